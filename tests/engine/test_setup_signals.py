"""SIGINT / SIGTERM during a run's set-up (after ``train.log`` is opened, before the first update):
the run stops at once with the same line on stderr and at the end of ``train.log``, exit status
130 / 143, and the checkpoint being resumed is left as it was.

The set-up is held deterministically: the training process runs a wrapper that replaces the dataset
check with a wait that never ends and drops a marker file when it starts; the test signals once the
marker is there (and, for a resume, once ``train.log`` has the resume line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset_writers import write_folder
from plca.config import save_config
from plca.engine.checkpoint import load_checkpoint
from plca.engine.trainer import train
from tiny_runs import tiny_in_process_config

TESTS = Path(__file__).resolve().parent.parent

# argv: MARKER then plca's arguments; the tiny backbone is registered as in the test process
HOLDING_WRAPPER = f"""
import pathlib, sys, time
sys.path.insert(0, {str(TESTS)!r})
import tiny_runs  # noqa: F401 - registers the tiny backbone
import plca.engine.trainer as trainer

def hold(*args, **kwargs):
    pathlib.Path(sys.argv[1]).write_text("checking")
    while True:
        time.sleep(0.01)

trainer.check_run_datasets = hold
from plca.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("setup_signal_data")
    write_folder(root, classes_count=3, splits={"train": 4}, size=(40, 56), seed=0)
    return root


def start_held(marker: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", HOLDING_WRAPPER, str(marker), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{what} did not happen in time"
        time.sleep(0.02)


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_set_up_of_a_resumed_run_ends_train_log_with_the_stderr_line(data, tmp_path, sig,
                                                                                         status):
    run_dir = train(tiny_in_process_config(data, tmp_path / "runs"), max_steps=1, progress=False).run_dir
    saved = (run_dir / "checkpoints" / "last.pt").read_bytes()
    log = run_dir / "train.log"
    marker = tmp_path / "checking"
    proc = start_held(marker, "train", "--resume", str(run_dir), "--no-progress")
    wait_until(lambda: marker.is_file() and "resumed from" in log.read_text(), proc, "the resumed set-up")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    line = last_line(err)
    assert line.startswith(f"plca train: stopped by {signal.Signals(sig).name} during the set-up, before the first "
                           f"update; the checkpoint of step 1 is unchanged. Resume with: plca train --resume"), err
    assert "Traceback" not in err
    assert last_line(log.read_text()).endswith(f"ERROR {line}")
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == saved
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 1


@pytest.mark.slow
def test_a_signal_during_the_set_up_of_a_new_run_says_nothing_was_saved_and_leaves_no_directory(data, tmp_path):
    config = tiny_in_process_config(data, tmp_path / "runs")
    config_file = tmp_path / "config.yaml"
    save_config(config, config_file)
    marker = tmp_path / "checking"
    proc = start_held(marker, "train", str(config_file), "--no-progress")
    wait_until(marker.is_file, proc, "the set-up")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert last_line(err) == ("plca train: stopped by SIGTERM during the set-up, before the first update; nothing "
                              "was saved: run the same command again"), err
    assert not (tmp_path / "runs" / "run").exists()
