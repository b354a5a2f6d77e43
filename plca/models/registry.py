"""Registries of backbones and heads: how any backbone meets any head, and what each promises.

A **backbone** is an ``nn.Module`` that maps *normalised* images ``(B, 3, H, W)`` to a
list of feature maps, finest first (``levels[k]`` has ``out_channels[k]`` channels and
is about ``H / strides[k]`` high). It carries:

- ``out_channels: tuple[int, ...]`` and ``strides: tuple[float, ...]``, one per level (a ViT
  pyramid of patch 14 has strides 3.5, 7, 14, 28);
- ``load_pretrained(path) -> LoadReport``: load ImageNet weights from a local file in
  any of the layouts its contract lists, strictly (see :mod:`plca.models.weights`);
- optionally ``no_weight_decay() -> set[str]`` (timm's convention, also for heads): the names,
  relative to the module, of its parameters that AdamW must not decay under
  ``train.no_decay: declared`` (and, with every norm and bias, under ``norm_bias_position``). A
  module without the method declares none; this is all a new backbone or head does to take part
  in the optimiser's parameter groups.

Its registry entry carries its :class:`BackboneContract`: the ``model.style`` values it accepts and
the input normalisation of each (the segmentor's :class:`~plca.models.normalization.InputNormalizer`
is built from it), the style that null stands for, the published weight layouts it loads (each
with a recogniser over names and shapes, which ``plca weights inspect`` asks), and, for a
``<prefix>:<name>`` family, a check of the name. Code outside :mod:`plca.models` asks the
registry (:func:`backbone_contract`, :func:`resolved_style`, :func:`identify_weights`) and
never tests a backbone's name.

A **head** is an ``nn.Module`` built as ``factory(in_channels, num_classes, **options)``
with ``in_channels`` the backbone's ``out_channels``; it has

- ``embed(levels) -> Tensor (B, E, h, w)``: the map its final classifier reads
  (DeepLab-v2: the backbone's last map itself; DAFormer: the fused embedding at 1/4);
- ``classify(embedding) -> Tensor (B, K, h, w)``: class logits;
- ``embed_channels: int`` (``E``).

Its :class:`HeadContract` is read from the factory's signature: a factory with a ``width``
option has a width (``model.head_width``).

Factories register by name (importing :mod:`plca.models`, which any import of this module
does first, registers the built-in ones); :func:`backbone_names` and :func:`head_names` list
what the config accepts. A name of the form ``<prefix>:<rest>`` (``timm:convnext_atto``) goes to
the factory registered for ``<prefix>``, which receives ``<rest>``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from plca.models.normalization import IMAGENET_RGB, Normalization

__all__ = ["IMAGENET_RGB", "BackboneContract", "HeadContract", "Normalization", "WeightLayout", "WeightsIdentity",
           "backbone_contract", "backbone_names", "backbone_styles", "check_backbone_name", "create_backbone",
           "create_head", "declared_no_weight_decay", "families_with_style", "head_contract", "head_names",
           "identify_weights", "is_known_backbone", "register_backbone", "register_head", "resolved_style",
           "unregister_backbone", "weight_layouts"]


@dataclass(frozen=True)
class WeightsIdentity:
    """What a recogniser of published weights names: the network, and what in this project loads it."""

    architecture: str
    backbone: str | None = None  # the model.backbone that loads it; None when none here does
    style: str | None = None  # its model.style, for backbones with styles
    trained: bool = False  # a trained segmentor (plca evaluate), not ImageNet backbone weights
    drop_head: bool = False  # the backbone loads it with model.drop_pretrained_head=true
    use: str = ""  # for a trained segmentor: how to use it
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightLayout:
    """One published key layout of a backbone's weights, which its ``load_pretrained`` reads.

    ``identify`` reads names and shapes only (meta tensors will do) and returns what the file holds,
    or None when the file is not in this layout.
    """

    name: str  # e.g. torchvision-resnet
    title: str  # what its keys look like
    identify: Callable[[Mapping[str, Tensor]], WeightsIdentity | None]


#: the input normalisation of a style: one for every backbone of the family, or read from the built module
NormalizationSource = Normalization | Callable[[nn.Module], Normalization]


@dataclass(frozen=True)
class BackboneContract:
    """What a registered backbone promises the rest of the project, declared when it registers.

    ``normalization`` is the input its weights expect when ``model.style`` is null and no
    ``default_style`` applies; ``styles`` are the other ``model.style`` values it accepts, each with
    its own normalisation (None: the same as ``normalization``). A normalisation may be a function
    of the built module, for a family whose members differ (timm: each model's pretrained config).
    """

    family: str  # names the backbones in messages, e.g. "ResNet"
    normalization: NormalizationSource
    styles: Mapping[str, NormalizationSource | None] = field(default_factory=dict)
    default_style: str | None = None  # the style that model.style null stands for (ResNets: caffe)
    weight_layouts: tuple[WeightLayout, ...] = ()
    #: for a ``<prefix>:<name>`` family: checks ``<name>``, raising ValueError (ImportError when a package is missing)
    check_name: Callable[[str], object] | None = None

    def __post_init__(self) -> None:
        if self.default_style is not None and self.default_style not in self.styles:
            raise ValueError(f"{self.family}: default style {self.default_style!r} is not one of its styles")

    def accepts(self, style: str | None) -> bool:
        return style is None or style in self.styles

    def resolve_style(self, style: str | None) -> str | None:
        """``style``, or the style that null stands for."""
        return self.default_style if style is None else style

    def input_normalization(self, style: str | None, backbone: nn.Module) -> Normalization:
        """The input that ``backbone`` (built with ``style``) expects."""
        resolved = self.resolve_style(style)
        source = self.styles.get(resolved) if resolved is not None else None
        source = self.normalization if source is None else source
        return source if isinstance(source, Normalization) else source(backbone)


@dataclass(frozen=True)
class HeadContract:
    """What a registered head promises: whether it has a width (``model.head_width``)."""

    width: bool


#: factory(style: str | None) -> backbone module
BackboneFactory = Callable[..., nn.Module]
#: factory(in_channels, num_classes, **options) -> head module
HeadFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Backbone:
    factory: BackboneFactory
    contract: BackboneContract


_BACKBONES: dict[str, _Backbone] = {}
_BACKBONE_PREFIXES: dict[str, _Backbone] = {}
_HEADS: dict[str, HeadFactory] = {}


def register_backbone(name: str, *, contract: BackboneContract,
                      prefix: bool = False) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory`` with its ``contract`` under ``name`` (or, with ``prefix``, for every
    ``name:<rest>``).

    A plain factory is called as ``factory(style=...)``; a prefix factory as ``factory(rest, style=...)``.
    ``style`` is ``model.style`` as given (None when unset), always one the contract accepts.
    """
    table = _BACKBONE_PREFIXES if prefix else _BACKBONES

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in table:
            raise ValueError(f"backbone {name!r} is registered twice")
        table[name] = _Backbone(factory, contract)
        return factory

    return decorate


def unregister_backbone(name: str, *, prefix: bool = False) -> None:
    """Remove what :func:`register_backbone` registered under ``name`` (for tests and plug-ins)."""
    del (_BACKBONE_PREFIXES if prefix else _BACKBONES)[name]


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


def _entry(name: str) -> tuple[_Backbone, str | None] | None:
    """The registry entry of ``name`` and, for a prefix family, the name after the prefix."""
    if name in _BACKBONES:
        return _BACKBONES[name], None
    prefix, sep, rest = name.partition(":")
    if sep and rest and prefix in _BACKBONE_PREFIXES:
        return _BACKBONE_PREFIXES[prefix], rest
    return None


def _known(name: str) -> tuple[_Backbone, str | None]:
    found = _entry(name)
    if found is None:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(backbone_names())}")
    return found


def is_known_backbone(name: str) -> bool:
    return _entry(name) is not None


def backbone_contract(name: str) -> BackboneContract:
    """The contract of the backbone registered as ``name``; ``ValueError`` listing the names when there is none."""
    return _known(name)[0].contract


def _contracts() -> list[BackboneContract]:
    """Each registered contract once, in registration order (a family shares one)."""
    unique: dict[int, BackboneContract] = {}
    for entry in (*_BACKBONES.values(), *_BACKBONE_PREFIXES.values()):
        unique.setdefault(id(entry.contract), entry.contract)
    return list(unique.values())


def backbone_styles() -> list[str]:
    """Every ``model.style`` some registered backbone accepts, in registration order."""
    return list(dict.fromkeys(style for contract in _contracts() for style in contract.styles))


def families_with_style(style: str) -> list[str]:
    """The families (``ResNet``, ...) of the registered backbones that accept ``style``."""
    return list(dict.fromkeys(contract.family for contract in _contracts() if style in contract.styles))


def resolved_style(backbone: str, style: str | None) -> str | None:
    """``model.style`` with null resolved to the style it stands for (ResNets: ``caffe``); as given for a
    backbone without a default style or not registered here."""
    found = _entry(backbone)
    return style if found is None else found[0].contract.resolve_style(style)


def check_backbone_name(name: str) -> None:
    """Raise ``ValueError`` when ``name`` is not registered, or (ValueError or ImportError) when its family's
    contract refuses the part after the prefix (``timm:`` a model timm does not have, or no timm)."""
    entry, rest = _known(name)
    if rest is not None and entry.contract.check_name is not None:
        entry.contract.check_name(rest)


def weight_layouts() -> list[WeightLayout]:
    """The weight layouts the registered backbones load, each once, in registration order."""
    layouts: dict[str, WeightLayout] = {}
    for contract in _contracts():
        for layout in contract.weight_layouts:
            layouts.setdefault(layout.name, layout)
    return list(layouts.values())


def identify_weights(tensors: Mapping[str, Tensor]) -> tuple[WeightLayout, WeightsIdentity] | None:
    """The first registered layout that recognises ``tensors`` (names and shapes) and what it names; None
    when none does."""
    for layout in weight_layouts():
        identity = layout.identify(tensors)
        if identity is not None:
            return layout, identity
    return None


def create_backbone(name: str, style: str | None = None) -> nn.Module:
    """The backbone registered as ``name`` (random weights), of ``style`` where it has styles."""
    entry, rest = _known(name)
    styles = list(entry.contract.styles)
    if not entry.contract.accepts(style):
        raise ValueError(f"backbone {name!r} has no style {style!r}; leave model.style unset"
                         + (f" or choose one of: {', '.join(styles)}" if styles else ""))
    return entry.factory(style=style) if rest is None else entry.factory(rest, style=style)


def head_contract(name: str) -> HeadContract:
    """The contract of the head registered as ``name``, read from its factory's signature."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(head_names())}")
    return HeadContract(width="width" in inspect.signature(_HEADS[name]).parameters)


def create_head(name: str, in_channels: Sequence[int], num_classes: int, **options) -> nn.Module:
    """The head registered as ``name`` for a backbone with ``in_channels`` per level."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(head_names())}")
    accepted = inspect.signature(_HEADS[name]).parameters
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise ValueError(f"head {name!r} has no option {', '.join(map(repr, unknown))}"
                         + (" (its width is the class count: leave model.head_width null)"
                            if "width" in unknown else ""))
    return _HEADS[name](tuple(in_channels), num_classes, **options)
