"""The warning for a crop larger than the training images says at which rescales that happens and
which share of the crops is padded; its numbers are checked against crops the transform really draws."""

import re

import numpy as np
import pytest

from plca.data.transforms import IGNORE_INDEX, TrainTransform, crop_larger_than_images


def padded_share_by_drawing(crop, sizes, draws, **rescale):
    """The share of :class:`TrainTransform` crops that hold padding (labels of 0 everywhere, so an
    ignored pixel can only be padding), every image size drawn ``draws`` times per image."""
    transform = TrainTransform(crop, flip=False, **rescale)
    rng = np.random.default_rng(0)
    padded = total = 0
    for (height, width), count in sizes.items():
        image, label = np.zeros((height, width, 3), np.uint8), np.zeros((height, width), np.uint8)
        for _ in range(draws * count):
            _, cropped = transform(image, label, rng)
            padded += bool((cropped == IGNORE_INDEX).any())
            total += 1
    return padded / total


def stated_share(message):
    return float(re.search(r"([\d.]+) % of the training crops are padded", message).group(1)) / 100


@pytest.mark.parametrize("rescale", [{"scale_range": (0.5, 2.0)}, {"scale_range": (0.8, 1.2)},
                                     {"shorter_side": (20, 60)}, {}],
                         ids=["ratios 0.5-2", "ratios 0.8-1.2", "shorter side 20-60", "no rescale"])
def test_the_stated_share_of_padded_crops_matches_the_crops_drawn(rescale):
    crop, sizes = (40, 40), {(36, 64): 3, (48, 48): 1}
    message = crop_larger_than_images(crop, sizes, **rescale)
    drawn = padded_share_by_drawing(crop, sizes, draws=600, **rescale)
    assert stated_share(message) == pytest.approx(drawn, abs=0.03), message


def test_the_ratio_below_which_crops_are_padded_is_exact():
    # a 72 x 128 image: 96 rows from a ratio of 95.5 / 72 = 1.326 on (rows round half up)
    message = crop_larger_than_images((96, 96), {(72, 128): 701}, scale_range=(0.5, 2.0))
    assert "larger than 701 of 701 images" in message and "drawn from [0.5, 2] is below 1.33:" in message
    assert f"{100 * (95.5 / 72 - 0.5) / 1.5:.1f} % of the training crops" in message  # 55.1 %
    rows = [int(72 * r + 0.5) for r in np.linspace(0.5, 2.0, 100001)]  # the rescales, counted one by one
    assert stated_share(message) == pytest.approx(np.mean(np.array(rows) < 96), abs=1e-3)


def test_every_shorter_side_below_the_first_that_fits_is_named_and_counted():
    message = crop_larger_than_images((96, 96), {(72, 128): 5}, shorter_side=(64, 128))
    fits = [side for side in range(64, 129) if side >= 96]  # the shorter side is the height here
    assert "the train.shorter_side drawn from [64, 128] is below 96:" in message
    assert stated_share(message) == pytest.approx(1 - len(fits) / 65, abs=1e-3)  # 32 of 65 sides: 49.2 %


def test_images_too_small_at_every_rescale_and_images_that_always_fit():
    message = crop_larger_than_images((96, 96), {(40, 40): 3, (400, 400): 1}, scale_range=(0.5, 2.0))
    assert "larger than 3 of 4 images" in message and "at every train.scale_range ratio drawn from [0.5, 2]" in message
    assert stated_share(message) == pytest.approx(0.75)
    assert crop_larger_than_images((96, 96), {(400, 400): 1}, scale_range=(0.5, 2.0)) is None
