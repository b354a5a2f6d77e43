"""DAFormer's head: per-level linear embeddings fused by an ASPP of depthwise separable convolutions.

As DAFormer builds it (``lhoyer/DAFormer/mmseg/models/decode_heads/daformer_head.py`` with
``lhoyer/DAFormer/configs/_base_/models/daformer_sepaspp_mitb5.py``):

1. every level is mapped to ``embed_dim`` (256) channels by a Linear at each pixel and upsampled
   (bilinear, ``align_corners=False``) to the size of the finest level; the maps are
   concatenated finest first (``L * embed_dim`` channels);
2. context-aware fusion (``ASPPWrapper`` with ``sep=True``, ``dilations=(1, 6, 12, 18)``,
   ``pool=False``): parallel branches to ``channels`` (256) each, a 1x1 conv + BN + ReLU for
   dilation 1 and, for each other dilation ``d``, a depthwise separable convolution: depthwise
   3x3 conv of dilation ``d`` (padding ``d``) + BN + ReLU, then pointwise 1x1 + BN + ReLU;
3. the branches concatenated and fused by a 3x3 conv (padding 1) + BN + ReLU to ``channels``:
   this is the head's embedding;
4. channel dropout (``Dropout2d``, 0.1) and a 1x1 classifier (weights normal, std 0.01, bias 0).

``fusion="conv1x1"`` replaces step 2-3 by one 1x1 conv + BN + ReLU to ``channels``: HRDA's lighter
scale-attention head (:mod:`plca.models.attention_head`).

Convolutions before a BatchNorm have no bias and are He-initialised (mmcv ``ConvModule``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from plca.models.head_base import ConvBNReLU, FusedLevelsHead, check_levels, embed_levels
from plca.models.registry import register_head


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise 3x3 conv of dilation ``d`` + BN + ReLU, then pointwise 1x1 + BN + ReLU.

    ``(B, C_in, H, W) -> (B, C_out, H, W)`` (padding ``d`` keeps the size).
    """

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            ConvBNReLU(in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels),
            ConvBNReLU(in_channels, out_channels, 1),
        )

    @property
    def depthwise(self) -> ConvBNReLU:
        return self[0]

    @property
    def pointwise(self) -> ConvBNReLU:
        return self[1]


class SeparableASPP(nn.Module):
    """DAFormer's context fusion: ``(B, C_in, H, W) -> (B, channels, H, W)``.

    One branch per dilation (1x1 conv for dilation 1, :class:`DepthwiseSeparableConv` otherwise),
    concatenated and fused by a 3x3 conv + BN + ReLU.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.dilations = tuple(dilations)
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError(f"ASPP dilations must be positive integers, got {self.dilations}")
        self.branches = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if d == 1 else DepthwiseSeparableConv(in_channels, channels, d)
            for d in self.dilations
        )
        self.bottleneck = ConvBNReLU(len(self.dilations) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


FUSIONS = ("aspp", "conv1x1")


def fusion_builder(fusion: str, channels: int, dilations: Sequence[int]) -> Callable[[int], nn.Module]:
    """The ``fuse`` factory of :class:`~plca.models.head_base.FusedLevelsHead` for ``fusion``: width -> module
    ``(B, width, H, W) -> (B, channels, H, W)``; ``dilations`` matter for ``"aspp"`` only."""
    if fusion == "aspp":
        return lambda width: SeparableASPP(width, channels, dilations)
    if fusion == "conv1x1":
        return lambda width: ConvBNReLU(width, channels, 1)
    raise ValueError(f"the DAFormer head's fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


class DAFormerHead(FusedLevelsHead):
    """DAFormer's decoder: levels ``[(B, C_k, h_k, w_k)]`` (finest first) -> logits ``(B, K, h_0, w_0)``.

    With a MiT backbone ``h_0, w_0`` is 1/4 of the image; with any other backbone it is the size
    of its first level. Works with any number of levels >= 1 and any channel counts. The fusion
    (``fuse``) is a :class:`SeparableASPP` to ``channels`` (``fusion="aspp"``) or a 1x1 conv + BN + ReLU
    (``fusion="conv1x1"``); dropout and classifier as :class:`~plca.models.head_base.FusedLevelsHead`,
    the classifier initialised Normal(0, 0.01).
    """

    head_name = "DAFormer"

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, channels: int = 256,
                 dilations: Sequence[int] = (1, 6, 12, 18), dropout: float = 0.1, fusion: str = "aspp") -> None:
        super().__init__(in_channels, num_classes, embed_dim=embed_dim, channels=channels, dropout=dropout,
                         fuse=fusion_builder(fusion, channels, dilations))
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def embed(self, levels: Sequence[Tensor]) -> Tensor:
        """The fused map (after the ASPP bottleneck or the 1x1 fusion) ``(B, channels, h_0, w_0)``, before dropout."""
        check_levels(levels, self.in_channels, self.head_name)
        return self.fuse(torch.cat(embed_levels(self.embeddings, levels), dim=1))


@register_head("daformer")
def daformer_head(in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, channels: int = 256,
                  dilations: Sequence[int] = (1, 6, 12, 18), dropout: float = 0.1,
                  width: int | None = None) -> DAFormerHead:
    """DAFormer's head with its defaults: 256-channel embeddings, separable ASPP of dilations 1/6/12/18.

    ``width`` (``model.head_width``) sets both the embedding and the fusion channels.
    """
    if width is not None:
        embed_dim = channels = width
    return DAFormerHead(in_channels, num_classes, embed_dim=embed_dim, channels=channels, dilations=dilations,
                        dropout=dropout)
