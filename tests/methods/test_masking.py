"""MIC's patch masks: the masked share is the ratio, masks are constant per grid cell, any size works,
and filling with the normalisation mean is MIC's masking of the normalised image."""

from __future__ import annotations

import pytest
import torch

from plca.methods.addons import mask_images, normalized_zero, patch_mask
from plca.models.registry import IMAGENET_RGB, Normalization


def test_masked_share_is_the_ratio():
    mask = patch_mask((50, 256, 256), torch.Generator().manual_seed(0), patch_size=64, ratio=0.7)
    assert mask.shape == (50, 1, 256, 256) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # 800 cells: binomial standard deviation of the share 0.016
    assert 1 - mask.mean().item() == pytest.approx(0.7, abs=0.05)
    low = patch_mask((50, 256, 256), torch.Generator().manual_seed(0), patch_size=64, ratio=0.2)
    assert 1 - low.mean().item() == pytest.approx(0.2, abs=0.05)


def test_constant_per_patch_for_multiples():
    mask = patch_mask((3, 128, 192), torch.Generator().manual_seed(1), patch_size=64)
    blocks = mask.view(3, 1, 2, 64, 3, 64)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))


@pytest.mark.parametrize("height, width, rows, cols", [(100, 150, 2, 2), (20, 20, 1, 1), (97, 33, 2, 1),
                                                       (160, 96, 2, 2)])
def test_other_sizes_follow_the_nearest_rule(height, width, rows, cols):
    # Python's round: 160 / 64 = 2.5 -> 2, 96 / 64 = 1.5 -> 2
    mask = patch_mask((4, height, width), torch.Generator().manual_seed(2), patch_size=64, ratio=0.5)
    assert mask.shape == (4, 1, height, width)
    row_of = [y * rows // height for y in range(height)]
    col_of = [x * cols // width for x in range(width)]
    grid = torch.zeros(4, 1, rows, cols)
    for y in range(height):
        for x in range(width):
            grid[:, :, row_of[y], col_of[x]] = mask[:, :, y, x]
    expected = grid[:, :, row_of][:, :, :, col_of]
    assert torch.equal(mask, expected)


def test_from_images_and_determinism():
    images = torch.rand(2, 3, 64, 128)
    first = patch_mask(images, torch.Generator().manual_seed(3), patch_size=32)
    assert first.shape == (2, 1, 64, 128) and first.device == images.device
    assert torch.equal(first, patch_mask((2, 64, 128), torch.Generator().manual_seed(3), patch_size=32))
    assert not torch.equal(first, patch_mask(images, torch.Generator().manual_seed(4), patch_size=32))


def test_mask_images_fill():
    images = torch.rand(2, 3, 8, 8) * 255
    mask = patch_mask(images, torch.Generator().manual_seed(0), patch_size=4, ratio=0.5)
    assert torch.equal(mask_images(images, mask), images * mask)
    filled = mask_images(images, mask, fill=(10.0, 20.0, 30.0))
    dropped = mask[:, 0] == 0
    assert dropped.any() and (~dropped).any()
    for channel, value in enumerate((10.0, 20.0, 30.0)):
        assert (filled[:, channel][dropped] == value).all()
        assert torch.equal(filled[:, channel][~dropped], images[:, channel][~dropped])
    with pytest.raises(ValueError):
        mask_images(images, mask, fill=(1.0, 2.0))
    with pytest.raises(ValueError):
        mask_images(images, mask[:, :, :4])


@pytest.mark.parametrize("normalization", [IMAGENET_RGB,
                                           Normalization(bgr=True, mean=(104.0, 116.7, 122.7), std=(1.0, 1.0, 1.0))])
def test_normalized_zero_reproduces_masking_the_normalised_image(normalization):
    def normalise(x):
        if normalization.bgr:
            x = x.flip(1)
        mean = torch.tensor(normalization.mean).view(1, 3, 1, 1)
        std = torch.tensor(normalization.std).view(1, 3, 1, 1)
        return (x - mean) / std

    images = torch.rand(2, 3, 8, 8) * 255
    mask = patch_mask(images, torch.Generator().manual_seed(0), patch_size=4, ratio=0.5)
    ours = normalise(mask_images(images, mask, fill=normalized_zero(normalization)))
    torch.testing.assert_close(ours, normalise(images) * mask, rtol=0, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        patch_mask((2, 8), torch.Generator())
    with pytest.raises(ValueError):
        patch_mask((2, 8, 8), torch.Generator(), ratio=1.5)
    with pytest.raises(ValueError):
        patch_mask((2, 8, 8), torch.Generator(), patch_size=0)
