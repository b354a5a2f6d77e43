"""What a run directory guarantees: unique, locked for its run's life, never damaged by a failed or
mismatched resume, never holding a diverged model, and saved on every exit that says it saved."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dataset_writers import write_folder
from tiny_runs import TINY_BACKBONE, plugin_env, tiny_in_process_config, tiny_source_only_config
from plca.config import ConfigError, save_config
from plca.engine.checkpoint import load_checkpoint
from plca.engine.run_dir import RunDirError, RunLock, create_unique, default_run_name
from plca.engine.trainer import TrainingError, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, classes_count=3, splits={"train": 8, "val": 12}, size=(40, 56), seed=2)
    return root


def run_cli(*args, **kwargs) -> subprocess.Popen:
    """``plca ARGS`` in a new process, which imports ``tiny_runs`` as a plugin (it may train the tiny backbone)."""
    env = plugin_env({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen([sys.executable, "-m", "plca.cli", *args], env=env, text=True, **kwargs)


def config_file(tmp_path: Path, data: Path, backbone: str = TINY_BACKBONE, **train_options) -> Path:
    """A tiny source-only run's config: the tiny test backbone unless ``backbone`` names another."""
    config = tiny_source_only_config(data, tmp_path / "runs", "run", backbone, **train_options)
    path = tmp_path / "config.yaml"
    save_config(config, path)
    return path


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------ unique, exclusive, locked


def test_default_run_names_differ_within_one_second(data, tmp_path):
    config = tiny_in_process_config(data, tmp_path, None)
    names = {default_run_name(config) for _ in range(50)}
    assert len(names) == 50


def test_creating_a_run_directory_is_exclusive(tmp_path):
    names = iter(["taken", "taken", "free"])
    (tmp_path / "taken").mkdir()
    assert create_unique(tmp_path, lambda: next(names)).name == "free"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        create_unique(tmp_path / "file", lambda: "a")


@pytest.mark.slow
def test_two_unnamed_runs_started_together_get_two_directories(data, tmp_path):
    config = config_file(tmp_path, data, iters=2)
    first = run_cli("train", str(config), "run_name=null", "--no-progress")
    second = run_cli("train", str(config), "run_name=null", "--no-progress")
    for proc in (first, second):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 2 and all((p / "checkpoints" / "final.pt").is_file() for p in runs)


def test_a_held_lock_names_its_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=rf"in use by PID {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire()  # released: free again


@pytest.mark.slow
def test_a_second_train_on_a_running_directory_stops_at_once_and_harms_nothing(data, tmp_path):
    # far more updates than any machine makes before it is stopped: the first run is still training when
    # the second starts; its output goes to a file (a full pipe would stall it)
    config = config_file(tmp_path, data, iters=10**6, checkpoint_every=1, log_every=10**6)
    with open(tmp_path / "first.err", "w") as first_err:
        first = run_cli("train", str(config), "--no-progress", stdout=subprocess.DEVNULL, stderr=first_err)
    run_dir, last = tmp_path / "runs" / "run", tmp_path / "runs" / "run" / "checkpoints" / "last.pt"
    try:
        wait_until(last.is_file, first)
        config_before = (run_dir / "config.yaml").read_bytes()
        started = time.time()
        second = run_cli("train", str(config), "train.lr=0.5", "--no-progress")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and time.time() - started < 60
        assert f"on host {socket.gethostname()}" in err and "in use by PID" in err and "Traceback" not in err
        assert (run_dir / "config.yaml").read_bytes() == config_before
        # the running one was not disturbed: it goes on saving, and stops cleanly when asked
        step = load_checkpoint(last)["step"]
        wait_until(lambda: load_checkpoint(last)["step"] > step, first)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143, (tmp_path / "first.err").read_text()[-3000:]
    assert load_checkpoint(last)["step"] > step and (run_dir / "config.yaml").read_bytes() == config_before


# ------------------------------------------------------------------ signals and failures save what they say


@pytest.mark.slow
def test_sigterm_during_a_validation_off_the_checkpoint_steps_saves_and_resumes(data, tmp_path):
    # ResNet-18: its validation lasts long enough for the signal to land in it
    config = config_file(tmp_path, data, "resnet18", iters=6, eval_every=2, checkpoint_every=1000)
    proc = run_cli("train", str(config), "--no-progress")
    run_dir = tmp_path / "runs" / "run"
    log = run_dir / "train.log"
    wait_until(lambda: log.is_file() and "step 2/6" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)  # step 2 is logged just before its validation starts
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # 128 + SIGTERM
    assert "checkpoint saved" in err
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 2 <= saved < 6
    command = err.split("Resume with: ")[1].split()[:4]
    assert command[:3] == ["plca", "train", "--resume"]
    resumed = run_cli(*command[1:], "--no-progress")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 6


@pytest.mark.slow
def test_an_out_of_memory_validation_saves_and_says_so_in_one_line(data, tmp_path, monkeypatch):
    import plca.engine.validation as validation

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(validation, "evaluate", out_of_memory)
    config = tiny_in_process_config(data, tmp_path, "oom", iters=4, eval_every=2, checkpoint_every=1000)
    config.data.val = config.data.source
    with pytest.raises(TrainingError) as info:
        train(config, progress=False)
    message = str(info.value)
    assert message.startswith("out of memory between updates at step 2") and "\n" not in message
    assert "Checkpoint of step 2 saved" in message and "plca train --resume" in message
    assert load_checkpoint(tmp_path / "oom" / "checkpoints" / "last.pt")["step"] == 2


# ------------------------------------------------------------------ resumes are checked before anything is written


@pytest.mark.slow
def test_an_incompatible_resume_is_refused_by_name_and_changes_nothing(data, tmp_path, capsys):
    from plca.cli import main

    part = train(tiny_in_process_config(data, tmp_path, "run", iters=4), max_steps=2, progress=False)
    before = snapshot(part.run_dir)
    for override, key in (("model.backbone=resnet34", "model.backbone"), ("data.classes=[a,b,c,d]", "data.classes"),
                          ("train.lr=0.5", "train.lr")):
        assert main(["train", "--resume", str(part.run_dir), override, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err, err
        assert snapshot(part.run_dir) == before
    assert main(["train", "--resume", str(part.run_dir), "--no-progress"]) == 0  # a plain resume still works
    assert load_checkpoint(part.run_dir / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.slow
def test_rerunning_a_named_run_with_other_hyperparameters_is_refused(data, tmp_path):
    train(tiny_in_process_config(data, tmp_path, "named", iters=4), max_steps=2, progress=False)
    before = snapshot(tmp_path / "named")
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 -> 0\.02"):
        train(tiny_in_process_config(data, tmp_path, "named", iters=4, lr=0.02), progress=False)
    assert snapshot(tmp_path / "named") == before
    # more iterations are allowed, with a warning that the LR schedule stretches
    result = train(tiny_in_process_config(data, tmp_path, "named", iters=5), progress=False)
    assert result.step == 5
    assert "poly LR schedule now decays over the new length" in (tmp_path / "named" / "train.log").read_text()


@pytest.mark.slow
def test_resuming_a_finished_run_says_it_is_finished(data, tmp_path, caplog):
    done = train(tiny_in_process_config(data, tmp_path, "done", iters=2), progress=False)
    before = snapshot(done.run_dir)
    again = train(tiny_in_process_config(data, tmp_path, "done", iters=2), resume=done.run_dir, progress=False)
    assert again.step == 2
    assert "already finished" in (done.run_dir / "train.log").read_text()
    assert {k: v for k, v in snapshot(done.run_dir).items() if k != "train.log"} == \
        {k: v for k, v in before.items() if k != "train.log"}


@pytest.mark.slow
def test_logs_hold_each_step_once_after_a_resume(data, tmp_path):
    part = train(tiny_in_process_config(data, tmp_path, "logs", iters=6, checkpoint_every=2), max_steps=3,
                 progress=False)  # steps 1-3 logged, checkpoint at 3
    # a kill after step 3 was logged but before its checkpoint would leave 3 logged and 2 saved: simulate it
    state = load_checkpoint(part.run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 3
    with open(part.run_dir / "scalars.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 4, "loss/total": 1.0}) + "\n")
    train(tiny_in_process_config(data, tmp_path, "logs", iters=6, checkpoint_every=2), progress=False)
    steps = [json.loads(line)["step"] for line in (part.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ a diverged model is never saved as good


@pytest.mark.slow
def test_a_huge_learning_rate_stops_the_run_before_a_diverged_checkpoint(data, tmp_path):
    config = tiny_in_process_config(data, tmp_path, "huge", iters=20, lr=1e12, checkpoint_every=1)
    with pytest.raises(TrainingError) as info:
        train(config, progress=False)
    message = str(info.value)
    assert "diverged" in message or "non-finite" in message
    last = tmp_path / "huge" / "checkpoints" / "last.pt"
    if last.is_file():
        state = load_checkpoint(last)
        assert all(torch.isfinite(v.float()).all() for v in state["model"].values() if v.is_floating_point())
        assert str(last) in message and f"step {state['step']}" in message
    else:
        assert "No checkpoint was written yet" in message


# ------------------------------------------------------------------ a batch without labels


def test_a_batch_without_a_labelled_pixel_gives_zero_loss_and_zero_gradient():
    from plca.methods.base import cross_entropy

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss, valid = cross_entropy(logits, torch.full((2, 4, 4), 255))
    assert loss.item() == 0.0 and valid.item() == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    labels = torch.randint(0, 3, (2, 4, 4))
    torch.testing.assert_close(cross_entropy(logits, labels)[0],
                               torch.nn.functional.cross_entropy(logits, labels))


@pytest.mark.slow
def test_unlabelled_batches_are_counted_apart_from_non_finite_steps(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    write_folder(root, classes_count=3, splits={"train": 4}, size=(40, 56), seed=0)
    for path in (root / "labels").glob("*.png"):  # every label all-ignore
        Image.fromarray(np.full((40, 56), 255, dtype=np.uint8)).save(path)
    result = train(tiny_in_process_config(root, tmp_path / "runs", "empty", iters=6, max_nonfinite_steps=2),
                   progress=False)
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert result.step == 6 and state["counters"]["skipped_steps"] == 0
    assert state["counters"]["unlabelled_batches"] == 6


def test_out_of_memory_in_the_first_update_says_what_to_lower_and_leaves_nothing(data, tmp_path, monkeypatch):
    import plca.engine.trainer as trainer

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer, "update", out_of_memory)
    with pytest.raises(TrainingError) as info:
        train(tiny_in_process_config(data, tmp_path, "big", iters=2), progress=False)
    message = str(info.value)
    assert message.startswith("out of memory during the update at step 0, before anything was trained")
    assert "train.crop_size" in message and "--resume" not in message
    assert not (tmp_path / "big").exists()
