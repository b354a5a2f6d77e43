"""HRDA's pseudo-label cropping v2: a mask of the image's borders that travels with the crop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset_writers import write_cityscapes
from plca.data.datasets import border_mask, build_dataset
from plca.data.labels import CITYSCAPES_CLASSES
from plca.data.transforms import TrainTransform


def reference_mask(height, width, top, bottom, left, right):
    """The mask written out pixel by pixel."""
    mask = np.zeros((height, width), np.uint8)
    for y in range(height):
        for x in range(width):
            mask[y, x] = int(top <= y < height - bottom and left <= x < width - right)
    return mask


@pytest.mark.parametrize("margins", [(0, 0, 0, 0), (1, 2, 3, 4), (5, 0, 0, 7), (20, 20, 0, 0), (0, 0, 9, 9)])
def test_border_mask_equals_the_pixel_by_pixel_reference(margins):
    np.testing.assert_array_equal(border_mask((10, 12), margins), reference_mask(10, 12, *margins))


@pytest.mark.parametrize("bad", [(1, 2, 3), (1, 2, 3, -1), (1.5, 0, 0, 0)])
def test_bad_margins_are_refused_with_the_values(bad):
    with pytest.raises(ValueError, match="4 integers >= 0"):
        border_mask((4, 4), bad)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("transform", [
    TrainTransform((24, 24), scale_range=(0.5, 2.0)),
    TrainTransform((24, 40), shorter_side=(16, 48)),
    TrainTransform((40, 60), flip=True),  # larger than the image: padded
])
def test_the_mask_follows_the_labels_geometry_and_leaves_the_crop_unchanged(seed, transform):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    valid = border_mask((30, 50), (3, 8, 5, 2))
    # a label that *is* the mask (1 inside, 0 in the margins): whatever the transform does to the label, the
    # mask must match it, and padding is outside the image (label 255, mask False)
    label = valid.copy()
    image_a, label_a = transform(image, label, np.random.default_rng([seed, 1]))
    image_b, label_b, valid_b = transform(image, label, np.random.default_rng([seed, 1]), valid)
    assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)  # same random draws
    assert valid_b.dtype == torch.bool and valid_b.shape == label_b.shape
    assert torch.equal(valid_b, label_b == 1)


def test_a_flipped_crop_masks_the_side_it_came_from():
    image = np.zeros((8, 20, 3), np.uint8)
    label = np.zeros((8, 20), np.uint8)
    valid = border_mask((8, 20), (0, 0, 6, 0))  # only the image's left 6 columns are masked
    transform = TrainTransform((8, 20), flip=True)
    seen = set()
    for seed in range(20):
        _, _, crop_valid = transform(image, label, np.random.default_rng(seed), valid)
        masked = (~crop_valid).all(dim=0)
        flipped = bool(masked[-6:].all())  # a flip moves the image's left border to the crop's right
        assert masked.sum() == 6 and (flipped or bool(masked[:6].all()))
        seen.add(flipped)
    assert seen == {True, False}


def test_datasets_add_border_valid_to_every_item(tmp_path):
    write_cityscapes(tmp_path, splits=("train",), n_per_city=1, size=(32, 64))
    plain = build_dataset("cityscapes", tmp_path, "train", CITYSCAPES_CLASSES, require_labels=False,
                          read_labels=False)
    masked = build_dataset("cityscapes", tmp_path, "train", CITYSCAPES_CLASSES, require_labels=False,
                           read_labels=False, border_margins=(2, 5, 3, 1))
    assert "border_valid" not in plain[0]
    item = masked[0]
    np.testing.assert_array_equal(item["border_valid"].numpy(), reference_mask(32, 64, 2, 5, 3, 1).astype(bool))
    assert torch.equal(item["image"], plain[0]["image"])
    cropped = build_dataset("cityscapes", tmp_path, "train", CITYSCAPES_CLASSES, require_labels=False,
                            read_labels=False, border_margins=(2, 5, 3, 1),
                            transform=TrainTransform((16, 16), scale_range=(0.5, 1.5)))
    for index in range(len(cropped)):
        item = cropped[index]
        assert item["border_valid"].shape == item["label"].shape == (16, 16)
