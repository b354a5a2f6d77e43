"""best_on_val.pt is one file with final.pt (a hard link) when the final validation is the best;
an earlier best stays its own file. Readers resolve either the same way."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import plca.engine.validation as validation
from dataset_writers import write_folder
from tiny_runs import tiny_source_only_config
from plca.config import build_config, to_dict
from plca.engine.checkpoint import load_checkpoint
from plca.engine.trainer import train
from plca.models.trained import inspect_model_file, resolve_model_path
from plca.tools.export import export_model, read_export_metadata


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_folder(root, classes_count=3, splits={"train": 4, "val": 2}, size=(32, 40), seed=5)
    return root


def run_with_scores(data: Path, out: Path, scores: list[float], monkeypatch) -> Path:
    """4 updates validated at steps 2 and 4, whose mIoU are ``scores`` (in that order)."""
    real, given = validation.summarize, iter(scores)

    def scripted(matrix, classes):
        metrics = real(matrix, classes)
        metrics["mIoU"] = next(given)
        return metrics

    monkeypatch.setattr(validation, "summarize", scripted)
    raw = to_dict(tiny_source_only_config(data, out, "run", iters=4, eval_every=2, checkpoint_every=100))
    raw["data"]["val"] = {"format": "folder", "root": str(data), "split": "val"}
    return train(build_config(raw), progress=False).run_dir


def disk_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` take, each hard-linked file counted once."""
    seen = {}
    for path in folder.rglob("*"):
        if path.is_file():
            info = path.stat()
            seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


def test_a_final_best_is_a_link_to_final_pt(data, tmp_path, monkeypatch):
    run_dir = run_with_scores(data, tmp_path, [10.0, 20.0], monkeypatch)
    checkpoints = run_dir / "checkpoints"
    final, best = checkpoints / "final.pt", checkpoints / "best_on_val.pt"
    assert os.path.samefile(final, best) and final.stat().st_nlink == 2  # the step-2 file was replaced
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best_on_val.pt", "final.pt", "last.pt"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_on_val"]["step"] == 4 and metrics["best_on_val"]["final"] is True
    assert metrics["best_on_val"]["same_file_as"] == "checkpoints/final.pt"
    # on disk: last.pt and one model file, not two
    sizes = {p.name: p.stat().st_size for p in checkpoints.iterdir()}
    assert disk_bytes(checkpoints) == sizes["last.pt"] + sizes["final.pt"]
    # every reader resolves it: the run's best model is the step-4 model
    assert resolve_model_path(run_dir, "best_on_val") == best
    assert inspect_model_file(best).step == 4 and inspect_model_file(best).final is True
    exported = export_model(run_dir, tmp_path / "best.safetensors", which="best_on_val")
    assert read_export_metadata(exported)["step"] == "4"


def test_an_earlier_best_stays_its_own_file(data, tmp_path, monkeypatch):
    run_dir = run_with_scores(data, tmp_path, [20.0, 10.0], monkeypatch)
    final, best = run_dir / "checkpoints" / "final.pt", run_dir / "checkpoints" / "best_on_val.pt"
    assert not os.path.samefile(final, best) and final.stat().st_nlink == 1
    saved = load_checkpoint(best)
    assert saved["step"] == 2 and saved["final"] is False and "oracle" in saved["selection"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_on_val"]["step"] == 2 and "same_file_as" not in metrics["best_on_val"]
    assert metrics["best_on_val"]["final"] is False and metrics["final"] is True and metrics["step"] == 4
    # the earlier best of a finished run is accepted by the tools (it is asked for by name)
    exported = export_model(run_dir, tmp_path / "best.safetensors", which="best_on_val")
    assert read_export_metadata(exported)["step"] == "2" and read_export_metadata(exported)["final"] == "false"
