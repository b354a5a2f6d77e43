"""The input a backbone's weights expect, and the module that maps RGB 0-255 images to it.

A :class:`Normalization` is declared by each backbone in its registry contract (per style where it
has styles, see :mod:`plca.models.registry`); the segmentor builds its :class:`InputNormalizer`
from the one its backbone and style ask for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Normalization:
    """The input a backbone's weights expect, from RGB 0-255 images.

    ``bgr``: reverse the channels first; ``mean`` / ``std`` are in 0-255 units, in the
    channel order after the optional reversal: ``x' = (x - mean) / std``. The value range
    follows: std 1 keeps 0-255 (Caffe), std ``255 * s`` is torchvision's ``(x / 255 - m) / s``.
    """

    bgr: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_unit_range(cls, mean: tuple[float, float, float], std: tuple[float, float, float],
                        bgr: bool = False) -> Normalization:
        """The normalisation written for images scaled to [0, 1] (torchvision's and timm's convention:
        ``(x / 255 - mean) / std``), in 0-255 units (rounded to 6 decimals, so that ImageNet's
        ``(0.485, 0.456, 0.406)`` / ``(0.229, 0.224, 0.225)`` give exactly :data:`IMAGENET_RGB`)."""
        return cls(bgr=bgr, mean=tuple(round(255.0 * m, 6) for m in mean),
                   std=tuple(round(255.0 * s, 6) for s in std))

    def as_dict(self) -> dict:
        return {"bgr": self.bgr, "mean": list(self.mean), "std": list(self.std)}


#: ImageNet mean / std of torchvision, timm and MiT, RGB, in 0-255 units.
IMAGENET_RGB = Normalization(bgr=False, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


class InputNormalizer(nn.Module):
    """Maps RGB images in 0-255 ``(B, 3, H, W)`` to the input a backbone's weights were trained on.

    ``normalization``: what the backbone's contract declares for its style (channels reversed when
    ``bgr``, then ``(x - mean) / std`` in 0-255 units); ``style``: the style it stands for, a label
    only. Integer images are converted to float32. The constants are non-persistent buffers: they
    follow ``.to(device)`` but never appear in state dicts.
    """

    def __init__(self, normalization: Normalization, style: str | None = None) -> None:
        super().__init__()
        if not isinstance(normalization, Normalization):
            raise TypeError(f"InputNormalizer takes a Normalization, got {type(normalization).__name__} "
                            f"(a backbone's contract gives it: plca.models.registry.backbone_contract)")
        self.style = style
        self.normalization = normalization
        self.bgr = normalization.bgr
        self.register_buffer("mean", _channel_vector(normalization.mean), persistent=False)
        self.register_buffer("std", _channel_vector(normalization.std), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Normalised float images ``(B, 3, H, W)`` from RGB 0-255 images ``(B, 3, H, W)``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            images = images.float()
        if self.bgr:
            images = images.flip(1)
        return (images - self.mean) / self.std


def _channel_vector(values: tuple[float, ...]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)
