"""DeepLab-v2: input normalisation -> dilated ResNet (output stride 8) -> ASPP classifier.

The ASPP head of DeepLab-v2 is four parallel 3x3 convolutions straight to the
class scores, with dilations 6, 12, 18 and 24, whose outputs are **summed**
(no bias, no batch norm, PyTorch's default initialisation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from plca.models.resnet import DEPTHS, InputNormalizer, ResNet
from plca.models.weights import load_imagenet_weights

log = logging.getLogger(__name__)

BACKBONES: dict[str, int] = {f"resnet{depth}": depth for depth in DEPTHS}


class ASPPHead(nn.Module):
    """Sum of dilated 3x3 convolutions: ``(B, in_channels, h, w) -> (B, num_classes, h, w)``."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.dilations = tuple(dilations)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=False) for d in self.dilations
        )

    def forward(self, features: Tensor) -> Tensor:
        out = self.convs[0](features)
        for conv in self.convs[1:]:
            out = out + conv(features)
        return out


class DeepLabV2(nn.Module):
    """Segmentation network: RGB 0-255 images in, features and logits at 1/8 resolution out.

    Submodules: ``normalizer`` (:class:`InputNormalizer` of the backbone's style), ``backbone``
    (:class:`ResNet`) and ``classifier`` (:class:`ASPPHead`).
    """

    def __init__(self, backbone: ResNet, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.style = backbone.style
        self.normalizer = InputNormalizer(backbone.style)
        self.backbone = backbone
        self.classifier = ASPPHead(backbone.out_channels, num_classes, dilations)

    def extract_features(self, images: Tensor) -> Tensor:
        """Backbone features ``(B, Cf, h, w)`` of RGB 0-255 images ``(B, 3, H, W)`` (float or uint8)."""
        return self.backbone(self.normalizer(images))

    def classify(self, features: Tensor) -> Tensor:
        """Class logits ``(B, K, h, w)`` of features ``(B, Cf, h, w)``."""
        return self.classifier(features)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{'features': (B, Cf, h, w), 'logits': (B, K, h, w)}`` for images ``(B, 3, H, W)``.

        ``h, w`` are about ``H / 8, W / 8``; logits are not upsampled.
        """
        features = self.extract_features(images)
        return {"features": features, "logits": self.classify(features)}


def build_deeplab_v2(num_classes: int, backbone: str = "resnet101", style: str = "caffe",
                     pretrained: str | Path | None = None) -> DeepLabV2:
    """DeepLab-v2 with a ``backbone`` ResNet of the given ``style``, optionally ImageNet-initialised.

    ``pretrained`` is a file of ImageNet weights in torchvision's key layout (see
    :func:`plca.models.weights.load_imagenet_weights`); every backbone tensor must be in it,
    else :class:`plca.models.weights.WeightsError` is raised.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of: {', '.join(BACKBONES)}")
    model = DeepLabV2(ResNet(BACKBONES[backbone], style), num_classes)
    if pretrained is not None:
        report = load_imagenet_weights(model.backbone, pretrained)
        log.info("ImageNet weights from %s: %s", pretrained, report)
    return model
