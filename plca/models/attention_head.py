"""HRDA's scale-attention head for the DAFormer decoder: DAFormer's head with a 1x1 fusion.

As lhoyer/HRDA builds it (``HRDAHead.__init__`` with ``single_scale_head='DAFormerHead'``): the same
per-level linear embeddings (``attention_embed_dim`` 256), but the separable ASPP fusion is replaced
by one 1x1 conv + BN + ReLU to 256 channels; dropout 0.1 and a 1x1 classifier (Normal(0, 0.01)) to one
map per class (or one map). Registered as ``daformer_attention``; ``model.hrda.attention_head`` picks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from plca.models.head_base import ConvBNReLU, FusedLevelsHead, check_levels, embed_levels
from plca.models.registry import register_head


class LightDAFormerHead(FusedLevelsHead):
    """Levels ``[(B, C_k, h_k, w_k)]`` (finest first) -> ``(B, K, h_0, w_0)``, fused by a 1x1 conv."""

    head_name = "DAFormer attention"

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__(in_channels, num_classes, embed_dim=embed_dim, channels=channels, dropout=dropout,
                         fuse=lambda width: ConvBNReLU(width, channels, 1))
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def embed(self, levels: Sequence[Tensor]) -> Tensor:
        """The fused map ``(B, channels, h_0, w_0)`` before dropout."""
        check_levels(levels, self.in_channels, self.head_name)
        return self.fuse(torch.cat(embed_levels(self.embeddings, levels), dim=1))


@register_head("daformer_attention")
def daformer_attention_head(in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, channels: int = 256,
                            dropout: float = 0.1, width: int | None = None) -> LightDAFormerHead:
    """HRDA's attention head for DAFormer; ``width`` (``model.head_width``) sets both widths."""
    if width is not None:
        embed_dim = channels = width
    return LightDAFormerHead(in_channels, num_classes, embed_dim=embed_dim, channels=channels, dropout=dropout)
