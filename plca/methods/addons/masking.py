"""MIC's random patch masking of images (masked image consistency).

A keep/drop value is drawn per cell of a ``round(H / patch) x round(W / patch)`` grid (Python's
``round``, at least one cell), a cell being dropped with probability ``ratio``
(MIC's ``torch.rand(...) > mask_ratio`` keeps it), and the grid is upsampled to ``H x W`` by
nearest neighbour (PyTorch's ``nearest``: pixel ``y`` reads cell ``floor(y * rows / H)``). When
``H`` and ``W`` are multiples of ``patch`` the cells are exactly ``patch x patch`` pixels.

MIC multiplies the *normalised* image by the mask, so a dropped pixel becomes the
normalisation mean; on the 0-255 images used here that is ``fill = mean`` (RGB, 0-255), which
:func:`normalized_zero` gives for a backbone's normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from plca.models.registry import Normalization

__all__ = ["mask_images", "normalized_zero", "patch_mask"]


def patch_mask(shape: Sequence[int] | torch.Size | Tensor, generator: torch.Generator, patch_size: int = 64,
               ratio: float = 0.7, device: torch.device | str | None = None) -> Tensor:
    """Masks ``(B, 1, H, W)`` float, 1 = keep, 0 = masked.

    ``shape``: ``(B, H, W)``, or images ``(B, C, H, W)`` (their shape and device are used).
    The grid is drawn from ``generator`` on its own device, then moved to ``device``.
    """
    if isinstance(shape, Tensor):
        if shape.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(shape.shape)}")
        device = shape.device if device is None else device
        batch, _, height, width = shape.shape
    else:
        if len(shape) != 3:
            raise ValueError(f"shape must be (B, H, W), got {tuple(shape)}")
        batch, height, width = (int(v) for v in shape)
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    rows, cols = max(1, round(height / patch_size)), max(1, round(width / patch_size))
    grid = torch.rand(batch, 1, rows, cols, generator=generator, device=generator.device)
    keep = (grid > ratio).float().to(device if device is not None else generator.device)
    return F.interpolate(keep, size=(height, width), mode="nearest")


def mask_images(images: Tensor, mask: Tensor, fill: float | Sequence[float] = 0.0) -> Tensor:
    """``images * mask + fill * (1 - mask)``; images ``(B, C, H, W)``, mask ``(B, 1, H, W)``.

    ``fill``: one value, or one per channel (e.g. :func:`normalized_zero` for MIC's behaviour).
    """
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != images.shape[0] \
            or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(images.shape)}")
    mask = mask.to(images.dtype)
    fill_values = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    if fill_values.dim() == 1:
        if fill_values.numel() != images.shape[1]:
            raise ValueError(f"fill has {fill_values.numel()} values for {images.shape[1]} channels")
        fill_values = fill_values.view(1, -1, 1, 1)
    return images * mask + fill_values * (1 - mask)


def normalized_zero(normalization: Normalization) -> tuple[float, float, float]:
    """The RGB 0-255 colour that ``normalization`` maps to 0 (its mean, in RGB order)."""
    mean = tuple(float(v) for v in normalization.mean)
    return mean[::-1] if normalization.bgr else mean
