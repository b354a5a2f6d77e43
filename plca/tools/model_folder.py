"""``plca export --format folder``: a trained model as a folder in the layout model hubs read.

::

    FOLDER/config.json        the network (backbone, head, style, normalisation), the classes (also as
                              id2label / label2id), the test-time settings, the training config, command
                              and step, and the final model's metrics with their protocol
    FOLDER/model.safetensors  the weights: the same self-describing file as ``plca export --format file``
    FOLDER/README.md          the model card (:mod:`plca.tools.model_card`)

``plca.load_model(FOLDER)``, ``plca evaluate --checkpoint FOLDER`` and ``plca predict --checkpoint
FOLDER`` read it; the test-time settings of ``config.json`` are the ones :func:`plca.segment` uses.
The folder is written beside its final place and renamed into it when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from plca.config import Config, ConfigError, to_dict
from plca.engine.run_record import read_run_record
from plca.files import atomic_path
from plca.models.trained import MODEL_FOLDER_CONFIG, MODEL_FOLDER_WEIGHTS, resolve_model_path
from plca.models.weights import WeightsError
from plca.tools.export import export_model, load_exported, read_export_metadata
from plca.tools.model_card import model_card
from plca.version import __version__

#: ``config.json``'s ``format`` value.
FOLDER_FORMAT = "plca-model-folder"


def _run_dir_of(model_path: Path) -> Path | None:
    """The run directory a model file belongs to (``RUN/checkpoints/x.pt``), when it is one."""
    run_dir = model_path.parent.parent
    return run_dir if model_path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file() else None


def _final_metrics(run_dir: Path | None, which: str) -> dict | None:
    """The run's ``metrics.json`` when the exported model is the one it scores (the final model)."""
    if run_dir is None or which != "final" or not (run_dir / "metrics.json").is_file():
        return None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def inference_settings(config: Config) -> dict:
    """The test-time settings of ``config`` as plain data: ``size`` (None = each image's own),
    ``test_time_aggregation``, ``alpha`` and the sliding ``window`` (the training crop)."""
    from plca.prediction import options_from_config

    options = options_from_config(config)
    return {"size": list(options.size) if options.size else None,
            "test_time_aggregation": bool(options.test_time_aggregation), "alpha": float(options.alpha),
            "window": list(config.train.crop_size)}


def protocol_text(config: Config, settings: dict) -> str:
    """How the metrics were measured, in words: the data, the resolution, the test-time aggregation."""
    val = config.data.val
    data = f"{val.format} '{val.split}' split" if val is not None else "the run's validation data"
    size = "at each image's own size" if settings["size"] is None else f"resized to {settings['size']}"
    aggregation = "on" if settings["test_time_aggregation"] else "off"
    return (f"the final model on {data}, single scale, whole image {size}, no flip, test-time aggregation "
            f"{aggregation}; IoU per class over the whole split's confusion matrix")


def folder_config(metadata: dict[str, str], config: Config, run_dir: Path | None, which: str) -> dict:
    """``config.json`` of a model folder, from the export's metadata, its config and its run."""
    classes = json.loads(metadata["classes"])
    segmentor = json.loads(metadata["segmentor"])
    record = read_run_record(run_dir) if run_dir is not None else None
    settings = inference_settings(config)
    metrics = _final_metrics(run_dir, which)
    return {
        "format": FOLDER_FORMAT, "library_name": "plca", "plca_version": __version__,
        "model_type": metadata["format"], "segmentor": segmentor,
        "num_labels": len(classes), "classes": classes,
        "id2label": {str(index): name for index, name in enumerate(classes)},
        "label2id": {name: index for index, name in enumerate(classes)},
        "normalization": segmentor.get("normalization"), "inference": settings,
        "training": {"method": config.method, "step": int(metadata["step"]) if metadata.get("step") else None,
                     "command": (record or {}).get("command"), "config": to_dict(config)},
        "metrics": None if metrics is None else {**metrics, "measured": protocol_text(config, settings)},
    }


def export_folder(source: str | Path, output: str | Path, config: Config | None = None,
                  which: str = "final", allow_unfinished: bool = False) -> Path:
    """Write the model folder of ``source`` (a run directory or a model file) to ``output``.

    ``output`` must be absent or an empty folder; ``config`` is needed only for a file that carries none;
    a model of a run that did not reach its end is refused unless ``allow_unfinished`` (as
    :func:`~plca.tools.export.export_model`).
    """
    output = Path(output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise ConfigError(f"export output '{output}' exists and is not an empty folder; remove it or choose "
                          f"another --output")
    model_path = resolve_model_path(source, which)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output, folder=True) as tmp:
        weights = export_model(model_path, tmp / MODEL_FOLDER_WEIGHTS, config=config, which=which,
                               allow_unfinished=allow_unfinished)
        metadata = read_export_metadata(weights)
        _, stored = load_exported(weights)
        data = folder_config(metadata, stored, _run_dir_of(model_path), which)
        (tmp / MODEL_FOLDER_CONFIG).write_text(json.dumps(data, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(data))
    return output


def read_folder_config(folder: str | Path) -> dict:
    """``FOLDER/config.json`` of a model folder, checked to be one (:class:`WeightsError` otherwise)."""
    path = Path(folder) / MODEL_FOLDER_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"'{path}' is not a readable model folder config: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FOLDER_FORMAT:
        raise WeightsError(f"'{path}' is not a plca model folder config (format is "
                           f"{data.get('format') if isinstance(data, dict) else None!r}, expected '{FOLDER_FORMAT}')")
    if not isinstance(data.get("inference"), dict) or not isinstance(data.get("classes"), list):
        raise WeightsError(f"'{path}': 'inference' must be a mapping and 'classes' a list")
    _check_inference_settings(data["inference"], path)
    return data


def _is_size(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _check_inference_settings(settings: dict, path: Path) -> None:
    """The ``inference`` keys a user may edit by hand, checked so that a wrong type is one named line
    (a string ``"false"`` would otherwise turn the aggregation on, an integer size fail deep inside)."""
    problems = {
        "size": "null or two positive integers [height, width]",
        "window": "null or two positive integers [height, width]",
        "test_time_aggregation": "true or false",
        "alpha": "a number in [0, 1]",
    }
    for key, expected in problems.items():
        if key not in settings:
            continue
        value = settings[key]
        if key in ("size", "window"):
            ok = value is None or _is_size(value)
        elif key == "test_time_aggregation":
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        if not ok:
            raise WeightsError(f"'{path}': inference.{key} must be {expected}, got {json.dumps(value)}")
