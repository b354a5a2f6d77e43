"""Training / evaluation transforms: shapes, rescale range, padding, flip consistency, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from plca.data.transforms import EvalTransform, TrainTransform, resize_image


def column_ramp(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Image whose red channel is the column index and label equal to it (width < 255)."""
    columns = np.broadcast_to(np.arange(width, dtype=np.uint8), (height, width))
    image = np.stack([columns, np.full_like(columns, 50), np.full_like(columns, 100)], axis=2).copy()
    return image, columns.copy()


def test_output_types_and_crop_shape():
    image, label = column_ramp(40, 60)
    out_image, out_label = TrainTransform((16, 24), shorter_side=(30, 50))(image, label, np.random.default_rng(0))
    assert out_image.dtype == torch.uint8 and out_image.shape == (3, 16, 24)
    assert out_label.dtype == torch.int64 and out_label.shape == (16, 24)


def test_crop_is_a_window_of_the_input_and_flip_keeps_image_and_label_together():
    image, label = column_ramp(30, 50)
    transform = TrainTransform((10, 20), shorter_side=None, flip=True)
    orientations = set()
    for seed in range(40):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        red = out_image[0].numpy().astype(int)
        np.testing.assert_array_equal(red, out_label.numpy())  # the same pixels, the same flip
        assert (out_image[1] == 50).all() and (out_image[2] == 100).all()
        row = red[0]
        step = np.diff(row)
        assert (step == step[0]).all() and abs(step[0]) == 1  # contiguous columns, possibly mirrored
        assert (red == row).all()  # every row of the window is the same
        orientations.add(int(step[0]))
    assert orientations == {1, -1}  # both flipped and unflipped crops occur


def test_no_flip_when_disabled():
    image, label = column_ramp(8, 30)
    transform = TrainTransform((8, 10), flip=False)
    for seed in range(20):
        _, out_label = transform(image, label, np.random.default_rng(seed))
        assert (np.diff(out_label[0].numpy()) == 1).all()


def test_random_shorter_side_covers_the_inclusive_range_and_keeps_aspect():
    """Pad-revealing crop: the resized image (no 255 in the label) sits in the top-left of the crop."""
    image, label = column_ramp(20, 40)
    transform = TrainTransform((40, 60), shorter_side=(8, 11), flip=False)
    seen = set()
    for seed in range(100):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        valid = (out_label != 255).numpy()
        height, width = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
        assert valid[:height, :width].all() and not valid[height:].any() and not valid[:, width:].any()
        assert width == 2 * height  # aspect ratio 1:2 kept
        assert (out_image[:, height:] == 0).all() and (out_image[:, :, width:] == 0).all()  # image padded with 0
        seen.add(height)
    assert seen == {8, 9, 10, 11}


def test_resize_uses_nearest_for_labels_and_stays_aligned_with_the_image():
    image, label = column_ramp(30, 60)
    label = (label // 10 * 40).astype(np.uint8)  # values 0, 40, ..., 200: bilinear would invent others
    image[:, :, 0] = label
    transform = TrainTransform((17, 34), shorter_side=(17, 17), flip=True)
    for seed in range(10):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        values = set(np.unique(out_label.numpy()).tolist())
        assert values <= {0, 40, 80, 120, 160, 200}
        # Away from the steps, bilinear image and nearest label agree.
        red, lab = out_image[0].numpy().astype(int), out_label.numpy()
        flat = np.abs(np.diff(red, axis=1, prepend=red[:, :1])) == 0
        assert (red[flat] == lab[flat]).mean() > 0.95


def test_upscale_and_padding_for_small_images():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    label = rng.integers(0, 3, size=(5, 7), dtype=np.uint8)
    out_image, out_label = TrainTransform((9, 12), shorter_side=None, flip=False)(image, label, rng)
    np.testing.assert_array_equal(out_image[:, :5, :7].numpy(), image.transpose(2, 0, 1))
    np.testing.assert_array_equal(out_label[:5, :7].numpy(), label)
    assert (out_label[5:] == 255).all() and (out_label[:, 7:] == 255).all()
    assert (out_image[:, 5:] == 0).all() and (out_image[:, :, 7:] == 0).all()


def test_same_rng_same_output_and_randomness_only_from_rng():
    image, label = column_ramp(50, 80)
    transform = TrainTransform((20, 30), shorter_side=(40, 70), flip=True)
    first = transform(image, label, np.random.default_rng([3, 1, 4]))
    np.random.seed(123)
    torch.manual_seed(456)
    second = transform(image, label, np.random.default_rng([3, 1, 4]))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    others = [transform(image, label, np.random.default_rng([3, 1, i])) for i in range(5, 10)]
    assert any(not torch.equal(first[1], other[1]) for other in others)


def test_eval_transform_resizes_image_only():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(32, 64), dtype=np.uint8)
    out_image, out_label = EvalTransform((16, 24))(image, label)
    assert out_image.shape == (3, 16, 24) and out_image.dtype == torch.uint8
    np.testing.assert_array_equal(out_label.numpy(), label)
    assert out_label.dtype == torch.int64
    same_image, _ = EvalTransform(None)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(same_image.numpy(), image.transpose(2, 0, 1))


def test_eval_transform_bilinear_on_a_constant_image_is_constant():
    image = np.full((10, 20, 3), 77, np.uint8)
    out, _ = EvalTransform((7, 13))(image, np.zeros((10, 20), np.uint8))
    assert (out == 77).all()


# ----------------------------------------------------------------------------------------------
# Image resize: cv2 INTER_LINEAR's sampling (mmcv), not Pillow's antialiased filter


def bilinear_reference(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Plain bilinear sampling with half-pixel centres, pixel by pixel, in float64 (unrounded).

    Output pixel ``x`` reads the source at ``(x + 0.5) * W / w - 0.5``, clamped to ``[0, W - 1]``,
    and mixes the two neighbouring source pixels (likewise for rows): cv2's ``INTER_LINEAR``.
    """
    def taps(out_index: int, out_len: int, src_len: int) -> tuple[int, int, float]:
        position = min(max((out_index + 0.5) * src_len / out_len - 0.5, 0.0), src_len - 1)
        low = int(np.floor(position))
        return low, min(low + 1, src_len - 1), position - low

    source = image.astype(np.float64)
    out = np.zeros((*size, image.shape[2]))
    for y in range(size[0]):
        y0, y1, fy = taps(y, size[0], image.shape[0])
        for x in range(size[1]):
            x0, x1, fx = taps(x, size[1], image.shape[1])
            top = (1 - fx) * source[y0, x0] + fx * source[y0, x1]
            bottom = (1 - fx) * source[y1, x0] + fx * source[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize("size", [(3, 4), (5, 3), (15, 23), (9, 30)], ids=["down", "down-3x", "up", "mixed"])
def test_image_resize_is_plain_bilinear_sampling(size):
    image = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    got = resize_image(image, size)
    assert got.dtype == np.uint8 and got.shape == (*size, 3)
    difference = got.astype(np.float64) - bilinear_reference(image, size)
    assert np.abs(difference).max() <= 0.5 + 1e-4  # rounded to the nearest integer


def test_downscale_does_not_antialias_as_pillow_does_and_upscale_agrees_with_it():
    image = np.random.default_rng(1).integers(0, 256, size=(24, 36, 3), dtype=np.uint8)
    pillow = lambda size: np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))  # noqa: E731
    # a 3x downscale samples exactly source pixel 3x + 1 (one in three per axis); Pillow's filter averages all
    down = resize_image(image, (8, 12)).astype(int)
    assert np.abs(down - pillow((8, 12)).astype(int)).mean() > 10
    assert down.std() > 2 * pillow((8, 12)).std()  # random pixels, not averaged: full contrast
    np.testing.assert_array_equal(resize_image(image, (8, 12), antialias=True), pillow((8, 12)))
    up = resize_image(image, (50, 70)).astype(int)
    assert np.abs(up - pillow((50, 70)).astype(int)).max() <= 1  # only rounding differs when upscaling


def test_image_resize_matches_cv2_when_it_is_installed():
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(2).integers(0, 256, size=(31, 47, 3), dtype=np.uint8)
    for size in ((10, 15), (17, 29), (62, 94), (45, 20)):
        want = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        assert np.abs(resize_image(image, size).astype(int) - want.astype(int)).max() <= 1  # cv2's fixed point


def test_train_and_eval_transforms_resize_images_without_antialiasing():
    image = np.random.default_rng(3).integers(0, 256, size=(24, 48, 3), dtype=np.uint8)
    label = np.zeros((24, 48), np.uint8)
    resized, _ = TrainTransform((8, 16), shorter_side=(8, 8), flip=False)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(resized.permute(1, 2, 0).numpy(), resize_image(image, (8, 16)))
    evaluated, _ = EvalTransform((8, 16))(image, label)
    np.testing.assert_array_equal(evaluated.permute(1, 2, 0).numpy(), resize_image(image, (8, 16)))
    pillow, _ = EvalTransform((8, 16), antialias=True)(image, label)
    np.testing.assert_array_equal(pillow.permute(1, 2, 0).numpy(), resize_image(image, (8, 16), antialias=True))
    assert not np.array_equal(pillow.numpy(), evaluated.numpy())


@pytest.mark.parametrize("kwargs", [
    {"crop_size": (0, 10)}, {"crop_size": (10,)}, {"crop_size": (10.5, 10)},
    {"crop_size": (10, 10), "shorter_side": (20, 10)}, {"crop_size": (10, 10), "shorter_side": (-1, 10)},
])
def test_train_transform_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        TrainTransform(**kwargs)


def test_transform_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="label"):
        TrainTransform((4, 4))(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="image"):
        EvalTransform()(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))


# ----------------------------------------------------------------------------------------------
# scale_range: a random ratio of each image's own size


def resized_extent(out_label: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` of the resized image inside a larger, padded crop (no flip): the non-255 block."""
    valid = (out_label != 255).numpy()
    height, width = int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())
    assert valid[:height, :width].all() and not valid[height:].any() and not valid[:, width:].any()
    return height, width


@pytest.mark.parametrize("size", [(20, 40), (30, 18)])
def test_scale_range_resizes_by_a_ratio_of_each_images_own_size(size):
    image, label = column_ramp(*size)
    low, high = 0.5, 1.5
    transform = TrainTransform((80, 80), scale_range=(low, high), flip=False)
    heights = []
    for seed in range(200):
        height, width = resized_extent(transform(image, label, np.random.default_rng(seed))[1])
        # One ratio r in [lo, hi] for both sides: h = round(H r), w = round(W r).
        r_low = max((height - 0.5) / size[0], (width - 0.5) / size[1], low)
        r_high = min((height + 0.5) / size[0], (width + 0.5) / size[1], high)
        assert r_low <= r_high, (height, width)
        heights.append(height)
    assert min(heights) <= round(size[0] * low) + 1 and max(heights) >= round(size[0] * high) - 1  # range covered
    assert len(set(heights)) > 10


def test_scale_range_keeps_image_and_label_aligned_and_labels_nearest():
    image, label = column_ramp(30, 60)
    label = (label // 10 * 40).astype(np.uint8)
    image[:, :, 0] = label
    transform = TrainTransform((24, 24), scale_range=(0.6, 1.7), flip=True)
    for seed in range(20):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        lab = out_label.numpy()
        assert set(np.unique(lab).tolist()) <= {0, 40, 80, 120, 160, 200, 255}
        red = out_image[0].numpy().astype(int)
        # Inside each plateau of the image (equal to both neighbours), the label has the same value.
        inner = np.zeros_like(lab, dtype=bool)
        inner[:, 1:-1] = (red[:, 1:-1] == red[:, :-2]) & (red[:, 1:-1] == red[:, 2:])
        inner &= lab != 255
        assert inner.sum() > 100 and (red[inner] == lab[inner]).mean() > 0.97


def test_scale_range_is_deterministic_given_the_rng():
    image, label = column_ramp(40, 50)
    transform = TrainTransform((16, 16), scale_range=(0.5, 2.0))
    first = transform(image, label, np.random.default_rng([1, 2, 3]))
    second = transform(image, label, np.random.default_rng([1, 2, 3]))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # The ratio is the first draw: the same generator state gives the size a plain uniform draw predicts.
    big = TrainTransform((200, 200), scale_range=(0.5, 2.0), flip=False)
    ratio = np.random.default_rng(7).uniform(0.5, 2.0)
    assert resized_extent(big(image, label, np.random.default_rng(7))[1]) == (int(40 * ratio + 0.5),
                                                                              int(50 * ratio + 0.5))


@pytest.mark.parametrize("kwargs, match", [
    ({"shorter_side": (10, 20), "scale_range": (0.5, 2.0)}, "one of them"),
    ({"scale_range": (2.0, 0.5)}, "lo <= hi"),
    ({"scale_range": (0.0, 1.0)}, "positive"),
    ({"scale_range": (0.5,)}, "two positive"),
    ({"scale_range": "big"}, "two positive"),
])
def test_scale_range_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainTransform((8, 8), **kwargs)


# ----------------------------------------------------------------------------------------------
# Warnings about a rescale / crop that does not suit the images


def test_crop_larger_than_images_without_resize():
    from plca.data.transforms import crop_larger_than_images

    sizes = {(300, 400): 2, (600, 800): 5}  # (h, w): count
    message = crop_larger_than_images((512, 512), sizes)
    assert "512x512" in message and "2 of 7 images" in message and "400x300" in message
    assert "no rescale is configured" in message and "28.6 % of the training crops" in message  # 2 of 7
    assert crop_larger_than_images((256, 256), sizes) is None
    assert crop_larger_than_images((512, 512), [(600, 800), (700, 900)]) is None  # an iterable of sizes
    assert crop_larger_than_images((512, 512), sizes, shorter_side=(512, 600)) is None  # upscaled enough
    assert crop_larger_than_images((512, 512), sizes, scale_range=(1.75, 2.0)) is None
    message = crop_larger_than_images((512, 512), sizes, scale_range=(0.5, 2.0))
    assert "7 of 7 images" in message and "ratio drawn from [0.5, 2] is below 0.853..1.71 (by image size)" in message


def test_resize_warnings():
    from plca.data.transforms import resize_warnings

    cityscapes = {(1024, 2048): 10}
    assert resize_warnings(cityscapes, (730, 730), shorter_side=(760, 988)) == []
    assert resize_warnings(cityscapes, (512, 512), scale_range=(0.5, 2.0)) == []
    small = {(256, 512): 3, (300, 500): 1}
    found = resize_warnings(small, (730, 730), shorter_side=(760, 988))
    assert len(found) == 1 and "upscales images up to 3.9x" in found[0]  # 988 / 256
    found = resize_warnings(cityscapes, (64, 64), shorter_side=(100, 200))
    assert len(found) == 1 and "downscales images down to 0.10x" in found[0]
    found = resize_warnings(small, (730, 730))
    assert len(found) == 1 and "larger than 4 of 4 images" in found[0]
    assert resize_warnings({}, (730, 730)) == []


# --- cat_max_ratio: mmsegmentation's RandomCrop re-draws (DAFormer's 0.75) --------------------------


def _window_reference(label: np.ndarray, ratio: float) -> bool:
    """At least two classes among the labelled pixels, none with a share >= ratio (written out)."""
    values = [int(v) for v in label.ravel() if v != 255]
    shares = [values.count(c) / len(values) for c in set(values)]
    return len(shares) >= 2 and max(shares) < ratio


@pytest.mark.parametrize("values, ratio, expected", [
    ([0] * 16, 0.75, False),                       # one class
    ([0] * 12 + [1] * 4, 0.75, False),             # a share of exactly 0.75 is too much
    ([0] * 11 + [1] * 5, 0.75, True),
    ([0] * 11 + [1] * 5, 0.6, False),
    ([255] * 10 + [0] * 4 + [1] * 2, 0.75, True),  # ignored pixels are not counted (else 0 would be 4/16)
    ([255] * 16, 0.75, False),                     # nothing labelled
    ([255] * 15 + [3], 0.75, False),
])
def test_window_is_varied_counts_only_labelled_pixels(values, ratio, expected):
    from plca.data.transforms import window_is_varied

    label = np.array(values, dtype=np.uint8).reshape(4, 4)
    assert window_is_varied(label, ratio) is expected == _window_reference(label, ratio)


def _stripes(height: int = 8, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 everywhere but a band of class 1 in columns 40..47 (most 8-wide windows are one class)."""
    image, _ = column_ramp(height, width)
    label = np.zeros((height, width), np.uint8)
    label[:, 40:] = 1
    label[:2, :] = 255
    return image, label


@pytest.mark.parametrize("seed", range(12))
def test_cat_max_ratio_keeps_the_first_varied_window_of_the_draws_else_the_last(seed):
    from plca.data.transforms import CAT_MAX_REDRAWS

    image, label = _stripes()
    crop = (8, 8)
    out_image, out_label = TrainTransform(crop, flip=False, cat_max_ratio=0.75)(image, label, np.random.default_rng(seed))

    # The reference: the same generator's windows, drawn as (top, left) pairs, the first varied one of the
    # first CAT_MAX_REDRAWS + 1 draws checked in turn, the last draw kept unchecked.
    rng = np.random.default_rng(seed)
    draws = [(int(rng.integers(0, 1)), int(rng.integers(0, 48 - 8 + 1))) for _ in range(CAT_MAX_REDRAWS + 1)]
    chosen = next((d for d in draws[:-1] if _window_reference(label[:, d[1]:d[1] + 8], 0.75)), draws[-1])
    np.testing.assert_array_equal(out_label.numpy(), label[:, chosen[1]:chosen[1] + 8])
    np.testing.assert_array_equal(out_image[0].numpy(), image[:, chosen[1]:chosen[1] + 8, 0])


def test_cat_max_ratio_makes_varied_crops_common_and_one_is_off():
    image, label = _stripes()
    varied = {}
    for ratio in (1.0, 0.75):
        transform = TrainTransform((8, 8), flip=False, cat_max_ratio=ratio)
        crops = [transform(image, label, np.random.default_rng(seed))[1].numpy() for seed in range(300)]
        varied[ratio] = np.mean([_window_reference(c, 0.75) for c in crops])
    # 3 of the 41 windows (3, 4 or 5 columns of class 1) are varied: 7.3 % unchecked,
    # 1 - (38/41)^11 = 56.6 % with the re-draws (sd of a 300-crop estimate: under 3 points)
    assert 0.03 < varied[1.0] < 0.13 and 0.45 < varied[0.75] < 0.68


def test_cat_max_ratio_one_draws_the_same_windows_as_before():
    image, label = _stripes()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        left = (int(rng.integers(0, 1)), int(rng.integers(0, 41)))[1]
        out = TrainTransform((8, 8), flip=False)(image, label, np.random.default_rng(seed))[1].numpy()
        np.testing.assert_array_equal(out, label[:, left:left + 8])


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_cat_max_ratio_out_of_range_is_refused(ratio):
    with pytest.raises(ValueError, match="cat_max_ratio"):
        TrainTransform((8, 8), cat_max_ratio=ratio)
