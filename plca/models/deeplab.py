"""DeepLab-v2's ASPP heads and the PLCA authors' released DeepLab-v2 checkpoints.

The ASPP head of DeepLab-v2 is parallel dilated 3x3 convolutions straight to the class
scores, whose outputs are **summed**; it reads the backbone's last map only, so that map is
both its embedding and the feature map of PLCA's feature-level association. Two variants:

- ``deeplabv2`` (the PLCA reference): four branches, dilations 6, 12, 18 and 24, no bias,
  PyTorch's default initialisation;
- ``deeplabv2_reduced`` (DACS and DAFormer's ``dlv2red``: mmseg ``DLV2Head`` with
  ``dilations=(6, 12)``, ``lhoyer/DAFormer/configs/_base_/models/deeplabv2red_r50-d8.py``): two branches,
  dilations 6 and 12, each convolution with a bias (mmcv ``ConvModule`` without a norm), weights
  drawn from Normal(0, 0.01) and biases 0 (``init_cfg=dict(type='Normal', std=0.01,
  override=dict(name='aspp_modules'))``). AdaptSegNet's code, which DACS and later works copied,
  returns inside its loop over the four branches, so only the first two were ever summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from plca.models.registry import register_head
from plca.models.weights import LoadReport, WeightsError, is_counter, load_strict, read_state_dict

if TYPE_CHECKING:
    from plca.models.segmentor import Segmentor

#: Output channel order of the PLCA authors' released GTA5 -> Cityscapes model.
PLCA_AUTHORS_CLASS_ORDER: tuple[str, ...] = (
    "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car", "traffic sign",
    "person", "bicycle", "motorcycle", "traffic light", "rider", "bus", "wall", "terrain", "truck", "train",
)
#: Output channel order of their SYNTHIA -> Cityscapes model: the same, without terrain, truck, train.
PLCA_AUTHORS_SYNTHIA_CLASS_ORDER: tuple[str, ...] = tuple(
    name for name in PLCA_AUTHORS_CLASS_ORDER if name not in ("terrain", "truck", "train")
)


#: Dilations of the PLCA reference's head (DeepLab-v2's own).
REFERENCE_DILATIONS: tuple[int, ...] = (6, 12, 18, 24)
#: Dilations of DACS / DAFormer's reduced head.
REDUCED_DILATIONS: tuple[int, ...] = (6, 12)
#: Standard deviation of the reduced head's Normal initialisation.
REDUCED_INIT_STD = 0.01


class ASPPHead(nn.Module):
    """Sum of dilated 3x3 convolutions: ``(B, in_channels, h, w) -> (B, num_classes, h, w)``.

    ``bias``: each convolution has a bias. ``init_std``: weights drawn from Normal(0, init_std)
    and biases set to 0; None keeps PyTorch's default initialisation.
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = REFERENCE_DILATIONS, *,
                 bias: bool = False, init_std: float | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.dilations = tuple(dilations)
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError(f"ASPP dilations must be positive integers, got {self.dilations}")
        self.embed_channels = in_channels
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=bias) for d in self.dilations
        )
        if init_std is not None:
            for conv in self.convs:
                nn.init.normal_(conv.weight, 0.0, init_std)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def embed(self, levels: Sequence[Tensor]) -> Tensor:
        """The backbone's last map ``(B, in_channels, h, w)``: DeepLab-v2 classifies it directly."""
        return levels[-1]

    def classify(self, features: Tensor) -> Tensor:
        """Class logits ``(B, num_classes, h, w)`` of features ``(B, in_channels, h, w)``."""
        out = self.convs[0](features)
        for conv in self.convs[1:]:
            out = out + conv(features)
        return out

    def forward(self, features: Tensor | Sequence[Tensor]) -> Tensor:
        """Logits of a feature map, or of the last of a list of maps."""
        return self.classify(features if isinstance(features, Tensor) else self.embed(features))

    def no_weight_decay(self) -> set[str]:
        """None: DAFormer decays the DeepLab-v2 head's weights and biases (it has no norm layer)."""
        return set()


@register_head("deeplabv2")
def deeplabv2_head(in_channels: Sequence[int], num_classes: int,
                   dilations: Sequence[int] = REFERENCE_DILATIONS) -> ASPPHead:
    """The PLCA reference's DeepLab-v2 head: four summed branches (6, 12, 18, 24), no bias, on the last level."""
    return ASPPHead(in_channels[-1], num_classes, dilations)


@register_head("deeplabv2_reduced")
def deeplabv2_reduced_head(in_channels: Sequence[int], num_classes: int) -> ASPPHead:
    """DACS / DAFormer's DeepLab-v2 head (``dlv2red``): two summed branches (6, 12) with biases, Normal(0, 0.01)."""
    return ASPPHead(in_channels[-1], num_classes, REDUCED_DILATIONS, bias=True, init_std=REDUCED_INIT_STD)


def build_deeplab_v2(num_classes: int, backbone: str = "resnet101", style: str = "caffe",
                     pretrained: str | Path | None = None) -> Segmentor:
    """DeepLab-v2: a ``backbone`` ResNet of the given ``style`` with the ASPP head, optionally ImageNet-initialised.

    A shorthand for :func:`plca.models.segmentor.build_segmentor` with ``head="deeplabv2"``.
    """
    from plca.models.segmentor import SegmentorSpec, build_segmentor

    spec = SegmentorSpec(backbone=backbone, head="deeplabv2", style=style,
                         pretrained=str(pretrained) if pretrained is not None else None)
    return build_segmentor(spec, num_classes)


# --------------------------------------------------------------------------- the authors' checkpoints


def _authors_class_order(num_channels: int, path: Path) -> tuple[str, ...]:
    for order in (PLCA_AUTHORS_CLASS_ORDER, PLCA_AUTHORS_SYNTHIA_CLASS_ORDER):
        if num_channels == len(order):
            return order
    raise WeightsError(
        f"weights file '{path}': the classifier has {num_channels} output channels; the PLCA authors' "
        f"models have {len(PLCA_AUTHORS_CLASS_ORDER)} (GTA5) or {len(PLCA_AUTHORS_SYNTHIA_CLASS_ORDER)} (SYNTHIA)"
    )


def is_authors_checkpoint(raw: object) -> bool:
    """Whether a loaded file looks like the PLCA authors' release: ``{'weights': {...}}``."""
    return isinstance(raw, dict) and isinstance(raw.get("weights"), dict) and "model" not in raw


def load_authors_checkpoint(model: Segmentor, path: str | Path, classes: Sequence[str]) -> LoadReport:
    """Load a PLCA authors' released checkpoint into a DeepLab-v2 ``model``, reordering its classes to ``classes``.

    Their file is ``{'weights': state_dict}`` with keys ``backbone.<resnet key>`` and
    ``classifier.0.convs.{0,1,2,3}.0.weight``, output channels in
    :data:`PLCA_AUTHORS_CLASS_ORDER` (19) or :data:`PLCA_AUTHORS_SYNTHIA_CLASS_ORDER` (16).
    ``classes`` (``model``'s class order, Cityscapes names) may be any subset of theirs; the
    channels are picked and permuted accordingly. ``num_batches_tracked`` and an unused
    ``aux_classifier.*`` are ignored; everything else must match exactly.
    """
    path = Path(path)
    classes = list(classes)
    if len(classes) != model.num_classes:
        raise WeightsError(f"{len(classes)} class names given for a model with {model.num_classes} classes")
    if model.head_name != "deeplabv2" or getattr(model.backbone, "style", None) is None:
        raise WeightsError(f"weights file '{path}': the PLCA authors' checkpoints are DeepLab-v2 ResNets; "
                           f"this model is {model.backbone_name} with the {model.head_name} head")
    if model.backbone.style != "caffe":
        raise WeightsError(
            f"weights file '{path}': the PLCA authors' checkpoints have a Caffe-style backbone; "
            f"build the model with style 'caffe', not {model.backbone.style!r}"
        )
    state: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in read_state_dict(path).items():
        if is_counter(key) or key.startswith("aux_classifier."):
            ignored.append(key)
        elif key.startswith("classifier.0.convs.") and key.endswith(".0.weight"):
            branch = key[len("classifier.0.convs."):-len(".0.weight")]
            state[f"head.convs.{branch}.weight"] = value
        else:
            state[key] = value  # backbone keys are named as ours; anything else is reported as unexpected

    head_keys = sorted(k for k in state if k.startswith("head.convs."))
    if head_keys:
        order = _authors_class_order(state[head_keys[0]].shape[0], path)
        lacking = [name for name in classes if name not in order]
        if lacking:
            raise WeightsError(
                f"weights file '{path}' has no output channel for class(es) {', '.join(lacking)}; "
                f"it predicts: {', '.join(order)}"
            )
        index = torch.tensor([order.index(name) for name in classes])
        for key in head_keys:
            if state[key].shape[0] != len(order):
                raise WeightsError(f"weights file '{path}': ASPP branches disagree on the number of classes")
            state[key] = state[key].index_select(0, index)
    return load_strict(model, state, path, "DeepLab-v2 model (PLCA authors' layout)", ignored, optional=True)
