"""The run's datasets from its config: each domain gets its own crop rule."""

from __future__ import annotations

import logging

import pytest

from dataset_writers import write_folder
from plca.config import build_config
from plca.data.build import build_run_datasets, check_run_datasets


@pytest.mark.parametrize("source_ratio, target_ratio", [(1.0, 1.0), (0.75, 1.0), (0.75, 0.5)])
def test_each_domain_crops_with_its_own_cat_max_ratio(tmp_path, caplog, source_ratio, target_ratio):
    write_folder(tmp_path / "data", classes_count=3, splits={"train": 4}, size=(24, 32))
    folder = {"format": "folder", "root": str(tmp_path / "data"), "split": "train"}
    config = build_config({
        "method": "plca", "data": {"classes": ["a", "b", "c"], "source": folder, "target": folder},
        "train": {"crop_size": [16, 16], "batch_size": 2, "cat_max_ratio": source_ratio,
                  "target_cat_max_ratio": target_ratio},
        "output_dir": str(tmp_path / "runs"),
    })
    datasets = build_run_datasets(config.data, config.train, None, uses_target=True)
    assert datasets.source.transform.cat_max_ratio == source_ratio
    assert datasets.target.transform.cat_max_ratio == target_ratio

    with caplog.at_level(logging.INFO):
        check_run_datasets(datasets, "labels", "raise", 0, 1, logging.getLogger("plca.test"), train=config.train)
    reads_target_labels = [r for r in caplog.records if "reads the target's ground truth" in r.getMessage()
                           and r.levelno == logging.WARNING]
    assert len(reads_target_labels) == (target_ratio < 1.0)


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_antialias_reaches_the_training_and_validation_transforms(tmp_path, antialias):
    write_folder(tmp_path / "data", classes_count=3, splits={"train": 4, "val": 2}, size=(24, 32))
    folder = {"format": "folder", "root": str(tmp_path / "data")}
    config = build_config({
        "method": "plca", "data": {"classes": ["a", "b", "c"], "source": {**folder, "split": "train"},
                                   "target": {**folder, "split": "train"}, "val": {**folder, "split": "val"},
                                   "resize_antialias": antialias},
        "train": {"crop_size": [16, 16], "batch_size": 2}, "output_dir": str(tmp_path / "runs"),
    })
    datasets = build_run_datasets(config.data, config.train, [12, 16], uses_target=True)
    assert datasets.source.transform.antialias is datasets.target.transform.antialias is antialias
    assert datasets.val.transform.antialias is antialias


def test_only_the_plca_reference_configs_resize_as_pillow():
    from pathlib import Path

    from plca.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(configs.glob("*.yaml")):
        reference = path.stem.split("_", 1)[1] in ("plca", "source_only") and not path.stem.startswith("folder")
        assert load_config(path).data.resize_antialias is reference, path.name
