"""Rare class sampling in the training stream: draws follow the sampler, crops are re-drawn, the class
statistics come from `plca prepare --rcs-stats` or a cache, and a resumed stream draws the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_writers import write_folder
from plca.config import build_config, load_config
from plca.data.build import build_run_datasets
from plca.data.io import DatasetError
from plca.data.rare_class import ClassStatistics, RareClassDataset
from plca.tools.prepare import check_dataset

CLASSES = ["road", "car", "sky"]
CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
RELATIVE = {"min_pixels": None, "min_pixels_ratio": 0.01, "min_crop_ratio": None, "min_crop_pixels_ratio": 0.05}


@pytest.fixture()
def data(tmp_path):
    root = tmp_path / "data"
    write_folder(root, classes_count=3, splits={"train": 6}, size=(40, 56), seed=0)
    # class 1 (car) only in the first image, on a small patch: rare
    for k, path in enumerate(sorted((root / "labels").glob("*.png"))):
        label = np.zeros((40, 56), dtype=np.uint8)
        label[20:, :] = 2
        if k == 0:
            label[:6, :6] = 1
        Image.fromarray(label).save(path)
    return root


def config(root, tmp_path, train=None, **rcs):
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"},
                 "rare_class_sampling": {"enabled": True, "min_pixels": 10, **rcs}},
        "train": {"crop_size": [16, 16], "batch_size": 2, **(train or {})},
        "output_dir": str(tmp_path / "runs"),
    })


def test_draws_favour_the_rare_class_and_repeat_exactly(data, tmp_path):
    cfg = config(data, tmp_path)
    source = build_run_datasets(cfg.data, cfg.train, None, uses_target=False, cache_dir=tmp_path / "cache").source
    assert isinstance(source, RareClassDataset)
    names = []
    for index in range(60):
        item, _ = source.fetch(index)
        names.append(item["name"])
    rare = sorted(p.stem for p in (data / "images").glob("*"))[0]
    # car's frequency is tiny, so softmax((1 - f) / 0.01) draws it almost always: its only image dominates
    assert names.count(rare) > 40
    again = build_run_datasets(cfg.data, cfg.train, None, uses_target=False, cache_dir=tmp_path / "cache").source
    first, second = source.fetch(7)[0], again.fetch(7)[0]  # the cache is read back; the same draw
    assert first["name"] == second["name"] and (first["label"] == second["label"]).all()
    assert list((tmp_path / "cache").glob("class_statistics_*.json"))


def test_prepare_writes_the_statistics_training_reads(data, tmp_path):
    stats = tmp_path / "rcs.json"
    report = check_dataset("folder", data, classes=CLASSES, split="train", rcs_stats_path=stats, progress=False)
    assert not report.errors and stats.is_file()
    cfg = config(data, tmp_path, stats=str(stats))
    source = build_run_datasets(cfg.data, cfg.train, None, uses_target=False).source
    assert isinstance(source, RareClassDataset)
    write_folder(tmp_path / "other", classes_count=3, splits={"train": 3}, size=(40, 56), seed=1)
    cfg = build_config({"data": {
        "classes": CLASSES, "source": {"format": "folder", "root": str(tmp_path / "other"), "split": "train"},
        "rare_class_sampling": {"enabled": True, "min_pixels": 10, "stats": str(stats)}},
        "train": {"crop_size": [16, 16], "batch_size": 2}})
    with pytest.raises(DatasetError, match="rcs.json"):
        build_run_datasets(cfg.data, cfg.train, None, uses_target=False)


def test_prepare_writes_the_label_sizes(data, tmp_path):
    stats = tmp_path / "rcs.json"
    check_dataset("folder", data, classes=CLASSES, split="train", rcs_stats_path=stats, progress=False)
    loaded = ClassStatistics.load(stats)
    assert loaded.sizes.tolist() == [[40, 56]] * 6 and loaded.counts[0].tolist() == [20 * 56 - 36, 36, 20 * 56]


def test_relative_crop_threshold_counts_the_rescaled_crop(data, tmp_path):
    """Each draw equals a written-out loop: the image's whole transform (rescale by 0.5 .. 2, flip, crop)
    re-drawn until the 16 x 16 crop holds more than 5 % of its pixels (12.8) of the drawn class."""
    cfg = config(data, tmp_path, train={"scale_range": [0.5, 2.0]}, **RELATIVE)
    source = build_run_datasets(cfg.data, cfg.train, None, uses_target=False, cache_dir=tmp_path / "cache").source
    assert source.sampler.min_pixels is None and source.min_crop_pixels_ratio == 0.05
    np.testing.assert_allclose(source.sampler.image_thresholds, [0.01 * 40 * 56] * 6)
    inner, redrawn = source.dataset, 0
    for draw in range(40):
        item, _ = source.fetch(draw)
        class_index, image_index = source.sampler.sample(draw)
        image, label = inner.load_pair(image_index)
        rng = source.sampler.rng(draw)
        rng.random(2)
        for attempt in range(11):
            _, crop = inner.transform(image, label, rng)
            if int((crop == class_index).sum()) > 0.05 * 16 * 16:
                break
        redrawn += attempt > 0
        assert item["index"] == image_index and torch.equal(item["label"], crop), draw
    assert redrawn > 0  # car's 36 pixels shrink to about 9 at half scale: such crops were re-drawn


def test_old_statistics_files_serve_absolute_thresholds_only(data, tmp_path):
    stats = tmp_path / "rcs.json"
    check_dataset("folder", data, classes=CLASSES, split="train", rcs_stats_path=stats, progress=False)
    payload = json.loads(stats.read_text())
    payload["version"] = 1
    del payload["sizes"]
    stats.write_text(json.dumps(payload))  # as plca wrote it before the sizes were stored
    cfg = config(data, tmp_path, stats=str(stats))
    assert isinstance(build_run_datasets(cfg.data, cfg.train, None, uses_target=False).source, RareClassDataset)
    cfg = config(data, tmp_path, stats=str(stats), **RELATIVE)
    with pytest.raises(DatasetError, match="plca prepare") as error:
        build_run_datasets(cfg.data, cfg.train, None, uses_target=False)
    assert str(stats) in str(error.value) and "--rcs-stats" in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["folder_self_training.yaml", "folder_self_training_plca.yaml"])
def test_folder_self_training_runs_with_relative_rare_class_sampling(data, tmp_path, name):
    from plca.engine.trainer import train

    overrides = [f"data.source.root={data}", f"data.target.root={data}", f"data.val.root={data}",
                 "data.val.split=train", "model.backbone=resnet18", "train.iters=2", "train.crop_size=[32,32]", f"output_dir={tmp_path}",
                 "data.num_workers=0", "device=cpu", "train.eval_every=0"]
    config = load_config(CONFIGS / name, overrides)
    rcs = config.data.rare_class_sampling
    assert rcs.enabled and rcs.min_pixels is None and rcs.min_pixels_ratio == 0.00149
    result = train(config, progress=False)
    assert result.step == 2
    caches = list((tmp_path / ".cache").glob("class_statistics_*.json"))
    assert len(caches) == 1 and ClassStatistics.load(caches[0]).sizes.tolist() == [[40, 56]] * 6
    assert "never draws" not in (result.run_dir / "train.log").read_text()


def test_classes_no_image_passes_are_named(data, tmp_path, caplog):
    cfg = config(data, tmp_path, min_pixels=40)  # car: 36 pixels in its only image
    with caplog.at_level("WARNING", logger="plca"):
        source = build_run_datasets(cfg.data, cfg.train, None, uses_target=False, cache_dir=tmp_path / "cache").source
    assert source.sampler.dropped_classes == (1,)
    assert "never draws car: no source image holds more than 40 pixels of it" in caplog.text
