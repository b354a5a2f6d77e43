"""What a dataset format is, and the pieces every format's reader is built from.

A format is a :class:`DatasetFormat` instance registered by name (:mod:`plca.data.formats.registry`).
It declares its layout in words, lists a split's files (:meth:`DatasetFormat.list_split`: image and
label paths and sample names, plus the :class:`LabelMap` that turns its label files into class
indices), names the splits a folder has, says whether a split may be a target's unlabelled images,
and how ``plca prepare`` recognises its layout (:meth:`DatasetFormat.recognise`).

Listing goes through :class:`Issues`: a strict listing (``build_dataset``) raises the first problem
as a :class:`~plca.data.io.DatasetError`; a collecting one (``scan_dataset``, for ``plca prepare``)
records every problem, with the files, and stops only when the split cannot be listed at all.
The helpers below (root and folder checks, split files, image / label pairing) word those
problems the same way for every format.

Formats with conditions (ACDC's weather, Dark Zurich's time of day) select them in the split:
``SPLIT`` is every condition the split has on disk, ``SPLIT:COND+COND`` those conditions, each of
which must be there (:meth:`DatasetFormat.parse_split`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from plca.data.io import DatasetError, duplicate_names, read_label, read_split_file
from plca.data.labels import CITYSCAPES_CLASSES, IGNORE_INDEX, class_remap, cityscapes_id_to_train_id, \
    cityscapes_known_ids
from plca.data.formats.registry import get_format, guess_format

__all__ = [
    "ConditionSplit", "DatasetFormat", "Issues", "LabelMap", "Listing", "Problem", "Sample", "Stop", "braced",
    "cityscapes_label_map", "condition_label_folders", "label_folder", "labels_of_sequences_without_image",
    "labels_without_image", "not_this_format", "pair", "pair_sequences", "remap", "require_images", "require_root",
    "split_files", "split_names", "SubmissionLayout", "train_id_label_map", "wrong_layout",
]

_SHOWN = 5  # files named in an error message


@dataclass(frozen=True)
class Sample:
    """One image and its label file (``None`` for unlabelled data)."""

    name: str
    image: Path
    label: Path | None


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


def remap(classes: Sequence[str], fmt: str) -> np.ndarray:
    """``(256,) uint8``: Cityscapes train id -> index in ``classes`` (255 if absent); unknown names are a
    :class:`DatasetError` naming the format."""
    try:
        return class_remap(classes, CITYSCAPES_CLASSES)
    except ValueError as error:
        raise DatasetError(f"data.classes for the '{fmt}' format: {error}") from None


def cityscapes_label_map(classes: Sequence[str], fmt: str) -> LabelMap:
    """Label files of Cityscapes label ids (0..33; ``*_labelIds.png``, GTA5's labels)."""
    return LabelMap(read_label, remap(classes, fmt)[cityscapes_id_to_train_id()], cityscapes_known_ids(),
                    "Cityscapes label ids 0..33 (are these *_labelIds.png files, not train ids, colours or "
                    "instances?)")


def train_id_label_map(classes: Sequence[str], fmt: str) -> LabelMap:
    """Label files of Cityscapes train ids (0..18, 255 = ignore; ``*_labelTrainIds.png``)."""
    known = np.zeros(256, dtype=bool)
    known[:len(CITYSCAPES_CLASSES)] = True
    known[IGNORE_INDEX] = True
    return LabelMap(read_label, remap(classes, fmt), known,
                    f"Cityscapes train ids 0..{len(CITYSCAPES_CLASSES) - 1} or 255 (are these *_labelTrainIds.png "
                    f"files, not label ids, colours or invalid masks?)")


# ----------------------------------------------------------------------------------------------
# Listing a split's files: every problem raised at once (build_dataset) or recorded (scan_dataset).


class Stop(Exception):
    """The listing cannot go on (the problem is recorded)."""


@dataclass
class Problem:
    """A problem found while listing: ``level`` error | warning | note, and the names or files that have it."""

    level: str
    message: str
    items: list[str] = field(default_factory=list)


class Issues:
    """Problems found while listing: ``strict`` raises the first that makes the split unusable."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.problems: list[Problem] = []

    def error(self, message: str, items: Sequence[str] = (), paths: Sequence[Path] = (), todo: str = "") -> None:
        """A problem of the split: raised when strict (naming ``paths``, else ``items``), else recorded."""
        if self.strict:
            shown = [str(path) for path in paths] or list(items)
            listed = ": " + ", ".join(shown[:_SHOWN]) + (" ..." if len(shown) > _SHOWN else "") if shown else ""
            raise DatasetError(f"{message}{listed}" + (f"; {todo}" if todo else ""))
        self.problems.append(Problem("error", message + (f"; {todo}" if todo else ""), list(items)))

    def fatal(self, message: str) -> NoReturn:
        """A problem after which the split cannot be listed: raised when strict, else recorded and listing stops."""
        self.error(message)
        raise Stop

    def record(self, level: str, message: str, items: Sequence[str] = ()) -> None:
        """A finding that never stops a build: recorded only when listing for ``plca prepare``."""
        if not self.strict:
            self.problems.append(Problem(level, message, list(items)))


@dataclass
class Listing:
    """A split's samples, the label reader of its files, and options for the dataset (e.g. GTA5's
    ``resize_mismatched_labels``)."""

    samples: list[Sample]
    label_reader: LabelMap
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SubmissionLayout:
    """How a format's benchmark server wants test-set predictions (``plca predict --submission``).

    ``ids``: ``"train"`` (Cityscapes train ids 0..18) or ``"label"`` (Cityscapes label ids 0..33);
    ``path``: the file of a sample inside the submission, a template with ``{name}`` (the sample's
    name); ``source``: where the layout was read; ``how``: how to submit it, in words.
    """

    ids: str
    path: str
    source: str
    how: str

    def __post_init__(self) -> None:
        if self.ids not in ("train", "label"):
            raise ValueError(f"SubmissionLayout.ids must be 'train' or 'label', got {self.ids!r}")
        if "{name}" not in self.path:
            raise ValueError(f"SubmissionLayout.path must contain {{name}}, got {self.path!r}")

    def file_of(self, name: str) -> str:
        """The relative path of sample ``name``'s prediction inside the submission."""
        return self.path.format(name=name)


@dataclass(frozen=True)
class ConditionSplit:
    """A split of a format with conditions: its name and the conditions named (in the format's order), or
    None for every condition the split has on disk."""

    split: str
    conditions: tuple[str, ...] | None


class DatasetFormat:
    """One on-disk dataset layout. Subclass it, set the attributes, implement :meth:`label_map` and
    :meth:`list_split` (and :meth:`splits`, :meth:`unpaired_labels`, :meth:`recognise` where the
    defaults do not fit), and register an instance with
    :func:`~plca.data.formats.registry.register_format`.
    """

    #: The name configs and the command line use (``data.source.format``, ``plca prepare NAME``).
    name: str = ""
    #: The name in messages ("GTA5").
    title: str = ""
    #: The folder, relative to the root, whose absence means "not this format".
    image_folder: str = "images"
    #: The layout in words, for messages ("images/ and labels/ (e.g. ...)").
    layout: str = ""
    #: The class names ``data.classes`` may use (its label files hold ids of these); None: any names (the
    #: label files hold indices of ``data.classes`` itself).
    class_names: tuple[str, ...] | None = CITYSCAPES_CLASSES
    #: A split may be a target's unlabelled images: ``plca prepare`` notes a split (or label folder)
    #: without labels instead of calling it an error.
    target_without_labels: bool = False
    #: Conditions a split may select with ``SPLIT:COND+COND`` (none: the split is a plain name).
    conditions: tuple[str, ...] = ()
    #: ``plca prepare`` offers this format.
    in_prepare: bool = True
    #: How its benchmark server wants test-set predictions; None: it has none plca knows.
    submission: SubmissionLayout | None = None

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        """The reader of this format's label files, mapping them to indices of ``classes``."""
        raise NotImplementedError

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        """The samples of ``split`` in ``root``. Problems go to ``issues`` (a missing folder: ``issues.fatal``;
        missing files: ``issues.error``, leaving those samples out). ``require_labels=False``: labels may be
        absent (samples without one have ``label=None``)."""
        raise NotImplementedError

    def splits(self, root: Path) -> list[str]:
        """The splits ``root`` holds (``plca prepare`` without ``--split`` checks each): its split files."""
        return [path.stem for path in split_files(root)] if root.is_dir() else []

    def unpaired_labels(self, root: Path, splits: Sequence[str]) -> list[Path]:
        """Label files of ``splits`` that have no image (a sign of an incomplete download)."""
        return []

    def recognise(self, root: Path) -> int:
        """How surely ``root`` has this layout: 0 not at all; higher for a more specific match (1: a generic
        layout another format may share, 2: this format's own folders)."""
        return 0

    def default_classes(self, root: Path) -> list[str] | None:
        """The classes ``plca prepare`` checks when given none (None: ``--classes`` is required)."""
        return list(self.class_names) if self.class_names is not None else None

    def parse_split(self, split: str) -> ConditionSplit:
        """``SPLIT`` (every condition the split has) or ``SPLIT:COND+COND``; a ``ValueError`` saying what is wrong."""
        name, colon, listed = split.partition(":")
        if not name:
            raise ValueError(f"split '{split}' has no split name before the ':'")
        if not colon:
            return ConditionSplit(name, None)
        if not self.conditions:
            raise ValueError(f"split '{split}': the {self.title} format has no conditions to select after ':'")
        chosen = listed.split("+")
        unknown = [condition for condition in chosen if condition not in self.conditions]
        if unknown or not listed:
            raise ValueError(f"split '{split}': unknown {self.title} condition(s) {unknown or ['']}; write "
                             f"{name}:COND or {name}:COND+COND with conditions among {', '.join(self.conditions)}, "
                             f"or {name} for all of them")
        duplicates = duplicate_names(chosen)
        if duplicates:
            raise ValueError(f"split '{split}' names the condition(s) {', '.join(duplicates)} more than once")
        return ConditionSplit(name, tuple(condition for condition in self.conditions if condition in chosen))

    def check_split(self, split: str) -> str | None:
        """What is wrong with ``split`` before any file is read (its condition syntax), or None."""
        if not self.conditions:
            return None
        try:
            self.parse_split(split)
        except ValueError as error:
            return str(error)
        return None

    def condition_of(self, sample: Sample) -> str | None:
        """The condition a sample was taken in (``plca prepare`` counts them), or None."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ----------------------------------------------------------------------------------------------
# Helpers the formats' readers share: they word each problem the same way for every format.


def entries(root: Path) -> str:
    """The top-level entries of ``root`` in words (folders with a trailing /)."""
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return "it cannot be listed"
    if not names:
        return "it is empty"
    shown = [f"{name}/" if (root / name).is_dir() else name for name in names[:8]]
    return "it holds " + ", ".join(shown) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def looks_like(root: Path, fmt: DatasetFormat) -> str | None:
    """``looks like a <Title> dataset (plca prepare NAME ROOT)`` when ``root`` has another format's
    layout than ``fmt``, else None."""
    guess = guess_format(root)
    if guess is None or guess == fmt.name:
        return None
    return f"looks like a {get_format(guess).title} dataset (plca prepare {guess} {root})"


def wrong_layout(fmt: DatasetFormat, root: Path, missing: str) -> str:
    """One line: ``root`` is not laid out as ``fmt`` (``missing`` says what is not there), and what it looks
    like instead."""
    looks = looks_like(root, fmt)
    instead = f"it {looks}" if looks else entries(root)
    return (f"{root} does not look like a {fmt.title} dataset: {missing} (a {fmt.title} root holds {fmt.layout}); "
            f"{instead}")


def not_this_format(fmt: DatasetFormat, root: Path) -> str:
    """One line: ``root`` lacks the image folder of ``fmt``, and what it looks like instead."""
    return wrong_layout(fmt, root, f"{root / fmt.image_folder}: folder not found")


def require_root(fmt: DatasetFormat, root: Path, issues: Issues) -> None:
    if not root.is_dir():
        state = "it is a file" if root.exists() else "it does not exist"
        issues.fatal(f"{root}: {fmt.title} dataset root folder not found ({state}); check the path")


def require_images(fmt: DatasetFormat, root: Path, issues: Issues) -> Path:
    """``root / fmt.image_folder``; its absence stops the listing with what ``root`` looks like instead."""
    folder = root / fmt.image_folder
    if not folder.is_dir():
        issues.fatal(not_this_format(fmt, root))
    return folder


def label_folder(fmt: DatasetFormat, folder: Path, what: str, hint: str, require_labels: bool,
                 issues: Issues) -> bool:
    """Whether the label ``folder`` exists; its absence is a problem if ``require_labels``.

    Listing for ``plca prepare``, the formats whose splits may be a target's unlabelled images
    (``fmt.target_without_labels``) get a note instead.
    """
    if folder.is_dir():
        return True
    if not require_labels:
        return False
    if fmt.target_without_labels and not issues.strict:
        issues.record("note", f"there is no label folder {folder}: its images were checked as unlabelled target "
                              f"images (they cannot serve as a source or for validation)")
        return False
    issues.error(f"{folder}: {what} folder not found; {hint}; without a label folder the images can serve only "
                 f"as unlabelled (target) data")
    return False


def _read_split(path: Path, issues: Issues) -> list[str]:
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


def split_files(root: Path) -> list[Path]:
    """The split files of ``root``: its ``*.txt`` but ``classes.txt``."""
    return [path for path in sorted(root.glob("*.txt")) if path.name != "classes.txt"]


def split_names(fmt: DatasetFormat, root: Path, split: str, image_dir: Path, every_image: bool,
                issues: Issues) -> tuple[list[str], Path | None]:
    """Names of ``ROOT/<split>.txt`` (and that file), else, if ``every_image`` and the split is ``all`` or
    ``train``, every PNG of ``image_dir`` (and None)."""
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        return _read_split(split_file, issues), split_file
    found = ", ".join(path.stem for path in split_files(root)) or "none"
    if not every_image:
        looks = looks_like(root, fmt) if not split_files(root) else None
        issues.fatal(f"{split_file}: split file not found (splits in {root}: {found}); write one image name "
                     f"(without extension) per line" + (f"; {root} {looks}" if looks else ""))
    if split not in ("all", "train"):
        issues.fatal(f"{split_file}: split file not found (split files in {root}: {found}); without a split file use "
                     f"split 'all' (or 'train') for every image")
    names = sorted(path.stem for path in image_dir.glob("*.png"))
    if not names:
        issues.fatal(f"{image_dir}: no .png images found; check the dataset root")
    return names, None


def pair(names: Sequence[str], image_of: Callable[[str], Path | None], label_of: Callable[[str], Path] | None,
         require_labels: bool, where: str, image_dir: Path, label_dir: Path, issues: Issues,
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


def labels_without_image(image_dir: Path, label_dir: Path, suffixes: Sequence[str] = (".png",)) -> list[Path]:
    """The PNGs of ``label_dir`` whose stem no file of ``image_dir`` (with one of ``suffixes``) has."""
    if not image_dir.is_dir() or not label_dir.is_dir():
        return []
    stems = {path.stem for path in image_dir.iterdir() if path.suffix.lower() in suffixes}
    return [path for path in sorted(label_dir.glob("*.png")) if path.stem not in stems]


def pair_sequences(fmt: DatasetFormat, image_dir: Path, label_dir: Path, image_suffix: str, label_suffix: str,
                   has_labels: bool, require_labels: bool, where: str, issues: Issues) -> list[Sample]:
    """Samples of the images ``image_dir/<sequence>/<name><image_suffix>`` and their labels
    ``label_dir/<sequence>/<name><label_suffix>`` (the layout of ACDC and Dark Zurich), named ``<name>``."""
    images = sorted(image_dir.glob(f"*/*{image_suffix}"))
    if not images:
        issues.error(f"{image_dir}: no <sequence>/*{image_suffix} images found",
                     todo="check the dataset root, or complete the download")
        return []
    by_name = {path.name[:-len(image_suffix)]: path for path in images}

    def label_of(name: str) -> Path:
        return label_dir / by_name[name].parent.name / f"{name}{label_suffix}"

    return pair(list(by_name), by_name.get, label_of if has_labels else None, require_labels, where, image_dir,
                label_dir, issues, labels_optional=fmt.target_without_labels)


def labels_of_sequences_without_image(image_dir: Path, label_dir: Path, image_suffix: str,
                                      label_suffix: str) -> list[Path]:
    """The ``label_dir/<sequence>/*<label_suffix>`` files without ``image_dir/<sequence>/<name><image_suffix>``."""
    labels = sorted(label_dir.glob(f"*/*{label_suffix}"))
    return [path for path in labels
            if not (image_dir / path.parent.name / f"{path.name[:-len(label_suffix)]}{image_suffix}").is_file()]


def condition_label_folders(fmt: DatasetFormat, folders: dict[str, Path], joint: Path, what: str, hint: str,
                            require_labels: bool, issues: Issues) -> dict[str, bool]:
    """:func:`label_folder` of each condition's label folder (``folders``: condition -> folder), whether each
    exists; when none does, one problem for them all, naming ``joint`` (e.g. ``gt/{fog,night}/test``)."""
    if not any(folder.is_dir() for folder in folders.values()):
        label_folder(fmt, joint, what, hint, require_labels, issues)
        return dict.fromkeys(folders, False)
    return {condition: label_folder(fmt, folder, what, hint, require_labels, issues)
            for condition, folder in folders.items()}


def braced(names: Sequence[str]) -> str:
    """``{a,b}`` for several names (as a shell writes a set of folders), the name itself for one."""
    return names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
