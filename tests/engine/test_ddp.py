"""Two CPU processes under torchrun (gloo): PLCA stays in sync; staged self-training backward averages gradients."""

import json
from pathlib import Path

import pytest

from dataset_writers import write_folder
from processes import run_torchrun


@pytest.mark.slow
def test_two_process_ddp_stays_in_sync(tmp_path):
    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 8, "val": 3}, size=(40, 56), seed=0)
    run_torchrun(Path(__file__).parent / "ddp_worker.py", data, tmp_path / "runs")
    results = [json.loads((tmp_path / "runs" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in results)
    assert results[0]["run_dir"] == results[1]["run_dir"]  # one shared run directory
    assert all(r["max_diff_to_rank0"] == 0.0 for r in results)
    assert results[0]["mIoU"] == results[1]["mIoU"]  # evaluation shards are summed over ranks


@pytest.mark.slow
def test_staged_backward_under_ddp_averages_every_parts_gradient(tmp_path):
    run_torchrun(Path(__file__).parent / "ddp_staged_worker.py", tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["applied"]
        assert result["max_relative_difference_to_mean_gradient"] < 1e-5
        assert result["max_difference_to_local_gradient"] > 1e-6  # the processes' batches differ: really averaged
        assert result["all_reduced_buckets"] == result["buckets_of_one_backward"] > 0  # one all-reduce, not three
        assert abs(result["total"] - result["reference_total"]) < 1e-5 * abs(result["reference_total"])
