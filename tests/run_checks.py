"""Checks and scaffolding shared by tests that train real tiny runs: the exact-resume check and the
tiny YAML config the ``plca sweep`` tests train."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from dataset_writers import write_folder
from plca.config import Config
from plca.engine.checkpoint import load_checkpoint
from plca.engine.trainer import train

CLASSES = ["road", "car", "sky"]


def assert_resume_is_exact(config: Callable[[str], Config], teacher_prefix: str, iters: int = 4,
                           stop_at: int = 2) -> tuple[object, dict]:
    """Train ``config("full")`` to its end and ``config("part")`` for ``stop_at`` updates, then resume the
    latter to its end; assert both end at ``iters`` with equal method states (tensor for tensor, keys
    included) that hold a key starting with ``teacher_prefix``. Returns the full run's result and state."""
    full = train(config("full"), progress=False)
    part = train(config("part"), max_steps=stop_at, progress=False)
    resumed = train(config("part"), resume=part.run_dir, progress=False)
    assert full.step == iters and resumed.step == iters
    a = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["method"]
    assert a.keys() == b.keys() and any(k.startswith(teacher_prefix) for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return full, a


def tiny_sweep_config(root: Path, iters: int = 4, backbone: str = "resnet18") -> Path:
    """``root/tiny.yaml``: source-only ``backbone`` (a ResNet in its ``pytorch`` style) on a 3-class folder
    dataset written to ``root/data`` (4 train, 2 val images of 32 x 48), ``iters`` updates of batch 2, a
    checkpoint at the end, no validation. A run of the tiny test backbone needs ``tiny_runs`` as a plugin
    in its ``plca`` processes (``tiny_runs.plugin_env``)."""
    write_folder(root / "data", classes_count=3, splits={"train": 4, "val": 2}, size=(32, 48), seed=0)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "method": "source_only",
        "data": {"classes": CLASSES, "num_workers": 0,
                 "source": {"format": "folder", "root": str(root / "data"), "split": "train"},
                 "val": {"format": "folder", "root": str(root / "data"), "split": "val"}},
        "model": {"backbone": backbone, **({"style": "pytorch"} if backbone.startswith("resnet") else {})},
        "train": {"iters": iters, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "eval_every": 0,
                  "checkpoint_every": iters, "log_every": 1, "image_every": 0},
        "device": "cpu",
    }))
    return path
