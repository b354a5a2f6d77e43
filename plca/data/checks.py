"""Checks of a dataset's files before training starts, so that a bad file stops a run at minute one,
not at hour ten.

:func:`check_files` looks at every sample of a :class:`~plca.data.datasets.SegmentationDataset`:

- ``"headers"``: the image and the label file open as images (only their headers are read), the
  label is single-channel (SYNTHIA: any PNG, its first channel is used) and has its image's size
  (GTA5, whose reader resizes a mismatched label, gets a count instead of an error);
- ``"labels"`` (the default of ``plca train``): also decodes every label and checks its ids
  against the format's table (Cityscapes label ids 0..33, SYNTHIA ids 0..22, folder: class indices
  or 255), which also finds truncated label files.

Images are not decoded (that would take as long as an epoch): a truncated image is found when it
is loaded, and handled by ``data.on_error``. ``plca prepare`` checks everything, images included.
Cost, estimated for the 24,966 GTA5 pairs (a label decodes in about 20 ms): headers a few
seconds, labels about a minute on 8 threads; ``plca train --data-check headers`` skips the decoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from plca.data.io import DatasetError

__all__ = ["CHECK_LEVELS", "FileCheckReport", "check_files"]

#: What :func:`check_files` may do: nothing, read headers, or also decode every label.
CHECK_LEVELS = ("none", "headers", "labels")
_SHOWN = 5  # files named per kind of problem
_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")

# kind -> (what is wrong, what to do)
_PROBLEMS = {
    "image": ("image file(s) cannot be opened as images", "re-extract or re-download them, or remove them "
                                                         "from the split"),
    "label": ("label file(s) cannot be read", "re-extract or re-download them, or remove them from the split"),
    "colour": ("label file(s) are colour images, not single-channel ids",
               "use the id images (Cityscapes: *_gtFine_labelIds.png, not *_color.png)"),
    "size": ("label(s) differ in size from their image", "fix or remove these pairs"),
    "ids": ("label file(s) hold ids outside the table of {known}", "fix the files, or the dataset format / "
                                                                  "data.classes if they are right"),
}


@dataclass
class FileCheckReport:
    """What :func:`check_files` found: ``problems[kind]`` lists one line per bad file."""

    description: str
    checked: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)
    resized: list[str] = field(default_factory=list)  # GTA5 pairs whose label will be resized when loaded
    known: str = ""  # the label table, in words

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        """All problems in one paragraph: per kind, the count, up to five files and what to do."""
        parts = []
        for kind, items in self.problems.items():
            what, todo = _PROBLEMS[kind]
            shown = "; ".join(items[:_SHOWN]) + (f"; ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN
                                                 else "")
            parts.append(f"{len(items)} {what.format(known=self.known)}: {shown}. To do: {todo}")
        return (f"{self.description}: checked {self.checked} samples before training. " + " | ".join(parts)
                + ". (plca prepare FORMAT ROOT lists every problem of a dataset.)")


def _header(path) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` from a file's header; raises OSError (and friends) if it is no image."""
    with Image.open(path) as image:
        return image.size, image.mode


def _check_sample(dataset, index: int, decode_labels: bool) -> list[tuple[str, str]]:
    sample = dataset.samples[index]
    found: list[tuple[str, str]] = []
    try:
        image_size, _ = _header(sample.image)
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        found.append(("image", f"{sample.image} ({type(error).__name__}: {error})"))
        image_size = None
    if sample.label is None:
        return found
    reader = dataset.label_reader
    try:
        label_size, mode = _header(sample.label)
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        return found + [("label", f"{sample.label} ({type(error).__name__}: {error})")]
    if not getattr(reader, "multichannel", False) and mode not in _LABEL_MODES:
        return found + [("colour", f"{sample.label} (mode {mode})")]
    if image_size is not None and label_size != image_size:
        text = f"{sample.label} (image {image_size[0]}x{image_size[1]}, label {label_size[0]}x{label_size[1]})"
        found.append(("resized" if dataset.resize_mismatched_labels else "size", text))
    if decode_labels and hasattr(reader, "read_raw"):
        try:
            raw = reader.read_raw(sample.label)
        except DatasetError as error:
            return found + [("label", str(error))]
        ids = np.flatnonzero(np.bincount(raw.ravel(), minlength=1))
        bad = reader.unknown_ids(ids)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
            found.append(("ids", f"{sample.label} (ids {shown})"))
    return found


def check_files(dataset, level: str = "labels", indices: Sequence[int] | None = None,
                workers: int | None = None) -> FileCheckReport:
    """Check the files of ``dataset`` (all samples, or ``indices``) at ``level`` (see :data:`CHECK_LEVELS`).

    Returns a :class:`FileCheckReport`; raises nothing for bad files (the caller decides whether
    they are errors, e.g. by ``data.on_error``).
    """
    if level not in CHECK_LEVELS:
        raise ValueError(f"level must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")
    known = dataset.label_reader.describe_known() if hasattr(dataset.label_reader, "describe_known") else ""
    report = FileCheckReport(description=dataset.description, known=known)
    if level == "none":
        return report
    indices = range(len(dataset)) if indices is None else indices
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for found in pool.map(lambda i: _check_sample(dataset, i, level == "labels"), indices):
            report.checked += 1
            for kind, text in found:
                if kind == "resized":
                    report.resized.append(text)
                else:
                    report.problems.setdefault(kind, []).append(text)
    return report
