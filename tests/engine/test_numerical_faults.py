"""Numerical faults during training: a non-finite gradient behind a finite
loss is caught too, a skipped step leaves no trace in the model (BatchNorm statistics included),
and the counts survive a resume. (NaN losses and the stop after too many in a row:
tests/engine/test_interruptions.py.)"""

import pytest
import torch

from dataset_writers import write_folder
from tiny_runs import tiny_in_process_config
from plca.engine.checkpoint import load_checkpoint
from plca.engine.trainer import train
from plca.methods.source_only import SourceOnly


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, classes_count=3, splits={"train": 8}, size=(40, 56), seed=1)
    return root


def tiny_config(root, out, run_name, **train_options):
    return tiny_in_process_config(root, out, run_name, **{"checkpoint_every": 100, **train_options})


class _InfiniteGradient(torch.autograd.Function):
    """Adds 0 to the loss (it stays finite) but sends +inf back to the input."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros((), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return torch.full((), float("inf"))


def _poison(monkeypatch, bad_calls, how):
    original = SourceOnly.training_step
    calls = {"n": 0}

    def step(self, source, target, step_index):
        bad = calls["n"] in bad_calls
        calls["n"] += 1
        if bad and how == "nan_input":  # NaN through the whole forward: BatchNorm statistics too
            source = {**source, "image": source["image"] * float("nan")}
        output = original(self, source, target, step_index)
        if bad and how == "inf_gradient":
            weight = next(self.student.parameters())
            output.loss = output.loss + _InfiniteGradient.apply(weight.sum())
        return output

    monkeypatch.setattr(SourceOnly, "training_step", step)


def _parameters_after(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


@pytest.mark.slow
def test_infinite_gradient_behind_a_finite_loss_is_skipped_and_counted(data, tmp_path, monkeypatch):
    clean = train(tiny_config(data, tmp_path, "clean", iters=1), progress=False)
    _poison(monkeypatch, {1}, "inf_gradient")
    result = train(tiny_config(data, tmp_path, "poisoned", iters=2), progress=False)
    assert result.step == 2
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert state["counters"]["skipped_steps"] == 1
    # the skipped step changed nothing, BatchNorm statistics included: the model is the clean one-step model
    expected = _parameters_after(clean)
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.slow
def test_nan_forward_does_not_leave_nan_in_batchnorm_statistics(data, tmp_path, monkeypatch):
    _poison(monkeypatch, {1}, "nan_input")
    result = train(tiny_config(data, tmp_path, "nan", iters=3), progress=False)
    assert result.step == 3
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert state["counters"]["skipped_steps"] == 1
    running = {k: v for k, v in state["model"].items() if "running_" in k}
    assert running and all(torch.isfinite(v).all() for v in running.values())
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


@pytest.mark.slow
def test_skipped_step_count_survives_a_resume(data, tmp_path, monkeypatch):
    _poison(monkeypatch, {0}, "inf_gradient")
    part = train(tiny_config(data, tmp_path, "resumed", iters=3), max_steps=1, progress=False)
    monkeypatch.undo()
    result = train(tiny_config(data, tmp_path, "resumed", iters=3), progress=False)  # resumes by run name
    assert result.step == 3 and result.run_dir == part.run_dir
    assert load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["counters"]["skipped_steps"] == 1
