"""Segmentation datasets in their real on-disk formats.

Formats (``build_dataset(format, root, split, classes)``):

- ``gta5``: ``images/NNNNN.png``, ``labels/NNNNN.png`` (Cityscapes label ids);
- ``synthia`` (SYNTHIA-RAND-CITYSCAPES): ``RGB/*.png``, ``GT/LABELS/*.png`` (16-bit, first
  channel = SYNTHIA class id);
- ``cityscapes``: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``,
  ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``;
- ``folder`` (any custom data): ``images/NAME.(png|jpg|jpeg)``, ``labels/NAME.png`` holding class
  indices of ``classes`` (255 = ignore), split files ``<split>.txt`` with one NAME per line;
- ``synthetic``: the embedded two-domain data (generated on first use), read as ``folder``.

For ``gta5`` and ``synthia`` the split is the file ``ROOT/<split>.txt`` (one name per line) if it
exists, else ``all`` or ``train`` means every image. Every reader maps its raw label ids to
indices of the run's ``classes`` (255 = ignore); classes the run does not use become 255.

Everything a constructor can check without decoding images (folders, split files, every
listed file) is checked up front and reported as a :class:`~plca.data.io.DatasetError`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from plca.data.io import DatasetError, read_image, read_label, read_synthia_label
from plca.data.labels import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    class_remap,
    cityscapes_id_to_train_id,
    cityscapes_known_ids,
    synthia_id_to_train_id,
    synthia_known_ids,
)
from plca.data.transforms import resize_label, to_tensors

__all__ = ["DATASET_FORMATS", "Sample", "SegmentationDataset", "build_dataset"]

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]
LabelReader = Callable[[Path], np.ndarray]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_MISSING_SHOWN = 5  # missing files named in an error message


@dataclass(frozen=True)
class Sample:
    """One image and its label file (``None`` for unlabelled data)."""

    name: str
    image: Path
    label: Path | None


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
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], label_reader: LabelReader,
                 transform: Transform | None = None, *, seed: int = 0, on_error: str = "raise",
                 resize_mismatched_labels: bool = False, description: str = "dataset") -> None:
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

    def _load(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.label is None:
            label = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        else:
            label = self._fit_label(self.label_reader(sample.label), image, sample)
        if self.transform is None:
            image_tensor, label_tensor = to_tensors(image, label)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image_tensor, label_tensor = self.transform(image, label, rng)
        return {"image": image_tensor, "label": label_tensor, "name": sample.name, "index": index}

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


# ----------------------------------------------------------------------------------------------
# Label readers: raw label file -> (H, W) uint8 class indices. Classes, not closures, so that
# datasets pickle into DataLoader worker processes under any start method.


class _LookupLabels:
    """8-bit label ids mapped through a ``(256,)`` lookup table; ``known`` ``(256,) bool`` marks the ids of
    the format's table (an id outside it is mapped to ignore when loading, and reported by :func:`check_files`)."""

    def __init__(self, table: np.ndarray, known: np.ndarray | None = None) -> None:
        self.table = table
        self.known = np.ones(256, dtype=bool) if known is None else known

    def __call__(self, path: Path) -> np.ndarray:
        return self.table[read_label(path)]

    read_raw = staticmethod(read_label)

    def unknown_ids(self, ids: np.ndarray) -> np.ndarray:
        """The raw ids among ``ids`` (distinct values) that are not in the format's table."""
        return ids[~self.known[ids]]

    def describe_known(self) -> str:
        return "Cityscapes label ids 0..33 (are these *_labelIds.png files, not train ids, colours or instances?)"


class _SynthiaLabels:
    """SYNTHIA's 16-bit class ids mapped through a ``(65536,)`` lookup table."""

    multichannel = True  # the labels are multi-channel PNGs; the class id is the first channel

    def __init__(self, table: np.ndarray, known: np.ndarray | None = None) -> None:
        self.table = table
        self.known = np.ones(65536, dtype=bool) if known is None else known

    def __call__(self, path: Path) -> np.ndarray:
        return self.table[read_synthia_label(path)]

    read_raw = staticmethod(read_synthia_label)

    def unknown_ids(self, ids: np.ndarray) -> np.ndarray:
        return ids[~self.known[ids]]

    def describe_known(self) -> str:
        return "SYNTHIA class ids 0..22 (are these the GT/LABELS files of SYNTHIA-RAND-CITYSCAPES?)"


class _IndexLabels:
    """Class indices stored directly (255 = ignore); any other value ``>= num_classes`` is an error."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, path: Path) -> np.ndarray:
        label = read_label(path)
        if label.size and int(label.max()) >= self.num_classes:
            counts = np.bincount(label.ravel(), minlength=256)
            bad = self.unknown_ids(np.flatnonzero(counts))
            if bad.size:
                shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
                raise DatasetError(
                    f"{path}: label values {shown} are not class indices; with {self.num_classes} classes a "
                    f"folder-format label holds 0..{self.num_classes - 1} or 255 (ignore). Check data.classes "
                    f"or the label file"
                )
        return label

    read_raw = staticmethod(read_label)

    def unknown_ids(self, ids: np.ndarray) -> np.ndarray:
        return ids[(ids >= self.num_classes) & (ids != IGNORE_INDEX)]

    def describe_known(self) -> str:
        return f"class indices 0..{self.num_classes - 1} of data.classes, or 255 (ignore)"


# ----------------------------------------------------------------------------------------------
# Listing files and checking them up front.


def _require_root(root: Path, fmt: str) -> None:
    if not root.is_dir():
        raise DatasetError(f"{root}: {fmt} dataset root folder not found; check the path")


def _require_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder not found; {hint}")


def _read_split_file(path: Path) -> list[str]:
    """Names listed in ``path``: one per line; blank lines and ``#`` comments ignored."""
    names = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name.lower().endswith(_IMAGE_SUFFIXES):
            name = name.rsplit(".", 1)[0]  # tolerate lists of file names
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: the split file lists no samples; write one name per line")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DatasetError(f"{path}: names listed more than once: {', '.join(duplicates[:_MISSING_SHOWN])}"
                           f"{' ...' if len(duplicates) > _MISSING_SHOWN else ''}; list each sample once")
    return names


def _split_names(root: Path, split: str, image_dir: Path) -> list[str]:
    """gta5 / synthia: names of ``ROOT/<split>.txt``, else every PNG of ``image_dir`` for ``all`` / ``train``."""
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        return _read_split_file(split_file)
    if split not in ("all", "train"):
        found = ", ".join(sorted(p.stem for p in root.glob("*.txt"))) or "none"
        raise DatasetError(f"{split_file}: split file not found (split files in {root}: {found}); without a "
                           f"split file use split 'all' (or 'train') for every image")
    names = sorted(p.stem for p in image_dir.glob("*.png"))
    if not names:
        raise DatasetError(f"{image_dir}: no .png images found; check the dataset root")
    return names


def _report_missing(paths: Sequence[Path], total: int, what: str, where: str) -> None:
    if paths:
        shown = ", ".join(str(p) for p in paths[:_MISSING_SHOWN]) + (" ..." if len(paths) > _MISSING_SHOWN else "")
        raise DatasetError(f"{len(paths)} of {total} {what} of {where} are missing: {shown}; "
                           f"check the dataset root and split, or complete the download")


def _pair_samples(names: Sequence[str], image_of: Callable[[str], Path], label_of: Callable[[str], Path] | None,
                  require_labels: bool, where: str) -> list[Sample]:
    """Samples of ``names``; reports missing images (and missing label files if ``require_labels``)."""
    images = [image_of(name) for name in names]
    _report_missing([image for image in images if not image.is_file()], len(names), "images", where)
    labels: list[Path | None] = [None] * len(names)
    if label_of is not None:
        labels = [label_of(name) for name in names]
        missing = [label for label in labels if not label.is_file()]
        if require_labels:
            _report_missing(missing, len(names), "label files", where)
        labels = [label if label.is_file() else None for label in labels]
    return [Sample(name, image, label) for name, image, label in zip(names, images, labels)]


def _cityscapes_table(classes: Sequence[str], fmt: str) -> np.ndarray:
    return _remap(classes, fmt)[cityscapes_id_to_train_id()]


def _remap(classes: Sequence[str], fmt: str) -> np.ndarray:
    try:
        return class_remap(classes, CITYSCAPES_CLASSES)
    except ValueError as error:
        raise DatasetError(f"data.classes for the '{fmt}' format: {error}") from None


# ----------------------------------------------------------------------------------------------
# One reader per format: (root, split, classes, require_labels) -> (samples, label reader, options).


def _gta5(root: Path, split: str, classes: Sequence[str], require_labels: bool) -> tuple:
    _require_root(root, "gta5")
    hint = "a GTA5 root holds images/ and labels/ (e.g. images/00001.png, labels/00001.png)"
    _require_dir(root / "images", "GTA5 images", hint)
    has_labels = (root / "labels").is_dir()
    if require_labels:
        _require_dir(root / "labels", "GTA5 labels", hint)
    names = _split_names(root, split, root / "images")
    samples = _pair_samples(names, lambda n: root / "images" / f"{n}.png",
                            (lambda n: root / "labels" / f"{n}.png") if has_labels else None,
                            require_labels, f"GTA5 split '{split}' in {root}")
    return (samples, _LookupLabels(_cityscapes_table(classes, "gta5"), cityscapes_known_ids()),
            {"resize_mismatched_labels": True})


def _synthia(root: Path, split: str, classes: Sequence[str], require_labels: bool) -> tuple:
    _require_root(root, "synthia")
    hint = "a SYNTHIA-RAND-CITYSCAPES root holds RGB/ and GT/LABELS/"
    _require_dir(root / "RGB", "SYNTHIA RGB", hint)
    labels = root / "GT" / "LABELS"
    has_labels = labels.is_dir()
    if require_labels:
        _require_dir(labels, "SYNTHIA GT/LABELS", hint)
    names = _split_names(root, split, root / "RGB")
    samples = _pair_samples(names, lambda n: root / "RGB" / f"{n}.png",
                            (lambda n: labels / f"{n}.png") if has_labels else None,
                            require_labels, f"SYNTHIA split '{split}' in {root}")
    table = _remap(classes, "synthia")[synthia_id_to_train_id()]
    return samples, _SynthiaLabels(table, synthia_known_ids()), {}


def _cityscapes(root: Path, split: str, classes: Sequence[str], require_labels: bool) -> tuple:
    _require_root(root, "cityscapes")
    images_root = root / "leftImg8bit"
    _require_dir(images_root, "Cityscapes leftImg8bit", "a Cityscapes root holds leftImg8bit/ and gtFine/")
    if not (images_root / split).is_dir():
        found = ", ".join(sorted(p.name for p in images_root.iterdir() if p.is_dir())) or "none"
        raise DatasetError(f"{images_root / split}: Cityscapes split '{split}' not found (splits there: {found})")
    labels_root = root / "gtFine" / split
    if require_labels:
        _require_dir(labels_root, f"Cityscapes gtFine/{split}",
                     "the labels come from gtFine_trainvaltest.zip, extracted next to leftImg8bit/")
    suffix = "_leftImg8bit.png"
    images = sorted((images_root / split).glob(f"*/*{suffix}"))
    if not images:
        raise DatasetError(f"{images_root / split}: no <city>/*{suffix} images found; check the dataset root")
    by_name = {path.name[:-len(suffix)]: path for path in images}

    def label_of(name: str) -> Path:
        return labels_root / by_name[name].parent.name / f"{name}_gtFine_labelIds.png"

    samples = _pair_samples(list(by_name), by_name.__getitem__, label_of if labels_root.is_dir() else None,
                            require_labels, f"Cityscapes split '{split}' in {root}")
    return samples, _LookupLabels(_cityscapes_table(classes, "cityscapes"), cityscapes_known_ids()), {}


def _find_image(images: Path, name: str) -> Path:
    """``images/name.<suffix>`` for the one image suffix that exists (the name shows all when none does)."""
    found = [images / f"{name}{suffix}" for suffix in _IMAGE_SUFFIXES if (images / f"{name}{suffix}").is_file()]
    if not found:
        found = [images / f"{name}{suffix.upper()}" for suffix in _IMAGE_SUFFIXES
                 if (images / f"{name}{suffix.upper()}").is_file()]
    if len(found) > 1:
        raise DatasetError(f"{images}: several images named '{name}' ({', '.join(p.name for p in found)}); "
                           f"keep one")
    return found[0] if found else images / f"{name}.(png|jpg|jpeg)"


def _check_classes_file(root: Path, classes: Sequence[str]) -> None:
    """A folder dataset may carry ``classes.txt``; its labels are indices into that list."""
    path = root / "classes.txt"
    if not path.is_file():
        return
    listed = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if listed != list(classes):
        raise DatasetError(
            f"{path}: this dataset's label values index the classes [{', '.join(listed)}], but the run's "
            f"classes are [{', '.join(classes)}]; set data.classes to the list in classes.txt (same order)"
        )


def _folder(root: Path, split: str, classes: Sequence[str], require_labels: bool) -> tuple:
    _require_root(root, "folder")
    hint = "a folder-format root holds images/, labels/ and one <split>.txt per split"
    _require_dir(root / "images", "images", hint)
    has_labels = (root / "labels").is_dir()
    if require_labels:
        _require_dir(root / "labels", "labels", hint)
    _check_classes_file(root, classes)
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        found = ", ".join(sorted(p.stem for p in root.glob("*.txt") if p.name != "classes.txt")) or "none"
        raise DatasetError(f"{split_file}: split file not found (splits in {root}: {found}); "
                           f"write one image name (without extension) per line")
    names = _read_split_file(split_file)
    samples = _pair_samples(names, lambda n: _find_image(root / "images", n),
                            (lambda n: root / "labels" / f"{n}.png") if has_labels else None,
                            require_labels, f"split '{split}' in {root}")
    return samples, _IndexLabels(len(classes)), {}


def _synthetic(root: Path, split: str, classes: Sequence[str], require_labels: bool) -> tuple:
    from plca.data.synthetic import ensure_generated

    try:
        ensure_generated(root)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    return _folder(root, split, classes, require_labels)


_READERS: dict[str, Callable[[Path, str, Sequence[str], bool], tuple]] = {
    "gta5": _gta5,
    "synthia": _synthia,
    "cityscapes": _cityscapes,
    "folder": _folder,
    "synthetic": _synthetic,
}

#: The dataset formats :func:`build_dataset` reads.
DATASET_FORMATS: tuple[str, ...] = tuple(_READERS)


def build_dataset(format: str, root: str | Path, split: str, classes: Sequence[str],
                  transform: Transform | None = None, *, seed: int = 0, on_error: str = "raise",
                  require_labels: bool = True) -> SegmentationDataset:
    """The ``split`` of the ``format`` dataset in ``root``, labelled with indices of ``classes``.

    ``require_labels=False`` allows a dataset without label files (e.g. the target's train
    split); its samples' labels are then all 255. Raises :class:`DatasetError` for an unknown
    format, a missing folder or split, an empty split or listed files that do not exist.
    """
    if format not in _READERS:
        raise DatasetError(f"unknown dataset format '{format}'; known formats: {', '.join(DATASET_FORMATS)}")
    if isinstance(classes, str) or not classes or not all(isinstance(name, str) for name in classes):
        raise DatasetError(f"classes must be a non-empty list of class names, got {classes!r}")
    if len(classes) >= IGNORE_INDEX:
        raise DatasetError(f"at most {IGNORE_INDEX - 1} classes are supported (255 is the ignore label), "
                           f"got {len(classes)}")
    root = Path(root).expanduser()
    samples, label_reader, options = _READERS[format](root, split, classes, require_labels)
    return SegmentationDataset(samples, classes, label_reader, transform, seed=seed, on_error=on_error,
                               description=f"{format} split '{split}' in {root}", **options)
