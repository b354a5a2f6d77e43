"""SYNTHIA-RAND-CITYSCAPES: ``RGB/NNNNNNN.png`` and ``GT/LABELS/NNNNNNN.png``.

The labels are 16-bit PNGs of several channels, the first holding the SYNTHIA class id (0..22),
mapped to the Cityscapes classes by :data:`plca.data.labels.SYNTHIA_ID_TO_NAME`. Splits as GTA5's:
``ROOT/<split>.txt`` if it exists, else ``all`` or ``train`` means every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from plca.data.formats.base import (
    DatasetFormat, Issues, LabelMap, Listing, label_folder, labels_without_image, pair, remap, require_images,
    require_root, split_names,
)
from plca.data.formats.registry import register_format
from plca.data.io import read_synthia_label
from plca.data.labels import SYNTHIA16_CLASSES, synthia_id_to_train_id, synthia_known_ids


class Synthia(DatasetFormat):
    name = "synthia"
    title = "SYNTHIA"
    image_folder = "RGB"
    layout = "RGB/ and GT/LABELS/"

    def label_map(self, classes: Sequence[str]) -> LabelMap:
        return LabelMap(read_synthia_label, remap(classes, self.name)[synthia_id_to_train_id()], synthia_known_ids(),
                        "SYNTHIA class ids 0..22 (are these the GT/LABELS files of SYNTHIA-RAND-CITYSCAPES?)",
                        any_mode=True, bit_depth=16)

    def list_split(self, root: Path, split: str, classes: Sequence[str], require_labels: bool,
                   issues: Issues) -> Listing:
        reader = self.label_map(classes)
        require_root(self, root, issues)
        images = require_images(self, root, issues)
        labels = root / "GT" / "LABELS"
        has_labels = label_folder(self, labels, "SYNTHIA GT/LABELS",
                                  "a SYNTHIA-RAND-CITYSCAPES root holds RGB/ and GT/LABELS/", require_labels, issues)
        names, split_file = split_names(self, root, split, images, True, issues)
        samples = pair(names, lambda n: images / f"{n}.png", (lambda n: labels / f"{n}.png") if has_labels else None,
                       require_labels, f"SYNTHIA split '{split}' in {root}", images, labels, issues, split_file)
        return Listing(samples, reader)

    def splits(self, root: Path) -> list[str]:
        """``all`` (every image) first, then the split files."""
        return ["all"] + [name for name in super().splits(root) if name != "all"]

    def unpaired_labels(self, root: Path, splits: Sequence[str]) -> list[Path]:
        """Every PNG of ``GT/LABELS/`` whose name no image of ``RGB/`` has."""
        return labels_without_image(root / "RGB", root / "GT" / "LABELS")

    def recognise(self, root: Path) -> int:
        return 2 if (root / "RGB").is_dir() else 0

    def default_classes(self, root: Path) -> list[str]:
        """The 16 classes SYNTHIA shares with Cityscapes."""
        return list(SYNTHIA16_CLASSES)


register_format(Synthia())
