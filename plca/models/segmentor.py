"""A segmentor = input normaliser + backbone + head, built by name from the registries.

Every part of the project that needs a network (training, evaluation, prediction,
export, the benchmarks) builds it here, with :func:`build_segmentor`. The segmentor
describes itself (:meth:`Segmentor.describe`), so a checkpoint or an exported file
can rebuild it without the run's config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from plca.models.hrda import MultiResolution, hrda_options
from plca.models.packaged import resolve_weights
from plca.models.normalization import InputNormalizer, Normalization
from plca.models.registry import backbone_contract, create_backbone, create_head, declared_no_weight_decay
from plca.models.weights import LoadReport, WeightsError

log = logging.getLogger(__name__)

#: Which map the feature-level association reads: the backbone's last level, or the map the
#: head's classifier reads (its fused embedding; for DeepLab-v2 the two are the same map).
FEATURE_SOURCES: tuple[str, ...] = ("backbone_last", "head_embedding")
#: The parts of a segmentor that hold parameters (the input normaliser holds none).
PARTS: tuple[str, ...] = ("backbone", "head")


class SegmentorOptions(Protocol):
    """What :func:`build_segmentor` reads; :class:`plca.config.ModelConfig` is one."""

    backbone: str
    head: str
    style: str | None
    pretrained: str | None
    features: str
    drop_pretrained_head: bool
    head_width: int | None
    hrda: Any  # plca.models.hrda.HRDAOptions, a dict of it, or None (optional)


@dataclass
class SegmentorSpec:
    """A plain :class:`SegmentorOptions`, for building a segmentor in code."""

    backbone: str = "resnet101"
    head: str = "deeplabv2"
    style: str | None = None
    pretrained: str | None = None
    features: str = "backbone_last"
    drop_pretrained_head: bool = False
    head_width: int | None = None
    hrda: Any = None  # HRDAOptions or its dict; None or enabled=false: single-scale


class Segmentor(nn.Module):
    """RGB 0-255 images in; the association's feature map and class logits out.

    Submodules: ``normalizer`` (the input the backbone's weights expect, no state),
    ``backbone`` (a list of maps, finest first) and ``head`` (``embed`` then ``classify``).
    :func:`build_segmentor` gives the ``style`` (null resolved) and the ``normalization`` that the
    backbone's registry contract declares; a segmentor built by hand from an unregistered backbone
    falls back on the module's own ``style`` and ``normalization`` attributes.

    With ``multi_resolution`` (HRDA, :mod:`plca.models.hrda`) the forward is HRDA's: a context and a
    detail view fused by a scale attention in train mode, the fused sliding-window prediction in eval mode.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int, *, backbone_name: str,
                 head_name: str, features: str = "backbone_last", head_width: int | None = None,
                 style: str | None = None, normalization: Normalization | None = None,
                 multi_resolution: MultiResolution | None = None) -> None:
        super().__init__()
        if features not in FEATURE_SOURCES:
            raise ValueError(f"features must be one of {', '.join(FEATURE_SOURCES)}, got {features!r}")
        self.num_classes = num_classes
        self.backbone_name = backbone_name
        self.head_name = head_name
        self.head_width = head_width
        self.weights_note: str | None = None  # what loading ImageNet weights did (build_segmentor), for the run's log
        self.features = features
        self.style: str | None = style if style is not None else getattr(backbone, "style", None)
        self.normalizer = InputNormalizer(normalization or backbone.normalization, style=self.style)
        self.backbone = backbone
        self.head = head
        self.multi_resolution = multi_resolution

    def levels(self, images: Tensor) -> list[Tensor]:
        """The backbone's maps ``[(B, C_k, H / s_k, W / s_k)]`` of RGB 0-255 images ``(B, 3, H, W)``."""
        return self.backbone(self.normalizer(images))

    def bottleneck_view(self, images: Tensor) -> Tensor:
        """The images whose last backbone map is the ``bottleneck`` output: the input itself, or HRDA's
        context view (the ImageNet feature distance compares the same view of a frozen network)."""
        return images if self.multi_resolution is None else self.multi_resolution.context_view(images)

    def extract_features(self, images: Tensor) -> Tensor:
        """The map the classifier reads ``(B, E, h, w)`` (test-time aggregation aggregates it)."""
        if self.multi_resolution is not None:
            raise ValueError("test-time aggregation is not defined for HRDA's fused prediction: set "
                             "eval.test_time_aggregation=false with model.hrda.enabled")
        return self.head.embed(self.levels(images))

    def classify(self, embedding: Tensor) -> Tensor:
        """Class logits ``(B, K, h, w)`` of the head's embedding ``(B, E, h, w)``."""
        return self.head.classify(embedding)

    def forward(self, images: Tensor, return_bottleneck: bool = False,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{'features': (B, C, h', w'), 'logits': (B, K, h, w)}`` for images ``(B, 3, H, W)``.

        ``features`` is the map of the feature-level association (:attr:`features` says which);
        logits are at the head's resolution (1/8 for DeepLab-v2, 1/4 for DAFormer), not upsampled.
        With ``return_bottleneck`` also ``'bottleneck'``: the backbone's last map. With HRDA see
        :mod:`plca.models.hrda` (train mode: its keys, the detail box drawn from ``generator``, torch's
        global one when None; eval mode: ``{'logits'}`` of the fused prediction). Single-scale: ``generator`` unused.
        """
        if self.multi_resolution is not None:
            if self.training:
                return self.multi_resolution.train_forward(self, images, return_bottleneck, generator)
            return {"logits": self.multi_resolution.inference(self, images)}
        levels = self.levels(images)
        embedding = self.head.embed(levels)
        features = levels[-1] if self.features == "backbone_last" else embedding
        output = {"features": features, "logits": self.head.classify(embedding)}
        if return_bottleneck:
            output["bottleneck"] = levels[-1]
        return output

    def parameter_parts(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter by part, named as :meth:`named_parameters` names it: ``{'backbone': [...],
        'head': [...]}`` (the optimiser gives the head its own learning rate; HRDA's scale attention is
        part of the head, as HRDA's ``head`` lr_mult key matches it)."""
        parts = {part: list(getattr(self, part).named_parameters(prefix=part)) for part in PARTS}
        if self.multi_resolution is not None:
            parts["head"] += list(self.multi_resolution.named_parameters(prefix="multi_resolution"))
        return parts

    def no_weight_decay(self) -> set[str]:
        """The parameters the backbone and the head declare exempt from weight decay (each part's
        ``no_weight_decay()``, timm's convention; see :mod:`plca.models.registry`), named as
        :meth:`named_parameters` names them."""
        exempt = {f"{part}.{name}" for part in PARTS for name in declared_no_weight_decay(getattr(self, part))}
        if self.multi_resolution is not None:
            exempt |= {f"multi_resolution.scale_attention.{name}"
                       for name in declared_no_weight_decay(self.multi_resolution.scale_attention)}
        return exempt

    def describe(self) -> dict:
        """What rebuilds this network: names, style, class count, feature map, input normalisation."""
        return {
            "backbone": self.backbone_name,
            "head": self.head_name,
            "style": self.style,
            "num_classes": self.num_classes,
            "features": self.features,
            "head_width": self.head_width,
            "normalization": self.normalizer.normalization.as_dict(),
            **({"hrda": self.multi_resolution.describe()} if self.multi_resolution is not None else {}),
        }


def build_segmentor(options: SegmentorOptions, num_classes: int) -> Segmentor:
    """The segmentor ``options`` describe, with ImageNet weights from ``options.pretrained`` when set.

    Unknown names raise ``ValueError`` listing the registered ones; a weights file that does not
    fit the backbone raises :class:`~plca.models.weights.WeightsError` naming the file and keys.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    contract = backbone_contract(options.backbone)
    backbone = create_backbone(options.backbone, style=options.style)
    style = contract.resolve_style(options.style)
    width = getattr(options, "head_width", None)
    head = create_head(options.head, backbone.out_channels, num_classes, **({"width": width} if width else {}))
    hrda = hrda_options(getattr(options, "hrda", None))
    multi_resolution = None
    if hrda is not None:
        attention = create_head(hrda.attention_head or options.head, backbone.out_channels,
                                num_classes if hrda.attention_classwise else 1, **({"width": width} if width else {}))
        multi_resolution = MultiResolution(attention, hrda)
    segmentor = Segmentor(backbone, head, num_classes, backbone_name=options.backbone, head_name=options.head,
                          features=getattr(options, "features", "backbone_last"), head_width=width, style=style,
                          normalization=contract.input_normalization(style, backbone),
                          multi_resolution=multi_resolution)
    if options.pretrained:
        report = load_backbone_weights(backbone, options.pretrained,
                                       drop_head=getattr(options, "drop_pretrained_head", False))
        segmentor.weights_note = (f"ImageNet weights from {options.pretrained}: {report} ({len(report.loaded)} of "
                                  f"the backbone's {len(backbone.state_dict())} tensors)")
        log.debug("%s", segmentor.weights_note)
    return segmentor


def load_backbone_weights(backbone: nn.Module, path: str | Path, drop_head: bool = False):
    """``backbone.load_pretrained(path)`` (with ``drop_head`` where the backbone knows it).

    ``path`` may name weights inside an installed package (``package:<name>``, see
    :mod:`plca.models.packaged`).
    """
    path = resolve_weights(path)
    if not hasattr(backbone, "load_pretrained"):
        raise WeightsError(f"backbone {type(backbone).__name__} cannot load weights from '{path}'")
    if drop_head:
        return backbone.load_pretrained(path, drop_head=True)
    return backbone.load_pretrained(path)


def build_backbone(name: str, style: str | None = None, pretrained: str | Path | None = None,
                   drop_head: bool = False) -> tuple[nn.Module, LoadReport | None]:
    """The backbone registered as ``name`` alone, with weights from ``pretrained`` when given (strictly).

    Returns the backbone and the load's report (None without weights). For tools that handle a
    backbone's weights without a head (``plca weights convert``).
    """
    backbone = create_backbone(name, style=style)
    report = load_backbone_weights(backbone, pretrained, drop_head=drop_head) if pretrained else None
    return backbone, report
