"""Cityscapes: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and
``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png`` (Cityscapes label ids 0..33).

A split is a folder of ``leftImg8bit/`` (train, val; test has no public labels). Its images may
serve as a target without labels (``gtFine/`` absent).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from plca.data.formats.base import (
    DatasetFormat, Issues, LabelMap, Listing, SubmissionLayout, cityscapes_label_map, label_folder, pair,
    require_images, require_root,
)
from plca.data.formats.registry import register_format

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(DatasetFormat):
    name = "cityscapes"
    title = "Cityscapes"
    image_folder = "leftImg8bit"
    layout = "leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/"
    target_without_labels = True
    submission = SubmissionLayout(
        ids="label", path="{name}_leftImg8bit.png",
        source=("cityscapesscripts' evalPixelLevelSemanticLabeling.getPrediction: one label-id PNG per image, found "
                "by the pattern <city>_<sequence>_<frame>*.png anywhere under the results folder"),
        how=("zip the files (plca predict writes submission.zip) and upload it at cityscapes-dataset.com/submit "
             "(pixel-level semantic labeling task)"))

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        return cityscapes_label_map(classes, self.name)

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        reader = self.label_map(classes)
        require_root(self, root, issues)
        images_root = require_images(self, root, issues)
        if not (images_root / split).is_dir():
            found = ", ".join(sorted(p.name for p in images_root.iterdir() if p.is_dir())) or "none"
            issues.fatal(f"{images_root / split}: Cityscapes split '{split}' not found (splits there: {found})")
        labels_root = root / "gtFine" / split
        has_labels = label_folder(self, labels_root, f"Cityscapes gtFine/{split}",
                                  "the labels come from gtFine_trainvaltest.zip, extracted next to leftImg8bit/",
                                  require_labels, issues)
        images = sorted((images_root / split).glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            issues.fatal(f"{images_root / split}: no <city>/*{IMAGE_SUFFIX} images found; check the dataset root")
        by_name = {path.name[:-len(IMAGE_SUFFIX)]: path for path in images}

        def label_of(name: str) -> Path:
            return labels_root / by_name[name].parent.name / f"{name}{LABEL_SUFFIX}"

        samples = pair(list(by_name), by_name.get, label_of if has_labels else None, require_labels,
                       f"Cityscapes split '{split}' in {root}", images_root / split, labels_root, issues,
                       labels_optional=True)
        return Listing(samples, reader)

    def splits(self, root: Path) -> list[str]:
        """The ``train`` and ``val`` folders of ``leftImg8bit/``."""
        return [split for split in ("train", "val") if (root / "leftImg8bit" / split).is_dir()]

    def unpaired_labels(self, root: Path, splits: Sequence[str]) -> list[Path]:
        """The ``*_gtFine_labelIds.png`` of ``splits`` without their ``*_leftImg8bit.png``."""
        found = []
        for split in splits:
            labels = sorted((root / "gtFine" / split).glob(f"*/*{LABEL_SUFFIX}"))
            found += [path for path in labels if not (root / "leftImg8bit" / split / path.parent.name /
                                                      f"{path.name[:-len(LABEL_SUFFIX)]}{IMAGE_SUFFIX}").is_file()]
        return found

    def recognise(self, root: Path) -> int:
        return 2 if (root / "leftImg8bit").is_dir() else 0


register_format(Cityscapes())
