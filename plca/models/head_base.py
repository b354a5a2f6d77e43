"""What the SegFormer and DAFormer heads share: per-pixel linear embeddings of every level, a fusion
of them into one map, and a classifier of that map (channel dropout, then a 1x1 convolution).

:class:`FusedLevelsHead` is their base: it checks the arguments, builds the modules in the
order ``embeddings``, ``fuse``, ``dropout``, ``classifier`` (the state-dict keys, the order of the
parameters in the optimiser, and the draws from the random generator at initialisation) and
implements the head contract's ``classify`` and ``forward`` (see :mod:`plca.models.registry`);
a subclass gives the fusion and ``embed``. The building blocks :class:`PixelLinear`,
:class:`ConvBNReLU`, :func:`check_levels` and :func:`embed_levels` live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvBNReLU", "FusedLevelsHead", "PixelLinear", "check_levels", "embed_levels"]


class PixelLinear(nn.Linear):
    """A Linear layer applied at every pixel: ``(B, C_in, H, W) -> (B, C_out, H, W)``.

    The same map as a 1x1 convolution, with a Linear's parameters ``weight (C_out, C_in)``,
    ``bias (C_out,)`` and initialisation (SegFormer's and DAFormer's ``MLP`` embedding).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class ConvBNReLU(nn.Sequential):
    """Convolution without bias, BatchNorm, ReLU (mmcv's ``ConvModule`` with BN):
    ``(B, C_in, H, W) -> (B, C_out, h, w)``.

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


class FusedLevelsHead(nn.Module):
    """Levels ``[(B, C_k, h_k, w_k)]`` (finest first) -> embedding ``(B, channels, h_0, w_0)`` -> logits
    ``(B, K, h_0, w_0)``.

    Modules: ``embeddings[k]``, a :class:`PixelLinear` ``C_k -> embed_dim`` per level; ``fuse``,
    built by ``fuse(L * embed_dim)`` (the width of the concatenated embeddings) and mapping them to
    ``channels``; ``dropout`` (``Dropout2d``); ``classifier``, a 1x1 conv ``channels -> K`` with
    PyTorch's default initialisation. ``head_name`` names the head in error messages.
    """

    head_name = "fused-levels"

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, embed_dim: int, channels: int,
                 dropout: float, fuse: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        if not self.in_channels:
            raise ValueError(f"the {self.head_name} head needs at least one level")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.embed_channels = channels
        self.embeddings = nn.ModuleList(PixelLinear(c, embed_dim) for c in self.in_channels)
        self.fuse = fuse(embed_dim * len(self.in_channels))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def embed(self, levels: Sequence[Tensor]) -> Tensor:
        """The fused map ``(B, channels, h_0, w_0)`` the classifier reads, before dropout."""
        raise NotImplementedError

    def classify(self, embedding: Tensor) -> Tensor:
        """Class logits ``(B, K, h, w)`` of the fused map ``(B, channels, h, w)``: dropout, then a 1x1 conv."""
        return self.classifier(self.dropout(embedding))

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        return self.classify(self.embed(levels))

    def no_weight_decay(self) -> set[str]:
        """None: DAFormer decays every parameter of its decode head, BatchNorms and biases included
        (mmcv names the BatchNorms ``bn``, which its optimiser's ``norm`` key does not match)."""
        return set()
