"""plca report: plots and Markdown from run directories; the TensorBoard image grid."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiny_runs import TINY_BACKBONE  # registers the tiny backbone
from plca.cli import main
from plca.evaluation.metrics import summarize
from plca.engine.run_record import write_run_record
from plca.tools.report import (ReportError, config_differences, display_names, load_run, plot_per_class_iou,
                               plot_training_curves, write_report)

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


def test_default_output_is_next_to_the_runs(runs, tmp_path, capsys):
    run_a, run_b, _, _ = runs
    assert main(["report", str(run_a)]) == 0
    assert (run_a / "report" / "report.md").is_file()
    assert str(run_a / "report" / "report.md") in capsys.readouterr().out
    assert write_report([run_a, run_b]) == tmp_path / "report" / "report.md"  # the folder holding both


def test_long_run_names_become_what_differs(tmp_path):
    long_names = [f"plca_gta5-cityscapes_resnet101_s0_20261124-10150{i}_3fa{i}" for i in range(2)]
    for seed, name in enumerate(long_names):
        fake_run(tmp_path / name, seed, "plca", with_assoc=True)  # the configs differ only in train.lr
    runs = [load_run(tmp_path / name) for name in long_names]
    assert display_names(runs) == ["lr=0.01", "lr=0.02"]
    text = write_report([tmp_path / name for name in long_names], tmp_path / "r").read_text()
    for name in long_names:  # the full names stay in the table, next to the labels
        assert name in text
    assert "| lr=0.01 | plca_gta5" in text and "| lr=0.02 |" in text
    # when what differs is long too, numbers, listed with the full names
    other = tmp_path / "source_only_gta5-cityscapes_resnet101_s0_20261124-111111_aaaa"
    fake_run(other, 2, "source_only", with_assoc=False, steps=(10, 20, 40))
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["data"]["source"] = {"root": "/datasets/gta5/a/rather/long/path"}
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    runs.append(load_run(other))
    assert display_names(runs) == ["#1", "#2", "#3"]
    assert display_names(runs[:1]) == [long_names[0]]  # one run: its own name


def test_differences_show_config_and_environment(runs, tmp_path):
    run_a, run_b, _, _ = runs
    for path in (run_a, run_b):
        write_run_record(path, {}, ["plca", "train"], 0, 1.0, finished=2.0)
    record = json.loads((run_b / "run.json").read_text())
    record["environment"].update(torch="9.9.9", gpu_count=8)
    (run_b / "run.json").write_text(json.dumps(record))
    text = write_report([run_a, run_b], tmp_path / "r").read_text()
    differences = text.split("## Differences", 1)[1]
    assert "| config | `train.lr` | 0.01 | 0.02 |" in differences
    assert "| environment | `torch` |" in differences and "9.9.9" in differences
    assert "| environment | `gpu_count` |" in differences
    assert "`hostname`" not in differences  # same on both


@pytest.fixture
def captured_figures(monkeypatch):
    """The figures the plotting functions close (so their artists can be inspected)."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    for fig in figures:
        close(fig)


def test_per_class_chart_labels_zero_and_keeps_its_legend_in_the_figure(tmp_path, captured_figures):
    path = tmp_path / "a_run_with_a_rather_long_name_for_a_legend"
    fake_run(path, 0, "plca", with_assoc=True)
    metrics = json.loads((path / "metrics.json").read_text())
    metrics["per_class_IoU"].update(car=0.0, sky=None)
    (path / "metrics.json").write_text(json.dumps(metrics))
    plot_per_class_iou([load_run(path)], tmp_path / "bars.png")
    fig = captured_figures[-1]
    ax = fig.axes[0]
    texts = [text.get_text() for text in ax.texts]
    assert texts.count("0") == 1 and texts.count("n/a") == 1  # car 0, sky undefined
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    figure_box = fig.bbox
    assert legend.x0 >= figure_box.x0 and legend.x1 <= figure_box.x1  # within the figure's width
    assert legend.y1 <= axes_box.y0  # below the axes, over no bar
    assert Image.open(tmp_path / "bars.png").size[1] > 300


def test_curves_have_integer_steps_and_a_single_point_shows(tmp_path, captured_figures):
    long_run = tmp_path / "a"
    fake_run(long_run, 0, "plca", with_assoc=True, steps=(1, 2, 3))
    single = tmp_path / "b"
    fake_run(single, 1, "plca", with_assoc=True, steps=(1, 2))
    (single / "scalars.jsonl").write_text(json.dumps({"step": 2, "loss/total": 1.0, "lr": 0.01}) + "\n")
    plot_training_curves([load_run(long_run), load_run(single)], tmp_path / "curves.png")
    fig = captured_figures[-1]
    fig.canvas.draw()
    visible = [ax for ax in fig.axes if ax.get_visible()]
    for ax in visible:
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks), (ax.get_title(), ticks)
    total = next(ax for ax in visible if ax.get_title() == "Total loss")
    lone = [line for line in total.get_lines() if len(line.get_xdata()) == 1]
    assert lone and lone[0].get_marker() not in (None, "None", "")
    assert len(fig.legends) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]


def fake_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    entries = []
    for lr_index, lr in enumerate(("0.01", "0.02")):
        for seed in (0, 1):
            name = f"train.lr={lr}_s{seed}"
            fake_run(sweep / "runs" / name, 2 * lr_index + seed, "plca", with_assoc=True)
            entries.append({"name": name, "run_dir": f"runs/{name}", "params": {"train.lr": lr}, "seed": seed,
                            "status": "finished"})
    entries.append({"name": "train.lr=0.03_s0", "run_dir": "runs/train.lr=0.03_s0", "params": {"train.lr": "0.03"},
                    "seed": 0, "status": "failed", "returncode": 1, "stderr_tail": ["RuntimeError: out of memory"]})
    (sweep / "manifest.json").write_text(json.dumps({"config": "c.yaml", "base_overrides": [], "seeds": [0, 1],
                                                     "grid": {"train.lr": ["0.01", "0.02", "0.03"]},
                                                     "runs": entries}))
    return sweep


def test_report_of_a_sweep_aggregates_over_seeds(tmp_path, capsys):
    sweep = fake_sweep(tmp_path)
    assert main(["report", str(sweep)]) == 0
    assert str(sweep / "report" / "report.md") in capsys.readouterr().out
    text = (sweep / "report" / "report.md").read_text()
    values = [json.loads((sweep / "runs" / f"train.lr=0.01_s{s}" / "metrics.json").read_text())["mIoU"] for s in (0, 1)]
    assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" in text
    assert "| lr=0.01 s0 | train.lr=0.01_s0 |" in text  # run labels: grid values and seed
    assert "failed (exit 1): RuntimeError: out of memory" in text
    for name in ("results.md", "results.csv", "results.png", "training_curves.png"):
        assert (sweep / "report" / name).is_file()
    assert not (sweep / "report" / "per_class_iou.png").exists()  # per-seed bars: results.png has them averaged
    with pytest.raises(ReportError, match="not both"):
        write_report([sweep, sweep / "runs" / "train.lr=0.01_s0"], tmp_path / "x")
    with pytest.raises(ReportError, match="--names"):
        write_report([sweep], tmp_path / "x", names=["a"])
    # two sweeps side by side: a sweep column
    other = fake_sweep(tmp_path / "b")
    text = write_report([sweep, other], tmp_path / "both").read_text()
    assert "| sweep | train.lr |" in text


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
            "model": {"backbone": TINY_BACKBONE},
            "train": {"iters": 2, "batch_size": 2, "crop_size": [32, 32], "log_every": 1, "eval_every": 1,
                      "checkpoint_every": 2},
            "output_dir": str(tmp_path / "runs"), "run_name": method, "device": "cpu",
        })
        run_dirs.append(train(config, progress=False).run_dir)
    text = write_report(run_dirs, tmp_path / "report").read_text()
    assert "road" in text and "plca" in text and "source_only" in text
    assert (tmp_path / "report" / "training_curves.png").is_file()
    assert (tmp_path / "report" / "per_class_iou.png").is_file()
