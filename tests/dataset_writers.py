"""Tiny datasets written in the exact on-disk formats of GTA5, SYNTHIA, Cityscapes, ACDC, Dark Zurich and the
folder format.

Each writer returns ``{name: WrittenSample}`` with the image and the *raw* label ids it wrote,
so tests can compare what a reader returns with what is on disk. Labels are made of 4 x 4
blocks of random ids drawn from a set that covers several classes and some ignored ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from plca.data.labels import cityscapes_id_to_train_id

from plca.data.io import write_png_16bit

#: Cityscapes label ids used in GTA5 / Cityscapes labels: road 7, sidewalk 8, building 11, pole 17,
#: vegetation 21, sky 23, person 24, car 26, bicycle 33 and the ignored 0 (unlabeled), 1 (ego vehicle), 4 (static).
CITYSCAPES_IDS = (0, 1, 4, 7, 8, 11, 17, 21, 23, 24, 26, 33)
#: SYNTHIA ids: sky 1, building 2, road 3, sidewalk 4, vegetation 6, car 8, pedestrian 10, traffic light 15,
#: terrain 16, wall 21 and the ignored 0 (void), 13 (parking slot), 22 (lane marking).
SYNTHIA_IDS = (0, 1, 2, 3, 4, 6, 8, 10, 13, 15, 16, 21, 22)
BLOCK = 4


@dataclass(frozen=True)
class WrittenSample:
    """What a writer put on disk for one sample: ``image (H, W, 3) uint8`` and raw ``label`` ids (or None)."""

    image: np.ndarray
    label: np.ndarray | None
    split: str = ""
    condition: str = ""  # ACDC's weather, Dark Zurich's time of day
    invalid: np.ndarray | None = None  # ACDC / Dark Zurich: the *_gt_invIds.png mask written (1 = invalid)


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3) uint8`` noise."""
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


def blocky_ids(rng: np.random.Generator, size: tuple[int, int], values: Sequence[int], block: int = BLOCK,
               dtype=np.uint8) -> np.ndarray:
    """``(H, W)`` ids constant over ``block x block`` tiles, each tile drawn from ``values``."""
    height, width = size
    tiles = rng.choice(np.asarray(values), size=(-(-height // block), -(-width // block)))
    return np.repeat(np.repeat(tiles, block, axis=0), block, axis=1)[:height, :width].astype(dtype)


def cityscapes_palette() -> list[int]:
    """Palette (768 ints) giving each Cityscapes label id its colour, as GTA5's palette labels have."""
    palette = [0] * 768
    for label_id, label in id2label.items():
        if 0 <= label_id < 256:
            palette[3 * label_id:3 * label_id + 3] = label.color
    return palette


def save_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def save_ids(path: Path, ids: np.ndarray, palette: list[int] | None = None) -> None:
    """An 8-bit single-channel PNG of ``ids``: grey (``L``), or palette (``P``) if ``palette`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8))
    if palette is not None:
        image.putpalette(palette)
    image.save(path)


def write_gta5(root: str | Path, n: int = 3, size: tuple[int, int] = (32, 64), mismatched: int | None = None,
               seed: int = 0) -> dict[str, WrittenSample]:
    """GTA5: ``images/00001.png`` (RGB) and ``labels/00001.png`` (palette PNG of Cityscapes label ids).

    Sample number ``mismatched`` (0-based) gets a label of twice the image size, made of 2 x 2
    copies of each pixel, so a nearest-neighbour resize back to the image size is exact.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    written = {}
    for index in range(n):
        name = f"{index + 1:05d}"
        image, label = random_image(rng, size), blocky_ids(rng, size, CITYSCAPES_IDS)
        on_disk = np.repeat(np.repeat(label, 2, axis=0), 2, axis=1) if index == mismatched else label
        save_rgb(root / "images" / f"{name}.png", image)
        save_ids(root / "labels" / f"{name}.png", on_disk, cityscapes_palette())
        written[name] = WrittenSample(image, on_disk, "all")
    return written


def write_synthia(root: str | Path, n: int = 3, size: tuple[int, int] = (32, 64),
                  seed: int = 0) -> dict[str, WrittenSample]:
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/0000000.png`` and ``GT/LABELS/0000000.png``.

    Labels are 16-bit PNGs, 3 channels for even samples and 4 for odd ones: channel 0 the
    SYNTHIA class id, the others random 16-bit junk (the real data has instance ids there).
    The returned label is the full ``(H, W, C) uint16`` array.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    written = {}
    for index in range(n):
        name = f"{index:07d}"
        image = random_image(rng, size)
        channels = 3 if index % 2 == 0 else 4
        label = rng.integers(0, 65536, size=(*size, channels), dtype=np.uint16)
        label[:, :, 0] = blocky_ids(rng, size, SYNTHIA_IDS, dtype=np.uint16)
        save_rgb(root / "RGB" / f"{name}.png", image)
        write_png_16bit(root / "GT" / "LABELS" / f"{name}.png", label)
        written[name] = WrittenSample(image, label, "all")
    return written


def write_cityscapes(root: str | Path, splits: Sequence[str] = ("train", "val"), n_per_city: int = 2,
                     cities: Sequence[str] = ("aachen", "bremen"), size: tuple[int, int] = (32, 64), seed: int = 0,
                     with_labels: bool = True) -> dict[str, WrittenSample]:
    """Cityscapes: ``leftImg8bit/<split>/<city>/<city>_NNNNNN_000019_leftImg8bit.png`` (NNNNNN
    numbers the samples of a city across splits, so names are unique) and, if
    ``with_labels``, ``gtFine/<split>/<city>/..._gtFine_labelIds.png`` (8-bit label ids) plus the
    ``_color.png`` and 16-bit ``_instanceIds.png`` files that sit next to it in the real data."""
    root, rng = Path(root), np.random.default_rng(seed)
    colours = np.zeros((256, 3), np.uint8)
    for label_id, label in id2label.items():
        if 0 <= label_id < 256:
            colours[label_id] = label.color
    written = {}
    for split_number, split in enumerate(splits):
        for city in cities:
            for index in range(n_per_city):
                name = f"{city}_{split_number * n_per_city + index:06d}_000019"  # unique across splits
                image, label = random_image(rng, size), blocky_ids(rng, size, CITYSCAPES_IDS)
                save_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image)
                if with_labels:
                    folder = root / "gtFine" / split / city
                    save_ids(folder / f"{name}_gtFine_labelIds.png", label)
                    save_rgb(folder / f"{name}_gtFine_color.png", colours[label])
                    write_png_16bit(folder / f"{name}_gtFine_instanceIds.png",
                                    label.astype(np.uint16) * 1000 + rng.integers(0, 3, size, dtype=np.uint16))
                written[name] = WrittenSample(image, label if with_labels else None, split)
    return written


def write_folder(root: str | Path, classes_count: int = 3, splits: Mapping[str, int] | None = None,
                 size: tuple[int, int] = (32, 64), seed: int = 0, ext: str = "png",
                 class_names: Sequence[str] | None = None) -> dict[str, WrittenSample]:
    """The generic folder format: ``images/NAME.<ext>``, ``labels/NAME.png`` (class index, 255 = ignore)
    and ``<split>.txt`` listing the names of each split (``splits`` maps split -> sample count,
    default ``{"train": 4, "val": 2}``). ``classes.txt`` is written only if ``class_names`` is given.

    JPEG images are lossy: the returned image is the array before compression.
    """
    root, rng = Path(root), np.random.default_rng(seed)
    splits = {"train": 4, "val": 2} if splits is None else splits
    values = (*range(classes_count), 255)
    written = {}
    for split, count in splits.items():
        names = [f"{split}_{index:04d}" for index in range(count)]
        for name in names:
            image, label = random_image(rng, size), blocky_ids(rng, size, values)
            save_rgb(root / "images" / f"{name}.{ext}", image)
            save_ids(root / "labels" / f"{name}.png", label)
            written[name] = WrittenSample(image, label, split)
        (root / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))
    if class_names is not None:
        (root / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))
    return written


#: ACDC's conditions, each with a GoPro sequence name of the kind ACDC uses.
ACDC_SEQUENCES = {"fog": "GOPR0475", "night": "GOPR0351", "rain": "GOPR0400", "snow": "GOPR0122"}


def _cityscapes_style_gt(folder: Path, stem: str, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ACDC / Dark Zurich ground truth of one image in ``folder``: ``<stem>_gt_labelIds.png`` (Cityscapes label
    ids), ``_gt_labelTrainIds.png`` (the same mapped to train ids, 255 = ignore), ``_gt_labelColor.png`` and
    ``_gt_invIds.png`` (1 where the pixel is marked invalid, else 0). Returns the invalid mask."""
    colours = np.zeros((256, 3), np.uint8)
    for label_id, entry in id2label.items():
        if 0 <= label_id < 256:
            colours[label_id] = entry.color
    invalid = blocky_ids(rng, label.shape, (0, 0, 1))
    save_ids(folder / f"{stem}_gt_labelIds.png", label)
    save_ids(folder / f"{stem}_gt_labelTrainIds.png", cityscapes_id_to_train_id()[label])
    save_rgb(folder / f"{stem}_gt_labelColor.png", colours[label])
    save_ids(folder / f"{stem}_gt_invIds.png", invalid)
    return invalid


def write_acdc(root: str | Path, splits: Mapping[str, int] | None = None,
               conditions: Sequence[str] = tuple(ACDC_SEQUENCES), size: tuple[int, int] = (32, 64), seed: int = 0,
               with_labels: bool = True) -> dict[str, WrittenSample]:
    """ACDC: ``rgb_anon/<condition>/<split>/<sequence>/<sequence>_frame_NNNNNN_rgb_anon.png`` and, for every split
    but ``test`` (its labels are withheld) if ``with_labels``,
    ``gt/<condition>/<split>/<sequence>/<stem>_gt_labelIds.png``, ``_gt_labelTrainIds.png``, ``_gt_labelColor.png``
    and ``_gt_invIds.png``. ``splits`` maps split -> images per condition (default ``{"train": 2, "val": 1}``).
    Each condition also gets a ``<split>_ref`` folder of reference images (``*_rgb_ref_anon.png``), as ACDC has,
    which no split includes. The returned label is the Cityscapes label ids written (None without labels)."""
    root, rng = Path(root), np.random.default_rng(seed)
    splits = {"train": 2, "val": 1} if splits is None else splits
    written = {}
    for condition in conditions:
        sequence = ACDC_SEQUENCES[condition]
        frame = 0
        for split, count in splits.items():
            for _ in range(count):
                frame += 1
                stem = f"{sequence}_frame_{frame:06d}"
                image, label = random_image(rng, size), blocky_ids(rng, size, CITYSCAPES_IDS)
                save_rgb(root / "rgb_anon" / condition / split / sequence / f"{stem}_rgb_anon.png", image)
                save_rgb(root / "rgb_anon" / condition / f"{split}_ref" / f"{sequence}_ref" /
                         f"{stem}_rgb_ref_anon.png", random_image(rng, size))
                labelled = with_labels and split != "test"
                invalid = (_cityscapes_style_gt(root / "gt" / condition / split / sequence, stem, label, rng)
                           if labelled else None)
                written[stem] = WrittenSample(image, label if labelled else None, split, condition, invalid)
    return written


#: Dark Zurich's times of day, each with a GoPro sequence name of the kind Dark Zurich uses.
DARK_ZURICH_SEQUENCES = {"day": "GOPR0348", "twilight": "GOPR0357", "night": "GOPR0356"}


def write_darkzurich(root: str | Path, splits: Mapping[str, Mapping[str, int]] | None = None,
                     size: tuple[int, int] = (32, 64), seed: int = 0, with_labels: bool = True,
                     labelled_splits: Sequence[str] = ("val",)) -> dict[str, WrittenSample]:
    """Dark Zurich: ``rgb_anon/<split>/<day|twilight|night>/<sequence>/<sequence>_frame_NNNNNN_rgb_anon.png`` and,
    for the ``labelled_splits`` (Dark Zurich labels only val) if ``with_labels``,
    ``gt/<split>/<time>/<sequence>/<stem>_gt_labelIds.png``, ``_gt_labelTrainIds.png``, ``_gt_labelColor.png``
    and ``_gt_invIds.png``. ``splits`` maps split -> time of day -> images (default: train 1 day, 1 twilight,
    2 night; val 2 night). A ``val_ref/day`` folder of reference images sits next to them, as in Dark Zurich.
    The returned label is the Cityscapes label ids written (None without labels)."""
    root, rng = Path(root), np.random.default_rng(seed)
    splits = {"train": {"day": 1, "twilight": 1, "night": 2}, "val": {"night": 2}} if splits is None else splits
    written = {}
    frame = 0
    for split, per_time in splits.items():
        for time_of_day, count in per_time.items():
            sequence = DARK_ZURICH_SEQUENCES[time_of_day]
            for _ in range(count):
                frame += 1
                stem = f"{sequence}_frame_{frame:06d}"
                image, label = random_image(rng, size), blocky_ids(rng, size, CITYSCAPES_IDS)
                save_rgb(root / "rgb_anon" / split / time_of_day / sequence / f"{stem}_rgb_anon.png", image)
                labelled = with_labels and split in labelled_splits
                invalid = (_cityscapes_style_gt(root / "gt" / split / time_of_day / sequence, stem, label, rng)
                           if labelled else None)
                written[stem] = WrittenSample(image, label if labelled else None, split, time_of_day, invalid)
    save_rgb(root / "rgb_anon" / "val_ref" / "day" / "GOPR0356_ref" / "GOPR0356_ref_frame_000001_ref_rgb_anon.png",
             random_image(rng, size))
    return written
