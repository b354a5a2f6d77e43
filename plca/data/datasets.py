"""Segmentation datasets read from disk in any registered format.

``build_dataset(format, root, split, classes)`` lists a split with the format's reader
(:mod:`plca.data.formats`: one module per format, each registered by name; ``format_names()``
lists them) and returns a :class:`SegmentationDataset` whose labels are indices of the run's
``classes`` (255 = ignore): every format maps its raw label ids with one :class:`LabelMap`, and
classes the run does not use become 255.

Everything a reader can check without decoding images (folders, split files, every listed file)
is checked up front. :func:`build_dataset` raises the first problem as a
:class:`~plca.data.io.DatasetError`; :func:`scan_dataset` (used by ``plca prepare``) runs the same
readers but records every problem as a :class:`~plca.data.checks.Finding`, with the files.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from plca.data.formats import format_names, get_format, guess_format
from plca.data.formats.base import DatasetFormat, Issues, LabelMap, Listing, Sample, Stop
from plca.data.formats.folder import read_classes_file
from plca.data.io import DatasetError, Finding, read_image
from plca.data.labels import IGNORE_INDEX
from plca.data.transforms import resize_label, to_tensors

__all__ = [
    "DATASET_FORMATS", "DatasetScan", "LabelMap", "Sample", "SegmentationDataset", "border_mask", "build_dataset",
    "dataset_splits", "format_names", "guess_format", "read_classes_file", "scan_dataset", "unpaired_labels",
]

#: ``transform(image, label, rng[, valid])`` -> ``(image, label[, valid])`` tensors (see TrainTransform)
Transform = Callable[..., tuple[torch.Tensor, ...]]
LabelReader = Callable[[Path], np.ndarray]


class _RegisteredFormats(Sequence):
    """The names of the registered dataset formats, read from the registry each time it is used (so a
    format registered later is in it): ``name in DATASET_FORMATS``, ``", ".join(DATASET_FORMATS)``."""

    def __getitem__(self, index):
        return format_names()[index]

    def __len__(self) -> int:
        return len(format_names())

    def __repr__(self) -> str:
        return repr(format_names())


#: The dataset formats :func:`build_dataset` reads (a live view of :func:`plca.data.formats.format_names`).
DATASET_FORMATS: Sequence[str] = _RegisteredFormats()


class SegmentationDataset(Dataset):
    """Image / label pairs read from disk, mapped to class indices, then transformed.

    Item ``index`` is ``{"image": (3, H, W) uint8 RGB, "label": (H, W) int64 class indices
    (255 = ignore; all 255 without a label), "name": str, "index": int}``. The transform's
    randomness comes only from ``numpy.random.default_rng([seed, epoch, index])``, so any
    worker process, and a resumed run, produces exactly the same sample.

    ``on_error="skip"`` replaces a sample that fails to load by the next one (wrapping around;
    it is augmented, and reports its ``index``, as that item would be), with a warning naming the
    file; ``num_skipped`` counts them (per process). ``on_error="raise"`` lets the error through.
    ``resize_mismatched_labels`` resizes (nearest, one warning per file) a label whose size differs
    from its image's (GTA5 has a few); otherwise that is a :class:`DatasetError`.

    ``border_margins = (top, bottom, left, right)`` adds ``"border_valid"`` to every item: ``(H, W)
    bool``, False within that many pixels of the image's borders as stored, transformed with the
    label (HRDA's pseudo-label cropping v2: the margins mask the image's borders, so a training crop
    loses them only where it reaches them).
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], label_reader: LabelReader,
                 transform: Transform | None = None, *, seed: int = 0, on_error: str = "raise",
                 resize_mismatched_labels: bool = False, description: str = "dataset",
                 border_margins: Sequence[int] | None = None) -> None:
        self.samples: list[Sample] = list(samples)
        self.classes: tuple[str, ...] = tuple(classes)
        self.label_reader = label_reader
        self.transform = transform
        self.description = description
        if not self.samples:
            raise DatasetError(f"{description}: no samples")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.on_error = on_error
        self.resize_mismatched_labels = resize_mismatched_labels
        self.border_margins = None if border_margins is None else _margins(border_margins)
        self.epoch = 0
        self.num_skipped = 0
        self._size_warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_labels(self) -> bool:
        """Whether every sample has a label file."""
        return all(sample.label is not None for sample in self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation ``__getitem__`` draws."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        return self.fetch(index, warn=True)[0]

    def fetch(self, index: int, warn: bool = False) -> tuple[dict, list[str]]:
        """Item ``index`` and, under ``on_error="skip"``, one message per sample skipped to produce it
        (naming the file and the problem); they are counted in ``num_skipped`` and, with ``warn``,
        also issued as ``RuntimeWarning``. A DataLoader worker uses this to report skips to the
        training process, which counts and logs them."""
        count = len(self.samples)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {self.description} of {count} samples")
        index %= count
        if self.on_error == "raise":
            return self._load(index), []
        skipped: list[str] = []
        for offset in range(count):
            current = (index + offset) % count
            try:
                return self._load(current), skipped
            except DatasetError as error:
                self.num_skipped += 1
                skipped.append(f"skipping sample '{self.samples[current].name}' of {self.description}: {error}")
                if warn:
                    warnings.warn(skipped[-1], RuntimeWarning, stacklevel=3)
        raise DatasetError(f"{self.description}: none of its {count} samples could be loaded (first problem: "
                           f"{skipped[0]}); check the dataset with plca prepare")

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as read, before the transform: ``(H, W, 3) uint8`` image, ``(H, W) uint8`` labels."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.label is None:
            return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        return image, self._fit_label(self.label_reader(sample.label), image, sample)

    def item(self, index: int, image_tensor, label_tensor) -> dict:
        """The item dict of sample ``index`` with these (transformed) tensors."""
        return {"image": image_tensor, "label": label_tensor, "name": self.samples[index].name, "index": index}

    def _load(self, index: int) -> dict:
        image, label = self.load_pair(index)
        valid = None if self.border_margins is None else border_mask(label.shape, self.border_margins)
        if self.transform is None:
            tensors = (*to_tensors(image, label), *(() if valid is None else (torch.from_numpy(valid).bool(),)))
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            tensors = self.transform(image, label, rng) if valid is None else self.transform(image, label, rng, valid)
        item = self.item(index, tensors[0], tensors[1])
        if valid is not None:
            item["border_valid"] = tensors[2]
        return item

    def _fit_label(self, label: np.ndarray, image: np.ndarray, sample: Sample) -> np.ndarray:
        if label.shape == image.shape[:2]:
            return label
        sizes = (f"image {sample.image} is {image.shape[1]}x{image.shape[0]}, "
                 f"label {sample.label} is {label.shape[1]}x{label.shape[0]}")
        if not self.resize_mismatched_labels:
            raise DatasetError(f"{sample.label}: label and image sizes differ ({sizes}); fix or remove the pair")
        if sample.name not in self._size_warned:
            self._size_warned.add(sample.name)
            warnings.warn(f"{sizes}; resizing the label with nearest neighbour", RuntimeWarning, stacklevel=3)
        return resize_label(label, image.shape[:2])

    def __repr__(self) -> str:
        return (f"SegmentationDataset({self.description}, {len(self.samples)} samples, "
                f"{len(self.classes)} classes, transform={self.transform!r})")


def _format(format: str, classes: Sequence[str]) -> DatasetFormat:
    """The registered format ``format``, after checking ``classes``; a :class:`DatasetError` for either."""
    try:
        fmt = get_format(format)
    except KeyError:
        raise DatasetError(f"unknown dataset format '{format}'; known formats: {', '.join(format_names())}") from None
    if isinstance(classes, str) or not classes or not all(isinstance(name, str) for name in classes):
        raise DatasetError(f"classes must be a non-empty list of class names, got {classes!r}")
    if len(classes) >= IGNORE_INDEX:
        raise DatasetError(f"at most {IGNORE_INDEX - 1} classes are supported (255 is the ignore label), "
                           f"got {len(classes)}")
    return fmt


def _margins(margins: Sequence[int]) -> tuple[int, int, int, int]:
    values = tuple(margins)
    if len(values) != 4 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in values):
        raise ValueError(f"border margins must be 4 integers >= 0 (top, bottom, left, right), got {list(values)}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def border_mask(shape: Sequence[int], margins: Sequence[int]) -> np.ndarray:
    """``(H, W) uint8``: 1 inside the image, 0 within ``margins = (top, bottom, left, right)`` pixels of its
    borders (a margin larger than the image masks all of it)."""
    height, width = int(shape[0]), int(shape[1])
    top, bottom, left, right = _margins(margins)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:max(height - bottom, 0), left:max(width - right, 0)] = 1
    return mask


def _make(format: str, root: Path, split: str, classes: Sequence[str], listing: Listing, transform: Transform | None,
          seed: int, on_error: str, border_margins: Sequence[int] | None = None) -> SegmentationDataset:
    return SegmentationDataset(listing.samples, classes, listing.label_reader, transform, seed=seed, on_error=on_error,
                               description=f"{format} split '{split}' in {root}", border_margins=border_margins,
                               **listing.options)


def build_dataset(format: str, root: str | Path, split: str, classes: Sequence[str],
                  transform: Transform | None = None, *, seed: int = 0, on_error: str = "raise",
                  require_labels: bool = True, read_labels: bool = True,
                  border_margins: Sequence[int] | None = None) -> SegmentationDataset:
    """The ``split`` of the ``format`` dataset in ``root``, labelled with indices of ``classes``.

    ``require_labels=False`` allows a dataset without label files (e.g. the target's train
    split); its samples' labels are then all 255. ``read_labels=False`` never opens a label file,
    even where they exist (every label is 255): the unsupervised target of a training run.
    ``border_margins``: see :class:`SegmentationDataset`.
    Raises :class:`DatasetError` for an unknown format, a missing folder or split, an empty
    split or listed files that do not exist.
    """
    fmt = _format(format, classes)
    root = Path(root).expanduser()
    listing = fmt.list_split(root, split, classes, require_labels and read_labels, Issues(strict=True))
    if not read_labels:
        listing.samples = [replace(sample, label=None) for sample in listing.samples]
    return _make(format, root, split, classes, listing, transform, seed, on_error, border_margins)


@dataclass
class DatasetScan:
    """What :func:`scan_dataset` found: the dataset of the samples it could list (None if none), and
    every layout problem, with the files (``Finding.level``: ``error``, ``warning`` or ``note``)."""

    dataset: SegmentationDataset | None
    findings: list[Finding]


def scan_dataset(format: str, root: str | Path, split: str, classes: Sequence[str],
                 require_labels: bool = True) -> DatasetScan:
    """The readers of :func:`build_dataset`, recording every problem instead of raising the first.

    Missing images or labels of some samples are recorded and those samples left out (missing
    labels: kept without a label); a split that cannot be listed at all gives ``dataset=None``.
    For ``plca prepare``: splits without any label of the formats that may serve as an unlabelled
    target (``DatasetFormat.target_without_labels``) get a note, not an error. Raises
    :class:`DatasetError` only for an unknown format or bad ``classes``.
    """
    fmt = _format(format, classes)
    root = Path(root).expanduser()
    issues = Issues(strict=False)
    try:
        listing = fmt.list_split(root, split, classes, require_labels, issues)
    except Stop:
        listing = None
    findings = [Finding(problem.level, problem.message, problem.items) for problem in issues.problems]
    if listing is None or not listing.samples:
        return DatasetScan(None, findings)
    return DatasetScan(_make(format, root, split, classes, listing, None, 0, "raise"), findings)


def dataset_splits(format: str, root: str | Path) -> list[str]:
    """The splits a dataset folder has (``plca prepare`` checks each): the format's
    :meth:`~plca.data.formats.base.DatasetFormat.splits`."""
    return get_format(format).splits(Path(root).expanduser())


def unpaired_labels(format: str, root: str | Path, splits: Sequence[str] = ()) -> list[Path]:
    """Label files of the dataset in ``root`` (of ``splits``, where the format has split folders) that have
    no image (a sign of an incomplete download)."""
    return get_format(format).unpaired_labels(Path(root).expanduser(), list(splits))
