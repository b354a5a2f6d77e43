"""Atomic checkpoints, safe loading, RNG state round trip, poly LR and parameter groups."""

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from plca.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state
from plca.engine.optim import build_optimizer, poly_lr, set_lr


def test_atomic_save_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    atomic_save({"model": {"w": torch.arange(3.0)}, "step": 4}, path)
    state = load_checkpoint(path)
    assert state["step"] == 4 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(2)}, "step": 1}, path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="previous checkpoint there, if any, is intact"):
        atomic_save({"model": {"w": torch.zeros(2)}, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(1000)}, "step": 1}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(path)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    atomic_save({"model": {}, "rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_poly_lr():
    assert poly_lr(0.1, 0, 100) == 0.1
    assert poly_lr(0.1, 50, 100, 0.9) == pytest.approx(0.1 * 0.5**0.9)
    assert poly_lr(0.1, 100, 100) == 0.0


class _TwoParts(nn.Module):
    """A model that says which of its parameters are the head's (as a Segmentor does)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.classifier = nn.Linear(2, 2), nn.Linear(2, 3)

    def parameter_parts(self):
        return {"backbone": list(self.backbone.named_parameters(prefix="backbone")),
                "head": list(self.classifier.named_parameters(prefix="classifier"))}


def test_head_lr_multiplier_groups():
    model = _TwoParts()
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4, head_lr_mult=10.0)
    set_lr(optimizer, 0.02)
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == 0.02 and head["lr"] == pytest.approx(0.2)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.classifier.parameters()}
    assert len(backbone["params"]) == 2 and optimizer.defaults["weight_decay"] == 5e-4
