"""Label spaces: Cityscapes train ids, SYNTHIA ids, class subsets and the colour palette.

Every dataset reader maps its raw ids to the 19 Cityscapes *train ids* first
(255 = ignore) and then, with :func:`class_remap`, to the run's own class list
(``data.classes`` in the config), so a model can be trained on any subset of
the Cityscapes classes, e.g. the 16 SYNTHIA classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255

#: The 19 Cityscapes evaluation classes in train-id order: ``(name, Cityscapes label id, RGB colour)``.
#: Every other label id (0..33) is ignored in training and evaluation. These are the values of
#: cityscapesscripts' ``helpers/labels.py`` (checked against it in the tests where it is installed).
CITYSCAPES_TRAIN_LABELS: tuple[tuple[str, int, tuple[int, int, int]], ...] = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)

#: The largest Cityscapes label id (0 unlabeled ... 33 bicycle; -1, license plate, is never in a label file).
CITYSCAPES_MAX_ID = 33

#: The 19 Cityscapes evaluation classes, in train-id order.
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for name, _, _ in CITYSCAPES_TRAIN_LABELS)

#: The 16 classes shared by SYNTHIA and Cityscapes (no terrain, truck, train).
SYNTHIA16_CLASSES: tuple[str, ...] = tuple(
    name for name in CITYSCAPES_CLASSES if name not in ("terrain", "truck", "train")
)

#: The 13 classes of the mIoU13 protocol (SYNTHIA16 without wall, fence, pole).
SYNTHIA13_CLASSES: tuple[str, ...] = tuple(
    name for name in SYNTHIA16_CLASSES if name not in ("wall", "fence", "pole")
)

#: SYNTHIA-RAND-CITYSCAPES class id -> Cityscapes class name (ids not listed are ignored).
SYNTHIA_ID_TO_NAME: dict[int, str] = {
    1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation", 7: "pole",
    8: "car", 9: "traffic sign", 10: "person", 11: "bicycle", 12: "motorcycle",
    15: "traffic light", 16: "terrain", 17: "rider", 18: "truck", 19: "bus", 20: "train", 21: "wall",
}

#: Cityscapes colour of each train class, by name (RGB).
CLASS_COLORS: dict[str, tuple[int, int, int]] = {name: color for name, _, color in CITYSCAPES_TRAIN_LABELS}


def cityscapes_id_to_train_id() -> np.ndarray:
    """Lookup table ``(256,) uint8``: Cityscapes label id -> train id (255 for ignored ids)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, (_, label_id, _) in enumerate(CITYSCAPES_TRAIN_LABELS):
        table[label_id] = train_id
    return table


def synthia_id_to_train_id() -> np.ndarray:
    """Lookup table ``(65536,) uint8``: SYNTHIA class id (16-bit) -> Cityscapes train id."""
    table = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for synthia_id, name in SYNTHIA_ID_TO_NAME.items():
        table[synthia_id] = CITYSCAPES_CLASSES.index(name)
    return table


def cityscapes_known_ids() -> np.ndarray:
    """``(256,) bool``: the Cityscapes label ids (0..33) a GTA5 / Cityscapes label file may hold."""
    known = np.zeros(256, dtype=bool)
    known[: CITYSCAPES_MAX_ID + 1] = True
    return known


#: The largest SYNTHIA-RAND-CITYSCAPES class id (0 void ... 22 lane marking).
SYNTHIA_MAX_ID = 22


def synthia_known_ids() -> np.ndarray:
    """``(65536,) bool``: the SYNTHIA class ids (0..22) a SYNTHIA label's first channel may hold."""
    known = np.zeros(65536, dtype=bool)
    known[: SYNTHIA_MAX_ID + 1] = True
    return known


def class_remap(classes: Sequence[str], source_classes: Sequence[str] = CITYSCAPES_CLASSES) -> np.ndarray:
    """Lookup table ``(256,) uint8``: index in ``source_classes`` -> index in ``classes``.

    Classes of ``source_classes`` missing from ``classes`` map to 255 (ignore).
    Raises ``ValueError`` naming any class of ``classes`` that ``source_classes`` lacks.
    """
    unknown = [name for name in classes if name not in source_classes]
    if unknown:
        raise ValueError(
            f"unknown class name(s) {unknown}; this dataset knows: {', '.join(source_classes)}"
        )
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for new_index, name in enumerate(classes):
        table[source_classes.index(name)] = new_index
    return table


def palette(classes: Sequence[str]) -> np.ndarray:
    """Colours ``(256, 3) uint8`` for class indices of ``classes``; ignore (255) is black.

    Cityscapes classes get their official colours; other names get distinct fixed colours.
    """
    colors = np.zeros((256, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        colors[index] = CLASS_COLORS.get(name, tuple(rng.integers(0, 256, size=3)))
    return colors
