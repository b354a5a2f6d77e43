"""Checks of a dataset's files before training, so that a bad file stops a run at minute one,
not at hour ten; ``plca prepare`` runs the same checks on every file.

:func:`check_files` looks at every sample of a :class:`~plca.data.datasets.SegmentationDataset`:

- ``"headers"``: the image and the label file open as images (only their headers are read), the
  image's mode converts to RGB, the label is single-channel (SYNTHIA: any 16-bit PNG, its first
  channel is used) and has its image's size (GTA5, whose reader resizes a mismatched label, gets a
  count instead of an error);
- ``"labels"`` (the default of ``plca train``): also decodes every label and checks its ids
  against the format's table (Cityscapes label ids 0..33, SYNTHIA ids 0..22, folder: class indices
  or 255), which also finds truncated label files, and counts the pixels of each class;
- ``"full"`` (``plca prepare``): also decodes every image, which finds truncated images.

At the first two levels images are not decoded (that would take as long as an epoch): a truncated
image is found when it is loaded, and handled by ``data.on_error``. Cost, estimated for the 24,966
GTA5 pairs (a label decodes in about 20 ms): headers a few seconds, labels about a minute on 8
threads; ``plca train --data-check headers`` skips the decoding.

:func:`check_enough_samples` checks that a split holds at least one batch.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from plca.data.io import DatasetError, Finding, ImageModeError, image_mode_problem, png_header, read_image

if TYPE_CHECKING:
    from plca.data.datasets import Sample

__all__ = ["CHECK_LEVELS", "FileCheckReport", "FileProblem", "Finding", "check_enough_samples", "check_files"]

#: What :func:`check_files` may do: nothing, read headers, also decode every label, also decode every image.
CHECK_LEVELS = ("none", "headers", "labels", "full")
_SHOWN = 5  # files named per kind of problem
_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
# What opening a file that is not a readable image raises.
_OPEN_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# kind -> (what is wrong, what to do)
_PROBLEMS = {
    "image": ("image file(s) cannot be opened as images", "re-extract or re-download them, or remove them "
                                                         "from the split"),
    "image_mode": ("image file(s) are in a mode with no faithful 8-bit RGB conversion",
                   "save them as 8-bit RGB (PNG or JPEG)"),
    "image_data": ("image file(s) cannot be decoded completely (truncated or corrupt)",
                   "re-extract or re-download them, or remove them from the split"),
    "label": ("label file(s) cannot be read", "re-extract or re-download them, or remove them from the split"),
    "colour": ("label file(s) are colour images, not single-channel ids",
               "use the id images (Cityscapes: *_gtFine_labelIds.png, not *_color.png)"),
    "depth": ("label file(s) have the wrong PNG bit depth (SYNTHIA's GT/LABELS are 16-bit PNGs; an 8-bit copy "
              "has lost the class ids)", "use the original GT/LABELS files of SYNTHIA-RAND-CITYSCAPES"),
    "size": ("label(s) differ in size from their image", "fix or remove these pairs"),
    "ids": ("label file(s) hold ids outside the table of {known}", "fix the files, or the dataset format / "
                                                                  "data.classes if they are right"),
}
#: Kinds that are not problems: labels resized when loaded (GTA5), labels without any class of the run.
_REMARKS = ("resized", "all_ignore")


@dataclass(frozen=True)
class FileProblem:
    """One file's problem: ``kind`` (a key of the problem table, or ``resized`` / ``all_ignore``),
    the sample's name, the file, the reason in words and, for ``ids``, the offending raw ids."""

    kind: str
    sample: str
    path: Path
    reason: str
    ids: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        return f"{self.path} ({self.reason})"


@dataclass
class FileCheckReport:
    """What :func:`check_files` found.

    ``problems[kind]`` lists one line per bad file; ``resized`` the labels that differ in size from
    their image but are resized when loaded (GTA5); ``all_ignored`` the labels without a pixel of any
    class of the run. ``image_sizes`` counts the images' ``(height, width)``. When the labels are
    decoded, ``class_pixels`` ``(C + 1,)`` counts the pixels of each class (last: ignored),
    ``class_images`` ``(C,)`` the labels holding each class, over ``labelled`` labels.
    """

    description: str
    checked: int = 0
    files: list[FileProblem] = field(default_factory=list)
    known: str = ""  # the label table, in words
    image_sizes: Counter = field(default_factory=Counter)
    labelled: int = 0
    class_pixels: np.ndarray | None = None
    class_images: np.ndarray | None = None

    @property
    def problems(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for problem in self.files:
            if problem.kind not in _REMARKS:
                found.setdefault(problem.kind, []).append(problem.text)
        return found

    @property
    def resized(self) -> list[str]:
        return [problem.text for problem in self.files if problem.kind == "resized"]

    @property
    def all_ignored(self) -> list[str]:
        return [problem.text for problem in self.files if problem.kind == "all_ignore"]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_samples(self) -> set[str]:
        """The names of the samples with a problem (remarks such as a resized label are none)."""
        return {problem.sample for problem in self.files if problem.kind not in _REMARKS}

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


def _reason(error: Exception, path: Path) -> str:
    """The error's message without the leading ``path:`` that the readers put there."""
    text = str(error) or type(error).__name__
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


@dataclass
class _SampleResult:
    problems: list[FileProblem] = field(default_factory=list)
    size: tuple[int, int] | None = None  # the image's (height, width)
    pixels: np.ndarray | None = None  # (C + 1,) pixels per class, last: ignored


def _check_image(sample, level: str, result: _SampleResult) -> None:
    def add(kind: str, reason: str) -> None:
        result.problems.append(FileProblem(kind, sample.name, sample.image, reason))

    try:
        (width, height), mode = _header(sample.image)
    except _OPEN_ERRORS as error:
        add("image", f"{type(error).__name__}: {error}")
        return
    result.size = (height, width)
    problem = image_mode_problem(mode)
    if problem is not None:
        add("image_mode", problem)
    elif level == "full":
        try:
            read_image(sample.image)
        except DatasetError as error:
            add("image_mode" if isinstance(error, ImageModeError) else "image_data", _reason(error, sample.image))


def _check_sample(dataset, index: int, level: str,
                  on_label: Callable[[Sample, np.ndarray], None] | None) -> _SampleResult:
    sample = dataset.samples[index]
    result = _SampleResult()
    _check_image(sample, level, result)
    if sample.label is None:
        return result

    def add(kind: str, reason: str, ids: tuple[int, ...] = ()) -> None:
        result.problems.append(FileProblem(kind, sample.name, sample.label, reason, ids))

    reader = dataset.label_reader
    try:
        (width, height), mode = _header(sample.label)
    except _OPEN_ERRORS as error:
        add("label", f"{type(error).__name__}: {error}")
        return result
    if not getattr(reader, "any_mode", False) and mode not in _LABEL_MODES:
        if mode in _COLOUR_MODES:
            add("colour", f"mode {mode}")
        else:
            add("label", f"mode {mode} is not a single-channel id image")
        return result
    depth = getattr(reader, "bit_depth", None)
    header = png_header(sample.label) if depth is not None else None
    if header is not None and header[2] != depth:
        add("depth", f"{header[2]}-bit")
        return result
    if result.size is not None and (height, width) != result.size:
        text = f"image {result.size[1]}x{result.size[0]}, label {width}x{height}"
        add("resized" if getattr(dataset, "resize_mismatched_labels", False) else "size", text)
    if level not in ("labels", "full") or not hasattr(reader, "read_raw"):
        return result
    try:
        raw = reader.read_raw(sample.label)
    except DatasetError as error:
        add("label", _reason(error, sample.label))
        return result
    ids = np.flatnonzero(np.bincount(raw.ravel(), minlength=1))
    bad = reader.unknown_ids(ids)
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
        add("ids", f"ids {shown}", tuple(int(v) for v in bad))
    if hasattr(reader, "to_classes"):
        label = reader.to_classes(raw)
        classes = len(dataset.classes)
        counts = np.bincount(label.ravel(), minlength=256)
        result.pixels = np.concatenate([counts[:classes], [counts[classes:].sum()]])
        if not result.pixels[:-1].any():
            add("all_ignore", "no pixel of the run's classes")
        if on_label is not None:
            on_label(sample, label)
    return result


def check_files(dataset, level: str = "labels", indices: Sequence[int] | None = None,
                workers: int | None = None, on_label: Callable[[Sample, np.ndarray], None] | None = None,
                progress: bool = False) -> FileCheckReport:
    """Check the files of ``dataset`` (all samples, or ``indices``) at ``level`` (see :data:`CHECK_LEVELS`).

    Returns a :class:`FileCheckReport`; raises nothing for bad files (the caller decides whether
    they are errors, e.g. by ``data.on_error``). At the ``labels`` and ``full`` levels,
    ``on_label(sample, label)`` is called with each decoded label as ``(H, W) uint8`` class
    indices, e.g. to write them out; it runs in the worker threads (``workers`` of them at once),
    so labels never pile up in memory. ``progress`` shows a progress bar.
    """
    if level not in CHECK_LEVELS:
        raise ValueError(f"level must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")
    known = dataset.label_reader.describe_known() if hasattr(dataset.label_reader, "describe_known") else ""
    report = FileCheckReport(description=dataset.description, known=known)
    if level == "none":
        return report
    indices = range(len(dataset)) if indices is None else indices
    workers = workers or min(8, os.cpu_count() or 1)
    classes = len(dataset.classes)
    pixels = np.zeros(classes + 1, dtype=np.int64)
    images = np.zeros(classes, dtype=np.int64)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: _check_sample(dataset, i, level, on_label), indices)
        for result in tqdm(results, total=len(indices), desc=f"checking {dataset.description}", unit="sample",
                           disable=not progress, dynamic_ncols=True):
            report.checked += 1
            report.files += result.problems
            if result.size is not None:
                report.image_sizes[result.size] += 1
            if result.pixels is not None:
                report.labelled += 1
                pixels += result.pixels
                images += result.pixels[:-1] > 0
    if level in ("labels", "full"):
        report.class_pixels, report.class_images = pixels, images
    return report


def check_enough_samples(dataset, batch_size: int, world_size: int = 1, name: str = "train") -> None:
    """Raise :class:`DatasetError` if ``dataset`` holds fewer samples than one batch of all processes.

    ``batch_size`` is per process; each of ``world_size`` processes draws its own batch, so a
    step needs ``batch_size * world_size`` samples. The message names the split (``name`` and the
    dataset's description), its size and the batch size.
    """
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
    needed = batch_size * world_size
    if len(dataset) < needed:
        description = getattr(dataset, "description", "dataset")
        processes = f" x {world_size} processes = {needed}" if world_size > 1 else ""
        raise DatasetError(f"the {name} data ({description}) has {len(dataset)} sample(s), fewer than one batch "
                           f"({batch_size} per process{processes}); add samples to the split or lower "
                           f"train.batch_size")
