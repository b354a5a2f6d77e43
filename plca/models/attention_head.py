"""HRDA's scale-attention head for the DAFormer decoder: DAFormer's head with a 1x1 fusion.

As lhoyer/HRDA builds it (``HRDAHead.__init__`` with ``single_scale_head='DAFormerHead'``): the same
per-level linear embeddings (``attention_embed_dim`` 256), but the separable ASPP fusion is replaced
by one 1x1 conv + BN + ReLU to 256 channels; dropout 0.1 and a 1x1 classifier (Normal(0, 0.01)) to one
map per class (or one map). Registered as ``daformer_attention``; ``model.hrda.attention_head`` picks it.
"""

from __future__ import annotations

from collections.abc import Sequence

from plca.models.daformer_head import DAFormerHead
from plca.models.registry import register_head


class LightDAFormerHead(DAFormerHead):
    """Levels ``[(B, C_k, h_k, w_k)]`` (finest first) -> ``(B, K, h_0, w_0)``: :class:`DAFormerHead` with
    ``fusion="conv1x1"`` (state-dict keys ``embeddings.*``, ``fuse.0`` conv, ``fuse.1`` BN, ``classifier``)."""

    head_name = "DAFormer attention"

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__(in_channels, num_classes, embed_dim=embed_dim, channels=channels, dropout=dropout,
                         fusion="conv1x1")


@register_head("daformer_attention")
def daformer_attention_head(in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, channels: int = 256,
                            dropout: float = 0.1, width: int | None = None) -> LightDAFormerHead:
    """HRDA's attention head for DAFormer; ``width`` (``model.head_width``) sets both widths."""
    if width is not None:
        embed_dim = channels = width
    return LightDAFormerHead(in_channels, num_classes, embed_dim=embed_dim, channels=channels, dropout=dropout)
