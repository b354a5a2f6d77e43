"""Rare class sampling in the training stream: draws follow the sampler, crops are re-drawn, the class
statistics come from `plca prepare --rcs-stats` or a cache, and a resumed stream draws the same."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataset_writers import write_folder
from plca.config import build_config
from plca.data.build import build_run_datasets
from plca.data.io import DatasetError
from plca.data.rare_class import RareClassDataset
from plca.tools.prepare import check_dataset

CLASSES = ["road", "car", "sky"]


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


def config(root, tmp_path, **rcs):
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"},
                 "rare_class_sampling": {"enabled": True, "min_pixels": 10, **rcs}},
        "train": {"crop_size": [16, 16], "batch_size": 2},
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
