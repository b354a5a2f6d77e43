"""Dilated ResNet backbones (output stride 8) and the input normalisation that goes with each style.

Three styles. The first two share torchvision's parameter names, so either kind of ImageNet
weights loads into either of them; what differs is where the stride sits:

* ``"caffe"`` (ResNet v1, the DeepLab-v2 / PLCA reference): a downsampling
  bottleneck strides in its first 1x1 convolution, the stem max-pool uses
  ``ceil_mode=True``, and images are BGR 0-255 minus the Caffe mean.
* ``"pytorch"`` (torchvision's v1.5): the bottleneck strides in its 3x3
  convolution, the max-pool rounds down, and images are RGB scaled to 0-1
  and standardised with the ImageNet mean and std.

* ``"v1c"`` (mmsegmentation's ``ResNetV1c``, the DeepLab-v2 of DACS / DAFormer): the
  ``"pytorch"`` blocks behind a deep stem of three 3x3 convolutions (32, 32, 64 channels,
  the first with stride 2; parameters ``stem.0``, ``stem.1``, ``stem.3``, ... as mmcv's
  ``open-mmlab://resnet101_v1c`` file names them) instead of the 7x7 ``conv1``, and the
  ``"pytorch"`` input normalisation.

For the two-convolution ``BasicBlock`` (ResNet-18/34) only the max-pool (and the v1c stem) changes.

layer3 and layer4 keep stride 1 and use dilation 2 and 4 in *every* block,
the first one included (the reference's choice; torchvision's own
``replace_stride_with_dilation`` keeps the old dilation in the first block). ``"v1c"``
follows mmsegmentation's ``contract_dilation=True`` instead: the first block of a dilated
stage uses half the dilation (1 in layer3, 2 in layer4).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from plca.models.normalization import IMAGENET_RGB, Normalization
from plca.models.registry import BackboneContract, WeightLayout, WeightsIdentity, register_backbone
from plca.models.weights import LoadReport, WeightsError, is_counter, load_strict, read_state_dict

STYLES: tuple[str, ...] = ("caffe", "pytorch", "v1c")

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

    ``forward`` maps images ``(B, 3, H, W)`` (already normalised, see :func:`style_normalization`)
    to the outputs of layer1..layer4, ``[(B, out_channels[k], h_k, w_k)]``, at strides 4, 8, 8, 8
    (:attr:`strides`); the last one is the feature map of DeepLab-v2, ``h ~ H / 8``: the stem
    convolution, the max-pool and layer2 each map a size ``n`` to ``ceil(n / 2)``, except the
    ``"caffe"`` max-pool (``ceil_mode=True``), which gives ``floor(n / 2) + 1`` (one more for
    even ``n``; so a 1024-pixel side gives 129 rather than 128). Parameter and buffer names
    follow torchvision's layout (``conv1.weight``, ``layer1.0.conv1.weight``, ...,
    ``layer2.0.downsample.0.weight``), without ``fc``; ``"v1c"`` has ``stem.*`` for ``conv1`` /
    ``bn1``, as mmcv names them.
    """

    def __init__(self, depth: int, style: str = "caffe") -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unknown ResNet depth {depth!r}; choose one of: {', '.join(map(str, DEPTHS))}")
        self.depth = depth
        self.style = check_style(style)
        kind, blocks = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck

        if style == "v1c":
            self.stem = nn.Sequential(
                _conv3x3(3, 32, 2, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                _conv3x3(32, 32, 1, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                _conv3x3(32, 64, 1, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=(style == "caffe"))
        in_channels, channels = 64, []
        for index, (planes, count, stride, dilation) in enumerate(
                zip((64, 128, 256, 512), blocks, STAGE_STRIDES, STAGE_DILATIONS), start=1):
            stage = self._make_stage(block, in_channels, planes, count, stride, dilation)
            self.add_module(f"layer{index}", stage)
            in_channels = planes * block.expansion
            channels.append(in_channels)
        self.out_channels: tuple[int, ...] = tuple(channels)
        self.strides: tuple[int, ...] = (4, 8, 8, 8)
        self._init_weights()

    @property
    def normalization(self) -> Normalization:
        """The input the weights of this style expect (:func:`style_normalization`)."""
        return style_normalization(self.style)

    def _make_stage(self, block: type[BasicBlock] | type[Bottleneck], in_channels: int, planes: int,
                    count: int, stride: int, dilation: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        first_dilation = dilation // 2 if self.style == "v1c" and dilation > 1 else dilation
        layers = [block(in_channels, planes, stride, first_dilation, downsample, self.style)]
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

    def forward(self, x: Tensor) -> list[Tensor]:
        """Outputs of layer1..layer4 ``[(B, out_channels[k], h_k, w_k)]`` of normalised images ``(B, 3, H, W)``."""
        x = self.stem(x) if self.style == "v1c" else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        levels = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            levels.append(x)
        return levels

    def no_weight_decay(self) -> set[str]:
        """None: DAFormer decays every parameter of its ResNets, BatchNorms included (its optimiser's
        ``norm`` key does not match mmcv's ``bn1``, ``downsample.1``, ``stem.1`` names)."""
        return set()

    def load_pretrained(self, path: str | Path, drop_head: bool = False) -> LoadReport:
        """ImageNet weights in torchvision's key layout, strictly (see :func:`load_resnet_weights`)."""
        return load_resnet_weights(self, path, drop_head=drop_head)


def style_normalization(style: str) -> Normalization:
    """The input a ResNet of ``style`` expects (its :class:`~plca.models.normalization.InputNormalizer`):
    ``"caffe"``: channels reversed to BGR, minus :data:`CAFFE_MEAN_BGR`, std 1 (range stays 0-255);
    ``"pytorch"`` and ``"v1c"``: ``(x / 255 - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB``."""
    if check_style(style) == "caffe":
        return Normalization(bgr=True, mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0))
    return IMAGENET_RGB




# --------------------------------------------------------------------------- ImageNet weights


def _strip_scale(key: str) -> str:
    # the Caffe ResNet conversion names some tensors with a 'Scale' component, e.g. 'Scale.bn1.weight'
    return ".".join(part for part in key.split(".") if part != "Scale")


def _is_deeplab_coco_head(keys: list[str]) -> bool:
    # DeepLab-v2's COCO-initialised Caffe ResNet-101 carries its old ASPP classifier as layer5.conv2d_list.*
    return bool(keys) and all(key.startswith("layer5.") for key in keys) and any(
        ".conv2d_list." in key for key in keys)


def load_resnet_weights(backbone: ResNet, path: str | Path, drop_head: bool = False) -> LoadReport:
    """Load ImageNet weights in torchvision's key layout into ``backbone``, strictly.

    Accepts torchvision's own files and the Caffe conversion of the reference (whose keys may
    carry a ``Scale.`` component, removed here). ``fc.*`` and ``num_batches_tracked`` entries are
    dropped and reported as ignored. The DeepLab COCO-initialised Caffe ResNet-101, which also
    holds its old classifier as ``layer5.*``, is recognised and named; its classifier is dropped
    only with ``drop_head`` (``model.drop_pretrained_head``). Any other missing or unexpected key
    or a shape mismatch raises :class:`WeightsError`. The weights' style (Caffe v1 / torchvision
    v1.5) cannot be read from the file: it must match the ``style`` the backbone was built with.
    A deep-stem (``stem.*``, mmcv's ``resnet*_v1c``) file and a 7x7-stem (``conv1.*``) file are told
    apart, and loading one into the other style is an error that names the style to use.
    """
    path = Path(path)
    state: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in read_state_dict(path).items():
        name = _strip_scale(key)
        if name.startswith("fc.") or is_counter(name):
            ignored.append(key)
            continue
        if name in state:
            raise WeightsError(f"weights file '{path}' has two tensors for '{name}' once 'Scale.' is removed")
        state[name] = value
    extra = sorted(key for key in state if key.startswith("layer5."))
    if _is_deeplab_coco_head(extra):
        if not drop_head:
            raise WeightsError(
                f"weights file '{path}' is the DeepLab COCO-initialised Caffe ResNet-101: besides the backbone it "
                f"holds DeepLab's old classifier ({len(extra)} tensors layer5.conv2d_list.*, trained for COCO's "
                f"classes), which this model does not use. Set model.drop_pretrained_head=true to drop those "
                f"tensors and load the backbone"
            )
        for key in extra:
            del state[key]
        ignored += [f"{key} (DeepLab COCO classifier)" for key in extra]
    _check_stem(backbone, state, path)
    return load_strict(backbone, state, path, f"ResNet-{backbone.depth} backbone", ignored, optional=True)


def _check_stem(backbone: ResNet, state: dict[str, Tensor], path: Path) -> None:
    deep_stem, plain_stem = "stem.0.weight" in state, "conv1.weight" in state
    if backbone.style == "v1c" and plain_stem and not deep_stem:
        raise WeightsError(f"weights file '{path}' is a ResNet with a 7x7 stem (conv1.*, torchvision or Caffe), "
                           f"not a deep-stem v1c ResNet: set model.style to pytorch or caffe to match it")
    if backbone.style != "v1c" and deep_stem and not plain_stem:
        raise WeightsError(f"weights file '{path}' is a deep-stem ResNet (stem.*, e.g. mmcv's resnet101_v1c): "
                           f"set model.style=v1c to load it")


@dataclass(frozen=True)
class ResNetWeightsInfo:
    """What a file in torchvision's ResNet key layout holds, read from its names and shapes alone.

    ``depth`` follows from the block kind and count (``3 * blocks + 2`` for bottlenecks, ``2 * blocks + 2``
    for basic blocks), so a ResNet-152 is named too; ``fits`` says whether every tensor has a place of the
    right shape in this module's ``ResNet(depth)`` (which has depths 18 / 34 / 50 / 101 only).
    """

    depth: int
    blocks: tuple[int, int, int, int]
    bottleneck: bool
    deep_stem: bool  # ``stem.*`` (mmcv's v1c) instead of the 7x7 ``conv1``
    scale_names: bool  # some names carry a ``Scale`` component: the Caffe conversion of the reference
    coco_head: bool  # DeepLab's COCO classifier ``layer5.conv2d_list.*`` is in the file
    classifier: int | None  # outputs of the ``fc`` classifier (1000 for ImageNet), None without one
    fits: bool


@functools.lru_cache(maxsize=None)
def _tensor_shapes(depth: int, style: str) -> dict[str, tuple[int, ...]]:
    # shapes of ResNet(depth, style)'s tensors, counters aside (built once on the meta device: no memory)
    with torch.device("meta"):
        state = ResNet(depth, style).state_dict()
    return {key: tuple(value.shape) for key, value in state.items() if not is_counter(key)}


def identify_resnet_weights(state: Mapping[str, Tensor]) -> ResNetWeightsInfo | None:
    """The ResNet a state dict in torchvision's key layout holds; None when it is not one.

    Reads names and shapes only (meta tensors do). Recognised: torchvision's files, the Caffe
    conversion of the reference (``Scale.`` names, DeepLab's COCO ``layer5.*`` classifier) and mmcv's
    deep-stem ``resnet*_v1c`` files. The Caffe (v1) and torchvision (v1.5) weights have the same names
    and shapes: which style a file without ``Scale.`` names was trained for cannot be read from it.
    """
    names = {_strip_scale(key): value for key, value in state.items()}
    stem = names.get("stem.0.weight") if "stem.0.weight" in names else names.get("conv1.weight")
    deep_stem = "stem.0.weight" in names and "conv1.weight" not in names
    if stem is None or tuple(stem.shape) != ((32, 3, 3, 3) if deep_stem else (64, 3, 7, 7)):
        return None
    blocks = []
    for layer in range(1, 5):
        indices = {int(m[1]) for key in names if (m := re.match(rf"layer{layer}\.(\d+)\.conv1\.weight$", key))}
        if not indices or indices != set(range(len(indices))):
            return None
        blocks.append(len(indices))
    bottleneck = "layer1.0.conv3.weight" in names
    depth = (3 if bottleneck else 2) * sum(blocks) + 2
    fc = names.get("fc.weight")
    own = {key: value for key, value in names.items()
           if not (key.startswith(("fc.", "layer5.")) or is_counter(key))}
    fits = False
    if depth in DEPTHS and DEPTHS[depth] == ("bottleneck" if bottleneck else "basic", tuple(blocks)):
        expected = _tensor_shapes(depth, "v1c" if deep_stem else "pytorch")
        fits = expected == {key: tuple(value.shape) for key, value in own.items()}
    return ResNetWeightsInfo(
        depth=depth, blocks=tuple(blocks), bottleneck=bottleneck, deep_stem=deep_stem,
        scale_names=any("Scale" in key.split(".") for key in state),
        coco_head=_is_deeplab_coco_head(sorted(key for key in names if key.startswith("layer5."))),
        classifier=int(fc.shape[0]) if fc is not None and fc.dim() == 2 else None, fits=fits)


# --------------------------------------------------------------------------- registration


def _architecture(info: ResNetWeightsInfo) -> str:
    kind = "bottleneck" if info.bottleneck else "basic"
    return f"ResNet-{info.depth} ({kind} blocks {'/'.join(map(str, info.blocks))})"


def _identify(tensors: Mapping[str, Tensor], style: str) -> WeightsIdentity | None:
    """What a file in the layout of ``style``'s published weights holds (``plca weights inspect``)."""
    info = identify_resnet_weights(tensors)
    if info is None:
        return None
    caffe = info.scale_names or info.coco_head
    if (style == "v1c") != info.deep_stem or (style == "caffe") != caffe:
        return None
    architecture = _architecture(info)
    if info.classifier is not None:
        architecture += f", with its {info.classifier}-way classifier fc.* (not part of the backbone)"
    notes = []
    if info.coco_head:
        architecture += ", with DeepLab's COCO classifier layer5.conv2d_list.*"
        notes.append("DeepLab's COCO-initialised Caffe ResNet-101: load it with model.drop_pretrained_head=true "
                     "(the layer5.* classifier, trained for COCO's classes, is dropped)")
    if style == "pytorch":
        notes.append("torchvision's own ResNets are style pytorch (v1.5, RGB); a Caffe conversion without "
                     "'Scale.' names has the very same names and shapes, so the style cannot be read from the "
                     "file: use model.style=caffe if it is one")
    if not info.fits:
        what = ("it is not one of this project's ResNets (depths 18, 34, 50, 101)" if info.depth not in DEPTHS else
                f"its tensors do not all fit this project's resnet{info.depth} (another width or a ResNeXt?)")
        return WeightsIdentity(architecture, notes=tuple(notes + [what]))
    return WeightsIdentity(architecture, backbone=f"resnet{info.depth}", style=style, drop_head=info.coco_head,
                           notes=tuple(notes))


#: What every ResNet promises: three styles, each with its input; the published layouts it loads.
CONTRACT = BackboneContract(
    family="ResNet",
    normalization=style_normalization("caffe"),
    styles={style: style_normalization(style) for style in STYLES},
    default_style="caffe",
    weight_layouts=(
        WeightLayout("caffe-resnet", "PLCA's Caffe ResNet, the DeepLab ImageNet init (torchvision names, some with a "
                                     "'Scale.' component; DeepLab's COCO file adds layer5.conv2d_list.*)",
                     functools.partial(_identify, style="caffe")),
        WeightLayout("mmcv-resnet-v1c", "mmcv / mmsegmentation ResNetV1c, open-mmlab://resnet*_v1c (deep stem "
                                        "stem.0/1/3/4/6/7, layer1.0.conv1.weight, ...)",
                     functools.partial(_identify, style="v1c")),
        WeightLayout("torchvision-resnet", "torchvision's ResNet (conv1.weight, bn1.*, layer1.0.conv1.weight, ..., "
                                           "fc.weight)",
                     functools.partial(_identify, style="pytorch")),
    ),
)


def _resnet_factory(depth: int):
    def build(style: str | None = None) -> ResNet:
        return ResNet(depth, style or CONTRACT.default_style)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"Dilated ResNet-{depth} (output stride 8), style ``caffe`` (default), ``pytorch`` or ``v1c``."
    return build


for _depth in DEPTHS:
    register_backbone(f"resnet{_depth}", contract=CONTRACT)(_resnet_factory(_depth))
