"""``plca export``: a trained model as one ``.safetensors`` file that carries its own config.

The file holds the model's weights and, as string metadata, everything needed
to rebuild it::

    format   "plca-deeplabv2"
    config   the run's resolved config, as YAML text
    classes  the class names in output-channel order, as a JSON list
    step     the training step the weights come from (when known)

:func:`load_exported` rebuilds the model from the file alone, so ``plca predict
--checkpoint model.safetensors`` needs no config file. Unlike a training
checkpoint, the file holds no optimiser state and no pickled objects.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import nn

from plca.config import Config, ConfigError, build_config, to_dict
from plca.models.weights import WeightsError

#: The ``format`` metadata value of a plca export.
EXPORT_FORMAT = "plca-deeplabv2"


def resolve_checkpoint(source: str | Path, which: str = "last") -> Path:
    """``source`` itself when it is a file; ``RUN_DIR/checkpoints/<which>.pt`` when it is a run directory."""
    source = Path(source)
    if source.is_dir():
        path = source / "checkpoints" / f"{which}.pt"
        if not path.is_file():
            found = sorted(p.name for p in (source / "checkpoints").glob("*.pt")) if (source / "checkpoints").is_dir() else []
            hint = f"; it has {', '.join(found)}" if found else "; is this a plca run directory?"
            raise WeightsError(f"run directory '{source}' has no checkpoints/{which}.pt{hint}")
        return path
    if not source.is_file():
        raise WeightsError(f"'{source}' is neither a run directory nor a checkpoint file")
    return source


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - any failure becomes one clear message
        raise WeightsError(f"cannot read '{path}' as safetensors (truncated or another format): {error}") from None


def stored_config(path: str | Path) -> Config | None:
    """The config saved inside a plca export or training checkpoint; None for files that carry none."""
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata = read_export_metadata(path)
        if metadata.get("format") != EXPORT_FORMAT or "config" not in metadata:
            return None
        return _config_from_yaml(metadata["config"], f"the config stored in '{path}'")
    raw = _load_torch(path, mmap=True)
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        return _build_stored(raw["config"], f"the config stored in '{path}'")
    return None


def export_model(source: str | Path, output: str | Path, config: Config | None = None,
                 which: str = "last") -> Path:
    """Write the weights of ``source`` (a run directory or a checkpoint file) to ``output`` (.safetensors).

    ``config``: needed only when the checkpoint carries none (e.g. the PLCA authors' release);
    by default the one saved in the checkpoint, or ``RUN_DIR/config.yaml``.
    """
    from plca.evaluation.run import load_trained_weights
    from plca.models.weights import save_safetensors

    output = Path(output)
    if output.suffix != ".safetensors":
        raise ConfigError(f"export output '{output}' must end in .safetensors")
    path = resolve_checkpoint(source, which)
    raw = _load_torch(path, mmap=True) if path.suffix != ".safetensors" else None
    if config is None:
        config = _find_config(path, raw)
    model = build_inference_model(config)
    step = None
    if isinstance(raw, dict) and "model" in raw:
        _load_state(model, raw["model"], path)
        step = raw.get("step")
    else:
        load_trained_weights(model, path, config.data.classes)
    metadata = {
        "format": EXPORT_FORMAT,
        "config": yaml.safe_dump(to_dict(config), sort_keys=False),
        "classes": json.dumps(list(config.data.classes)),
    }
    if step is not None:
        metadata["step"] = str(int(step))
    output.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, output, metadata)
    return output


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild the model of a ``plca export`` file; return it (in eval mode, on ``device``) and its config."""
    from plca.models.weights import load_safetensors_into

    metadata = read_export_metadata(path)
    if metadata.get("format") != EXPORT_FORMAT or "config" not in metadata:
        raise WeightsError(
            f"'{path}' is not a plca export (metadata format is {metadata.get('format')!r}, expected "
            f"'{EXPORT_FORMAT}' with a config); give the run's CONFIG.yaml to load it instead"
        )
    config = _config_from_yaml(metadata["config"], f"the config stored in '{path}'")
    classes = json.loads(metadata.get("classes", "null") or "null")
    if classes is not None and list(classes) != list(config.data.classes):
        raise WeightsError(f"'{path}': metadata 'classes' {classes} disagrees with its config's data.classes")
    model = build_inference_model(config)
    load_safetensors_into(model, path)
    return model.to(device).eval(), config


def build_inference_model(config: Config) -> nn.Module:
    """The config's DeepLab-v2 on the CPU, without ImageNet weights (trained weights replace them)."""
    from plca.models.deeplab import build_deeplab_v2

    model_cfg = replace(config.model, pretrained=None)
    return build_deeplab_v2(num_classes=len(config.data.classes), backbone=model_cfg.backbone,
                            style=model_cfg.style, pretrained=None)


# --------------------------------------------------------------------------- helpers


def _load_torch(path: Path, mmap: bool = False):
    if not path.is_file():
        raise WeightsError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as error:
        if mmap and "mmap" in str(error):  # legacy (non-zip) files cannot be memory-mapped
            return _load_torch(path, mmap=False)
        raise WeightsError(_unreadable(path, error)) from None
    except Exception as error:  # noqa: BLE001
        raise WeightsError(_unreadable(path, error)) from None


def _unreadable(path: Path, error: Exception) -> str:
    return (f"cannot load '{path}': truncated, not a PyTorch file, or it holds objects other than tensors "
            f"(refused for safety). Detail: {str(error).splitlines()[0] if str(error) else type(error).__name__}")


def _find_config(path: Path, raw) -> Config:
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        return _build_stored(raw["config"], f"the config stored in '{path}'")
    run_config = path.parent.parent / "config.yaml"
    if path.parent.name == "checkpoints" and run_config.is_file():
        return _config_from_yaml(run_config.read_text(), str(run_config))
    raise ConfigError(f"'{path}' carries no config; pass the run's config with --config CONFIG.yaml")


def _config_from_yaml(text: str, where: str) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a mapping")
    return _build_stored(data, where)


def _build_stored(data: dict, where: str) -> Config:
    try:
        return build_config(data)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even when not strict
        raise WeightsError(f"'{path}' does not match the model its config describes: "
                           f"{str(error).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"'{path}' does not match the model its config describes: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
