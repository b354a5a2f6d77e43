"""A stopped run says why in the same words on stderr and in its ``train.log``, exits with the
status a shell expects (SIGTERM 143, SIGINT 130, a user error 2), and a run that could not make
its first update leaves no directory behind; ``data.on_error=skip`` never advises setting itself."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dataset_writers import write_folder
from plca.cli import main
from plca.engine.failure import TrainingError, TrainingInterrupted
from plca.engine.loader import ResumableBatchSampler
from plca.engine.stop_report import exit_status, stop_text

CLASSES = ["road", "car", "sky"]
BATCH = 2


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_folder(root, classes_count=3, splits={"train": 8}, size=(40, 56), seed=1)
    return root


def write_config(tmp_path, data, **train):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(data), "split": "train"},
                 "num_workers": 0, "on_error": train.pop("on_error", "raise")},
        "model": {"backbone": "resnet18", "style": "pytorch"},
        "train": {"iters": 10, "batch_size": BATCH, "crop_size": [32, 32], "lr": 0.01, "checkpoint_every": 1000,
                  "eval_every": 0, "log_every": 1, "image_every": 0, "seed": 0, **train},
        "output_dir": str(tmp_path / "runs"), "run_name": "run", "device": "cpu",
    }))
    return path


def start_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "plca.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def truncate(path):
    path.write_bytes(path.read_bytes()[:120])  # the header survives: only loading the pixels fails


def last_stderr_line(err):
    return [line for line in err.splitlines() if line.strip()][-1]


# ---------------------------------------------------------------------------------------------- exit statuses


def test_exit_status_is_128_plus_the_signal_and_the_text_names_it():
    term = TrainingInterrupted("stopped by SIGTERM at step 3", signal.SIGTERM)
    assert exit_status(term) == 143 and term.exit_code == 143
    assert exit_status(TrainingInterrupted("stopped", signal.SIGINT)) == 130
    assert exit_status(TrainingInterrupted("stopped on another process", None)) == 130
    assert exit_status(TrainingError("diverged")) == 2 and exit_status(ValueError("a bug")) == 1
    assert stop_text("train", term) == "plca train: stopped by SIGTERM at step 3"
    assert stop_text("train", TrainingError("diverged")) == "plca train: error: diverged"
    try:
        raise ValueError("a bug")
    except ValueError as error:
        assert stop_text("train", error).startswith("Traceback") and "ValueError: a bug" in stop_text("train", error)


# ---------------------------------------------------------------------------------------------- train.log


@pytest.mark.slow
def test_sigterm_exits_143_and_train_log_ends_with_the_stderr_line(data, tmp_path):
    proc = start_cli("train", str(write_config(tmp_path, data)), "--no-progress")
    scalars = tmp_path / "runs" / "run" / "scalars.jsonl"
    deadline = time.time() + 240
    while not (scalars.is_file() and scalars.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not log a step in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = last_stderr_line(err)
    assert line.startswith("plca train: stopped by SIGTERM at step ") and "Resume with: plca train --resume" in line
    log = (tmp_path / "runs" / "run" / "train.log").read_text().splitlines()
    assert log[-1].endswith(f"ERROR {line}")


def test_a_failure_at_a_later_step_is_the_last_line_of_train_log(data, tmp_path, capsys):
    """The second batch holds a sample that cannot be decoded (the check of headers passes it)."""
    second_batch = ResumableBatchSampler(8, BATCH, 0).epoch_batches(0)[1]
    first_batch = {index for _, index in ResumableBatchSampler(8, BATCH, 0).epoch_batches(0)[0]}
    bad = next(index for _, index in second_batch if index not in first_batch)
    truncate(data / "images" / f"train_{bad:04d}.png")
    config = write_config(tmp_path, data, iters=3)
    assert main(["train", str(config), "--no-progress", "--data-check", "headers"]) == 2
    err = capsys.readouterr().err
    text = err[err.index("plca train: error: "):].rstrip("\n")  # the error's lines, after the log's
    assert f"train_{bad:04d}.png" in text and "Training stopped at step 1; checkpoint saved" in text
    log = (tmp_path / "runs" / "run" / "train.log").read_text()
    assert log.rstrip("\n").endswith(f"ERROR {text}")


# ---------------------------------------------------------------------------------------------- on_error=skip


def test_skip_with_every_sample_bad_stops_before_training_without_advising_skip(data, tmp_path, capsys):
    for image in (data / "images").glob("train_*.png"):
        image.write_bytes(b"not an image at all")
    config = write_config(tmp_path, data, on_error="skip", iters=2)
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not one of its samples can be loaded" in err and "data.on_error=skip (set)" in err
    assert "Or set data.on_error=skip" not in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "run").exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_skip_with_every_sample_bad_and_no_check_stops_at_the_first_batch_leaving_nothing(data, tmp_path, capsys):
    for image in (data / "images").glob("train_*.png"):
        truncate(image)
    config = write_config(tmp_path, data, on_error="skip", iters=2)
    assert main(["train", str(config), "--no-progress", "--data-check", "none"]) == 2
    err = capsys.readouterr().err
    assert "none of its 8 samples could be loaded" in err and "before its first update; nothing was saved" in err
    assert "on_error=skip" not in err and "--resume" not in err and "Traceback" not in err
    assert list((tmp_path / "runs").iterdir()) == []
