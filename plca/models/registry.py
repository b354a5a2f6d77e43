"""Registries of backbones and heads: how any backbone meets any head.

A **backbone** is an ``nn.Module`` that maps *normalised* images ``(B, 3, H, W)`` to a
list of feature maps, finest first (``levels[k]`` has ``out_channels[k]`` channels and
is about ``H / strides[k]`` high). It carries:

- ``out_channels: tuple[int, ...]`` and ``strides: tuple[float, ...]``, one per level (a ViT
  pyramid of patch 14 has strides 3.5, 7, 14, 28);
- ``normalization: Normalization``, the input its weights expect (the segmentor builds
  its input normaliser from it);
- ``load_pretrained(path) -> LoadReport``: load ImageNet weights from a local file in
  any layout it knows, strictly (see :mod:`plca.models.weights`);
- optionally ``no_weight_decay() -> set[str]`` (timm's convention, also for heads): the names,
  relative to the module, of its parameters that AdamW must not decay under
  ``train.no_decay: declared``. A module without the method declares none; this is all a new
  backbone or head does to take part in the optimiser's parameter groups.

A **head** is an ``nn.Module`` built as ``factory(in_channels, num_classes, **options)``
with ``in_channels`` the backbone's ``out_channels``; it has

- ``embed(levels) -> Tensor (B, E, h, w)``: the map its final classifier reads
  (DeepLab-v2: the backbone's last map itself; DAFormer: the fused embedding at 1/4);
- ``classify(embedding) -> Tensor (B, K, h, w)``: class logits;
- ``embed_channels: int`` (``E``).

Factories register by name (importing :mod:`plca.models`, which any import of this module
does first, registers the built-in ones); :func:`backbone_names` and :func:`head_names` list
what the config accepts. A name of the form ``<prefix>:<rest>`` (``timm:convnext_atto``) goes to
the factory registered for ``<prefix>``, which receives ``<rest>``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Normalization:
    """The input a backbone's weights expect, from RGB 0-255 images.

    ``bgr``: reverse the channels first; ``mean`` / ``std`` are in 0-255 units, in the
    channel order after the optional reversal: ``x' = (x - mean) / std``.
    """

    bgr: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"bgr": self.bgr, "mean": list(self.mean), "std": list(self.std)}


#: ImageNet mean / std of torchvision, timm and MiT, RGB, in 0-255 units.
IMAGENET_RGB = Normalization(bgr=False, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))

#: factory(style: str | None) -> backbone module
BackboneFactory = Callable[..., nn.Module]
#: factory(in_channels, num_classes, **options) -> head module
HeadFactory = Callable[..., nn.Module]

_BACKBONES: dict[str, BackboneFactory] = {}
_BACKBONE_PREFIXES: dict[str, BackboneFactory] = {}
_HEADS: dict[str, HeadFactory] = {}


def register_backbone(name: str, *, prefix: bool = False) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory`` under ``name`` (or, with ``prefix``, for every ``name:<rest>``).

    A plain factory is called as ``factory(style=...)``; a prefix factory as
    ``factory(rest, style=...)``. ``style`` is ``model.style`` (None when unset); a backbone
    without styles raises ``ValueError`` for any style it does not have.
    """
    table = _BACKBONE_PREFIXES if prefix else _BACKBONES

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in table:
            raise ValueError(f"backbone {name!r} is registered twice")
        table[name] = factory
        return factory

    return decorate


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator: register a head factory ``factory(in_channels, num_classes, **options)`` under ``name``."""

    def decorate(factory: HeadFactory) -> HeadFactory:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        _HEADS[name] = factory
        return factory

    return decorate


def declared_no_weight_decay(module: nn.Module) -> set[str]:
    """The parameter names ``module`` declares exempt from weight decay (its ``no_weight_decay()``),
    relative to it; the empty set for a module without the method."""
    declare = getattr(module, "no_weight_decay", None)
    return set(declare()) if callable(declare) else set()


def backbone_names() -> list[str]:
    """Accepted ``model.backbone`` values, in registration order: names, then ``<prefix>:<name>`` patterns."""
    return list(_BACKBONES) + [f"{prefix}:<name>" for prefix in _BACKBONE_PREFIXES]


def head_names() -> list[str]:
    return list(_HEADS)


def is_known_backbone(name: str) -> bool:
    prefix, sep, rest = name.partition(":")
    return name in _BACKBONES or (bool(sep) and bool(rest) and prefix in _BACKBONE_PREFIXES)


def create_backbone(name: str, style: str | None = None) -> nn.Module:
    """The backbone registered as ``name`` (random weights), of ``style`` where it has styles."""
    if name in _BACKBONES:
        return _BACKBONES[name](style=style)
    prefix, sep, rest = name.partition(":")
    if sep and rest and prefix in _BACKBONE_PREFIXES:
        return _BACKBONE_PREFIXES[prefix](rest, style=style)
    raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(backbone_names())}")


def create_head(name: str, in_channels: Sequence[int], num_classes: int, **options) -> nn.Module:
    """The head registered as ``name`` for a backbone with ``in_channels`` per level."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(head_names())}")
    accepted = inspect.signature(_HEADS[name]).parameters
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise ValueError(f"head {name!r} has no option {', '.join(map(repr, unknown))}"
                         + (" (its width is the class count: leave model.head_width null)" if "width" in unknown else ""))
    return _HEADS[name](tuple(in_channels), num_classes, **options)
