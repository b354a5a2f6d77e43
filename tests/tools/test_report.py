"""plca report: plots and Markdown from run directories; the TensorBoard image grid."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from plca.cli import main
from plca.data.labels import palette
from plca.evaluation.metrics import summarize
from plca.tools.report import ReportError, config_differences, load_run, log_image_grid, make_image_grid, write_report

CLASSES = ["road", "sidewalk", "car", "sky"]


def fake_run(path, seed, method, with_assoc, steps=(10, 20, 30)):
    """A run directory as the trainer writes it, with metrics from a random confusion matrix."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(
        {"method": method, "data": {"classes": CLASSES}, "train": {"lr": 0.01 * (seed + 1), "iters": steps[-1]},
         "run_name": path.name}))
    with open(path / "scalars.jsonl", "w") as handle:
        for step in steps:
            line = {"step": step, "loss/total": 2.0 / step, "loss/source_ce": 1.5 / step, "loss/lsr": 0.1,
                    "lr": 0.01 * (1 - step / 40) ** 0.9, "skipped_steps": 0}
            if with_assoc:
                line.update({"loss/assoc_feature": 0.5, "loss/assoc_classifier": 0.4,
                             "assoc/feature_positive_ratio": 0.3, "assoc/classifier_positive_ratio": 0.4,
                             "assoc/feature_cover_ratio": 0.2, "assoc/classifier_cover_ratio": 0.25,
                             "assoc/feature_target_acc": 0.6, "assoc/classifier_target_acc": 0.7})
            handle.write(json.dumps(line) + "\n")
    history = []
    for step in steps[1:]:
        matrix = torch.from_numpy(rng.integers(1, 100, size=(4, 4))) + torch.eye(4, dtype=torch.int64) * 300
        history.append({**summarize(matrix, CLASSES), "step": step})
    (path / "eval_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (path / "metrics.json").write_text(json.dumps({**history[-1], "method": method}))
    return history[-1]


@pytest.fixture
def runs(tmp_path):
    a = fake_run(tmp_path / "source_only_s0", 0, "source_only", with_assoc=False)
    b = fake_run(tmp_path / "plca_s0", 1, "plca", with_assoc=True)
    return tmp_path / "source_only_s0", tmp_path / "plca_s0", a, b


def test_report_writes_pngs_and_the_per_class_table(runs, tmp_path):
    run_a, run_b, metrics_a, metrics_b = runs
    report = write_report([run_a, run_b], tmp_path / "report")
    text = report.read_text()
    for png in ("training_curves.png", "per_class_iou.png"):
        image = Image.open(tmp_path / "report" / png)
        assert image.size[0] > 400 and image.size[1] > 300
        assert f"]({png})" in text
    for name in CLASSES + ["source_only_s0", "plca_s0"]:
        assert name in text
    # the per-class numbers of each run appear as the table formats them
    for metrics in (metrics_a, metrics_b):
        assert f"{metrics['mIoU']:.1f}" in text
    assert "`train.lr`" in text and "`method`" in text  # the configs differ in these keys


def test_config_differences_lists_only_differing_keys(runs):
    run_a, run_b, _, _ = runs
    differences = config_differences([load_run(run_a), load_run(run_b)])
    assert set(differences) == {"method", "train.lr"}
    assert differences["method"] == ["source_only", "plca"]


def test_unfinished_run_uses_its_last_validation(runs, tmp_path):
    run_a, _, _, _ = runs
    (run_a / "metrics.json").unlink()
    with open(run_a / "scalars.jsonl", "a") as handle:
        handle.write('{"step": 40, "loss/to')  # a line being written
    record = load_run(run_a)
    assert record.metrics is None and record.final_metrics["step"] == 30
    assert any("line 4" in note for note in record.notes)
    text = write_report([run_a], tmp_path / "r").read_text()
    assert "not finished" in text


def test_cli_report_and_errors(runs, tmp_path, capsys):
    run_a, run_b, _, _ = runs
    assert main(["report", str(run_a), str(run_b), "--output", str(tmp_path / "out"),
                 "--names", "baseline", "PLCA"]) == 0
    assert "| baseline" in (tmp_path / "out" / "report.md").read_text()
    assert main(["report", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="plca run directory"):
        load_run(tmp_path / "empty")


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, image, step, dataformats):
        self.calls.append((tag, image, step, dataformats))


def test_image_grid_rows_are_input_prediction_label():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 16, 24), dtype=np.uint8))
    predictions = torch.from_numpy(rng.integers(0, 4, size=(3, 2, 3)))  # at 1/8 resolution
    labels = torch.from_numpy(rng.integers(0, 4, size=(3, 16, 24)))
    labels[0, 0, 0] = 255
    writer = FakeWriter()
    log_image_grid(writer, "val/predictions", images, predictions, labels, CLASSES, step=5, max_images=2)
    (tag, grid, step, fmt), = writer.calls
    assert (tag, step, fmt) == ("val/predictions", 5, "HWC")
    assert grid.shape == (2 * 16, 3 * 24, 3) and grid.dtype == np.uint8
    colors = palette(CLASSES)
    for row in range(2):
        block = grid[row * 16:(row + 1) * 16]
        assert np.array_equal(block[:, :24], images[row].permute(1, 2, 0).numpy())
        upsampled = predictions[row].numpy().repeat(8, axis=0).repeat(8, axis=1)
        assert np.array_equal(block[:, 24:48], colors[upsampled])
        assert np.array_equal(block[:, 48:], colors[labels[row].numpy()])
    assert np.array_equal(grid[0, 48], [0, 0, 0])  # ignore is black
    assert make_image_grid(images.float(), predictions, None, CLASSES).shape == (3 * 16, 2 * 24, 3)
    log_image_grid(None, "x", images, predictions, labels, CLASSES, step=0)  # no writer: nothing happens


@pytest.mark.slow
def test_report_from_two_real_runs(tmp_path):
    from dataset_writers import write_folder

    from plca.config import build_config
    from plca.engine.trainer import train

    root = tmp_path / "data"
    write_folder(root, classes_count=3, splits={"train": 4, "val": 2}, size=(32, 48), seed=0)
    run_dirs = []
    for method in ("source_only", "plca"):
        config = build_config({
            "method": method,
            "data": {"classes": ["road", "car", "sky"], "num_workers": 0,
                     "source": {"format": "folder", "root": str(root), "split": "train"},
                     "target": {"format": "folder", "root": str(root), "split": "train"},
                     "val": {"format": "folder", "root": str(root), "split": "val"}},
            "model": {"backbone": "resnet18", "style": "pytorch"},
            "train": {"iters": 2, "batch_size": 2, "crop_size": [32, 32], "log_every": 1, "eval_every": 1,
                      "checkpoint_every": 2},
            "output_dir": str(tmp_path / "runs"), "run_name": method, "device": "cpu",
        })
        run_dirs.append(train(config, progress=False).run_dir)
    text = write_report(run_dirs, tmp_path / "report").read_text()
    assert "road" in text and "plca" in text and "source_only" in text
    assert (tmp_path / "report" / "training_curves.png").is_file()
    assert (tmp_path / "report" / "per_class_iou.png").is_file()
