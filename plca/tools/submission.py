"""Test-set predictions in the form a benchmark server scores (``plca predict --split test --submission``).

The test labels of Cityscapes, ACDC and Dark Zurich are withheld: a test mIoU comes only from the
dataset's server. Each format that has one declares its layout (a
:class:`~plca.data.formats.base.SubmissionLayout`: which ids, which file names); this module turns
predicted class indices into those ids and writes the files, then ``submission.zip``::

    OUTPUT/submission/<the layout's path of each image>
    OUTPUT/submission.zip     the same files, ready to upload

Class indices are mapped by class name: index ``k`` of ``data.classes`` is the Cityscapes class of
that name, written as its train id (0..18) or its label id (e.g. road 7, sky 23).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from plca.config import ConfigError
from plca.data.formats.base import SubmissionLayout
from plca.data.formats.registry import format_names, get_format
from plca.data.labels import CITYSCAPES_CLASSES, CITYSCAPES_TRAIN_LABELS, IGNORE_INDEX
from plca.files import atomic_path

__all__ = ["SubmissionWriter", "class_to_submission_ids", "submission_layout", "train_id_to_label_id"]


def submission_layout(format_name: str) -> SubmissionLayout:
    """The layout of ``format_name``'s benchmark server; a :class:`ConfigError` naming the formats that have one."""
    layout = getattr(get_format(format_name), "submission", None)
    if layout is None:
        known = [name for name in format_names() if getattr(get_format(name), "submission", None) is not None]
        raise ConfigError(f"--submission: the '{format_name}' format (data.val.format) has no benchmark server plca "
                          f"writes for; formats with one: {', '.join(known)}")
    return layout


def train_id_to_label_id() -> np.ndarray:
    """``(256,) uint8``: Cityscapes train id (0..18) -> its label id; 255 stays 255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[:len(CITYSCAPES_TRAIN_LABELS)] = [label_id for _, label_id, _ in CITYSCAPES_TRAIN_LABELS]
    return table


def class_to_submission_ids(classes: Sequence[str], ids: str) -> np.ndarray:
    """``(len(classes),) uint8``: class index of ``classes`` -> Cityscapes train id (``ids="train"``) or label id
    (``ids="label"``); a class that is not a Cityscapes class is a :class:`ConfigError`."""
    unknown = [name for name in classes if name not in CITYSCAPES_CLASSES]
    if unknown:
        raise ConfigError(f"--submission: data.classes holds {unknown}, which are not Cityscapes classes; a benchmark "
                          f"server scores the 19 Cityscapes classes ({', '.join(CITYSCAPES_CLASSES)})")
    train_ids = np.array([CITYSCAPES_CLASSES.index(name) for name in classes], dtype=np.uint8)
    return train_ids if ids == "train" else train_id_to_label_id()[train_ids]


class SubmissionWriter:
    """Writes each image's prediction under ``output/submission/`` in ``layout``; :meth:`finish` zips them."""

    def __init__(self, output: str | Path, layout: SubmissionLayout, classes: Sequence[str]) -> None:
        self.folder = Path(output) / "submission"
        self.layout = layout
        self.table = class_to_submission_ids(classes, layout.ids)
        self.written: list[str] = []

    def __call__(self, name: str, labels: np.ndarray) -> Path:
        """Write class indices ``(H, W)`` of the image called ``name`` (its dataset sample name); returns the file."""
        relative = self.layout.file_of(name)
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.table[labels]).save(path)
        self.written.append(relative)
        return path

    def finish(self) -> Path:
        """Write ``submission.zip`` next to the folder, holding every file written (paths as in the layout)."""
        archive = self.folder.parent / "submission.zip"
        with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            for relative in sorted(self.written):
                bundle.write(self.folder / relative, arcname=relative)
        return archive
