"""``plca export``: a trained model as one ``.safetensors`` file that describes itself.

The file holds the model's weights and, as string metadata, everything needed to
rebuild it and to use it::

    format       "plca-segmentor"
    segmentor    the network: backbone, head, style, class count, feature map, input normalisation (JSON)
    classes      the class names in output-channel order (JSON list)
    config       the run's resolved config (YAML text; what exports before ``config_json`` hold)
    config_json  the same config as JSON, what readers use (the core install reads it without pyyaml)
    step         the training step the weights come from (when known)
    final        "true" when that step is the run's last, "false" for a model of an unfinished run
                 (exported only with ``--allow-unfinished``), absent when unknown
    run_id       the run the weights come from (when known)

:func:`load_exported` rebuilds the model from the file alone, so ``plca evaluate`` and
``plca predict --checkpoint model.safetensors`` need no config file. Unlike a training
checkpoint, the file holds no optimiser state and no pickled objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from plca.config import Config, ConfigError, build_config, to_dict
from plca.inference import check_config_matches, description_from_config
from plca.models.segmentor import Segmentor
from plca.models.trained import (EXPORT_FORMAT, inspect_model_file, load_model_file, refuse_unfinished,
                                 resolve_model_path, spec_of)
from plca.models.weights import WeightsError, save_safetensors

__all__ = ["EXPORT_FORMAT", "export_model", "load_exported", "read_export_metadata"]


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty when it has none)."""
    from plca.serialization import UnreadableFileError, read_safetensors_metadata

    try:
        return read_safetensors_metadata(path)
    except UnreadableFileError as error:
        raise WeightsError(str(error)) from None


def export_model(source: str | Path, output: str | Path, config: Config | None = None,
                 which: str = "final", allow_unfinished: bool = False) -> Path:
    """Write the weights of ``source`` (a run directory or a model file) to ``output`` (.safetensors).

    ``config``: needed only when the file carries none (e.g. the PLCA authors' release); a given
    config that asks for another network than the file holds is an error. A model of a run that
    did not reach its end is refused (nothing written) unless ``allow_unfinished``.
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ConfigError(f"export output '{output}' must end in .safetensors")
    file = inspect_model_file(resolve_model_path(source, which))
    refuse_unfinished(file, allow_unfinished)
    if config is not None:
        check_config_matches(file, config)
    elif file.config is not None:
        config = _stored(file.config, file.path)
    else:
        raise ConfigError(f"'{file.path}' carries no config; pass the run's config with --config CONFIG.yaml")
    import yaml

    description = file.description or description_from_config(config)
    model = load_model_file(file, description, config.data.classes)
    metadata = {
        "format": EXPORT_FORMAT,
        "segmentor": json.dumps(model.describe()),
        "classes": json.dumps(list(config.data.classes)),
        "config": yaml.safe_dump(to_dict(config), sort_keys=False),
        "config_json": json.dumps(to_dict(config)),
    }
    if file.step is not None:
        metadata["step"] = str(int(file.step))
    if file.final is not None:
        metadata["final"] = "true" if file.final else "false"
    if file.run_id is not None:
        metadata["run_id"] = file.run_id
    output.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, output, metadata)
    return output


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[Segmentor, Config]:
    """Rebuild the model of a ``plca export`` file; return it (in eval mode, on ``device``) and its config."""
    file = inspect_model_file(Path(path))
    if file.kind != "plca export" or file.config is None:
        raise WeightsError(f"'{path}' is not a plca export with its config; give the run's CONFIG.yaml to load it")
    config = _stored(file.config, file.path)
    check_config_matches(file, config)
    return load_model_file(file).to(device).eval(), config


def build_inference_model(config: Config) -> nn.Module:
    """The config's segmentor on the CPU without ImageNet weights (trained weights replace them)."""
    from plca.models.segmentor import build_segmentor

    return build_segmentor(spec_of(description_from_config(config)), len(config.data.classes))


def _stored(data: dict, path: Path) -> Config:
    try:
        return build_config(data)
    except ConfigError as error:
        raise ConfigError(f"the config stored in '{path}': {error}") from None
