"""Time and peak memory per megapixel of whole-image inference, without and with PLCA's test-time
aggregation (bounded by ``eval.aggregation_max_pixels``, or exact at any size).

    python bench/test_time_aggregation.py                                   # the demo's network, 0.5 and 2 MP
    python bench/test_time_aggregation.py --sizes 512x1024,1024x2048,2048x4096 --modes off,bounded
    python bench/test_time_aggregation.py --modes off,bounded,exact --sizes 1024x2048 --json tta.json

The network is the CPU demo's (``plca demo``): EfficientNet-Lite0 with DAFormer's head at width 64,
whose 1/4 embedding (64 channels) is the map the aggregation reads, then 19 class probabilities
(``--backbone`` / ``--head`` / ``--head-width`` / ``--classes`` change it; ``resnet101`` +
``deeplabv2`` is the paper's, stride 8, 2048 channels, far slower). Weights are random: the cost of
inference and of the aggregation does not depend on them, and nothing is downloaded.

Modes: ``off`` (logits only), ``bounded`` (the aggregation exact up to ``--max-pixels`` feature pixels,
per window above: :mod:`plca.evaluation.aggregation`), ``exact`` (``eval.aggregation_max_pixels=null``).

One measurement = one (size, mode) in its own fresh subprocess (multiprocessing "spawn"), which builds
the network, runs one untimed 64 x 64 image (one-off kernel and allocator costs), then times
:func:`plca.tools.predict.predict_full` on a random ``--sizes`` image, ``--repeats`` times (median).
``peak_mb`` is the peak resident memory of that run above what the subprocess held before it
(``bench/association.py``'s :class:`PeakMemory`: Linux's VmHWM after a reset), i.e. the network's
activations, the aggregation and the full-size probabilities. ``per MP`` divides by the image's
megapixels. The estimate the aggregation prints before a map over the bound is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from association import PeakMemory  # noqa: E402  (the same peak-memory measure as the association bench)

MODES = ("off", "bounded", "exact")


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width)


def build_model(args: dict):
    from plca.models.segmentor import SegmentorSpec, build_segmentor

    torch.manual_seed(0)
    spec = SegmentorSpec(backbone=args["backbone"], head=args["head"], head_width=args["head_width"],
                         features="head_embedding" if args["head"] == "daformer" else "backbone_last")
    return build_segmentor(spec, args["classes"]).eval()


def worker(size: tuple[int, int], mode: str, args: dict, queue) -> None:
    """Subprocess body: time one (size, mode) and put its result (or its error) on ``queue``."""
    try:
        from plca.evaluation.aggregation import plan_aggregation
        from plca.tools.predict import InferenceOptions, predict_full

        torch.set_num_threads(args["threads"])
        model = build_model(args)
        options = InferenceOptions(test_time_aggregation=mode != "off",
                                   aggregation_max_pixels=None if mode == "exact" else args["max_pixels"])
        generator = torch.Generator().manual_seed(0)
        image = torch.randint(0, 256, (1, 3, *size), generator=generator, dtype=torch.uint8)
        with torch.no_grad():
            predict_full(model, image[:, :, :64, :64], options)
            features = model.extract_features(image[:, :, :, :].float())
        plan = plan_aggregation(features.shape[-2], features.shape[-1], options.aggregation_max_pixels)
        del features
        printed = io.StringIO()  # the estimate the aggregation prints, for the report
        peak = PeakMemory(torch.device("cpu"))
        seconds = []
        for _ in range(args["repeats"]):
            start = time.perf_counter()
            with contextlib.redirect_stdout(printed):
                predict_full(model, image, options)
            seconds.append(time.perf_counter() - start)
        estimate = next((line for line in printed.getvalue().splitlines() if "test-time aggregation" in line), None)
        megapixels = size[0] * size[1] / 1e6
        median = statistics.median(seconds)
        queue.put({"size": list(size), "mode": mode, "megapixels": megapixels, "seconds": median,
                   "seconds_per_mp": median / megapixels, "peak_mb": peak.peak_mb(),
                   "peak_mb_per_mp": peak.peak_mb() / megapixels, "feature_map": [plan.height, plan.width],
                   "windows": len(plan.windows) if mode != "off" else 0, "estimate": estimate,
                   "threads": torch.get_num_threads(), "memory_method": peak.method})
    except Exception as error:  # the parent reports it and goes on with the next measurement
        queue.put({"size": list(size), "mode": mode, "error": f"{type(error).__name__}: {error}"})


def measure(size: tuple[int, int], mode: str, args: dict) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=worker, args=(size, mode, args, queue))
    process.start()
    try:
        result = queue.get(timeout=args["timeout"])
    except Exception:
        result = {"size": list(size), "mode": mode, "error": f"no result within {args['timeout']} s"}
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
    return result


def row(result: dict) -> str:
    size = "x".join(map(str, result["size"]))
    if "error" in result:
        return f"| {size} | {result['mode']} | {result['error']} | | | |"
    fmap = "x".join(map(str, result["feature_map"]))
    return (f"| {size} ({result['megapixels']:.2f} MP) | {result['mode']} | {fmap}, {result['windows']} window(s) | "
            f"{result['seconds']:.2f} | {result['seconds_per_mp']:.2f} | {result['peak_mb']:.0f} / "
            f"{result['peak_mb_per_mp']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512x1024,1024x2048", help="image sizes HxW, comma-separated")
    parser.add_argument("--modes", default="off,bounded", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--max-pixels", type=int, default=32768, help="eval.aggregation_max_pixels (bounded)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--head", default="daformer")
    parser.add_argument("--head-width", type=int, default=64)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--timeout", type=float, default=900, help="seconds one measurement may take")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    modes = [mode for mode in args.modes.split(",") if mode]
    if unknown := [mode for mode in modes if mode not in MODES]:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    settings = {key: getattr(args, key) for key in ("max_pixels", "backbone", "head", "head_width", "classes",
                                                   "repeats", "threads", "timeout")}
    print(f"{args.backbone} + {args.head} (width {args.head_width}), {args.classes} classes, CPU, "
          f"{args.threads} thread(s), bound {args.max_pixels:,} feature pixels")
    print("| image | aggregation | feature map | seconds | s / MP | peak MB / per MP |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = []
    for size in map(parse_size, args.sizes.split(",")):
        for mode in modes:
            results.append(measure(size, mode, settings))
            print(row(results[-1]), flush=True)
    for result in results:
        if result.get("estimate"):
            print(f"  {'x'.join(map(str, result['size']))} {result['mode']}: {result['estimate']}")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
