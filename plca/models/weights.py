"""Reading and checking weight files: ImageNet backbones, the PLCA authors' checkpoints, safetensors.

Every loader is strict: each tensor the model needs must be in the file with the
right shape, and every tensor in the file must have a place in the model, except
for a few named kinds that are dropped on purpose and reported as ``ignored``
(an ImageNet classifier ``fc.*``, BatchNorm's ``num_batches_tracked`` counters).
Anything else raises :class:`WeightsError` listing the offending keys; nothing is
ever loaded partially. Pickled files are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from plca.models.deeplab import DeepLabV2
    from plca.models.resnet import ResNet

#: Output channel order of the PLCA authors' released GTA5 -> Cityscapes model.
PLCA_AUTHORS_CLASS_ORDER: tuple[str, ...] = (
    "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car", "traffic sign",
    "person", "bicycle", "motorcycle", "traffic light", "rider", "bus", "wall", "terrain", "truck", "train",
)
#: Output channel order of their SYNTHIA -> Cityscapes model: the same, without terrain, truck, train.
PLCA_AUTHORS_SYNTHIA_CLASS_ORDER: tuple[str, ...] = tuple(
    name for name in PLCA_AUTHORS_CLASS_ORDER if name not in ("terrain", "truck", "train")
)

# keys of the wrapping dict under which a checkpoint file may hold its state dict
_WRAPPER_KEYS = ("state_dict", "model", "weights")
_MAX_LISTED = 12


class WeightsError(ValueError):
    """A weights file is missing, unreadable, unsafe, or does not fit the model."""


@dataclass
class LoadReport:
    """What a strict load did: keys loaded and keys deliberately ignored (missing / unexpected stay empty
    on success: a load with either raises instead)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("ignored", self.ignored)):
            if not keys:
                continue
            # BatchNorm counters are many and uninformative: count them instead of listing them
            named = [k for k in keys if not _is_counter(k)]
            counters = len(keys) - len(named)
            text = _list_keys(named) if named else ""
            if counters:
                text += f"{' and ' if named else ''}{counters} num_batches_tracked"
            parts.append(f"{name} {len(keys)}: {text}")
        return "; ".join(parts)


def _list_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown if len(keys) <= _MAX_LISTED else f"{shown}, ... ({len(keys) - _MAX_LISTED} more)"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, by name.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``, unwrapping a top-level dict that holds the
    tensors under ``'state_dict'``, ``'model'`` or ``'weights'``. Raises :class:`WeightsError`
    naming the file when it is missing, unreadable, refused for safety, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise WeightsError(
                f"weights file '{path}' contains code or non-tensor objects and is not loaded for safety "
                "(only plain tensors and containers are accepted; re-save it as a state dict or .safetensors)"
            ) from None
        raise WeightsError(f"weights file '{path}' is not a readable PyTorch file: {error}") from None
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise WeightsError(
            f"weights file '{path}' is not a readable PyTorch file (truncated or another format): "
            f"{type(error).__name__}: {error}"
        ) from None
    return _unwrap_state_dict(raw, path)


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _unwrap_state_dict(raw: object, path: Path) -> dict[str, Tensor]:
    if _is_state_dict(raw):
        return dict(raw)
    if isinstance(raw, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(raw.get(key)):
                return dict(raw[key])
        found = ", ".join(map(repr, list(raw)[:_MAX_LISTED]))
        raise WeightsError(
            f"weights file '{path}' holds no state dict (a mapping of names to tensors) at the top level or "
            f"under {', '.join(map(repr, _WRAPPER_KEYS))}; its top-level keys are: {found or 'none'}"
        )
    raise WeightsError(f"weights file '{path}' holds a {type(raw).__name__}, not a state dict")


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsError(f"weights file '{path}' is not a readable .safetensors file: {error}") from None
    if not tensors:
        raise WeightsError(f"weights file '{path}' holds no tensors")
    return tensors, metadata


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _load_strict(module: nn.Module, state: dict[str, Tensor], path: Path, what: str,
                 ignored: list[str], optional: bool = False) -> LoadReport:
    """Copy ``state`` into ``module`` after checking keys and shapes; raise on any mismatch.

    With ``optional`` the model's ``num_batches_tracked`` counters may be absent from
    ``state`` (they keep their current value).
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not (optional and _is_counter(k)))
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in state if k in own and state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        problems = [f"{label} ({len(keys)}): {_list_keys(keys)}"
                    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatches", mismatched)) if keys]
        raise WeightsError(f"weights file '{path}' does not fit the {what}: " + "; ".join(problems))
    complete = {k: state.get(k, own[k]) for k in own}
    module.load_state_dict(complete, strict=True)
    return LoadReport(loaded=sorted(state), ignored=sorted(ignored))


def _strip_scale(key: str) -> str:
    # the Caffe ResNet conversion names some tensors with a 'Scale' component, e.g. 'Scale.bn1.weight'
    return ".".join(part for part in key.split(".") if part != "Scale")


def load_imagenet_weights(backbone: ResNet, path: str | Path) -> LoadReport:
    """Load ImageNet weights in torchvision's key layout into ``backbone``, strictly.

    Accepts torchvision's own files and the Caffe conversion of the reference (whose keys may
    carry a ``Scale.`` component, removed here). ``fc.*`` and ``num_batches_tracked`` entries are
    dropped and reported as ignored; any other missing or unexpected key or a shape mismatch
    raises :class:`WeightsError`. The weights' style (Caffe v1 / torchvision v1.5) cannot be read
    from the file: it must match the ``style`` the backbone was built with.
    """
    path = Path(path)
    state: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in read_state_dict(path).items():
        name = _strip_scale(key)
        if name.startswith("fc.") or _is_counter(name):
            ignored.append(key)
            continue
        if name in state:
            raise WeightsError(f"weights file '{path}' has two tensors for '{name}' once 'Scale.' is removed")
        state[name] = value
    return _load_strict(backbone, state, path, f"ResNet-{backbone.depth} backbone", ignored, optional=True)


def _authors_class_order(num_channels: int, path: Path) -> tuple[str, ...]:
    for order in (PLCA_AUTHORS_CLASS_ORDER, PLCA_AUTHORS_SYNTHIA_CLASS_ORDER):
        if num_channels == len(order):
            return order
    raise WeightsError(
        f"weights file '{path}': the classifier has {num_channels} output channels; the PLCA authors' "
        f"models have {len(PLCA_AUTHORS_CLASS_ORDER)} (GTA5) or {len(PLCA_AUTHORS_SYNTHIA_CLASS_ORDER)} (SYNTHIA)"
    )


def load_authors_checkpoint(model: DeepLabV2, path: str | Path, classes: Sequence[str]) -> LoadReport:
    """Load a PLCA authors' released checkpoint into ``model``, reordering its classes to ``classes``.

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
    if model.style != "caffe":
        raise WeightsError(
            f"weights file '{path}': the PLCA authors' checkpoints have a Caffe-style backbone; "
            f"build the model with style 'caffe', not {model.style!r}"
        )
    state: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in read_state_dict(path).items():
        if _is_counter(key) or key.startswith("aux_classifier."):
            ignored.append(key)
        elif key.startswith("classifier.0.convs.") and key.endswith(".0.weight"):
            branch = key[len("classifier.0.convs."):-len(".0.weight")]
            state[f"classifier.convs.{branch}.weight"] = value
        else:
            state[key] = value  # backbone keys are named as ours; anything else is reported as unexpected

    head_keys = sorted(k for k in state if k.startswith("classifier.convs."))
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
    return _load_strict(model, state, path, "DeepLab-v2 model (PLCA authors' layout)", ignored, optional=True)


def save_safetensors(model: nn.Module, path: str | Path, metadata: Mapping[str, str]) -> None:
    """Write every tensor of ``model.state_dict()`` and string ``metadata`` to a ``.safetensors`` file.

    The file is written next to ``path`` and renamed into place, so an interrupted save never
    leaves a truncated file under the final name.
    """
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"safetensors metadata must map strings to strings; bad entries: {bad}")
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=dict(metadata))
    os.replace(partial, path)


def load_safetensors_into(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a :func:`save_safetensors` file into ``model`` (every key, strictly); return its metadata."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    tensors, metadata = _read_safetensors(path)
    _load_strict(model, tensors, path, "model", ignored=[])
    return metadata
