"""evaluate / export / predict refuse a model of an unfinished run (naming the step reached and
--allow-unfinished) and write nothing; metrics say what they scored (checkpoint step and whether
final, data, protocol, test-time options), and scoring other data writes another file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset_writers import write_folder
from tiny_runs import tiny_source_only_config
from plca.config import build_config, to_dict
from plca.engine.trainer import train
from plca.models.trained import UnfinishedRunError, inspect_model_file, refuse_unfinished
from plca.tools.evaluate import data_key, default_metrics_path, evaluate_checkpoint
from plca.tools.export import export_model, read_export_metadata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, classes_count=3, splits={"train": 4, "val": 2}, size=(32, 40), seed=4)
    return root


def config_with_val(data: Path, out: Path, name: str, **train_options):
    config = tiny_source_only_config(data, out, name, iters=4, **train_options)
    raw = to_dict(config)
    raw["data"]["val"] = {"format": "folder", "root": str(data), "split": "val"}
    return build_config(raw)


@pytest.fixture(scope="module")
def unfinished(data, tmp_path_factory):
    """A run of 4 updates stopped after 2: only checkpoints/last.pt, at step 2."""
    out = tmp_path_factory.mktemp("runs")
    return train(config_with_val(data, out, "stopped"), max_steps=2, progress=False).run_dir


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(config_with_val(data, out, "done"), progress=False).run_dir


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "plca.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_refuses_an_unfinished_run_and_writes_nothing(unfinished, data, tmp_path):
    before = files_under(unfinished)
    image = data / "images" / "val_0000.png"
    commands = {
        "evaluate": ["evaluate", "--checkpoint", str(unfinished), "--no-progress"],
        "export": ["export", str(unfinished), "--output", str(tmp_path / "model.safetensors")],
        "predict": ["predict", "--checkpoint", str(unfinished), "--input", str(image),
                    "--output", str(tmp_path / "predictions"), "--no-progress"],
    }
    for command, args in commands.items():
        done = run_cli(*args)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"plca {command}: error: "), (command, done.stderr)
        assert "step 2 of 4" in lines[0] and "--allow-unfinished" in lines[0], lines[0]
        assert f"plca train --resume {unfinished}" in lines[0]
    assert files_under(unfinished) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no export, no predictions folder


def test_allow_unfinished_scores_the_step_reached_and_says_so(unfinished, tmp_path):
    output = tmp_path / "m.json"
    done = run_cli("evaluate", "--checkpoint", str(unfinished), "--allow-unfinished", "--no-progress",
                   "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2 of 4, NOT the run's final model" in done.stdout
    metrics = json.loads(output.read_text())
    assert (metrics["step"], metrics["total_steps"], metrics["final"]) == (2, 4, False)
    assert metrics["checkpoint"] == str(unfinished / "checkpoints" / "last.pt")
    # an export of it says the same, and is itself refused until allowed
    exported = export_model(unfinished, tmp_path / "m.safetensors", allow_unfinished=True)
    assert read_export_metadata(exported)["final"] == "false"
    with pytest.raises(UnfinishedRunError, match="step 2 of 4"):
        evaluate_checkpoint(exported, progress=False)


def test_finished_runs_are_accepted_and_metrics_say_what_they_scored(finished, data, tmp_path, capsys):
    from plca.cli import main

    assert main(["evaluate", "--checkpoint", str(finished), "--no-progress"]) == 0
    out = capsys.readouterr().out
    final = finished / "checkpoints" / "final.pt"
    key = data_key({"format": "folder", "root": str(data), "split": "val"})
    first = final.with_name(f"final.{key}.metrics.json")
    assert f"metrics written to {first}" in out
    assert f"checkpoint: {final} (plca checkpoint, step 4 of 4, final)" in out
    assert f"data: folder '{data}' split val, 2 images" in out and "protocol: " in out
    metrics = json.loads(first.read_text())
    assert (metrics["step"], metrics["total_steps"], metrics["final"]) == (4, 4, True)
    assert metrics["data"] == {"format": "folder", "root": str(data), "split": "val", "images": 2}
    assert metrics["run_id"] == json.loads((finished / "run.json").read_text())["run_id"]
    assert metrics["test_time"] == {"size": None, "aggregation": False, "alpha": None,
                                   "aggregation_max_pixels": None, "amp": False}
    assert metrics["protocol"] in metrics["protocols"]
    # the same model on other data: another file, the first one kept
    other = tmp_path / "other"
    write_folder(other, classes_count=3, splits={"val": 3}, size=(32, 40), seed=9)
    assert main(["evaluate", "--checkpoint", str(finished), "--no-progress", f"data.val.root={other}"]) == 0
    second = json.loads(default_metrics_path({"checkpoint": str(final), "data": {
        "format": "folder", "root": str(other), "split": "val"}}).read_text())
    assert second["data"]["root"] == str(other) and second["data"]["images"] == 3
    assert json.loads(first.read_text()) == metrics
    # and metrics.json of the run says the same about its final model
    run_metrics = json.loads((finished / "metrics.json").read_text())
    assert (run_metrics["step"], run_metrics["final"], run_metrics["total_steps"]) == (4, True, 4)
    history = [json.loads(line) for line in (finished / "eval_history.jsonl").read_text().splitlines()]
    assert [(line["step"], line["final"]) for line in history] == [(4, True)]


def test_data_key_separates_roots_and_splits(tmp_path):
    a = data_key({"format": "folder", "root": str(tmp_path / "a"), "split": "val"})
    assert a.startswith("folder-val-") and len(a) == len("folder-val-") + 8
    assert a != data_key({"format": "folder", "root": str(tmp_path / "b"), "split": "val"})
    assert data_key({"format": "acdc", "root": "/x", "split": "val:night+snow"}).startswith("acdc-val_night_snow-")


def test_what_counts_as_final(unfinished, finished, tmp_path):
    import torch

    last = inspect_model_file(unfinished / "checkpoints" / "last.pt")
    assert (last.step, last.total_steps, last.final) == (2, 4, False)
    assert inspect_model_file(finished / "checkpoints" / "last.pt").final is True
    refuse_unfinished(inspect_model_file(finished / "checkpoints" / "final.pt"))  # accepted
    # files from before the marker: a final.pt name counts, else the step against train.iters
    config = {"method": "source_only", "train": {"iters": 6}}
    for name, step, expected in (("final.pt", 3, True), ("last.pt", 3, False), ("last.pt", 6, True),
                                 ("other.pt", None, None)):
        path = tmp_path / name
        torch.save({"model": {}, "config": config, "step": step}, path)
        assert inspect_model_file(path).final is expected, (name, step)
    with pytest.raises(UnfinishedRunError, match="step 3 of 6.*--allow-unfinished"):
        torch.save({"model": {}, "config": config, "step": 3}, tmp_path / "last.pt")
        refuse_unfinished(inspect_model_file(tmp_path / "last.pt"))
    refuse_unfinished(inspect_model_file(tmp_path / "last.pt"), allow_unfinished=True)
