"""Dilated ResNet backbones (output stride 8) and the input normalisation that goes with each style.

Two styles share torchvision's parameter names, so either kind of ImageNet
weights loads into either style; what differs is where the stride sits:

* ``"caffe"`` (ResNet v1, the DeepLab-v2 / PLCA reference): a downsampling
  bottleneck strides in its first 1x1 convolution, the stem max-pool uses
  ``ceil_mode=True``, and images are BGR 0-255 minus the Caffe mean.
* ``"pytorch"`` (torchvision's v1.5): the bottleneck strides in its 3x3
  convolution, the max-pool rounds down, and images are RGB scaled to 0-1
  and standardised with the ImageNet mean and std.

For the two-convolution ``BasicBlock`` (ResNet-18/34) only the max-pool changes.

layer3 and layer4 keep stride 1 and use dilation 2 and 4 in *every* block,
the first one included (the reference's choice; torchvision's own
``replace_stride_with_dilation`` keeps the old dilation in the first block).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

STYLES: tuple[str, ...] = ("caffe", "pytorch")

#: depth -> (block kind, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

#: (stride, dilation) of layer1..layer4: output stride 4 * 2 = 8.
STAGE_STRIDES: tuple[int, int, int, int] = (1, 2, 1, 1)
STAGE_DILATIONS: tuple[int, int, int, int] = (1, 1, 2, 4)

#: Caffe ImageNet mean in BGR order, 0-255 (the values of the DeepLab / PLCA reference code).
CAFFE_MEAN_BGR: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)
#: torchvision's ImageNet mean and std in RGB order, for images scaled to 0-1.
IMAGENET_MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)


def check_style(style: str) -> str:
    """Return ``style`` if it is a known backbone style, else raise ``ValueError``."""
    if style not in STYLES:
        raise ValueError(f"unknown backbone style {style!r}; choose one of: {', '.join(STYLES)}")
    return style


def _conv3x3(in_channels: int, out_channels: int, stride: int, dilation: int) -> nn.Conv2d:
    # padding = dilation keeps the spatial size at stride 1
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Maps ``(B, in_channels, H, W)`` to ``(B, planes, H / stride, W / stride)``.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, style: str) -> None:
        super().__init__()
        check_style(style)  # a BasicBlock strides in its first 3x3 in both styles
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with a residual connection (ResNet-50/101).

    Maps ``(B, in_channels, H, W)`` to ``(B, 4 * planes, H / stride, W / stride)``; the stride
    sits in the first 1x1 convolution (``"caffe"``) or in the 3x3 (``"pytorch"``).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, style: str) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if check_style(style) == "caffe" else (1, stride)
        self.conv1 = _conv1x1(in_channels, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride_3x3, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Dilated ResNet backbone without the classification head, output stride 8.

    ``forward`` maps images ``(B, 3, H, W)`` (already normalised, see :class:`InputNormalizer`)
    to layer4 features ``(B, out_channels, h, w)`` with ``h ~ H / 8``: the stem convolution,
    the max-pool and layer2 each map a size ``n`` to ``ceil(n / 2)``, except the ``"caffe"``
    max-pool (``ceil_mode=True``), which gives ``floor(n / 2) + 1`` (one more for even ``n``;
    so a 1024-pixel side gives 129 rather than 128). Parameter and buffer names
    follow torchvision's layout (``conv1.weight``, ``layer1.0.conv1.weight``, ...,
    ``layer2.0.downsample.0.weight``), without ``fc``.
    """

    def __init__(self, depth: int, style: str = "caffe") -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unknown ResNet depth {depth!r}; choose one of: {', '.join(map(str, DEPTHS))}")
        self.depth = depth
        self.style = check_style(style)
        kind, blocks = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=(style == "caffe"))
        in_channels = 64
        for index, (planes, count, stride, dilation) in enumerate(
                zip((64, 128, 256, 512), blocks, STAGE_STRIDES, STAGE_DILATIONS), start=1):
            stage = self._make_stage(block, in_channels, planes, count, stride, dilation)
            self.add_module(f"layer{index}", stage)
            in_channels = planes * block.expansion
        self.out_channels = in_channels
        self._init_weights()

    def _make_stage(self, block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int,
                    count: int, stride: int, dilation: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        layers = [block(in_channels, planes, stride, dilation, downsample, self.style)]
        layers += [block(out_channels, planes, 1, dilation, None, self.style) for _ in range(count - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's initialisation; only matters when training without ImageNet weights
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Layer4 features ``(B, out_channels, h, w)`` of normalised images ``(B, 3, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class InputNormalizer(nn.Module):
    """Maps RGB images in 0-255 ``(B, 3, H, W)`` to the input the backbone style was trained on.

    ``"caffe"``: channels reversed to BGR, minus :data:`CAFFE_MEAN_BGR`, std 1 (range stays 0-255).
    ``"pytorch"``: ``(x / 255 - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB``.
    Integer images are converted to float32. The constants are non-persistent buffers: they
    follow ``.to(device)`` but never appear in state dicts.
    """

    def __init__(self, style: str = "caffe") -> None:
        super().__init__()
        self.style = check_style(style)
        self.bgr = style == "caffe"
        if self.bgr:
            mean, std = CAFFE_MEAN_BGR, (1.0, 1.0, 1.0)
        else:  # expressed in 0-255 units: (x / 255 - m) / s == (x - 255 m) / (255 s)
            mean = tuple(255.0 * m for m in IMAGENET_MEAN_RGB)
            std = tuple(255.0 * s for s in IMAGENET_STD_RGB)
        self.register_buffer("mean", _channel_vector(mean), persistent=False)
        self.register_buffer("std", _channel_vector(std), persistent=False)

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
