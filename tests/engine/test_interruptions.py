"""Killed, terminated and numerically broken runs lose nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dataset_writers import write_folder
from plca.engine.checkpoint import load_checkpoint
from plca.engine.trainer import TrainingError, train
from plca.methods.source_only import SourceOnly

CLASSES = ["road", "car", "sky"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, classes_count=3, splits={"train": 8, "val": 2}, size=(40, 56), seed=1)
    path = root / "config.yaml"
    path.write_text(json.dumps({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"},
                 "val": {"format": "folder", "root": str(root), "split": "val"}, "num_workers": 0},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "train": {"iters": 10, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "checkpoint_every": 1,
                  "eval_every": 0, "log_every": 1, "seed": 0},
        "device": "cpu",
    }))
    return path


def run_cli(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "plca.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def checkpoint_step(run_dir):
    try:
        return load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    except Exception:  # not written yet, or being replaced
        return -1


def wait_for_step(run_dir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while checkpoint_step(run_dir) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.05)


def final_weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli("train", str(config_file), f"output_dir={out}", "run_name=full", "--no-progress")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return final_weights(out / "full")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches(config_file, uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    proc = run_cli("train", str(config_file), f"output_dir={tmp_path}", "run_name=killed", "--no-progress")
    kill_after = random.Random().randint(1, 7)
    wait_for_step(run_dir, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    stopped_at = checkpoint_step(run_dir)
    assert 1 <= stopped_at < 10, stopped_at
    resumed = run_cli("train", "--resume", str(run_dir), "--no-progress")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in err
    assert_same_weights(final_weights(run_dir), uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(config_file, uninterrupted, tmp_path):
    run_dir = tmp_path / "term"
    proc = run_cli("train", str(config_file), f"output_dir={tmp_path}", "run_name=term", "--no-progress",
                   "train.checkpoint_every=1000")
    deadline = time.time() + 240
    while not (run_dir / "scalars.jsonl").is_file() or not (run_dir / "scalars.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM
    assert "checkpoint saved" in err and "--resume" in err
    step = checkpoint_step(run_dir)  # checkpoint_every=1000: only the signal wrote it
    assert 1 <= step < 10
    resumed = run_cli("train", "--resume", str(run_dir), "--no-progress")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_weights(final_weights(run_dir), uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_to_the_process_group_with_loader_workers_saves_and_resumes_exactly(config_file, uninterrupted,
                                                                                  tmp_path, signum):
    """Ctrl-C in a terminal, or a scheduler stopping a job, signals every process of the group, the
    DataLoader workers included: the run still saves a checkpoint and resumes exactly."""
    run_dir = tmp_path / "group"
    proc = run_cli("train", str(config_file), f"output_dir={tmp_path}", "run_name=group", "--no-progress",
                   "train.checkpoint_every=1000", "data.num_workers=2", start_new_session=True)
    deadline = time.time() + 240
    while not (run_dir / "scalars.jsonl").is_file() or not (run_dir / "scalars.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "checkpoint saved" in err and "Traceback" not in err
    step = checkpoint_step(run_dir)
    assert 1 <= step < 10
    resumed = run_cli("train", "--resume", str(run_dir), "--no-progress")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_weights(final_weights(run_dir), uninterrupted)  # workers or not, the same batches


def _tiny_config(config_file, tmp_path, **train):
    from plca.config import load_config

    overrides = [f"output_dir={tmp_path}"] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(config_file, overrides)


def _poisoned(bad_calls):
    """A training_step that returns a NaN loss on the given (0-based) call numbers."""
    original = SourceOnly.training_step
    calls = {"n": 0}

    def step(self, model, source, target=None):
        output = original(self, model, source, target)
        if calls["n"] in bad_calls:
            output.loss = output.loss * float("nan")
        calls["n"] += 1
        return output

    return step


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(config_file, tmp_path, monkeypatch):
    monkeypatch.setattr(SourceOnly, "training_step", _poisoned({1}))
    result = train(_tiny_config(config_file, tmp_path, iters=3), progress=False)
    assert result.step == 3 and result.metrics["skipped_steps"] == 1
    for value in result.model.state_dict().values():
        assert torch.isfinite(value.float()).all()


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_the_run_with_last_good_checkpoint(config_file, tmp_path, monkeypatch):
    monkeypatch.setattr(SourceOnly, "training_step", _poisoned({2, 3, 4}))
    config = _tiny_config(config_file, tmp_path, iters=8, max_nonfinite_steps=3)
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        train(config, progress=False)
    run_dir = next(tmp_path.iterdir())
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
