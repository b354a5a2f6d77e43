"""Reading and checking weight files: the strict loader that every model's converter uses, safetensors.

Every loader is strict: each tensor the model needs must be in the file with the
right shape, and every tensor in the file must have a place in the model, except
for a few named kinds that are dropped on purpose and reported as ``ignored``
(an ImageNet classifier ``fc.*``, BatchNorm's ``num_batches_tracked`` counters).
Anything else raises :class:`WeightsError` listing the offending keys; nothing is
ever loaded partially. Pickled files are read with ``weights_only=True`` only
(:mod:`plca.serialization`). Converters of published layouts live next to their model
(:func:`plca.models.resnet.load_resnet_weights`, :func:`plca.models.deeplab.load_authors_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from plca.files import atomic_path
from plca.serialization import UnreadableFileError, load_torch_file, read_safetensors

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
            named = [k for k in keys if not is_counter(k)]
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
    try:
        if path.suffix == ".safetensors":
            tensors = read_safetensors(path)[0]
            if not tensors:
                raise WeightsError(f"weights file '{path}' holds no tensors")
            return tensors
        raw = load_torch_file(path, "weights file")
    except UnreadableFileError as error:
        raise WeightsError(str(error)) from None
    return _unwrap_state_dict(raw, path)


def unwrap_state_dict(raw: object, path: str | Path) -> dict[str, Tensor]:
    """The state dict in an object read from a weights file ``path``: the object itself, or the mapping
    under ``'state_dict'``, ``'model'`` or ``'weights'`` (as :func:`read_state_dict` unwraps it)."""
    return _unwrap_state_dict(raw, Path(path))


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


def is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked`` counters: many, uninformative, optional in files."""
    return key.endswith("num_batches_tracked")


def load_strict(module: nn.Module, state: dict[str, Tensor], path: Path, what: str,
                 ignored: list[str], optional: bool = False) -> LoadReport:
    """Copy ``state`` into ``module`` after checking keys and shapes; raise on any mismatch.

    With ``optional`` the model's ``num_batches_tracked`` counters may be absent from
    ``state`` (they keep their current value).
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not (optional and is_counter(k)))
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


def save_safetensors(model: nn.Module, path: str | Path, metadata: Mapping[str, str]) -> None:
    """Write every tensor of ``model.state_dict()`` and string ``metadata`` to a ``.safetensors`` file.

    The file is written under a hidden temporary name next to ``path`` and renamed into place, so
    an interrupted or failed save never leaves a truncated file under the final name (and removes
    its temporary file).
    """
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"safetensors metadata must map strings to strings; bad entries: {bad}")
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as partial:  # the usual permissions, not 0600: a model file is for sharing
        save_file(tensors, str(partial), metadata=dict(metadata))


def load_safetensors_into(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a :func:`save_safetensors` file into ``model`` (every key, strictly); return its metadata."""
    path = Path(path)
    try:
        tensors, metadata = read_safetensors(path)
    except UnreadableFileError as error:
        raise WeightsError(str(error)) from None
    load_strict(model, tensors, path, "model", ignored=[])
    return metadata
