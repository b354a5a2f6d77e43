"""GTA5 (Playing for Data): ``images/NNNNN.png`` and ``labels/NNNNN.png`` (Cityscapes label ids, palette PNGs).

A split is ``ROOT/<split>.txt`` (one name per line) if it exists, else ``all`` or ``train`` means
every image. A few GTA5 labels differ in size from their image: they are resized (nearest) when
loaded, with a warning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from plca.data.formats.base import (
    DatasetFormat, Issues, LabelMap, Listing, cityscapes_label_map, label_folder, labels_without_image, pair,
    require_images, require_root, split_names,
)
from plca.data.formats.registry import register_format

_NAME = re.compile(r"\d{5}\.png")


def _not_gta5_names(images: Path) -> str | None:
    """An image among the first entries of ``images`` not named NNNNN.png (GTA5's names), or None."""
    with os.scandir(images) as entries:
        for _, entry in zip(range(50), entries):
            if not _NAME.fullmatch(entry.name):
                return entry.name
    return None


def not_gta5(root: Path) -> str | None:
    """Why ``root`` (with ``images/``) does not look like GTA5, or None."""
    if (root / "classes.txt").exists():
        return "it has a classes.txt"
    odd = _not_gta5_names(root / "images")
    return f"its images are not all named NNNNN.png (e.g. images/{odd})" if odd is not None else None


class GTA5(DatasetFormat):
    name = "gta5"
    title = "GTA5"
    image_folder = "images"
    layout = "images/ and labels/ (e.g. images/00001.png, labels/00001.png)"

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        return cityscapes_label_map(classes, self.name)

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        reader = self.label_map(classes)
        require_root(self, root, issues)
        images = require_images(self, root, issues)
        has_labels = label_folder(self, root / "labels", "GTA5 labels", f"a GTA5 root holds {self.layout}",
                                  require_labels, issues)
        odd = None if issues.strict else not_gta5(root)
        if odd is not None:
            issues.record("warning", f"{root} does not look like a GTA5 dataset: {odd}; it looks like a "
                                     f"folder-format dataset (plca prepare folder {root} --classes ...)")
        names, split_file = split_names(self, root, split, images, True, issues)
        samples = pair(names, lambda n: images / f"{n}.png", (lambda n: root / "labels" / f"{n}.png") if has_labels
                       else None, require_labels, f"GTA5 split '{split}' in {root}", images, root / "labels", issues,
                       split_file)
        return Listing(samples, reader, {"resize_mismatched_labels": True})

    def splits(self, root: Path) -> list[str]:
        """``all`` (every image) first, then the split files."""
        return ["all"] + [name for name in super().splits(root) if name != "all"]

    def unpaired_labels(self, root: Path, splits: Sequence[str]) -> list[Path]:
        """Every PNG of ``labels/`` whose name no image of ``images/`` has."""
        return labels_without_image(root / "images", root / "labels")

    def recognise(self, root: Path) -> int:
        """``images/`` with images named NNNNN.png and no ``classes.txt`` (the folder format shares ``images/``)."""
        return 2 if (root / "images").is_dir() and not_gta5(root) is None else 0


register_format(GTA5())
