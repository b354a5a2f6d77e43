"""End-to-end training on tiny folder-format data: logging, metrics, exact resume, CLI."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dataset_writers import write_folder
from tiny_runs import TINY_BACKBONE  # registers the tiny backbone
from plca.cli import main
from plca.config import build_config
from plca.engine.checkpoint import load_checkpoint
from plca.engine.trainer import train

CLASSES = ["road", "car", "sky"]


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_folder(root, classes_count=3, splits={"train": 8, "val": 2}, size=(40, 56), seed=0)
    return root


def tiny_config(root, out, method="plca", run_name=None, **train):
    overrides = {"iters": 4, "batch_size": 2, "crop_size": [32, 32], "shorter_side": None, "lr": 0.01,
                 "eval_every": 0, "checkpoint_every": 2, "log_every": 1, "image_every": 2, "seed": 3, **train}
    return build_config({
        "method": method,
        "data": {
            "classes": CLASSES,
            "source": {"format": "folder", "root": str(root), "split": "train"},
            "target": {"format": "folder", "root": str(root), "split": "train"} if method == "plca" else None,
            "val": {"format": "folder", "root": str(root), "split": "val"},
            "num_workers": 0,
        },
        "model": {"backbone": TINY_BACKBONE},
        "train": overrides,
        "loss": {"lovasz_weight": 3.0},
        **({"plca": {"lsr_weight": 0.01}} if method == "plca" else {}),
        "output_dir": str(out),
        "run_name": run_name,
        "device": "cpu",
    })


def weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.mark.slow
def test_plca_steps_log_finite_terms_and_write_metrics(folder_data, tmp_path):
    config = tiny_config(folder_data, tmp_path, run_name="a")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, target_label_diagnostics=True))
    result = train(config, progress=False)
    lines = [json.loads(line) for line in (result.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for line in lines:
        for key in ("loss/total", "loss/source_ce", "loss/source_lovasz", "loss/lsr", "loss/assoc_feature",
                    "loss/assoc_classifier", "assoc/feature_positive_ratio", "assoc/feature_cover_ratio", "lr"):
            assert key in line and torch.isfinite(torch.tensor(line[key])), key
    assert any(line["loss/assoc_feature"] > 0 for line in lines)
    assert any(line["loss/assoc_classifier"] > 0 for line in lines)
    assert "assoc/feature_target_acc" in lines[0]  # asked for, and the folder target has labels: diagnostic only
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 100 and set(metrics["per_class_IoU"]) == set(CLASSES)
    assert metrics["protocol"] and metrics["test_time_aggregation"] is True
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "train.log").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.run_dir / "tb"))
    events.Reload()
    assert {"images/source", "images/target"} <= set(events.Tags()["images"])
    assert "loss/assoc_feature" in events.Tags()["scalars"]


@pytest.mark.slow
@pytest.mark.parametrize("method, accumulation", [("plca", 1), ("source_only", 2)])
def test_interrupted_and_resumed_run_matches_uninterrupted(folder_data, tmp_path, method, accumulation):
    full = train(tiny_config(folder_data, tmp_path, method, accumulation=accumulation, iters=5), progress=False)
    part = train(tiny_config(folder_data, tmp_path / "b", method, accumulation=accumulation, iters=5,
                             checkpoint_every=100), max_steps=3, progress=False)
    assert part.step == 3 and load_checkpoint(part.run_dir / "checkpoints" / "last.pt")["step"] == 3
    resumed = train(tiny_config(folder_data, tmp_path / "b", method, accumulation=accumulation, iters=5),
                    resume=part.run_dir, progress=False)
    assert resumed.step == 5 and resumed.run_dir == part.run_dir
    a, b = weights(full.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the check can fail: a run with another seed ends elsewhere
    other = train(tiny_config(folder_data, tmp_path / "c", method, accumulation=accumulation, iters=5, seed=4),
                  progress=False)
    assert any(not torch.equal(a[k], weights(other.run_dir)[k]) for k in a)


@pytest.mark.slow
def test_named_run_resumes_automatically(folder_data, tmp_path):
    part = train(tiny_config(folder_data, tmp_path, "source_only", run_name="named"), max_steps=2, progress=False)
    again = train(tiny_config(folder_data, tmp_path, "source_only", run_name="named"), progress=False)
    assert again.run_dir == part.run_dir and again.step == 4
    assert "resumed from" in (part.run_dir / "train.log").read_text()


@pytest.mark.slow
def test_cli_train_then_evaluate_agree(folder_data, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps({  # JSON is YAML
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(folder_data), "split": "train"},
                 "val": {"format": "folder", "root": str(folder_data), "split": "val"}, "num_workers": 0},
        "model": {"backbone": "resnet18", "style": "caffe"}, "device": "cpu",
    }))
    code = main(["train", str(config_file), "train.iters=2", "train.batch_size=2", "train.crop_size=[32,32]",
                 f"output_dir={tmp_path / 'runs'}", "run_name=cli", "train.eval_every=0", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "cli"
    assert f"run dir: {run_dir}" in out
    trained = json.loads((run_dir / "metrics.json").read_text())
    code = main(["evaluate", str(config_file), "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
                 "--output", str(tmp_path / "m.json"), "--no-progress"])
    assert code == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-9)
    assert evaluated["per_class_IoU"] == pytest.approx(trained["per_class_IoU"], abs=1e-9) or \
        evaluated["per_class_IoU"] == trained["per_class_IoU"]


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("method: source_only\ntrain: {iters: 3, bogus: 1}\n")
    assert main(["train", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "train.bogus" in err and "Traceback" not in err


def test_cli_reports_missing_dataset(tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps({
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(tmp_path / "nowhere")}},
        "model": {"backbone": "resnet18"}, "device": "cpu", "output_dir": str(tmp_path / "runs"),
    }))
    assert main(["train", str(config_file), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err
