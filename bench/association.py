"""Time and peak memory of the association loss (or of spatial aggregation alone), forward + backward,
dense reference against the memory-linear implementation, and how far apart their numbers are.

    python bench/association.py                                   # 92x183, cos at C=2048 and kl at 19 classes
    python bench/association.py --metric cos --size 92x183 --channels 2048 --json cos.json
    python bench/association.py --metric kl --classes 19 --size 32x64
    python bench/association.py --part aggregate --impls dense,efficient:blockwise,efficient:sdpa

What one measurement is: every impl gets its own **fresh subprocess** (multiprocessing "spawn", so
no impl inherits another's memory), which builds the random inputs (below) and waits. The parent
then has them run in turn, one at a time: ``--warmup`` untimed rounds, then ``--repeats`` timed
rounds of ``impl 1, impl 2, ...``, so that on a shared machine every impl sees about the same load
(the load average during its runs is reported). ``seconds`` is the median wall time of one forward +
backward (CUDA synchronised). ``peak_mb`` is the peak memory of the subprocess over all its runs
above what it held once its inputs were built:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` at that point
  (tensors only, after ``reset_peak_memory_stats``);
- CPU: the increase of the resident set size. Where ``/proc/self/clear_refs`` is writable (Linux), the
  kernel's high-water mark VmHWM is reset to the current RSS once the inputs are built, and the peak
  is VmHWM at the end minus that RSS: everything the runs touched (tensors, autograd buffers, BLAS /
  OpenMP workspaces). Elsewhere it is ``ru_maxrss`` minus the RSS at that point, an upper bound (it also
  counts any higher peak while the inputs were built). CPU tensors are malloc'ed, and large blocks go
  back to the OS when freed, so the RSS follows the live tensors.

Metrics and channels. ``cos`` runs on features of ``--channels`` channels (the backbone's last map,
2048 for ResNet-101); ``kl`` runs on softmax probabilities over ``--classes`` classes (19 for
Cityscapes), so its channel count is ``--classes`` and ``--channels`` does not apply to it. Labels
take values in ``[0, --classes)``.

Inputs (seeded, identical in every subprocess): source and target of the same ``--size`` (so
``N = M = H * W``); each image has a blocky random class map (8 x 8 pixel cells, 5% of the source
pixels ignored), and each pixel's features are its class's embedding plus noise (cos) or the softmax
of 3 * one-hot(class) plus noise (kl), so that most cycles are positive. The efficient backward only
visits positive rows; random labels would make it look cheaper than in training.

``max_rel_diff`` compares every impl with the first one (dense): the max over the loss and the
source and target gradients of ``max|a - b| / max(max|a|, max|b|)``; ``rel_diff`` breaks it down.

Impls: ``dense`` (reference: materialises N x M matrices), ``efficient`` (the default backend of
:mod:`plca.losses.association_efficient`), ``efficient:blockwise`` / ``efficient:sdpa`` (its spatial
aggregation forced to one backend). ``--part aggregate`` measures spatial aggregation of the target
alone, its loss being ``sum(aggregated * w)`` with a fixed random ``w``.

Memory of dense: the loss keeps about ten N x M float32 matrices alive at its peak (similarities,
standardised logits, log-softmaxes, their gradients); at 92x183 one is 16836^2 * 4 B = 1.06 GiB, so
dense needs about 11 GiB (more for kl, whose way back is a second matrix, not a transpose). The
script prints this estimate and the memory available and runs dense anyway: if the OS kills the
subprocess, its row says so and the others still run.

JSON (``--json``): with one metric ``{"dense": {"seconds", "peak_mb", ...}, "efficient": {...},
"max_rel_diff": float, "ratios": {...}, "settings": {...}}``; with ``--metric both`` an object
``{"cos": <that>, "kl": <that>}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

IMPL_CHOICES = ("dense", "efficient", "efficient:blockwise", "efficient:sdpa")
CELL = 8  # pixels per side of a class cell in the random label maps
IGNORE_FRACTION = 0.05
DENSE_MATRICES = 10  # N x M float32 matrices alive at dense's peak (estimate, see the docstring)
IDLE_SECONDS = 0.5  # pause before each run: OpenMP threads spin-wait for a while after a parallel region


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration; everything a worker subprocess needs to rebuild the inputs."""

    part: str  # "loss" or "aggregate"
    metric: str  # "cos" or "kl"
    height: int
    width: int
    channels: int  # channels of the maps actually used (features for cos, classes for kl)
    classes: int
    batch: int
    aggregate: bool
    alpha: float
    repeats: int
    warmup: int
    device: str
    threads: int | None
    seed: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


# --------------------------------------------------------------------------- inputs


def label_maps(settings: Settings, generator: torch.Generator) -> Tensor:
    """``(B, H, W)`` int64: one random class per ``CELL x CELL`` cell."""
    cells_h, cells_w = -(-settings.height // CELL), -(-settings.width // CELL)
    coarse = torch.randint(0, settings.classes, (settings.batch, cells_h, cells_w), generator=generator)
    full = coarse.repeat_interleave(CELL, dim=1).repeat_interleave(CELL, dim=2)
    return full[:, :settings.height, :settings.width].contiguous()


def class_maps(labels: Tensor, settings: Settings, generator: torch.Generator) -> Tensor:
    """``(B, C, H, W)`` float32 maps whose pixels look like their class: features or probabilities."""
    b, h, w = labels.shape
    noise = torch.randn(b, settings.channels, h, w, generator=generator)
    if settings.metric == "cos":
        embedding = torch.randn(settings.classes, settings.channels, generator=generator)
        return embedding[labels].permute(0, 3, 1, 2) + 1.5 * noise
    one_hot = torch.nn.functional.one_hot(labels, settings.classes).permute(0, 3, 1, 2).float()
    return (3 * one_hot + noise).softmax(dim=1)


def make_inputs(settings: Settings) -> dict[str, Tensor]:
    """Source / target maps, source labels (with ignored pixels) and the aggregate-part weight ``w``."""
    generator = torch.Generator().manual_seed(settings.seed)
    source_labels = label_maps(settings, generator)
    target_labels = label_maps(settings, generator)
    source = class_maps(source_labels, settings, generator)
    target = class_maps(target_labels, settings, generator)
    source_labels[torch.rand(source_labels.shape, generator=generator) < IGNORE_FRACTION] = 255
    weight = torch.randn(target.shape, generator=generator)
    device = torch.device(settings.device)
    return {"source": source.to(device).requires_grad_(True), "target": target.to(device).requires_grad_(True),
            "labels": source_labels.to(device), "weight": weight.to(device)}


# --------------------------------------------------------------------------- one run


def forward_backward(impl: str, inputs: dict[str, Tensor], settings: Settings) -> dict[str, Tensor | float]:
    """One forward + backward of ``impl``: loss, gradients and, for the loss part, the positive ratio.

    The inputs are leaves that require grad (no copy, which would count in the peak); their ``.grad``
    is reset first, so each run allocates its own gradients, as a training step does."""
    from plca.losses.association import associate, check_inputs, spatial_aggregate
    from plca.losses.association_efficient import efficient_associate, efficient_spatial_aggregate

    source, target = inputs["source"], inputs["target"]
    source.grad = target.grad = None
    backend = impl.partition(":")[2]
    result: dict[str, Tensor | float] = {}
    if settings.part == "aggregate":
        if backend:
            aggregated = efficient_spatial_aggregate(target, settings.metric, settings.alpha, backend=backend)
        else:
            aggregated = spatial_aggregate(target, settings.metric, settings.alpha, impl=impl)
        loss = (aggregated * inputs["weight"]).sum()
        loss.backward()
        result["grad_target"] = target.grad
    else:
        labels = inputs["labels"]
        if backend:
            check_inputs(source, target, labels, None, settings.metric, "efficient", settings.alpha)
            out = efficient_associate(source, target, labels, settings.metric, settings.aggregate, settings.alpha,
                                      255, None, aggregate_backend=backend)
        else:
            out = associate(source, target, labels, metric=settings.metric, aggregate=settings.aggregate,
                            alpha=settings.alpha, impl=impl)
        loss = out.loss
        loss.backward()
        result["positive_ratio"] = float(out.positive_ratio)
        result["grad_source"] = source.grad if source.grad is not None else torch.zeros_like(source)
        result["grad_target"] = target.grad if target.grad is not None else torch.zeros_like(target)
    result["loss"] = loss.detach()
    return result


# --------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MB, or None where there is no procfs."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the moment of construction; see the module docstring for what it counts."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device) / 2**20
            self.method = "torch.cuda.max_memory_allocated"
        else:
            reset = _reset_peak_rss()
            rss = _status_mb("VmRSS")
            self.base = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.method = "VmHWM - VmRSS (clear_refs reset)" if reset else "ru_maxrss - VmRSS (upper bound)"
            self.reset = reset

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        hwm = _status_mb("VmHWM") if self.reset else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return max(hwm - self.base, 0.0)


# --------------------------------------------------------------------------- worker


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def worker(impl: str, settings_dict: dict, out_path: str, connection) -> None:
    """Subprocess body for one impl: build the inputs, start the peak-memory count, then serve the
    parent's commands: ``"run"`` (one timed forward + backward; answers its seconds) until ``"finish"``
    (``torch.save`` the peak and the last run's loss and gradients to ``out_path``; answers "done")."""
    settings = Settings(**settings_dict)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    inputs = make_inputs(settings)
    memory = PeakMemory(device)
    connection.send("ready")
    result: dict[str, Tensor | float] = {}
    while connection.recv() == "run":
        result.clear()  # free the previous run's gradients before the next run
        _synchronise(device)
        start = time.perf_counter()
        result.update(forward_backward(impl, inputs, settings))
        _synchronise(device)
        connection.send(time.perf_counter() - start)
    record = {"peak_mb": memory.peak_mb(), "peak_measured_as": memory.method, "threads": torch.get_num_threads(),
              "loss": float(result["loss"])}
    if "positive_ratio" in result:
        record["positive_ratio"] = result["positive_ratio"]
    tensors = {key: value.cpu() for key, value in result.items() if isinstance(value, Tensor)}
    torch.save({"record": record, "tensors": tensors}, out_path)
    connection.send("done")


class Worker:
    """A :func:`worker` process for one impl, spawned fresh (no memory inherited from the parent)."""

    def __init__(self, impl: str, settings: Settings, scratch: Path):
        self.impl, self.error = impl, None
        self.out_path = scratch / f"{settings.metric}-{impl.replace(':', '-')}.pt"
        context = mp.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=worker, args=(impl, asdict(settings), str(self.out_path), child))
        self.process.start()
        child.close()
        self._receive()

    def _receive(self):
        try:
            return self.connection.recv()
        except EOFError:  # the process died
            self.process.join()
            code = self.process.exitcode
            self.error = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            if code == -9:
                self.error += " (probably out of memory)"
            return None

    def run(self) -> float | None:
        """One timed forward + backward; None once the process has died."""
        if self.error:
            return None
        self.connection.send("run")
        return self._receive()

    def finish(self) -> tuple[dict, dict[str, Tensor] | None]:
        """The record (peak, loss, ...) and the last run's tensors; an error record if it died."""
        if not self.error:
            self.connection.send("finish")
            self._receive()
        self.process.join()
        if self.error or not self.out_path.exists():
            return {"error": self.error or f"exit code {self.process.exitcode}"}, None
        saved = torch.load(self.out_path, weights_only=True)
        self.out_path.unlink()
        return saved["record"], saved["tensors"]


def measure(impls: list[str], settings: Settings, scratch: Path) -> dict[str, tuple[dict, dict[str, Tensor] | None]]:
    """Start one :class:`Worker` per impl, then run them in turn (``impl 1, impl 2, impl 1, ...``) so
    that all impls see the same machine load; only one runs at a time. Warm-up runs are not timed."""
    workers = {}
    for impl in impls:
        if impl == "dense" and settings.device == "cpu":
            available = available_gb()
            note = f", {available:.1f} GiB available now" if available is not None else ""
            print(f"  dense: estimated peak about {estimate_dense_gb(settings):.1f} GiB{note}", flush=True)
        workers[impl] = Worker(impl, settings, scratch)
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    loads: dict[str, list[float | None]] = {impl: [] for impl in impls}
    for index in range(settings.warmup + settings.repeats):
        kind = "warm-up" if index < settings.warmup else "timed"
        for impl, runner in workers.items():
            time.sleep(IDLE_SECONDS)  # let the previous worker's OpenMP threads stop spinning
            loads[impl].append(_load_average())
            elapsed = runner.run()
            if elapsed is None:
                print(f"  {impl}: {runner.error}", flush=True)
                continue
            print(f"  {impl}: {kind} run {elapsed:.2f} s", flush=True)
            if index >= settings.warmup:
                seconds[impl].append(elapsed)
    results = {}
    for impl, runner in workers.items():
        record, tensors = runner.finish()
        if "error" not in record:
            record = {"seconds": statistics.median(seconds[impl]), "all_seconds": seconds[impl], **record,
                      "load_average": [min(v for v in loads[impl] if v is not None) if any(loads[impl]) else None,
                                       max(v for v in loads[impl] if v is not None) if any(loads[impl]) else None]}
        results[impl] = (record, tensors)
    return results


# --------------------------------------------------------------------------- comparison and report


def rel_diff(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max(max|a|, max|b|)`` in float64 (0 for two zero tensors)."""
    a, b = a.double(), b.double()
    scale = max(a.abs().max().item(), b.abs().max().item())
    return 0.0 if scale == 0 else (a - b).abs().max().item() / scale


def estimate_dense_gb(settings: Settings) -> float:
    """Rough peak of the dense impl: ``DENSE_MATRICES`` N x M float32 matrices (one pair at a time)."""
    if settings.part == "aggregate":
        return 5 * settings.pixels**2 * 4 / 2**30
    return DENSE_MATRICES * settings.pixels**2 * 4 / 2**30


def available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def benchmark(impls: list[str], settings: Settings) -> dict:
    """Measure every impl; ratios and relative differences against the first one."""
    with tempfile.TemporaryDirectory(prefix="bench-association-") as scratch:
        measured = measure(impls, settings, Path(scratch))
    records = {impl: record for impl, (record, _) in measured.items()}
    tensors = {impl: values for impl, (_, values) in measured.items()}
    reference = impls[0]
    result: dict = dict(records)
    ratios: dict[str, dict[str, float]] = {}
    diffs: dict[str, dict[str, float]] = {}
    for impl in impls[1:]:
        if tensors[impl] is None or tensors[reference] is None:
            continue
        ratios[f"{impl}/{reference}"] = {key: records[impl][key] / records[reference][key]
                                         for key in ("seconds", "peak_mb") if records[reference][key] > 0}
        diffs[impl] = {key: rel_diff(tensors[impl][key], tensors[reference][key]) for key in tensors[impl]}
    result["ratios"] = ratios
    result["rel_diff"] = diffs
    compared = [value for per_impl in diffs.values() for value in per_impl.values()]
    result["max_rel_diff"] = max(compared) if compared else None
    result["settings"] = {**asdict(settings), "impls": impls, "torch": torch.__version__}
    return result


def print_table(result: dict, settings: Settings) -> None:
    what = "association loss" if settings.part == "loss" else "spatial aggregation"
    n = settings.pixels
    aggregate = f", aggregate {'on' if settings.aggregate else 'off'}" if settings.part == "loss" else ""
    records = [record for record in result.values() if isinstance(record, dict) and "threads" in record]
    threads = records[0]["threads"] if records else "?"
    print(f"\n{what}, metric {settings.metric}, {settings.height}x{settings.width} (N = M = {n}), "
          f"C = {settings.channels}, batch {settings.batch}{aggregate}, {settings.device}, {threads} threads, "
          f"forward + backward, median of {settings.repeats} after {settings.warmup} warm-up")
    print(f"{'impl':<26}{'seconds':>10}{'peak MB':>11}  notes")
    impls = result["settings"]["impls"]
    for impl in impls:
        record = result[impl]
        if "error" in record:
            print(f"{impl:<26}{'-':>10}{'-':>11}  {record['error']}")
            continue
        notes = [f"positive ratio {record['positive_ratio']:.2f}"] if "positive_ratio" in record else []
        if None not in record["load_average"]:
            notes.append("load average %.1f-%.1f" % tuple(record["load_average"]))
        note = ", ".join(notes)
        print(f"{impl:<26}{record['seconds']:>10.2f}{record['peak_mb']:>11.0f}  {note}")
    for name, ratio in result["ratios"].items():
        print(f"{name:<26}{ratio.get('seconds', float('nan')):>10.3f}{ratio.get('peak_mb', float('nan')):>11.3f}")
    for impl, diffs in result["rel_diff"].items():
        parts = ", ".join(f"{key} {value:.1e}" for key, value in diffs.items())
        print(f"max_rel_diff {impl} vs {impls[0]}: {max(diffs.values()):.1e} ({parts})")
    if impls and "error" not in result[impls[0]]:
        print(f"peak measured as {result[impls[0]]['peak_measured_as']}")


# --------------------------------------------------------------------------- command line


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW, got {text!r}") from None
    return height, width


def parse_impls(text: str) -> list[str]:
    impls = [impl.strip() for impl in text.split(",") if impl.strip()]
    unknown = [impl for impl in impls if impl not in IMPL_CHOICES]
    if unknown or not impls:
        raise argparse.ArgumentTypeError(f"impls must be a comma-separated subset of {IMPL_CHOICES}, got {text!r}")
    return impls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=(92, 183),
                        help="HxW of both source and target maps (default 92x183, the 1/8 map of 730x1460)")
    parser.add_argument("--channels", type=int, default=2048, help="feature channels for cos (default 2048)")
    parser.add_argument("--classes", type=int, default=19,
                        help="classes: the channels of the kl probabilities and the label range (default 19)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--metric", choices=["cos", "kl", "both"], default="both")
    parser.add_argument("--aggregate", action=argparse.BooleanOptionalAction, default=True,
                        help="spatial aggregation of the target before the association (default on)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--part", choices=["loss", "aggregate"], default="loss",
                        help="the whole association loss, or spatial aggregation alone")
    parser.add_argument("--impls", type=parse_impls, default=["dense", "efficient"],
                        help=f"comma-separated, first one is the reference; from {', '.join(IMPL_CHOICES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    metrics = ["cos", "kl"] if args.metric == "both" else [args.metric]
    results = {}
    for metric in metrics:
        settings = Settings(part=args.part, metric=metric, height=args.size[0], width=args.size[1],
                            channels=args.channels if metric == "cos" else args.classes, classes=args.classes,
                            batch=args.batch, aggregate=args.aggregate, alpha=args.alpha, repeats=args.repeats,
                            warmup=args.warmup, device=args.device, threads=args.threads, seed=args.seed)
        print(f"{metric}: {settings.part}, {settings.height}x{settings.width}, C = {settings.channels}", flush=True)
        results[metric] = benchmark(args.impls, settings)
        print_table(results[metric], settings)
        sys.stdout.flush()
    if args.json:
        payload = results[metrics[0]] if len(metrics) == 1 else results
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
