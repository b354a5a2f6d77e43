"""Training / evaluation transforms: shapes, rescale range, padding, flip consistency, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plca.data.transforms import EvalTransform, TrainTransform


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
