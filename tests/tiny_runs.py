"""A tiny source-only run on a folder dataset: the config the fault tests train, and a tiny backbone for
the runs that a test trains in its own process.

Importing this module registers the backbone ``tiny_test_net``. A process that trains or loads such a
run must import it first: a child ``plca`` process does when its environment names this module as a
plugin (:func:`plugin_env`); without that it keeps ``tiny_source_only_config``'s ResNet-18."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from plca.config import Config, build_config
from plca.models.registry import IMAGENET_RGB, BackboneContract, is_known_backbone, register_backbone
from plca.plugins import ENV_VAR

CLASSES = ["road", "car", "sky"]
#: two convolutions: a checkpoint of a tiny run is kilobytes where ResNet-18's is 90 MB
TINY_BACKBONE = "tiny_test_net"


class TinyTestNet(nn.Module):
    """Features at strides 4 and 8 (8 and 16 channels), batch norm as in a ResNet.

    Input ``(B, 3, H, W)``; output ``[(B, 8, H/4, W/4), (B, 16, H/8, W/8)]``.
    """

    out_channels = (8, 16)
    strides = (4, 8)

    def __init__(self, style: str | None = None) -> None:
        super().__init__()
        self.style = style
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        fine = F.relu(self.bn1(self.stem(x)))
        return [fine, F.relu(self.bn2(self.down(fine)))]


if not is_known_backbone(TINY_BACKBONE):
    register_backbone(TINY_BACKBONE, contract=BackboneContract(family="tiny test net",
                                                               normalization=IMAGENET_RGB))(TinyTestNet)


def tiny_source_only_config(root: Path, out: Path, run_name: str = "run", backbone: str = "resnet18",
                            **train_options) -> Config:
    """``backbone`` (ResNets in their ``pytorch`` style), 32 x 32 crops of ``root``'s ``train`` split,
    batch 2, 4 updates with a checkpoint after each, in ``out / run_name``; ``train_options`` override the
    ``train`` section."""
    model = {"backbone": backbone, **({"style": "pytorch"} if backbone.startswith("resnet") else {})}
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"},
                 "num_workers": 0},
        "model": model,
        "train": {"iters": 4, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "eval_every": 0,
                  "checkpoint_every": 1, "log_every": 1, "image_every": 0, "seed": 0, **train_options},
        "output_dir": str(out), "run_name": run_name, "device": "cpu",
    })


def tiny_in_process_config(root: Path, out: Path, run_name: str = "run", **train_options) -> Config:
    """:func:`tiny_source_only_config` with the tiny test backbone: for a run that only this process
    trains and loads (kilobyte checkpoints instead of ResNet-18's 90 MB)."""
    return tiny_source_only_config(root, out, run_name, TINY_BACKBONE, **train_options)


def plugin_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this module as a plugin: ``PLCA_PLUGINS`` names
    it and ``tests/`` and the repository lead ``PYTHONPATH``, so a child ``plca`` process (and its own
    children) can train and load runs of :data:`TINY_BACKBONE`."""
    env = dict(os.environ if base is None else base)
    tests = Path(__file__).resolve().parent
    paths = [str(tests), str(tests.parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, ENV_VAR: __name__, "PYTHONPATH": os.pathsep.join(paths)}
