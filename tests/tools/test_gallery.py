"""Per-image scores (against a brute-force count), the gallery's choice of images, its panels and index;
``plca evaluate --gallery``."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tiny_runs import TINY_BACKBONE  # registers the tiny backbone
from plca.cli import main
from plca.tools.evaluate import data_key
from plca.data.labels import palette
from plca.engine.image_grids import colour_legend
from plca.evaluation.evaluator import PerImageScores, evaluate
from plca.tools.gallery import (CORRECT_COLOUR, IGNORED_COLOUR, WRONG_COLOUR, default_gallery_dir, error_map,
                                gallery_image, gallery_panels, write_gallery)

CLASSES = ["road", "car", "sky"]
K = len(CLASSES)


class StubSegmentor(nn.Module):
    """Predicts, at every pixel, the class written in the image's red channel (logits at full resolution)."""

    def forward(self, images):
        return {"logits": 10.0 * F.one_hot(images[:, 0].long(), K).permute(0, 3, 1, 2).float()}


def controlled_dataset(seed=0, count=9, size=(8, 12)):
    """Items whose red channel is the prediction the stub makes; labels with ignored pixels, one image
    predicted perfectly, one without a labelled pixel, two with the same score (a tie)."""
    rng = np.random.default_rng(seed)
    items, predictions = [], []
    for index in range(count):
        label = rng.integers(0, K, size=size)
        label[rng.random(size) < 0.2] = 255
        prediction = np.where(rng.random(size) < 0.3 + 0.07 * index, rng.integers(0, K, size=size), label % 255)
        prediction = np.where(label == 255, rng.integers(0, K, size=size), prediction)
        if index == 2:
            prediction = np.where(label == 255, 0, label)  # perfect on every labelled pixel
        if index == 4:
            label[:] = 255  # nothing to score
        predictions.append(prediction)
        image = rng.integers(0, 256, size=(3, *size))
        image[0] = prediction
        items.append({"image": torch.from_numpy(image.astype(np.uint8)), "label": torch.from_numpy(label),
                      "name": f"img_{index}", "index": index})
    # image 7 is image 6 again: the same score, the earlier index first
    items[7] = {**items[6], "name": "img_7", "index": 7}
    predictions[7] = predictions[6]
    return items, predictions


def brute_force_score(prediction, label):
    """Mean IoU (%) over the classes with a labelled or predicted pixel (labelled pixels only), pixel accuracy (%)."""
    ious, correct, counted = [], 0, 0
    for c in range(K):
        tp = fp = fn = 0
        for p, truth in zip(prediction.ravel().tolist(), label.ravel().tolist()):
            if truth == 255:
                continue
            tp += p == c and truth == c
            fp += p == c and truth != c
            fn += p != c and truth == c
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    for p, truth in zip(prediction.ravel().tolist(), label.ravel().tolist()):
        if truth != 255:
            counted += 1
            correct += p == truth
    return (100 * sum(ious) / len(ious) if ious else None), (100 * correct / counted if counted else None), len(ious)


def test_per_image_scores_match_a_brute_force_count():
    items, predictions = controlled_dataset()
    scores = PerImageScores(keep=3)
    confusion = evaluate(StubSegmentor(), items, K, torch.device("cpu"), progress=False, image_scores=scores)
    plain = evaluate(StubSegmentor(), items, K, torch.device("cpu"), progress=False)
    assert torch.equal(confusion.matrix, plain.matrix)  # scoring per image changes nothing overall
    expected_matrix = np.zeros((K, K), dtype=np.int64)
    for item, prediction in zip(items, predictions):
        label = item["label"].numpy()
        for p, truth in zip(prediction.ravel(), label.ravel()):
            if truth != 255:
                expected_matrix[truth, p] += 1
    assert np.array_equal(confusion.matrix.numpy(), expected_matrix)
    got = scores.sorted_scores()
    assert [s.index for s in got] == list(range(len(items))) and [s.name for s in got] == [i["name"] for i in items]
    for score, item, prediction in zip(got, items, predictions):
        miou, accuracy, classes = brute_force_score(prediction, item["label"].numpy())
        assert (score.mIoU is None) == (miou is None) and score.classes == classes
        if miou is not None:
            assert score.mIoU == pytest.approx(miou, abs=1e-9)
            assert score.pixel_accuracy == pytest.approx(accuracy, abs=1e-9)
    assert got[2].mIoU == 100.0 and got[4].mIoU is None


def test_the_lowest_and_highest_are_kept_with_their_predictions():
    items, predictions = controlled_dataset()
    scores = PerImageScores(keep=3)
    evaluate(StubSegmentor(), items, K, torch.device("cpu"), progress=False, image_scores=scores)
    reference = [(brute_force_score(p, i["label"].numpy())[0], i["index"]) for i, p in zip(items, predictions)]
    scored = [(m, index) for m, index in reference if m is not None]
    lowest = [index for _, index in sorted(scored)[:3]]
    highest = [index for _, index in sorted(scored, key=lambda e: (-e[0], e[1]))[:3]]
    assert [k.score.index for k in scores.lowest()] == lowest
    assert [k.score.index for k in scores.highest()] == highest
    assert 4 not in lowest + highest and highest[0] == 2
    for kept in scores.lowest() + scores.highest():
        assert kept.prediction.dtype == np.uint8
        assert np.array_equal(kept.prediction, predictions[kept.score.index])


def test_ties_keep_the_earlier_image():
    scores = PerImageScores(keep=2)
    same = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    for index in (3, 0, 2, 1):  # the order images arrive in (shards) does not matter
        scores.add(index, f"img_{index}", same, torch.zeros(2, 2, dtype=torch.int64))
    scores.add(9, "img_9", torch.eye(K, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))
    assert [k.score.index for k in scores.lowest()] == [0, 1]
    assert [k.score.index for k in scores.highest()] == [9, 0]


def test_shards_merge_to_the_whole():
    """What two DDP processes collect, merged, is what one process collects."""
    items, _ = controlled_dataset(seed=1, count=11)
    whole = PerImageScores(keep=2)
    evaluate(StubSegmentor(), items, K, torch.device("cpu"), progress=False, image_scores=whole)
    shards = [PerImageScores(keep=2) for _ in range(2)]
    for rank, shard in enumerate(shards):
        evaluate(StubSegmentor(), items, K, torch.device("cpu"), rank=rank, world_size=2, progress=False,
                 image_scores=shard)
    assert [s.index for s in shards[0].scores] == list(range(0, 11, 2))
    shards[0].merge(shards[1])
    assert shards[0].sorted_scores() == whole.sorted_scores()
    assert [k.score for k in shards[0].lowest()] == [k.score for k in whole.lowest()]
    assert [k.score for k in shards[0].highest()] == [k.score for k in whole.highest()]
    nothing_kept = PerImageScores(keep=0)
    evaluate(StubSegmentor(), items, K, torch.device("cpu"), progress=False, image_scores=nothing_kept)
    assert len(nothing_kept.scores) == 11 and nothing_kept.lowest() == [] == nothing_kept.highest()


def test_error_map_colours():
    prediction = np.array([[0, 1, 2], [2, 2, 0]])
    label = np.array([[0, 2, 255], [2, 1, 255]])
    row = [CORRECT_COLOUR, WRONG_COLOUR, IGNORED_COLOUR]
    expected = np.array([row, row], dtype=np.uint8)
    assert np.array_equal(error_map(prediction, label), expected)
    with pytest.raises(ValueError, match="one"):
        error_map(prediction, label[:, :2])


def test_panels_show_input_prediction_label_and_errors():
    items, predictions = controlled_dataset(size=(6, 10))
    image, label, prediction = items[0]["image"].numpy(), items[0]["label"].numpy(), predictions[0]
    colours = palette(CLASSES)
    panels = gallery_panels(image, prediction, label, CLASSES, panel_width=10)  # the label's own size
    assert [p.shape for p in panels] == [(6, 10, 3)] * 4
    assert np.array_equal(panels[0], image.transpose(1, 2, 0))
    assert np.array_equal(panels[1], colours[prediction])
    assert np.array_equal(panels[2], colours[label])
    assert np.array_equal(panels[3], error_map(prediction, label))
    # twice as wide: each label pixel becomes a 2 x 2 block (nearest), no blended colour
    panels = gallery_panels(image, prediction, label, CLASSES, panel_width=20)
    assert panels[2].shape == (12, 20, 3)
    assert np.array_equal(panels[2], np.repeat(np.repeat(colours[label], 2, axis=0), 2, axis=1))
    assert np.array_equal(panels[3], np.repeat(np.repeat(error_map(prediction, label), 2, axis=0), 2, axis=1))
    # a large image is scaled down to the panel width, keeping the label's aspect ratio
    big_label = np.zeros((1024, 2048), dtype=np.int64)
    big_image = np.zeros((512, 1024, 3), dtype=np.uint8)  # the resized evaluation input
    assert [p.shape for p in gallery_panels(big_image, big_label, big_label, CLASSES, 512)] == [(256, 512, 3)] * 4


def test_gallery_image_layout():
    items, predictions = controlled_dataset(size=(6, 10))
    image, label, prediction = items[0]["image"].numpy(), items[0]["label"].numpy(), predictions[0]
    grid = gallery_image(image, prediction, label, CLASSES, "lowest #1: img_0", panel_width=30)
    legend = colour_legend(CLASSES, 120)
    assert grid.shape[1] == 120 and grid.dtype == np.uint8
    assert np.array_equal(grid[-legend.shape[0]:], legend)
    top = grid.shape[0] - legend.shape[0] - 18
    panels = gallery_panels(image, prediction, label, CLASSES, panel_width=30)
    for column, panel in enumerate(panels):
        assert np.array_equal(grid[top:top + 18, 30 * column:30 * (column + 1)], panel)


def gallery_png_panels(path, panel_width, panel_height):
    """The four panels of a gallery PNG (above the legend, under the titles)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    legend = colour_legend(CLASSES, grid.shape[1])
    top = grid.shape[0] - legend.shape[0] - panel_height
    assert grid.shape[1] == 4 * panel_width
    return [grid[top:top + panel_height, k * panel_width:(k + 1) * panel_width] for k in range(4)]


def test_write_gallery_files_and_index(tmp_path):
    items, predictions = controlled_dataset()
    scores = PerImageScores(keep=2)
    evaluate(StubSegmentor(), items, K, torch.device("cpu"), progress=False, image_scores=scores)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "lowest_05_old.png").write_bytes(b"stale")
    index = write_gallery(tmp_path / "g", scores, items, CLASSES, panel_width=24, description="a | test")
    assert not (tmp_path / "g" / "lowest_05_old.png").exists()
    on_disk = json.loads((tmp_path / "g" / "index.json").read_text())
    assert on_disk == index and index["images"] == len(items) and index["count"] == 2
    assert [e["index"] for e in index["lowest"]] == [k.score.index for k in scores.lowest()]
    assert [e["index"] for e in index["highest"]] == [k.score.index for k in scores.highest()]
    assert index["highest"][0]["index"] == 2 and index["highest"][0]["mIoU"] == 100.0
    markdown = (tmp_path / "g" / "index.md").read_text()
    colours = palette(CLASSES)
    for kind in ("lowest", "highest"):
        for rank, entry in enumerate(index[kind], start=1):
            assert entry["rank"] == rank and entry["file"].startswith(f"{kind}_{rank:02d}_img_")
            assert entry["name"] in markdown and f"({entry['file']})" in markdown
            assert f"{entry['mIoU']:.1f}" in markdown
            label = items[entry["index"]]["label"].numpy()
            prediction = predictions[entry["index"]]
            panels = gallery_png_panels(tmp_path / "g" / entry["file"], 24, 16)  # 8 x 12 labels, doubled
            doubled = lambda a: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)  # noqa: E731
            assert np.array_equal(panels[1], doubled(colours[prediction]))
            assert np.array_equal(panels[2], doubled(colours[label]))
            assert np.array_equal(panels[3], doubled(error_map(prediction, label)))
    with open(tmp_path / "g" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(items) and rows[-1]["name"] == "img_4" and rows[-1]["mIoU"] == ""  # unscored last
    assert [float(r["mIoU"]) for r in rows[:-1]] == sorted(float(r["mIoU"]) for r in rows[:-1])


def test_default_gallery_dir_is_next_to_the_metrics():
    assert default_gallery_dir("runs/a/checkpoints/final.metrics.json").as_posix() == "runs/a/checkpoints/final.gallery"
    assert default_gallery_dir("out/scores.json").as_posix() == "out/scores.gallery"


# --------------------------------------------------------------------------- plca evaluate --gallery


def tiny_checkpoint(tmp_path):
    """A random-weight checkpoint of the tiny test backbone whose config's data.val is a folder of 3 labelled
    32 x 48 images."""
    from dataset_writers import write_folder

    from plca.config import build_config, to_dict
    from plca.tools.export import build_inference_model

    root = tmp_path / "data"
    write_folder(root, classes_count=K, splits={"train": 1, "val": 3}, size=(32, 48), seed=0)
    config = build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"},
                 "val": {"format": "folder", "root": str(root), "split": "val"}},
        "model": {"backbone": TINY_BACKBONE}, "device": "cpu",
    })
    torch.manual_seed(0)
    model = build_inference_model(config).eval()
    checkpoint = tmp_path / "run" / "checkpoints" / "final.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": to_dict(config), "step": 3}, checkpoint)
    return checkpoint


def test_cli_evaluate_gallery(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--gallery", "1", "--no-progress"]) == 0
    key = data_key({"format": "folder", "root": str(tmp_path / "data"), "split": "val"})  # the data scored
    folder = checkpoint.parent / f"final.{key}.gallery"
    assert str(folder) in capsys.readouterr().out
    index = json.loads((folder / "index.json").read_text())
    metrics = json.loads((checkpoint.parent / f"final.{key}.metrics.json").read_text())
    assert metrics["gallery"]["dir"] == str(folder)
    assert [e["name"] for e in metrics["gallery"]["lowest"]] == [e["name"] for e in index["lowest"]]
    assert index["images"] == 3 and len(index["lowest"]) == len(index["highest"]) == 1
    scores = {row["name"]: float(row["mIoU"]) for row in csv.DictReader(open(folder / "scores.csv"))}
    assert set(scores) == {"val_0000", "val_0001", "val_0002"}
    assert index["lowest"][0]["mIoU"] == pytest.approx(min(scores.values()), abs=1e-3)
    assert index["highest"][0]["mIoU"] == pytest.approx(max(scores.values()), abs=1e-3)
    for entry in index["lowest"] + index["highest"]:
        image = Image.open(folder / entry["file"])
        assert image.size[0] == 4 * 512 and image.size[1] > 512 * 32 / 48  # panels scaled up to 512 px
    # the label column holds the label of that image, as written on disk
    entry = index["lowest"][0]
    label = np.asarray(Image.open(tmp_path / "data" / "labels" / f"{entry['name']}.png"))
    panels = gallery_png_panels(folder / entry["file"], 512, round(32 * 512 / 48))
    rows = ((np.arange(panels[2].shape[0]) + 0.5) * 32 / panels[2].shape[0]).astype(int)
    cols = ((np.arange(512) + 0.5) * 48 / 512).astype(int)
    assert np.array_equal(panels[2], palette(CLASSES)[label[rows][:, cols]])
    # --output moves the default gallery next to it; --gallery-dir puts it anywhere
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--gallery", "1", "--no-progress",
                 "--output", str(tmp_path / "out" / "m.json")]) == 0
    assert (tmp_path / "out" / "m.gallery" / "index.md").is_file()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--gallery", "2", "--no-progress",
                 "--gallery-dir", str(tmp_path / "elsewhere")]) == 0
    assert len(json.loads((tmp_path / "elsewhere" / "index.json").read_text())["lowest"]) == 2
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--gallery-dir", str(tmp_path / "x")]) == 2
    assert "--gallery N" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--gallery", "-1", "--no-progress"]) == 2
