"""A tiny source-only run on a folder dataset: the config the fault tests train."""

from __future__ import annotations

from pathlib import Path

from plca.config import Config, build_config

CLASSES = ["road", "car", "sky"]


def tiny_source_only_config(root: Path, out: Path, run_name: str = "run", **train_options) -> Config:
    """ResNet-18, 32 x 32 crops of ``root``'s ``train`` split, batch 2, 4 updates with a checkpoint
    after each, in ``out / run_name``; ``train_options`` override the ``train`` section."""
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"},
                 "num_workers": 0},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "train": {"iters": 4, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "eval_every": 0,
                  "checkpoint_every": 1, "log_every": 1, "image_every": 0, "seed": 0, **train_options},
        "output_dir": str(out), "run_name": run_name, "device": "cpu",
    })
