"""Under DDP a SIGTERM that reaches one process only still stops every process at the same step, with a
checkpoint, instead of leaving the others waiting forever in a collective."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset_writers import write_folder
from processes import free_port
from tiny_runs import tiny_source_only_config
from plca.config import save_config
from plca.engine.checkpoint import load_checkpoint


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 8}, size=(40, 56), seed=0)
    config = tiny_source_only_config(data, tmp_path / "runs", "ddp", iters=500, checkpoint_every=1000,
                                     collective_timeout_s=60)
    config_path = tmp_path / "config.yaml"
    save_config(config, config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "-m", "plca.cli", "train", str(config_path), "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "ddp"
    deadline = time.time() + 240
    while not ((run_dir / "scalars.jsonl").is_file() and (run_dir / "scalars.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.1)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # one rank only
    started = time.time()
    _, err = proc.communicate(timeout=180)
    assert time.time() - started < 120
    assert proc.returncode != 0
    assert "checkpoint saved" in err
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 2 <= state["step"] < 500
    assert len(state["rng"]) == 2  # written by both processes together
