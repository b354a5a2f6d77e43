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
import torch.nn.functional as F
from torch import Tensor, nn

from plca.models.registry import register_head


class PixelLinear(nn.Linear):
    """A Linear layer applied at every pixel: ``(B, C_in, H, W) -> (B, C_out, H, W)``.

    The same map as a 1x1 convolution, with a Linear's parameters ``weight (C_out, C_in)``,
    ``bias (C_out,)`` and initialisation (SegFormer's and DAFormer's ``MLP`` embedding).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class ConvBNReLU(nn.Sequential):
    """Convolution without bias, BatchNorm, ReLU (mmcv's ``ConvModule`` with BN): ``(B, C_in, H, W) -> (B, C_out, h, w)``.

    Initialised as ``ConvModule``: He-normal weights (fan-out, ReLU gain), BatchNorm weight 1, bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, padding: int = 0,
                 dilation: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self[1].weight)
        nn.init.zeros_(self[1].bias)

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]


def check_levels(levels: Sequence[Tensor], in_channels: Sequence[int], head: str) -> None:
    """Raise ``ValueError`` unless ``levels`` are ``len(in_channels)`` maps ``(B, in_channels[k], h_k, w_k)``."""
    if len(levels) != len(in_channels):
        raise ValueError(f"the {head} head was built for {len(in_channels)} levels, got {len(levels)}")
    got = tuple(level.shape[1] if level.dim() == 4 else None for level in levels)
    if got != tuple(in_channels):
        shapes = ", ".join(str(tuple(level.shape)) for level in levels)
        raise ValueError(f"the {head} head expects maps (B, C, h, w) with C = {tuple(in_channels)}; got {shapes}")


def embed_levels(embeddings: nn.ModuleList, levels: Sequence[Tensor]) -> list[Tensor]:
    """Each level embedded by its layer and upsampled to the size of ``levels[0]``, finest first."""
    size = levels[0].shape[2:]
    out = []
    for layer, level in zip(embeddings, levels):
        x = layer(level)
        if x.shape[2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out.append(x)
    return out


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder: levels ``[(B, C_k, h_k, w_k)]`` (finest first) -> logits ``(B, K, h_0, w_0)``.

    With a MiT backbone ``h_0, w_0`` is 1/4 of the image; with any other backbone it is the size
    of its first level. Works with any number of levels >= 1 and any channel counts.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        if not self.in_channels:
            raise ValueError("the SegFormer head needs at least one level")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.embed_channels = embed_dim
        self.embeddings = nn.ModuleList(PixelLinear(c, embed_dim) for c in self.in_channels)
        self.fuse = ConvBNReLU(embed_dim * len(self.in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def embed(self, levels: Sequence[Tensor]) -> Tensor:
        """The fused map ``(B, embed_dim, h_0, w_0)`` the classifier reads."""
        check_levels(levels, self.in_channels, "SegFormer")
        maps = embed_levels(self.embeddings, levels)
        return self.fuse(torch.cat(maps[::-1], dim=1))  # coarsest first, as SegFormer concatenates

    def classify(self, embedding: Tensor) -> Tensor:
        """Class logits ``(B, K, h, w)`` of the fused map ``(B, embed_dim, h, w)``: dropout, then a 1x1 conv."""
        return self.classifier(self.dropout(embedding))

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        return self.classify(self.embed(levels))

    def no_weight_decay(self) -> set[str]:
        """None: DAFormer decays every parameter of its decode head, BatchNorms and biases included
        (mmcv names the BatchNorms ``bn``, which its optimiser's ``norm`` key does not match)."""
        return set()


@register_head("segformer")
def segformer_head(in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                   dropout: float = 0.1, width: int | None = None) -> SegFormerHead:
    """SegFormer's all-MLP head (``embed_dim`` 256 as for MiT-B0/B1; SegFormer uses 768 for B2-B5).

    ``width`` (``model.head_width``) sets ``embed_dim``.
    """
    if width is not None:
        embed_dim = width
    return SegFormerHead(in_channels, num_classes, embed_dim=embed_dim, dropout=dropout)
