"""Throughput and peak memory of one full training step of any method and segmentor (random data).

Default: PLCA on DeepLab-v2 (source + target forward, CE + Lovasz + LSR + association at both levels,
backward, optimiser update). Any registered backbone / head and method:

    python bench/train_step.py --size 730x730 --batch 2 --backbone resnet101 --device cuda --amp --impl efficient
    python bench/train_step.py --size 512x512 --batch 2 --backbone mit_b5 --head daformer --features head_embedding \
        --method self_training_plca --device cuda --amp
    python bench/train_step.py --size 129x129 --batch 1 --backbone resnet18            # CPU smoke run
    python bench/train_step.py --method self_training_plca --single-backward ...      # vs the staged backward
    python bench/train_step.py --size 1024x1024 --batch 2 --backbone mit_b5 --head daformer --features head_embedding \
        --method self_training_plca --hrda --device cuda --amp                          # HRDA (+ PLCA), real sizes

Random images and labels; no data loading. Prints images/s (source + target images per second)
and the peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the process's max RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from plca.config import build_config
from plca.engine.distributed import DistInfo
from plca.engine.optim import optimizer_from_config
from plca.engine.trainer import build_training_method
from plca.engine.update import update

PLCA_TERMS = {"lsr_weight": 0.01, "association": {"feature_weight": 0.1, "classifier_weight": 0.1}}
#: --method -> (method, loss section, plca section or None)
METHODS = {
    "source_only": ("source_only", {"lovasz_weight": 3.0}, None),
    "plca": ("plca", {"lovasz_weight": 3.0}, PLCA_TERMS),
    "self_training": ("self_training", {}, {}),
    "self_training_plca": ("self_training", {}, PLCA_TERMS),
}


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def run(size, batch, backbone, device, amp, impl, steps, warmup, channels_last, num_classes=19, head="deeplabv2",
        features="backbone_last", method_name="plca", staged_backward=True, hrda=False, mic=False) -> dict:
    torch.manual_seed(0)
    device = torch.device(device)
    name, loss, plca = METHODS[method_name]
    sections = {} if plca is None else {"plca": {**plca, "association": {**plca.get("association", {}), "impl": impl}}}
    # HRDA: the detail crop is half the crop (HRDA's 512 of 1024), its corner on the grid of output stride / 0.5
    hrda_section = {"enabled": True, "detail_crop_size": [size[0] // 2, size[1] // 2],
                    "attention_head": "daformer_attention" if head == "daformer" else None,
                    "crop_divisible": 8 if head in ("daformer", "segformer") else 16} if hrda else {}
    config = build_config({
        "method": name,
        "data": {"classes": [f"class{k}" for k in range(num_classes)], "source": {"root": "-"},
                 "target": {"root": "-"}},
        "model": {"backbone": backbone, "head": head, "features": features,
                  "style": "caffe" if backbone.startswith("resnet") else None, "hrda": hrda_section},
        "train": {"optimizer": "sgd" if name != "self_training" else "adamw", "lr": 1e-4,
                  "channels_last": channels_last, "crop_size": list(size)},
        "eval": {"test_time_aggregation": False},
        "loss": loss, **sections, "device": str(device),
        **({"self_training": {"staged_backward": staged_backward, "masking": {"enabled": mic}}}
           if name == "self_training" else {}),
    })
    method = build_training_method(config, device).train()
    optimizer = optimizer_from_config(method.trainable_module(), config.train)

    def batch_of(seed):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch, 3, *size), generator=g).float().to(device)
        labels = torch.randint(0, num_classes, (batch, *size), generator=g).to(device)
        labels[:, : size[0] // 10] = 255
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"image": images, "label": labels}

    source, target = batch_of(1), batch_of(2)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    logs: list[dict] = []

    def step():
        # the engine's update (early backward of finished parts included), bf16 autocast on CUDA with --amp
        update(method, optimizer, [(source, target)], 0, info, None, amp and device.type == "cuda", channels_last,
               on_logs=logs.append)
        return logs[-1]

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "torch.cuda.max_memory_allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "process max RSS"
    return {
        "size": list(size), "batch": batch, "backbone": backbone, "head": head, "features": features,
        "method": method_name, "device": str(device), "amp": amp, "impl": impl,
        "channels_last": channels_last, "seconds_per_step": seconds,
        "images_per_second": 2 * batch / seconds, "peak_mb": peak_mb, "peak_measured_as": peak_kind,
        "staged_backward": staged_backward if name == "self_training" else None, "hrda": hrda, "mic": mic,
        "loss": float(out["loss/total"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="730x730", type=parse_size)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backbone", default="resnet101",
                        help="any registered backbone, e.g. mit_b0, timm:convnext_atto")
    parser.add_argument("--head", default="deeplabv2", help="deeplabv2 | daformer | segformer")
    parser.add_argument("--features", default="backbone_last", choices=["backbone_last", "head_embedding"],
                        help="the map of the feature-level association")
    parser.add_argument("--method", default="plca", choices=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--impl", default="efficient", choices=["efficient", "dense"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--single-backward", action="store_true",
                        help="self-training: one backward of the summed loss (self_training.staged_backward=false)")
    parser.add_argument("--hrda", action="store_true",
                        help="HRDA's multi-resolution step (model.hrda): context view at 0.5, detail crop of half the size")
    parser.add_argument("--mic", action="store_true", help="self-training: MIC's masked consistency (one more forward)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = run(args.size, args.batch, args.backbone, args.device, args.amp, args.impl, args.steps, args.warmup,
                 args.channels_last, head=args.head, features=args.features, method_name=args.method,
                 staged_backward=not args.single_backward, hrda=args.hrda, mic=args.mic)
    print(f"{args.method}: {result['backbone']} + {args.head} (association on {args.features}) "
          f"{args.size[0]}x{args.size[1]} batch {args.batch} (+{args.batch} target) on {result['device']}, "
          f"amp={args.amp}, association={args.impl}, channels_last={args.channels_last}, hrda={args.hrda}, mic={args.mic}"
          + (f", staged_backward={result['staged_backward']}" if result["staged_backward"] is not None else ""))
    print(f"  {result['seconds_per_step']:.3f} s/step  {result['images_per_second']:.2f} images/s  "
          f"peak {result['peak_mb']:.0f} MB ({result['peak_measured_as']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
