"""The folder format, for any custom data: ``images/NAME.(png|jpg|jpeg)``, ``labels/NAME.png`` and
``<split>.txt`` files listing one NAME per line.

The labels hold indices of the run's ``data.classes`` (255 = ignore); another value is an error
when loaded. An optional ``classes.txt`` lists the class names the indices stand for, and must
then equal ``data.classes``. A split without labels (``labels/`` absent, or no label for any of
its images) may serve as a target's unlabelled images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from plca.data.formats.base import (
    DatasetFormat, Issues, LabelMap, Listing, label_folder, labels_without_image, pair, require_images, require_root,
    split_names,
)
from plca.data.formats.registry import register_format
from plca.data.io import IMAGE_SUFFIXES, DatasetError, read_label, read_text_lines
from plca.data.labels import IGNORE_INDEX


def read_classes_file(path: str | Path) -> list[str]:
    """The class names a folder dataset's ``classes.txt`` lists, one per line, in label-index order."""
    return [name for _, name in read_text_lines(path)]


def index_label_map(num_classes: int) -> LabelMap:
    """Label files whose values are the class indices themselves (0..num_classes-1, 255 = ignore)."""
    known = np.zeros(256, dtype=bool)
    known[:num_classes] = True
    known[IGNORE_INDEX] = True
    table = np.where(known, np.arange(256), IGNORE_INDEX).astype(np.uint8)
    return LabelMap(read_label, table, known, f"class indices 0..{num_classes - 1} of data.classes, or 255 (ignore)",
                    reject_unknown=True)


def _check_classes_file(root: Path, classes: Sequence[str], issues: Issues) -> None:
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


class Folder(DatasetFormat):
    name = "folder"
    title = "folder-format"
    image_folder = "images"
    layout = "images/, labels/ and one <split>.txt per split"
    class_names = None
    target_without_labels = True

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        return index_label_map(len(classes))

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        reader = self.label_map(classes)
        require_root(self, root, issues)
        images = require_images(self, root, issues)
        has_labels = label_folder(self, root / "labels", "labels", f"a folder-format root holds {self.layout}",
                                  require_labels, issues)
        _check_classes_file(root, classes, issues)
        names, split_file = split_names(self, root, split, images, False, issues)
        ambiguous: list[str] = []
        samples = pair(names, lambda n: _find_image(images, n, ambiguous),
                       (lambda n: root / "labels" / f"{n}.png") if has_labels else None, require_labels,
                       f"split '{split}' in {root}", images, root / "labels", issues, split_file, labels_optional=True)
        if ambiguous:
            issues.error(f"{images}: several images share one name (which one is meant is ambiguous)", ambiguous,
                         todo="keep one")
        return Listing(samples, reader)

    def unpaired_labels(self, root: Path, splits: Sequence[str]) -> list[Path]:
        """Every PNG of ``labels/`` whose name no image of ``images/`` has."""
        return labels_without_image(root / "images", root / "labels", IMAGE_SUFFIXES)

    def recognise(self, root: Path) -> int:
        """Any ``images/`` folder (GTA5's is more specific)."""
        return 1 if (root / "images").is_dir() else 0

    def default_classes(self, root: Path) -> list[str] | None:
        """The names of ``ROOT/classes.txt`` if there is one."""
        return read_classes_file(root / "classes.txt") if (root / "classes.txt").is_file() else None


register_format(Folder())
