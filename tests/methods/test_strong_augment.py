"""DACS' strong augmentation: kornia-0.5 colour ops re-implemented on 0-255 images, DAFormer's blur
kernel size, the apply probabilities and determinism."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from plca.methods.addons.strong_augment import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                                                blur_kernel_size, color_jitter, gaussian_blur, hsv_to_rgb,
                                                rgb_to_hsv, strong_augment)


def random_images(seed: int = 0, shape=(2, 3, 6, 7)) -> torch.Tensor:
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 255
    images[0, :, 0, 0] = 0.0  # black
    images[0, :, 0, 1] = 255.0  # white
    images[0, :, 0, 2] = torch.tensor([200.0, 200.0, 10.0])  # a tie for the maximum
    images[0, :, 0, 3] = 77.0  # grey
    return images


def per_pixel(images: torch.Tensor, function) -> torch.Tensor:
    """Apply ``function(r, g, b) -> (r, g, b)`` (0-1 floats) to every pixel."""
    out = images.clone()
    for b in range(images.shape[0]):
        for y in range(images.shape[2]):
            for x in range(images.shape[3]):
                rgb = (images[b, :, y, x] / 255).tolist()
                out[b, :, y, x] = torch.tensor(function(*rgb), dtype=images.dtype) * 255
    return out


def test_hsv_against_colorsys():
    images = random_images()
    hsv = rgb_to_hsv(images / 255)
    expected = per_pixel(images, colorsys.rgb_to_hsv) / 255
    torch.testing.assert_close(hsv, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(hsv_to_rgb(hsv), images / 255, rtol=0, atol=1e-9)


def test_saturation_and_hue_against_colorsys():
    images = random_images()

    def saturate(factor):
        def f(r, g, b):
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            return colorsys.hsv_to_rgb(h, min(max(s * factor, 0.0), 1.0), v)
        return f

    def rotate(shift):
        def f(r, g, b):
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            return colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
        return f

    for factor in (0.8, 1.2, 3.0):
        torch.testing.assert_close(adjust_saturation(images, factor), per_pixel(images, saturate(factor)),
                                   rtol=0, atol=1e-7)
    for shift in (-0.2, 0.13, 0.5):
        torch.testing.assert_close(adjust_hue(images, shift), per_pixel(images, rotate(shift)), rtol=0, atol=1e-7)
    # one factor per image
    both = adjust_saturation(images, torch.tensor([0.8, 1.2], dtype=torch.float64))
    torch.testing.assert_close(both[1:], adjust_saturation(images[1:], 1.2))


def test_brightness_and_contrast():
    images = random_images()
    torch.testing.assert_close(adjust_brightness(images, 1.2), (images + 51).clamp(0, 255))
    torch.testing.assert_close(adjust_brightness(images, 0.8), (images - 51).clamp(0, 255))
    torch.testing.assert_close(adjust_contrast(images, 1.2), (images * 1.2).clamp(0, 255))
    per_image = adjust_contrast(images, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(per_image[0], images[0])
    torch.testing.assert_close(per_image[1], images[1] * 0.5)


def test_jitter_keeps_the_range_and_strength_zero_is_identity():
    images = random_images(shape=(3, 3, 8, 8))
    for seed in range(5):
        out = color_jitter(images, 0.9, torch.Generator().manual_seed(seed))
        assert out.min() >= 0 and out.max() <= 255
        assert not torch.allclose(out, images)
    torch.testing.assert_close(color_jitter(images, 0.0, torch.Generator().manual_seed(0)), images,
                               rtol=0, atol=1e-9)


def test_blur_kernel_size_is_daformers_formula():
    for length in range(1, 2500):
        tenth = np.ceil(0.1 * length)
        assert blur_kernel_size(length) == int(np.floor(tenth - 0.5 + tenth % 2)), length
        assert blur_kernel_size(length) % 2 == 1
    assert blur_kernel_size(512) == 51
    assert blur_kernel_size(1024) == 103


def test_blur_against_a_dense_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 9, 11, generator=g, dtype=torch.float64) * 255
    sigma, (ky, kx) = 0.8, (5, 3)
    out = gaussian_blur(images, sigma, (ky, kx))

    def kernel(size):
        x = np.arange(size) - size // 2
        k = np.exp(-x ** 2 / (2 * sigma ** 2))
        return k / k.sum()

    k2 = np.outer(kernel(ky), kernel(kx))
    array = images.numpy()
    expected = np.zeros_like(array)
    for y in range(9):
        for x in range(11):
            for dy in range(ky):
                for dx in range(kx):
                    sy, sx = y + dy - ky // 2, x + dx - kx // 2
                    sy = -sy if sy < 0 else (2 * 8 - sy if sy > 8 else sy)  # reflect (no edge repeat)
                    sx = -sx if sx < 0 else (2 * 10 - sx if sx > 10 else sx)
                    expected[:, :, y, x] += k2[dy, dx] * array[:, :, sy, sx]
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-9)


def test_blur_keeps_a_constant_and_reduces_noise():
    constant = torch.full((1, 3, 40, 50), 93.0)
    torch.testing.assert_close(gaussian_blur(constant, 1.15), constant)
    noise = torch.rand(1, 3, 40, 50, generator=torch.Generator().manual_seed(0)) * 255
    blurred = gaussian_blur(noise, 1.0)
    assert blurred.shape == noise.shape
    assert blurred.var() < 0.5 * noise.var()
    assert abs(blurred.mean() - noise.mean()) < 1.0


def test_zero_probabilities_are_identity():
    images = random_images(shape=(2, 3, 30, 30)).float()
    for seed in range(5):
        out = strong_augment(images, torch.Generator().manual_seed(seed), jitter_probability=0.0,
                             blur_probability=0.0)
        assert torch.equal(out, images)


def test_deterministic_given_the_generator():
    images = random_images(shape=(2, 3, 30, 30)).float()
    first = strong_augment(images, torch.Generator().manual_seed(5), jitter_probability=1.0, blur_probability=1.0)
    second = strong_augment(images, torch.Generator().manual_seed(5), jitter_probability=1.0, blur_probability=1.0)
    assert torch.equal(first, second)
    third = strong_augment(images, torch.Generator().manual_seed(6), jitter_probability=1.0, blur_probability=1.0)
    assert not torch.equal(first, third)
    assert first.min() >= 0 and first.max() <= 255


def test_apply_probabilities():
    images = random_images(shape=(1, 3, 24, 24)).float()
    g = torch.Generator().manual_seed(0)
    draws = 300
    jittered = sum(not torch.equal(strong_augment(images, g, jitter_probability=0.8, blur_probability=0.0), images)
                   for _ in range(draws))
    blurred = sum(not torch.equal(strong_augment(images, g, jitter_probability=0.0, blur_probability=0.5), images)
                  for _ in range(draws))
    # binomial standard deviations: 0.023 and 0.029
    assert jittered / draws == pytest.approx(0.8, abs=0.08)
    assert blurred / draws == pytest.approx(0.5, abs=0.09)


def test_bad_arguments():
    with pytest.raises(ValueError):
        strong_augment(torch.zeros(1, 1, 4, 4), torch.Generator())
    with pytest.raises(ValueError):
        strong_augment(torch.zeros(1, 3, 4, 4), torch.Generator(), jitter_probability=1.5)
    with pytest.raises(ValueError):
        gaussian_blur(torch.zeros(1, 3, 4, 4), 1.0, (4, 3))
    assert math.isclose(blur_kernel_size(21), 3)
