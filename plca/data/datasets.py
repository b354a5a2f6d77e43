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
exists, else ``all`` or ``train`` means every image. Split files are read by
:func:`plca.data.io.read_split_file`. Every reader maps its raw label ids to indices of the run's
``classes`` (255 = ignore) with one :class:`LabelMap`; classes the run does not use become 255.

Everything a constructor can check without decoding images (folders, split files, every
listed file) is checked up front. :func:`build_dataset` raises the first problem as a
:class:`~plca.data.io.DatasetError`; :func:`scan_dataset` (used by ``plca prepare``) runs the same
readers but records every problem as a :class:`~plca.data.checks.Finding`, with the files.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch.utils.data import Dataset

from plca.data.io import (
    IMAGE_SUFFIXES,
    DatasetError,
    Finding,
    duplicate_names,
    read_image,
    read_label,
    read_split_file,
    read_synthia_label,
    read_text_lines,
)
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

__all__ = [
    "DATASET_FORMATS", "DatasetScan", "LabelMap", "Sample", "SegmentationDataset", "build_dataset",
    "dataset_splits", "guess_format", "read_classes_file", "scan_dataset", "unpaired_labels",
]

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]
LabelReader = Callable[[Path], np.ndarray]

_SHOWN = 5  # files named in an error message
_FORMAT_NAMES = {"gta5": "GTA5", "synthia": "SYNTHIA", "cityscapes": "Cityscapes", "folder": "folder-format",
                 "synthetic": "synthetic"}
#: Per format: the folder that must exist, and the layout in words.
_LAYOUTS = {
    "gta5": ("images", "images/ and labels/ (e.g. images/00001.png, labels/00001.png)"),
    "synthia": ("RGB", "RGB/ and GT/LABELS/"),
    "cityscapes": ("leftImg8bit", "leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/"),
    "folder": ("images", "images/, labels/ and one <split>.txt per split"),
    "synthetic": ("images", "images/, labels/ and one <split>.txt per split"),
}
#: Formats whose splits may be a target's unlabelled images (plca prepare notes a split without labels).
_TARGET_FORMATS = ("folder", "synthetic", "cityscapes")
_GTA5_NAME = re.compile(r"\d{5}\.png")
_CITYSCAPES_IMAGE = "_leftImg8bit.png"
_CITYSCAPES_LABEL = "_gtFine_labelIds.png"


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
        if self.transform is None:
            image_tensor, label_tensor = to_tensors(image, label)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image_tensor, label_tensor = self.transform(image, label, rng)
        return self.item(index, image_tensor, label_tensor)

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
# The label reader: raw label file -> (H, W) uint8 class indices. A class, not a closure, so that
# datasets pickle into DataLoader worker processes under any start method.


class LabelMap:
    """Raw label ids read by ``decode`` and mapped through a lookup ``table`` to class indices.

    ``decode(path)`` returns ``(H, W)`` raw ids (uint8, or uint16 for SYNTHIA) and ``table``
    (one entry per possible raw id, uint8) maps them to class indices of the run (255 = ignore).
    ``known`` (bool, same length) marks the ids of the format's table and ``known_text`` says
    which they are, in words. An id outside it is mapped to ignore when loading, or, with
    ``reject_unknown``, raises :class:`DatasetError` (the folder format, whose ids are the
    class indices themselves). :func:`~plca.data.checks.check_files` reports such ids in any case.
    ``any_mode``: the label file may be any PNG (SYNTHIA's multi-channel labels); ``bit_depth``:
    the PNG bit depth the files must have (SYNTHIA: 16), checked by ``check_files``.
    """

    def __init__(self, decode: Callable[[Path], np.ndarray], table: np.ndarray, known: np.ndarray,
                 known_text: str, *, reject_unknown: bool = False, any_mode: bool = False,
                 bit_depth: int | None = None) -> None:
        if table.shape != known.shape:
            raise ValueError(f"table {table.shape} and known {known.shape} must have one entry per raw id each")
        self.decode = decode
        self.table = table
        self.known = known
        self.known_text = known_text
        self.reject_unknown = reject_unknown
        self.any_mode = any_mode
        self.bit_depth = bit_depth
        self._first_unknown = int(np.argmin(known)) if not known.all() else len(known)

    def __call__(self, path: Path) -> np.ndarray:
        raw = self.decode(path)
        if self.reject_unknown and raw.size and int(raw.max()) >= self._first_unknown:
            bad = self.unknown_ids(np.flatnonzero(np.bincount(raw.ravel(), minlength=1)))
            if bad.size:
                shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
                raise DatasetError(f"{path}: label values {shown} are outside the {self.known_text}; check "
                                   f"data.classes or the label file")
        return self.table[raw]

    def read_raw(self, path: Path) -> np.ndarray:
        """The raw ids of the label file at ``path``, unmapped."""
        return self.decode(path)

    def to_classes(self, raw: np.ndarray) -> np.ndarray:
        """Raw ids -> ``uint8`` class indices (ids outside the format's table -> 255)."""
        return self.table[raw]

    def unknown_ids(self, ids: np.ndarray) -> np.ndarray:
        """The raw ids among ``ids`` (distinct values) that are not in the format's table."""
        return ids[~self.known[ids]]

    def describe_known(self) -> str:
        return self.known_text


def _remap(classes: Sequence[str], fmt: str) -> np.ndarray:
    try:
        return class_remap(classes, CITYSCAPES_CLASSES)
    except ValueError as error:
        raise DatasetError(f"data.classes for the '{fmt}' format: {error}") from None


def _cityscapes_labels(classes: Sequence[str], fmt: str) -> LabelMap:
    return LabelMap(read_label, _remap(classes, fmt)[cityscapes_id_to_train_id()], cityscapes_known_ids(),
                    "Cityscapes label ids 0..33 (are these *_labelIds.png files, not train ids, colours or "
                    "instances?)")


def _synthia_labels(classes: Sequence[str]) -> LabelMap:
    return LabelMap(read_synthia_label, _remap(classes, "synthia")[synthia_id_to_train_id()], synthia_known_ids(),
                    "SYNTHIA class ids 0..22 (are these the GT/LABELS files of SYNTHIA-RAND-CITYSCAPES?)",
                    any_mode=True, bit_depth=16)


def _index_labels(num_classes: int) -> LabelMap:
    known = np.zeros(256, dtype=bool)
    known[:num_classes] = True
    known[IGNORE_INDEX] = True
    table = np.where(known, np.arange(256), IGNORE_INDEX).astype(np.uint8)
    return LabelMap(read_label, table, known, f"class indices 0..{num_classes - 1} of data.classes, or 255 (ignore)",
                    reject_unknown=True)


# ----------------------------------------------------------------------------------------------
# Listing a split's files: every problem raised at once (build_dataset) or recorded (scan_dataset).


class _Stop(Exception):
    """The listing cannot go on (the problem is recorded)."""


class _Issues:
    """Problems found while listing: ``strict`` raises the first that makes the split unusable."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.findings: list[Finding] = []

    def error(self, message: str, items: Sequence[str] = (), paths: Sequence[Path] = (), todo: str = "") -> None:
        """A problem of the split: raised when strict (naming ``paths``, else ``items``), else recorded."""
        if self.strict:
            shown = [str(path) for path in paths] or list(items)
            listed = ": " + ", ".join(shown[:_SHOWN]) + (" ..." if len(shown) > _SHOWN else "") if shown else ""
            raise DatasetError(f"{message}{listed}" + (f"; {todo}" if todo else ""))
        self.findings.append(Finding("error", message + (f"; {todo}" if todo else ""), list(items)))

    def fatal(self, message: str) -> NoReturn:
        """A problem after which the split cannot be listed: raised when strict, else recorded and listing stops."""
        self.error(message)
        raise _Stop

    def record(self, level: str, message: str, items: Sequence[str] = ()) -> None:
        """A finding that never stops a build: recorded only when listing for ``plca prepare``."""
        if not self.strict:
            self.findings.append(Finding(level, message, list(items)))


@dataclass
class _Listing:
    samples: list[Sample]
    label_reader: LabelMap
    options: dict = field(default_factory=dict)


def _entries(root: Path) -> str:
    """The top-level entries of ``root`` in words (folders with a trailing /)."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return "it cannot be listed"
    if not names:
        return "it is empty"
    shown = [f"{name}/" if (root / name).is_dir() else name for name in names[:8]]
    return "it holds " + ", ".join(shown) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _not_gta5_names(images: Path) -> str | None:
    """An image among the first entries of ``images`` not named NNNNN.png (GTA5's names), or None."""
    with os.scandir(images) as entries:
        for _, entry in zip(range(50), entries):
            if not _GTA5_NAME.fullmatch(entry.name):
                return entry.name
    return None


def _not_gta5(root: Path) -> str | None:
    """Why ``root`` (with ``images/``) does not look like GTA5, or None."""
    if (root / "classes.txt").exists():
        return "it has a classes.txt"
    odd = _not_gta5_names(root / "images")
    return f"its images are not all named NNNNN.png (e.g. images/{odd})" if odd is not None else None


def guess_format(root: str | Path) -> str | None:
    """The format whose folders ``root`` has (``cityscapes``, ``synthia``, ``gta5``, ``folder``), or None.

    GTA5 and the folder format share ``images/`` and ``labels/``; GTA5's images are all named
    ``NNNNN.png`` and it has no ``classes.txt``.
    """
    root = Path(root)
    if (root / "leftImg8bit").is_dir():
        return "cityscapes"
    if (root / "RGB").is_dir():
        return "synthia"
    if (root / "images").is_dir():
        return "folder" if _not_gta5(root) else "gta5"
    return None


def _not_this_format(fmt: str, root: Path) -> str:
    """One line: ``root`` lacks the image folder of ``fmt``, and what it looks like instead."""
    folder, layout = _LAYOUTS[fmt]
    name = _FORMAT_NAMES[fmt]
    guess = guess_format(root)
    if guess is not None and guess != fmt:
        instead = f"it looks like a {_FORMAT_NAMES[guess]} dataset (plca prepare {guess} {root})"
    else:
        instead = _entries(root)
    return (f"{root} does not look like a {name} dataset: {root / folder}: folder not found (a {name} root holds "
            f"{layout}); {instead}")


def _require_root(root: Path, fmt: str, issues: _Issues) -> None:
    if not root.is_dir():
        state = "it is a file" if root.exists() else "it does not exist"
        issues.fatal(f"{root}: {_FORMAT_NAMES[fmt]} dataset root folder not found ({state}); check the path")


def _require_images(root: Path, fmt: str, issues: _Issues) -> Path:
    folder = root / _LAYOUTS[fmt][0]
    if not folder.is_dir():
        issues.fatal(_not_this_format(fmt, root))
    return folder


def _label_folder(folder: Path, fmt: str, what: str, hint: str, require_labels: bool, issues: _Issues) -> bool:
    """Whether the label ``folder`` exists; its absence is a problem if ``require_labels``.

    Listing for ``plca prepare``, the folder and Cityscapes formats (whose splits may be a
    target's unlabelled images) get a note instead.
    """
    if folder.is_dir():
        return True
    if not require_labels:
        return False
    if fmt in _TARGET_FORMATS and not issues.strict:
        issues.record("note", f"there is no label folder {folder}: its images were checked as unlabelled target "
                              f"images (they cannot serve as a source or for validation)")
        return False
    issues.error(f"{folder}: {what} folder not found; {hint}; without a label folder the images can serve only "
                 f"as unlabelled (target) data")
    return False


def _read_split(path: Path, issues: _Issues) -> list[str]:
    """The names of split file ``path``; an unreadable or empty file stops, duplicates are reported."""
    try:
        names = read_split_file(path)
    except DatasetError as error:
        issues.fatal(str(error))
    if not names:
        issues.fatal(f"{path}: the split file lists no samples; write one name per line")
    duplicates = duplicate_names(names)
    if duplicates:
        issues.error(f"{path}: names listed more than once", duplicates, todo="list each sample once")
    return list(dict.fromkeys(names))


def _split_files(root: Path) -> list[Path]:
    return [path for path in sorted(root.glob("*.txt")) if path.name != "classes.txt"]


def _split_names(root: Path, split: str, image_dir: Path, every_image: bool,
                 issues: _Issues) -> tuple[list[str], Path | None]:
    """Names of ``ROOT/<split>.txt`` (and that file), else, if ``every_image`` and the split is ``all`` or
    ``train``, every PNG of ``image_dir`` (and None)."""
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        return _read_split(split_file, issues), split_file
    found = ", ".join(path.stem for path in _split_files(root)) or "none"
    if not every_image:
        guess = guess_format(root) if not _split_files(root) else None
        looks = (f"; {root} looks like a {_FORMAT_NAMES[guess]} dataset (plca prepare {guess} {root})"
                 if guess not in (None, "folder") else "")
        issues.fatal(f"{split_file}: split file not found (splits in {root}: {found}); write one image name "
                     f"(without extension) per line{looks}")
    if split not in ("all", "train"):
        issues.fatal(f"{split_file}: split file not found (split files in {root}: {found}); without a split file use "
                     f"split 'all' (or 'train') for every image")
    names = sorted(path.stem for path in image_dir.glob("*.png"))
    if not names:
        issues.fatal(f"{image_dir}: no .png images found; check the dataset root")
    return names, None


def _pair(names: Sequence[str], image_of: Callable[[str], Path | None], label_of: Callable[[str], Path] | None,
          require_labels: bool, where: str, image_dir: Path, label_dir: Path, issues: _Issues,
          listed_in: Path | None = None, labels_optional: bool = False) -> list[Sample]:
    """Samples of ``names`` that have an image, reporting the missing images and (if ``require_labels``) labels.

    ``labels_optional`` (listing for ``plca prepare`` a target-capable format): a split none of whose
    images has a label gets a note instead.
    """
    images = [image_of(name) for name in names]
    missing = [(name, path) for name, path in zip(names, images) if path is None or not path.is_file()]
    if missing:
        source = f"listed in {listed_in}" if listed_in is not None else f"of {where}"
        paths = [path or image_dir / f"{name}.(png|jpg|jpeg)" for name, path in missing]
        issues.error(f"{len(missing)} of {len(names)} images {source} are missing from {image_dir}",
                     [name for name, _ in missing], paths,
                     todo="check the dataset root and split, or complete the download")
    pairs = [(name, path) for name, path in zip(names, images) if path is not None and path.is_file()]
    if label_of is None:
        return [Sample(name, path, None) for name, path in pairs]
    labels = [label_of(name) for name, _ in pairs]
    absent = [label for label in labels if not label.is_file()]
    if absent and require_labels:
        if len(absent) == len(labels) and labels_optional and not issues.strict:
            issues.record("note", f"none of the {len(labels)} images of {where} has a label in {label_dir}: they "
                                  f"were checked as unlabelled target images")
        else:
            issues.error(f"{len(absent)} of {len(labels)} label files of {where} are missing from {label_dir} "
                         f"(these images have no label)", [label.name for label in absent], absent,
                         todo="check the dataset root and split, or complete the download")
    return [Sample(name, path, label if label.is_file() else None) for (name, path), label in zip(pairs, labels)]


# ----------------------------------------------------------------------------------------------
# One reader per format: (root, split, classes, require_labels, issues) -> listing.


def _gta5(root: Path, split: str, classes: Sequence[str], require_labels: bool, issues: _Issues) -> _Listing:
    reader = _cityscapes_labels(classes, "gta5")
    _require_root(root, "gta5", issues)
    images = _require_images(root, "gta5", issues)
    has_labels = _label_folder(root / "labels", "gta5", "GTA5 labels",
                               "a GTA5 root holds images/ and labels/ (e.g. images/00001.png, labels/00001.png)",
                               require_labels, issues)
    odd = None if issues.strict else _not_gta5(root)
    if odd is not None:
        issues.record("warning", f"{root} does not look like a GTA5 dataset: {odd}; it looks like a folder-format "
                                 f"dataset (plca prepare folder {root} --classes ...)")
    names, split_file = _split_names(root, split, images, True, issues)
    samples = _pair(names, lambda n: images / f"{n}.png", (lambda n: root / "labels" / f"{n}.png") if has_labels
                    else None, require_labels, f"GTA5 split '{split}' in {root}", images, root / "labels", issues,
                    split_file)
    return _Listing(samples, reader, {"resize_mismatched_labels": True})


def _synthia(root: Path, split: str, classes: Sequence[str], require_labels: bool, issues: _Issues) -> _Listing:
    reader = _synthia_labels(classes)
    _require_root(root, "synthia", issues)
    images = _require_images(root, "synthia", issues)
    labels = root / "GT" / "LABELS"
    has_labels = _label_folder(labels, "synthia", "SYNTHIA GT/LABELS",
                               "a SYNTHIA-RAND-CITYSCAPES root holds RGB/ and GT/LABELS/", require_labels, issues)
    names, split_file = _split_names(root, split, images, True, issues)
    samples = _pair(names, lambda n: images / f"{n}.png", (lambda n: labels / f"{n}.png") if has_labels else None,
                    require_labels, f"SYNTHIA split '{split}' in {root}", images, labels, issues, split_file)
    return _Listing(samples, reader)


def _cityscapes(root: Path, split: str, classes: Sequence[str], require_labels: bool, issues: _Issues) -> _Listing:
    reader = _cityscapes_labels(classes, "cityscapes")
    _require_root(root, "cityscapes", issues)
    images_root = _require_images(root, "cityscapes", issues)
    if not (images_root / split).is_dir():
        found = ", ".join(sorted(p.name for p in images_root.iterdir() if p.is_dir())) or "none"
        issues.fatal(f"{images_root / split}: Cityscapes split '{split}' not found (splits there: {found})")
    labels_root = root / "gtFine" / split
    has_labels = _label_folder(labels_root, "cityscapes", f"Cityscapes gtFine/{split}",
                               "the labels come from gtFine_trainvaltest.zip, extracted next to leftImg8bit/",
                               require_labels, issues)
    images = sorted((images_root / split).glob(f"*/*{_CITYSCAPES_IMAGE}"))
    if not images:
        issues.fatal(f"{images_root / split}: no <city>/*{_CITYSCAPES_IMAGE} images found; check the dataset root")
    by_name = {path.name[:-len(_CITYSCAPES_IMAGE)]: path for path in images}

    def label_of(name: str) -> Path:
        return labels_root / by_name[name].parent.name / f"{name}{_CITYSCAPES_LABEL}"

    samples = _pair(list(by_name), by_name.get, label_of if has_labels else None, require_labels,
                    f"Cityscapes split '{split}' in {root}", images_root / split, labels_root, issues,
                    labels_optional=True)
    return _Listing(samples, reader)


def _find_image(images: Path, name: str, ambiguous: list[str]) -> Path | None:
    """``images/name.<suffix>`` for the one image suffix that exists (None if none does); several
    are added to ``ambiguous`` and the first is used."""
    found = [images / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES if (images / f"{name}{suffix}").is_file()]
    if not found:
        found = [images / f"{name}{suffix.upper()}" for suffix in IMAGE_SUFFIXES
                 if (images / f"{name}{suffix.upper()}").is_file()]
    if len(found) > 1:
        ambiguous.append(" / ".join(path.name for path in found))
    return found[0] if found else None


def read_classes_file(path: str | Path) -> list[str]:
    """The class names a folder dataset's ``classes.txt`` lists, one per line, in label-index order."""
    return [name for _, name in read_text_lines(path)]


def _check_classes_file(root: Path, classes: Sequence[str], issues: _Issues) -> None:
    """A folder dataset may carry ``classes.txt``; its labels are indices into that list."""
    path = root / "classes.txt"
    if not path.is_file():
        return
    try:
        listed = read_classes_file(path)
    except DatasetError as error:
        issues.fatal(str(error))
    if listed != list(classes):
        issues.error(f"{path}: this dataset's label values index the classes [{', '.join(listed)}], but the run's "
                     f"classes are [{', '.join(classes)}]; set data.classes (plca prepare: --classes) to the list in "
                     f"classes.txt (same order)")


def _folder(root: Path, split: str, classes: Sequence[str], require_labels: bool, issues: _Issues) -> _Listing:
    reader = _index_labels(len(classes))
    _require_root(root, "folder", issues)
    images = _require_images(root, "folder", issues)
    has_labels = _label_folder(root / "labels", "folder", "labels",
                               "a folder-format root holds images/, labels/ and one <split>.txt per split",
                               require_labels, issues)
    _check_classes_file(root, classes, issues)
    names, split_file = _split_names(root, split, images, False, issues)
    ambiguous: list[str] = []
    samples = _pair(names, lambda n: _find_image(images, n, ambiguous),
                    (lambda n: root / "labels" / f"{n}.png") if has_labels else None, require_labels,
                    f"split '{split}' in {root}", images, root / "labels", issues, split_file, labels_optional=True)
    if ambiguous:
        issues.error(f"{images}: several images share one name (which one is meant is ambiguous)", ambiguous,
                     todo="keep one")
    return _Listing(samples, reader)


def _synthetic(root: Path, split: str, classes: Sequence[str], require_labels: bool, issues: _Issues) -> _Listing:
    from plca.data.synthetic import ensure_generated, generated_parameters

    try:
        ensure_generated(root, **generated_parameters(root))
    except ValueError as error:
        issues.fatal(str(error))
    return _folder(root, split, classes, require_labels, issues)


_READERS: dict[str, Callable[[Path, str, Sequence[str], bool, _Issues], _Listing]] = {
    "gta5": _gta5,
    "synthia": _synthia,
    "cityscapes": _cityscapes,
    "folder": _folder,
    "synthetic": _synthetic,
}

#: The dataset formats :func:`build_dataset` reads.
DATASET_FORMATS: tuple[str, ...] = tuple(_READERS)


def _check_arguments(format: str, classes: Sequence[str]) -> None:
    if format not in _READERS:
        raise DatasetError(f"unknown dataset format '{format}'; known formats: {', '.join(DATASET_FORMATS)}")
    if isinstance(classes, str) or not classes or not all(isinstance(name, str) for name in classes):
        raise DatasetError(f"classes must be a non-empty list of class names, got {classes!r}")
    if len(classes) >= IGNORE_INDEX:
        raise DatasetError(f"at most {IGNORE_INDEX - 1} classes are supported (255 is the ignore label), "
                           f"got {len(classes)}")


def _make(format: str, root: Path, split: str, classes: Sequence[str], listing: _Listing, transform: Transform | None,
          seed: int, on_error: str) -> SegmentationDataset:
    return SegmentationDataset(listing.samples, classes, listing.label_reader, transform, seed=seed, on_error=on_error,
                               description=f"{format} split '{split}' in {root}", **listing.options)


def build_dataset(format: str, root: str | Path, split: str, classes: Sequence[str],
                  transform: Transform | None = None, *, seed: int = 0, on_error: str = "raise",
                  require_labels: bool = True, read_labels: bool = True) -> SegmentationDataset:
    """The ``split`` of the ``format`` dataset in ``root``, labelled with indices of ``classes``.

    ``require_labels=False`` allows a dataset without label files (e.g. the target's train
    split); its samples' labels are then all 255. ``read_labels=False`` never opens a label file,
    even where they exist (every label is 255): the unsupervised target of a training run.
    Raises :class:`DatasetError` for an unknown format, a missing folder or split, an empty
    split or listed files that do not exist.
    """
    _check_arguments(format, classes)
    root = Path(root).expanduser()
    listing = _READERS[format](root, split, classes, require_labels and read_labels, _Issues(strict=True))
    if not read_labels:
        listing.samples = [replace(sample, label=None) for sample in listing.samples]
    return _make(format, root, split, classes, listing, transform, seed, on_error)


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
    For ``plca prepare``: splits of the folder / Cityscapes formats without any label get a
    note, not an error, as a target's training split has no labels. Raises
    :class:`DatasetError` only for an unknown format or bad ``classes``.
    """
    _check_arguments(format, classes)
    root = Path(root).expanduser()
    issues = _Issues(strict=False)
    try:
        listing = _READERS[format](root, split, classes, require_labels, issues)
    except _Stop:
        return DatasetScan(None, issues.findings)
    dataset = _make(format, root, split, classes, listing, None, 0, "raise") if listing.samples else None
    return DatasetScan(dataset, issues.findings)


def dataset_splits(format: str, root: str | Path) -> list[str]:
    """The splits a dataset folder has: its split files (gta5 and synthia: ``all``, every image,
    first), Cityscapes' ``train`` and ``val`` folders."""
    root = Path(root).expanduser()
    if format == "cityscapes":
        return [split for split in ("train", "val") if (root / "leftImg8bit" / split).is_dir()]
    files = [path.stem for path in _split_files(root)] if root.is_dir() else []
    if format in ("gta5", "synthia"):
        return ["all"] + [name for name in files if name != "all"]
    return files


def unpaired_labels(format: str, root: str | Path, splits: Sequence[str] = ()) -> list[Path]:
    """Label files of the dataset in ``root`` that have no image (a sign of an incomplete download).

    gta5 / synthia / folder: every PNG of the label folder whose name no image has; Cityscapes:
    the ``*_gtFine_labelIds.png`` of ``splits`` without their ``*_leftImg8bit.png``.
    """
    root = Path(root).expanduser()
    if format == "cityscapes":
        found = []
        for split in splits:
            labels = sorted((root / "gtFine" / split).glob(f"*/*{_CITYSCAPES_LABEL}"))
            found += [path for path in labels if not (root / "leftImg8bit" / split / path.parent.name /
                                                      f"{path.name[:-len(_CITYSCAPES_LABEL)]}{_CITYSCAPES_IMAGE}"
                                                      ).is_file()]
        return found
    image_dir = root / _LAYOUTS.get(format, ("images",))[0]
    label_dir = root / "GT" / "LABELS" if format == "synthia" else root / "labels"
    if not image_dir.is_dir() or not label_dir.is_dir():
        return []
    suffixes = IMAGE_SUFFIXES if format in ("folder", "synthetic") else (".png",)
    stems = {path.stem for path in image_dir.iterdir() if path.suffix.lower() in suffixes}
    return [path for path in sorted(label_dir.glob("*.png")) if path.stem not in stems]
