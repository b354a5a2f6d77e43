"""DACS' strong augmentation of a mixed image: colour jitter, then Gaussian blur.

On RGB 0-255 float images ``(B, 3, H, W)``, following DAFormer's ``dacs_transforms`` with
kornia 0.5.8 (the version it pins), re-implemented here:

- **When.** One uniform draw ``u`` per *batch* for each of the two; DAFormer jitters when
  ``u > color_jitter_probability`` (0.2), so 80 % of the batches, and blurs when ``u > 0.5``.
  :func:`strong_augment` takes the chances of applying (0.8 and 0.5).
- **Colour jitter** of strength ``s`` (kornia ``ColorJitter(s, s, s, s)``), per image: the four
  operations in a random order (``randperm(4)``), on values scaled to 0-1:
  brightness ``x + (b - 1)``, ``b ~ U[max(0, 1 - s), 1 + s]``, clamped to [0, 1];
  contrast ``x * c``, ``c ~ U[max(0, 1 - s), 1 + s]``, clamped (kornia scales, it does not blend
  towards the mean); saturation: HSV ``S * f``, ``f ~ U[max(0, 1 - s), 1 + s]``, clamped to [0, 1];
  hue: HSV ``H + h`` (in turns, modulo 1), ``h ~ U[-s, s]`` (bounded to [-0.5, 0.5]).
  DAFormer de-normalises to 0-1 around the jitter; here the image is scaled by 1/255 and back.
- **Gaussian blur**, per image ``sigma ~ U[0.15, 1.15]``, the same in both directions, kernel
  size per axis ``floor(ceil(0.1 * L) - 0.5 + ceil(0.1 * L) % 2)`` for a side of length ``L``
  (the largest odd number <= ``ceil(0.1 * L)``), reflect padding. DAFormer blurs the normalised
  image; normalisation is affine per channel and the kernel sums to 1, so blurring 0-255 values
  is the same.

Random numbers come from ``generator`` only, drawn on its device in a fixed order: the jitter
draw, the blur draw, then per image (jitter factors b, c, f, h and the order) if jittering,
then the per-image sigmas if blurring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation", "blur_kernel_size",
           "color_jitter", "gaussian_blur", "hsv_to_rgb", "rgb_to_hsv", "strong_augment"]

_MAX = 255.0


def _factor(value: Tensor | float, images: Tensor, dims: int) -> Tensor | float:
    """A scalar as it is, or one value per image ``(B,)`` shaped to broadcast over ``dims`` trailing dims."""
    if isinstance(value, Tensor) and value.dim() > 0:
        return value.to(dtype=images.dtype, device=images.device).reshape(-1, *([1] * dims))
    return float(value)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """RGB in [0, 1] ``(B, 3, H, W)`` -> HSV ``(B, 3, H, W)``, hue in turns [0, 1), S and V in [0, 1]."""
    red, green, blue = images.unbind(dim=1)
    value, argmax = images.max(dim=1)
    delta = value - images.min(dim=1).values
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.stack([((green - blue) / safe) % 6, (blue - red) / safe + 2, (red - green) / safe + 4], dim=1)
    hue = hue.gather(1, argmax.unsqueeze(1)).squeeze(1) / 6
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue)) % 1.0
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(images: Tensor) -> Tensor:
    """HSV ``(B, 3, H, W)`` (hue in turns) -> RGB in [0, 1]."""
    hue, saturation, value = images.unbind(dim=1)
    sector = torch.floor(hue * 6)
    fraction = hue * 6 - sector
    sector = sector.long() % 6
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    # the (R, G, B) of each of the six hue sectors
    table = torch.stack([value, t, p,  q, value, p,  p, value, t,  p, q, value,  t, p, value,  value, p, q], dim=1)
    index = (sector * 3).unsqueeze(1) + torch.arange(3, device=images.device).view(1, 3, 1, 1)
    return table.gather(1, index)


def adjust_brightness(images: Tensor, factor: Tensor | float) -> Tensor:
    """``x + (factor - 1) * 255`` clamped to [0, 255]; ``factor`` a scalar or one per image ``(B,)``."""
    return (images + (_factor(factor, images, 3) - 1) * _MAX).clamp(0, _MAX)


def adjust_contrast(images: Tensor, factor: Tensor | float) -> Tensor:
    """``x * factor`` clamped to [0, 255] (kornia 0.5's contrast)."""
    return (images * _factor(factor, images, 3)).clamp(0, _MAX)


def adjust_saturation(images: Tensor, factor: Tensor | float) -> Tensor:
    """HSV saturation multiplied by ``factor``, clamped to [0, 1]; hue and value kept."""
    hsv = rgb_to_hsv(images / _MAX)
    hsv = torch.stack([hsv[:, 0], (hsv[:, 1] * _factor(factor, images, 2)).clamp(0, 1), hsv[:, 2]], dim=1)
    return hsv_to_rgb(hsv) * _MAX


def adjust_hue(images: Tensor, shift: Tensor | float) -> Tensor:
    """HSV hue shifted by ``shift`` turns (modulo 1); saturation and value kept."""
    hsv = rgb_to_hsv(images / _MAX)
    hsv = torch.stack([(hsv[:, 0] + _factor(shift, images, 2)) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
    return hsv_to_rgb(hsv) * _MAX


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def color_jitter(images: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """kornia-0.5 ``ColorJitter(s, s, s, s)`` on 0-255 images ``(B, 3, H, W)``, own factors per image."""
    low = max(0.0, 1.0 - strength)
    hue = min(strength, 0.5)
    out = []
    for image in images.split(1):
        brightness = _uniform(generator, low, min(1.0 + strength, 2.0))
        contrast = _uniform(generator, low, 1.0 + strength)
        saturation = _uniform(generator, low, 1.0 + strength)
        hue_shift = _uniform(generator, -hue, hue)
        order = torch.randperm(4, generator=generator, device=generator.device).tolist()
        operations = (lambda x, f=brightness: adjust_brightness(x, f), lambda x, f=contrast: adjust_contrast(x, f),
                      lambda x, f=saturation: adjust_saturation(x, f), lambda x, f=hue_shift: adjust_hue(x, f))
        for index in order:
            image = operations[index](image)
        out.append(image)
    return torch.cat(out).clamp(0, _MAX)


def blur_kernel_size(length: int) -> int:
    """DAFormer's kernel size for a side of ``length`` pixels: the largest odd number <= ceil(0.1 * length)."""
    tenth = math.ceil(0.1 * length)
    return int(math.floor(tenth - 0.5 + tenth % 2))


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(images: Tensor, sigma: float, kernel_size: tuple[int, int] | None = None) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with reflect padding; odd ``kernel_size = (ky, kx)``.

    ``kernel_size`` defaults to :func:`blur_kernel_size` of each side.
    """
    _, channels, height, width = images.shape
    ky, kx = kernel_size or (blur_kernel_size(height), blur_kernel_size(width))
    if ky % 2 == 0 or kx % 2 == 0 or ky < 1 or kx < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {(ky, kx)}")
    if ky // 2 >= height or kx // 2 >= width:
        raise ValueError(f"kernel_size {(ky, kx)} too large for reflect padding of a {height} x {width} image")
    out = images
    if ky > 1:
        kernel = _gaussian_1d(ky, sigma, images.dtype, images.device).view(1, 1, ky, 1).expand(channels, 1, ky, 1)
        out = F.conv2d(F.pad(out, (0, 0, ky // 2, ky // 2), mode="reflect"), kernel, groups=channels)
    if kx > 1:
        kernel = _gaussian_1d(kx, sigma, images.dtype, images.device).view(1, 1, 1, kx).expand(channels, 1, 1, kx)
        out = F.conv2d(F.pad(out, (kx // 2, kx // 2, 0, 0), mode="reflect"), kernel, groups=channels)
    return out


def strong_augment(images: Tensor, generator: torch.Generator, jitter_strength: float = 0.2,
                   jitter_probability: float = 0.8, blur_probability: float = 0.5,
                   sigma_range: tuple[float, float] = (0.15, 1.15)) -> Tensor:
    """DACS' colour jitter and Gaussian blur of 0-255 images ``(B, 3, H, W)`` (see the module text).

    ``jitter_probability`` / ``blur_probability``: the chance that a batch is jittered / blurred.
    DAFormer's ``color_jitter_probability = p`` is ``jitter_probability = 1 - p`` (0.8), its
    ``blur = True`` is ``blur_probability = 0.5`` and ``blur = False`` is 0. With both 0 the
    input comes back unchanged (and no random number is drawn beyond the two decisions).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    for name, value in (("jitter_probability", jitter_probability), ("blur_probability", blur_probability)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    jitter_draw = float(torch.rand((), generator=generator, device=generator.device))
    blur_draw = float(torch.rand((), generator=generator, device=generator.device))
    out = images
    # DAFormer applies when u > p; u >= 1 - probability is the same test up to a null event
    if jitter_draw >= 1.0 - jitter_probability and jitter_probability > 0:
        out = color_jitter(out, jitter_strength, generator)
    if blur_draw >= 1.0 - blur_probability and blur_probability > 0:
        out = torch.cat([gaussian_blur(image, _uniform(generator, *sigma_range)) for image in out.split(1)])
    return out
