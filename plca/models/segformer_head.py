"""SegFormer's all-MLP head: per-level linear embeddings, upsampled, concatenated, fused by a 1x1 conv.

As NVlabs/SegFormer ``segformer_head.py``: every level is mapped to ``embed_dim`` channels by a
Linear applied at each pixel, upsampled (bilinear, ``align_corners=False``) to the size of the
finest level, the maps are concatenated coarsest first, fused by a 1x1 convolution without
bias + BatchNorm + ReLU to ``embed_dim`` channels, then channel dropout (``Dropout2d``, 0.1)
and a 1x1 classifier. SegFormer uses ``embed_dim`` 256 with MiT-B0/B1 and 768 with B2-B5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from plca.models.head_base import ConvBNReLU, FusedLevelsHead, PixelLinear, check_levels, embed_levels
from plca.models.registry import register_head

__all__ = ["ConvBNReLU", "PixelLinear", "SegFormerHead", "check_levels", "embed_levels", "segformer_head"]


class SegFormerHead(FusedLevelsHead):
    """SegFormer's all-MLP decoder: levels ``[(B, C_k, h_k, w_k)]`` (finest first) -> logits ``(B, K, h_0, w_0)``.

    With a MiT backbone ``h_0, w_0`` is 1/4 of the image; with any other backbone it is the size
    of its first level. Works with any number of levels >= 1 and any channel counts. The fusion
    (``fuse``) is a 1x1 conv + BN + ReLU to ``embed_dim``; dropout and classifier as
    :class:`~plca.models.head_base.FusedLevelsHead`.
    """

    head_name = "SegFormer"

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__(in_channels, num_classes, embed_dim=embed_dim, channels=embed_dim, dropout=dropout,
                         fuse=lambda width: ConvBNReLU(width, embed_dim))

    def embed(self, levels: Sequence[Tensor]) -> Tensor:
        """The fused map ``(B, embed_dim, h_0, w_0)`` the classifier reads."""
        check_levels(levels, self.in_channels, self.head_name)
        maps = embed_levels(self.embeddings, levels)
        return self.fuse(torch.cat(maps[::-1], dim=1))  # coarsest first, as SegFormer concatenates


@register_head("segformer")
def segformer_head(in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                   dropout: float = 0.1, width: int | None = None) -> SegFormerHead:
    """SegFormer's all-MLP head (``embed_dim`` 256 as for MiT-B0/B1; SegFormer uses 768 for B2-B5).

    ``width`` (``model.head_width``) sets ``embed_dim``.
    """
    if width is not None:
        embed_dim = width
    return SegFormerHead(in_channels, num_classes, embed_dim=embed_dim, dropout=dropout)
