"""The datasets of a run, built from its config, and their files checked before training starts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plca.data.checks import FileCheckReport, check_enough_samples, check_files
from plca.data.datasets import build_dataset
from plca.data.io import DatasetError
from plca.data.transforms import EvalTransform, TrainTransform, crop_larger_than_images


@dataclass
class RunDatasets:
    source: Any
    target: Any | None
    val: Any | None

    def named(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "val": self.val}


def reads_target_labels(data, train) -> bool:
    """Whether training opens the target's label files: only for logged diagnostics
    (``data.target_label_diagnostics``) or target crops chosen by class ratio
    (``train.target_cat_max_ratio`` < 1, which makes the run no longer unsupervised)."""
    return data.target_label_diagnostics or train.target_cat_max_ratio < 1.0


def build_run_datasets(data, train, eval_size: Sequence[int] | None, uses_target: bool,
                       world_size: int = 1, cache_dir: Path | None = None,
                       target_border_margins: Sequence[int] | None = None) -> RunDatasets:
    """The training source (and target, when the method uses one) with the training transform, and the
    validation set with the evaluation transform. A training set smaller than one batch for every
    process is a :class:`DatasetError`. ``target_border_margins`` (what the method asks for, e.g.
    HRDA's pseudo-label margins) adds each target item's ``border_valid`` mask.

    ``data``: :class:`plca.config.DataConfig`; ``train``: :class:`plca.config.TrainConfig`.
    """
    def training_transform(shorter_side, cat_max_ratio: float) -> TrainTransform:
        return TrainTransform(crop_size=tuple(train.crop_size), shorter_side=tuple(shorter_side) if shorter_side else None,
                              flip=train.flip, scale_range=tuple(train.scale_range) if train.scale_range else None,
                              cat_max_ratio=cat_max_ratio, antialias=data.resize_antialias)

    transform = training_transform(train.shorter_side, train.cat_max_ratio)
    target_transform = training_transform(train.target_shorter_side or train.shorter_side, train.target_cat_max_ratio)
    common = dict(classes=data.classes, on_error=data.on_error)
    source = build_dataset(data.source.format, data.source.root, data.source.split, transform=transform,
                           seed=train.seed, **common)
    target = None
    if uses_target:
        target = build_dataset(data.target.format, data.target.root, data.target.split, transform=target_transform,
                               seed=train.seed + 1, require_labels=False,
                               read_labels=reads_target_labels(data, train), border_margins=target_border_margins,
                               **common)
    for name, dataset in (("source", source), ("target", target)):
        if dataset is not None:
            check_enough_samples(dataset, train.batch_size, world_size, name)
    if data.rare_class_sampling.enabled:
        from plca.data.rare_class import rare_class_dataset

        source = rare_class_dataset(source, data.rare_class_sampling, cache_dir or Path(".cache"), train.seed)
    val = None
    if data.val is not None:
        val = build_dataset(data.val.format, data.val.root, data.val.split,
                            transform=EvalTransform(tuple(eval_size) if eval_size else None,
                                                    antialias=data.resize_antialias),
                            seed=train.seed, **common)
    return RunDatasets(source, target, val)


def _every_sample_bad(report: FileCheckReport) -> bool:
    """Whether every sample this process checked has a problem (a remark such as a resize is none)."""
    return report.checked > 0 and len(report.bad_samples) >= report.checked


#: How a run checks its datasets' files before training (``plca train --data-check``; the default first): see
#: :data:`plca.data.checks.CHECK_LEVELS` (``full``, which decodes every image, is for ``plca prepare``).
RUN_CHECK_LEVELS: tuple[str, ...] = ("labels", "headers", "none")


def check_run_datasets(datasets: RunDatasets, level: str, on_error: str, rank: int, world_size: int,
                       logger: logging.Logger, agree: Callable[[bool], bool] = lambda ok: ok,
                       train=None) -> None:
    """Check the files of each dataset before training (each process a share of the samples).

    Bad files are a :class:`DatasetError` naming them under ``on_error="raise"``, and a warning
    under ``"skip"`` (they are then skipped, and counted, when loaded), unless not one sample of a
    dataset is good. ``agree(ok)`` is true on
    every process iff ``ok`` is true on every process (a collective under DDP). With ``train``
    (:class:`plca.config.TrainConfig`), a crop larger than the training images is a warning.
    """
    failed = ""
    for name, dataset in datasets.named().items():
        if dataset is None or level == "none":
            continue
        started = time.time()
        report = check_files(dataset, level, indices=range(rank, len(dataset), world_size))
        if train is not None and name in ("source", "target") and rank == 0:
            warning = crop_larger_than_images(
                tuple(train.crop_size), report.image_sizes,
                shorter_side=tuple(train.shorter_side) if train.shorter_side else None,
                scale_range=tuple(train.scale_range) if train.scale_range else None)
            if warning:
                logger.warning("%s data: %s", name, warning)
            if name == "target" and train.target_cat_max_ratio < 1.0:
                logger.warning("target data: crops are re-drawn while one class covers >= %g of the target's labelled "
                               "pixels (train.target_cat_max_ratio): this reads the target's ground truth, so this run "
                               "is NOT unsupervised domain adaptation; set it to 1 (the default) for crops that never "
                               "read target labels", train.target_cat_max_ratio)
        if report.resized:
            logger.warning("%s: %d label(s) differ in size from their image and are resized when loaded "
                           "(nearest), e.g. %s", dataset.description, len(report.resized), report.resized[0])
        if on_error == "skip" and agree(_every_sample_bad(report)) and not failed:
            failed = (f"{name} data: not one of its samples can be loaded, so data.on_error=skip (set) has nothing "
                      f"left to train on. {report.message()}")
        elif not report.ok:
            if on_error == "skip":
                logger.warning("%s (data.on_error is skip: these samples are skipped and counted when loaded)",
                               report.message())
            elif not failed:
                failed = (f"{name} data: {report.message()} Or set data.on_error=skip to skip bad samples (they "
                          f"are counted and logged).")
        logger.info("checked the files of the %s data (%s) in %.1f s", name, level, time.time() - started)
    if not agree(not failed):
        raise DatasetError(failed or "another process found bad dataset files (see its message)")
