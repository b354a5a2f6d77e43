"""Two CPU processes under torchrun (gloo): PLCA stays in sync; staged self-training backward averages gradients."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_writers import write_folder
from processes import free_port


@pytest.mark.slow
def test_two_process_ddp_stays_in_sync(tmp_path):
    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 8, "val": 3}, size=(40, 56), seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    worker = Path(__file__).parent / "ddp_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(worker), str(data), str(tmp_path / "runs")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / "runs" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in results)
    assert results[0]["run_dir"] == results[1]["run_dir"]  # one shared run directory
    assert all(r["max_diff_to_rank0"] == 0.0 for r in results)
    assert results[0]["mIoU"] == results[1]["mIoU"]  # evaluation shards are summed over ranks


@pytest.mark.slow
def test_staged_backward_under_ddp_averages_every_parts_gradient(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    worker = Path(__file__).parent / "ddp_staged_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(worker), str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["applied"]
        assert result["max_relative_difference_to_mean_gradient"] < 1e-5
        assert result["max_difference_to_local_gradient"] > 1e-6  # the processes' batches differ: really averaged
        assert result["all_reduced_buckets"] == result["buckets_of_one_backward"] > 0  # one all-reduce, not three
        assert abs(result["total"] - result["reference_total"]) < 1e-5 * abs(result["reference_total"])
