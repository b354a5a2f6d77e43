"""Checks of the config's ``model`` section that types alone cannot express, answered by the registries.

:func:`plca.config.validate` calls :func:`validate_model_config`; a new backbone or head is checked by
what its registry contract declares (its styles, whether it has a width), never by its name here.
"""

from __future__ import annotations

from plca.models.packaged import is_packaged, packaged_entry
from plca.models.registry import (backbone_contract, backbone_names, backbone_styles, check_backbone_name,
                                  families_with_style, head_contract, head_names, is_known_backbone)
from plca.models.segmentor import FEATURE_SOURCES, SegmentorOptions


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_model_config(model: SegmentorOptions) -> None:
    """Raise ``ValueError`` naming the key when ``model`` asks for what the registered backbones and heads
    do not have: an unknown name, a style the backbone does not accept, a width for a head without one,
    packaged weights that are not installed, a ``timm:`` model timm does not know."""
    _check(is_known_backbone(model.backbone),
           f"model.backbone '{model.backbone}' is unknown; choose one of {', '.join(backbone_names())}")
    _check(model.head in head_names(),
           f"model.head '{model.head}' is unknown; choose one of {', '.join(head_names())}")
    styles = backbone_styles()
    _check(model.style is None or model.style in styles,
           f"model.style must be {', '.join(repr(style) for style in styles)} or null")
    _check(backbone_contract(model.backbone).accepts(model.style),
           f"model.style {model.style} is for the {', '.join(families_with_style(model.style))} backbones only; "
           f"{model.backbone} has its own input normalisation (leave model.style null)")
    _check(model.features in FEATURE_SOURCES, f"model.features must be one of {', '.join(FEATURE_SOURCES)}")
    _check(model.head_width is None or model.head_width > 0,
           f"model.head_width must be > 0 or null, got {model.head_width}")
    _check(model.head_width is None or head_contract(model.head).width,
           f"model.head_width: the {model.head} head has no width (its output is the class count); leave it null")
    hrda = getattr(model, "hrda", None)
    if hrda is not None and hrda.enabled:
        hrda.validate()
        _check(hrda.attention_head is None or hrda.attention_head in head_names(),
               f"model.hrda.attention_head '{hrda.attention_head}' is unknown; choose one of {', '.join(head_names())}")
    if is_packaged(model.pretrained):
        packaged_entry(model.pretrained)  # ValueError naming the package when it is not installed
    try:
        check_backbone_name(model.backbone)
    except (ImportError, ValueError) as error:
        raise ValueError(f"model.backbone '{model.backbone}': {error}") from None
