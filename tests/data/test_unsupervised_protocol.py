"""The unsupervised protocol: no shipped config reads a target label file in training.

Every config in ``configs/`` (resolved with its ``_base_`` pieces) is built on tiny datasets in its
own formats whose target has **no label files at all**; its training datasets must build, and the
target must yield batches whose labels are all "ignore". With label files present, the target's
samples must still point at none of them, so no loss or crop rule can read them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from dataset_writers import write_acdc, write_cityscapes, write_darkzurich, write_folder, write_gta5, write_synthia
from plca.config import load_config
from plca.data.build import build_run_datasets, check_run_datasets
from plca.data.labels import IGNORE_INDEX
from plca.engine.loader import batch_stream
from plca.methods import get_method

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
#: small training images keep each config's resize (e.g. a shorter side of 704) cheap enough
SMALL = ["train.crop_size=[32,32]", "train.shorter_side=null", "train.target_shorter_side=null",
         "train.scale_range=null", "data.num_workers=0", "data.val=null",
         "data.rare_class_sampling.enabled=false"]  # RCS draws source images only; tiny images have too few pixels


def write(fmt: str, root: Path, with_labels: bool, classes_count: int) -> None:
    if fmt == "gta5":
        write_gta5(root, n=4)
    elif fmt == "synthia":
        write_synthia(root, n=4)
    elif fmt == "cityscapes":
        write_cityscapes(root, splits=("train",), with_labels=with_labels)
    elif fmt == "folder":
        write_folder(root, classes_count=classes_count, splits={"train": 4})
        if not with_labels:
            shutil.rmtree(root / "labels")
    elif fmt == "acdc":
        write_acdc(root, splits={"train": 1}, with_labels=with_labels)  # one image of each condition
    elif fmt == "darkzurich":  # with labels: as if its training images had them (Dark Zurich labels only val)
        write_darkzurich(root, splits={"train": {"day": 1, "night": 4}}, with_labels=with_labels,
                         labelled_splits=("train",))
    else:
        raise AssertionError(f"no writer for the format {fmt} of a shipped config")


def shipped_config(path: Path, tmp_path: Path, target_labels: bool, *extra: str):
    config = load_config(path, SMALL)
    source, target = config.data.source, config.data.target
    classes = len(config.data.classes)
    write(source.format, tmp_path / "source", True, classes)
    if target is not None:
        write(target.format, tmp_path / "target", target_labels, classes)
    overrides = [f"data.source.root={tmp_path / 'source'}", f"output_dir={tmp_path / 'runs'}", *SMALL, *extra]
    if source.format == "folder":
        overrides.append("data.source.split=train")
    if target is not None:
        overrides.append(f"data.target.root={tmp_path / 'target'}")
    return load_config(path, overrides)


def test_every_shipped_config_is_checked():
    assert len(CONFIGS) >= 14, "the configs folder moved?"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_trains_on_a_target_without_any_label_file(tmp_path, path, caplog):
    config = shipped_config(path, tmp_path, target_labels=False)
    assert config.train.target_cat_max_ratio == 1.0
    assert config.data.target_label_diagnostics is False
    uses_target = get_method(config.method).uses_target
    datasets = build_run_datasets(config.data, config.train, None, uses_target=uses_target,
                                  cache_dir=tmp_path / "cache")
    if not uses_target:
        assert datasets.target is None
        return
    with caplog.at_level(logging.INFO):
        check_run_datasets(datasets, "labels", "raise", 0, 1, logging.getLogger("plca.test"), train=config.train)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "target" in r.getMessage()]
    batch = next(batch_stream(datasets.target, config.train.batch_size, seed=0))
    assert batch["image"].shape[0] == config.train.batch_size
    assert torch.all(batch["label"] == IGNORE_INDEX)


@pytest.mark.parametrize("path", [p for p in CONFIGS if "source_only" not in p.stem], ids=lambda p: p.stem)
def test_shipped_config_never_points_at_the_target_label_files_that_exist(tmp_path, path):
    config = shipped_config(path, tmp_path, target_labels=True)
    datasets = build_run_datasets(config.data, config.train, None, uses_target=True, cache_dir=tmp_path / "cache")
    assert all(sample.label is None for sample in datasets.target.samples)
    assert all(bool((datasets.target[i]["label"] == IGNORE_INDEX).all()) for i in range(2))


def test_target_labels_are_read_only_when_asked_for_diagnostics_or_by_a_target_crop_ratio(tmp_path, caplog):
    path = next(p for p in CONFIGS if p.stem == "folder_plca")
    diagnostics = shipped_config(path, tmp_path, True, "data.target_label_diagnostics=true")
    target = build_run_datasets(diagnostics.data, diagnostics.train, None, uses_target=True).target
    assert all(sample.label is not None for sample in target.samples)
    assert any(bool((target[i]["label"] != IGNORE_INDEX).any()) for i in range(len(target)))

    ratio = load_config(path, [*SMALL, f"data.source.root={tmp_path / 'source'}", "data.source.split=train",
                               f"data.target.root={tmp_path / 'target'}", "train.target_cat_max_ratio=0.75"])
    datasets = build_run_datasets(ratio.data, ratio.train, None, uses_target=True)
    assert all(sample.label is not None for sample in datasets.target.samples)
    with caplog.at_level(logging.INFO):
        check_run_datasets(datasets, "labels", "raise", 0, 1, logging.getLogger("plca.test"), train=ratio.train)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "NOT unsupervised" in r.getMessage()]
    assert len(warnings) == 1
