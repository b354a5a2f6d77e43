"""Any timm model as a backbone (``model.backbone: timm:<model name>``), weights from a local file only.

The trunk is timm's own feature extractor, ``timm.create_model(name, features_only=True,
pretrained=False)``: nothing is ever downloaded, weights come only from :meth:`TimmBackbone.load_pretrained`.

* Hierarchical models (ResNet, ResNeXt, ConvNeXt, Swin, ...) give their maps at strides
  4, 8, 16, 32; a stride-2 stem map, where timm exposes one, is left out (no head reads it
  and upsampling heads would pay for it in memory).
* Plain models whose blocks all run at one stride (ViT, DeiT, DINOv2, ...) give their last
  block's map, before the final norm, to a :class:`SimpleFeaturePyramid` (ViTDet's), which
  turns it into four maps at 4x, 2x, 1x and 0.5x that scale: strides ``p / 4 .. 2 p`` for patch
  size ``p`` (3.5, 7, 14, 28 for patch 14). Such models are built with timm's
  ``dynamic_img_size`` and ``dynamic_img_pad`` where the model has them: the position
  embedding is resampled to each input's patch grid, and an input whose side is not a
  multiple of the patch size is zero-padded on the right / bottom to the next multiple
  (a side ``n`` gives a grid side ``ceil(n / p)``). Any crop size works.

Weight files are the ones timm and the Hugging Face hub publish for the *classification*
model (``model.safetensors``, ``pytorch_model.bin``, a ``.pth`` state dict, possibly wrapped):
the model's own timm ``checkpoint_filter_fn`` converts foreign layouts and resizes position
embeddings, the keys the feature extractor has no use for (classifier, final norm, pooling)
are dropped and reported as ignored, and everything else loads strictly into the trunk.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.models.normalization import IMAGENET_RGB, Normalization
from plca.models.registry import BackboneContract, register_backbone
from plca.models.weights import LoadReport, WeightsError, is_counter, load_strict, read_state_dict

#: the only style a timm backbone has (RGB input, the model's own mean / std)
STYLES: tuple[str, ...] = ("pytorch",)
#: hierarchical levels finer than this stride are left out
MIN_STRIDE = 4
#: relative scales of the simple feature pyramid's levels, finest first
PYRAMID_SCALES: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
_CLOSE_MATCHES = 5
_LISTED = 12


@dataclass
class TimmLoadReport(LoadReport):
    """A :class:`LoadReport` that also names the backbone's parameters the file does not hold
    (``new``: the simple feature pyramid of a plain model, which keeps its fresh initialisation)
    and the tensors timm's converter resampled to fit (``resized``: ``"pos_embed (1, 197, 192) ->
    (1, 50, 192)"``, a position embedding for another input size or a patch embedding for
    another patch size)."""

    new: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [super().__str__()]
        for label, keys in (("resized by timm's converter", self.resized), ("new (not in the file)", self.new)):
            if keys:
                shown = ", ".join(keys[:_LISTED])
                if len(keys) > _LISTED:
                    shown += f", ... ({len(keys) - _LISTED} more)"
                parts.append(f"{label} {len(keys)}: {shown}")
        return "; ".join(parts)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of ``(B, C, H, W)`` maps (ViTDet's ``LayerNorm`` for conv maps)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``, each pixel's channel vector standardised, scaled and shifted."""
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: four maps at relative scales 4x, 2x, 1x, 0.5x from one map.

    Maps ``(B, C, h, w)`` to ``[(B, C / 4, 4h, 4w), (B, C / 2, 2h, 2w), (B, C, h, w),
    (B, C, ceil(h / 2), ceil(w / 2))]``: 4x is two stride-2 transposed convolutions with a
    channel LayerNorm and GELU between them, 2x one transposed convolution, 1x the map itself,
    0.5x a 2x2 max-pool (rounding up, so a one-pixel map stays one pixel).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        quarter, half = channels // 4, channels // 2
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(channels, half, 2, stride=2),
            ChannelLayerNorm(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(channels, half, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.out_channels: tuple[int, ...] = (quarter, half, channels, channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Maps at 4x, 2x, 1x, 0.5x ``[(B, out_channels[k], ...)]`` of one map ``(B, C, h, w)``."""
        return [self.up4(x), self.up2(x), x, self.down2(x)]


class TimmBackbone(nn.Module):
    """A timm model's feature maps, finest first, with the contract of :mod:`plca.models.registry`.

    ``forward`` maps normalised RGB images ``(B, 3, H, W)`` (see :attr:`normalization`) to
    ``[(B, out_channels[k], ~H / strides[k], ~W / strides[k])]``. ``model_kwargs`` go to
    ``timm.create_model`` (for example ``depth=2`` for a small test model); the same ones must
    be given when loading weights of a model built with them.

    Submodules: ``trunk`` (timm's feature extractor, keys as timm's ``features_only`` model
    names them) and, for plain models, ``pyramid`` (:class:`SimpleFeaturePyramid`).
    """

    def __init__(self, name: str, style: str | None = None, **model_kwargs) -> None:
        super().__init__()
        if style is not None and style not in STYLES:
            raise ValueError(f"backbone 'timm:{name}' has no style {style!r}; "
                             f"leave model.style unset or choose one of: {', '.join(STYLES)}")
        timm = import_timm()
        self.name = check_model_name(name)
        self.style = style
        probe = _reference_model(self.name, model_kwargs)
        info = _feature_info(probe, self.name)
        reductions = [entry["reduction"] for entry in info]
        self.plain = len(set(reductions)) == 1
        if self.plain:
            out_indices: tuple[int, ...] = (len(info) - 1,)
            model_kwargs = {**_dynamic_size_kwargs(probe), **model_kwargs}
        else:
            out_indices = tuple(i for i, r in enumerate(reductions) if r >= MIN_STRIDE)
        self.model_kwargs = dict(model_kwargs)
        self.trunk = timm.create_model(self.name, pretrained=False, features_only=True, out_indices=out_indices,
                                       **model_kwargs)
        # a few timm models (Swin, ...) give channels-last maps; timm's Format is a str enum
        self.channels_last = getattr(self.trunk, "output_fmt", "NCHW") == "NHWC"
        channels = tuple(self.trunk.feature_info.channels())
        strides = tuple(self.trunk.feature_info.reduction())
        if self.plain:
            self.pyramid = SimpleFeaturePyramid(channels[-1])
            self.out_channels: tuple[int, ...] = self.pyramid.out_channels
            self.strides = tuple(_exact(strides[-1] / scale) for scale in PYRAMID_SCALES)
        else:
            self.pyramid = None
            self.out_channels = channels
            self.strides = strides
        self.normalization: Normalization = normalization_from_cfg(getattr(self.trunk, "pretrained_cfg", None))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps ``[(B, out_channels[k], h_k, w_k)]``, finest first, of normalised images ``(B, 3, H, W)``."""
        levels = list(self.trunk(x))
        if self.channels_last:
            levels = [level.permute(0, 3, 1, 2) for level in levels]
        if self.pyramid is not None:
            return self.pyramid(levels[-1])
        return levels

    def no_weight_decay(self) -> set[str]:
        """What timm declares exempt from weight decay, in this module's names.

        The classification model's ``no_weight_decay()`` (names or timm's fnmatch patterns, such as a
        ViT's ``pos_embed`` and ``cls_token``) matched against the trunk's parameters under their
        classification-model names (``trunk.model.pos_embed`` for a ViT); the simple feature pyramid
        declares nothing. Empty for a model without the method.
        """
        reference = _reference_model(self.name, self.model_kwargs)
        declare = getattr(reference, "no_weight_decay", None)
        if not callable(declare):
            return set()
        trunk_names = [name for name, _ in self.trunk.named_parameters()]
        return {f"trunk.{name}" for name in declared_in_trunk(declare(), trunk_names, set(reference.state_dict()))}

    def load_pretrained(self, path: str | Path, drop_head: bool = False) -> TimmLoadReport:
        """Weights of the timm classification model ``name`` from a local file, strictly (trunk only).

        The file is read with :func:`~plca.models.weights.read_state_dict` and passed through the
        model's timm ``checkpoint_filter_fn`` where its module has one (foreign layouts such as
        the original DINOv2 or OpenCLIP files; position embeddings resized to this model's grid).
        Keys of the classification model that the feature extractor lacks (classifier, final
        norm, ...) and BatchNorm counters are ignored; any other missing or unexpected key or a
        shape mismatch raises :class:`WeightsError`. The pyramid's parameters are not in such a
        file and are reported as ``new``, tensors the converter resampled as ``resized``. The
        classifier is always dropped, so ``drop_head`` changes nothing (it is accepted for the
        common backbone interface).
        """
        path = Path(path)
        reference = _reference_model(self.name, self.model_kwargs)
        file_state = read_state_dict(path)
        state = _filtered(file_state, reference, path, self.name)
        resized = sorted(f"{key} {tuple(file_state[key].shape)} -> {tuple(value.shape)}" for key, value in state.items()
                         if key in file_state and file_state[key].shape != value.shape)
        model_keys = set(reference.state_dict())
        source_to_trunk = {}
        for key in self.trunk.state_dict():
            source = _source_key(key, model_keys)
            source_to_trunk[source if source is not None else key] = key
        trunk_state: dict[str, Tensor] = {}
        ignored: list[str] = []
        for key, value in state.items():
            if key in source_to_trunk:
                trunk_state[source_to_trunk[key]] = value
            elif key in model_keys or is_counter(key):
                ignored.append(key)
            else:
                trunk_state[key] = value  # unexpected: load_strict names it
        report = load_strict(self.trunk, trunk_state, path, f"timm model '{self.name}' (features)", ignored,
                             optional=True)
        trunk_to_source = {trunk: source for source, trunk in source_to_trunk.items()}
        new = [f"pyramid.{key}" for key in self.pyramid.state_dict()] if self.pyramid is not None else []
        return TimmLoadReport(loaded=sorted(trunk_to_source[k] for k in trunk_state), ignored=report.ignored,
                              new=new, resized=resized)


def import_timm():
    """The timm package, or ``ImportError`` saying that ``timm:`` backbones need it (imported only when used)."""
    try:
        import timm
    except ImportError as error:
        import torch

        raise ImportError(f"'timm:' backbones need the [timm] extra, which could not be imported ({error}): "
                          f"pip install 'plca[timm]' torch=={torch.__version__.split('+')[0]} torchvision==<the "
                          f"release made for it> (one command, so pip keeps this torch)") from error
    return timm


def check_model_name(name: str) -> str:
    """``name`` if timm knows it (``arch`` or ``arch.tag``), else ``ValueError`` with close matches.

    Names that point timm at a hub repository or a folder (``hf-hub:...``, ``local-dir:...``,
    anything with ``/``) are refused: weights come only from a local file given to
    :meth:`TimmBackbone.load_pretrained`.
    """
    if ":" in name or "/" in name or "\\" in name:
        raise ValueError(f"backbone 'timm:{name}': give a timm model name such as 'resnet50' or "
                         f"'vit_small_patch14_dinov2'; hub repositories and folders are not read, load "
                         f"weights from a local file with model.pretrained")
    timm = import_timm()
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        matches = difflib.get_close_matches(arch, timm.list_models(), n=_CLOSE_MATCHES, cutoff=0.6)
        hint = f"; close matches: {', '.join(matches)}" if matches else ""
        raise ValueError(f"unknown timm model {arch!r} (backbone 'timm:{name}'){hint}")
    if tag:
        tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise ValueError(f"timm model {arch!r} has no pretrained tag {tag!r} (backbone 'timm:{name}'); "
                             f"its tags are: {', '.join(tags) or 'none'}")
    return name


def normalization_from_cfg(cfg: dict | None) -> Normalization:
    """RGB mean / std in 0-255 units from a timm ``pretrained_cfg`` (0-1 units); ImageNet's when it has none."""
    mean, std = (cfg or {}).get("mean"), (cfg or {}).get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_RGB
    return Normalization.from_unit_range(tuple(mean), tuple(std))  # timm's ImageNet constants give IMAGENET_RGB


def _reference_model(name: str, model_kwargs: dict) -> nn.Module:
    """The whole classification model on the meta device: its key names, shapes, feature_info; no memory."""
    timm = import_timm()
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **model_kwargs)


def _feature_info(model: nn.Module, name: str) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, import_timm().models.FeatureInfo):
        info = info.info
    if not info:
        raise ValueError(f"timm model {name!r} does not describe its feature maps (no feature_info), "
                         f"so it cannot serve as a backbone")
    return list(info)


def _dynamic_size_kwargs(model: nn.Module) -> dict[str, bool]:
    """``dynamic_img_size`` / ``dynamic_img_pad`` for a model class that takes them: inputs of any size."""
    accepted = inspect.signature(type(model).__init__).parameters
    return {flag: True for flag in ("dynamic_img_size", "dynamic_img_pad") if flag in accepted}


def _exact(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _filter_fn(model: nn.Module) -> Callable[[dict, nn.Module], dict] | None:
    """timm's converter of published checkpoints for this model class, where its module defines one."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _filtered(state: dict[str, Tensor], reference: nn.Module, path: Path, name: str) -> dict[str, Tensor]:
    convert = _filter_fn(reference)
    if convert is None:
        return state
    try:
        converted = convert(dict(state), reference)
    except Exception as error:  # a converter fails in its own ways on a file of another model
        raise WeightsError(f"weights file '{path}' does not fit the timm model '{name}': timm's "
                           f"checkpoint conversion failed ({type(error).__name__}: {error})") from error
    return dict(converted)


def declared_in_trunk(patterns: Iterable[str], trunk_names: Iterable[str], model_keys: set[str]) -> list[str]:
    """The trunk's parameter names whose classification-model name matches one of ``patterns``.

    ``patterns``: a timm model's ``no_weight_decay()``, parameter names or fnmatch patterns, as
    timm's ``param_groups_weight_decay`` reads them; ``model_keys``: the classification model's
    state-dict keys (see :func:`_source_key`).
    """
    patterns = list(patterns)
    return [name for name in trunk_names
            if any(fnmatch.fnmatchcase(_source_key(name, model_keys) or name, pattern) for pattern in patterns)]


def _source_key(trunk_key: str, model_keys: set[str]) -> str | None:
    """The classification model's name for a key of timm's feature extractor.

    The extractors rename at most the first component: ``model.`` in front (the getter of
    ViTs) or a flattened container, ``stages_0`` for ``stages.0``; the key whose rename is a
    key of the whole model is the one.
    """
    head, dot, rest = trunk_key.partition(".")
    candidates = [trunk_key]
    if head == "model" and dot:
        candidates.append(rest)
    candidates += [f"{head[:i]}.{head[i + 1:]}{dot}{rest}" for i, char in enumerate(head) if char == "_"]
    return next((candidate for candidate in candidates if candidate in model_keys), None)


def _own_normalization(backbone: nn.Module) -> Normalization:
    return backbone.normalization


def _check_name(name: str) -> None:
    import_timm()  # ImportError first: without timm no name can be checked
    check_model_name(name)


#: What every ``timm:`` backbone promises: the input of its model's pretrained config (RGB; ImageNet's where the
#: config has none), model.style null or pytorch (the same); its name must be one timm knows.
CONTRACT = BackboneContract(family="timm", normalization=_own_normalization, styles=dict.fromkeys(STYLES),
                            check_name=_check_name)


@register_backbone("timm", prefix=True, contract=CONTRACT)
def timm_backbone(name: str, style: str | None = None) -> TimmBackbone:
    """``timm:<model name>``: the timm model's feature maps (plain ViTs through a simple feature pyramid)."""
    return TimmBackbone(name, style=style)


__all__ = ["SimpleFeaturePyramid", "TimmBackbone", "TimmLoadReport", "check_model_name", "declared_in_trunk",
           "normalization_from_cfg", "timm_backbone"]
