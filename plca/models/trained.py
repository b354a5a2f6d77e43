"""Trained model files of every kind, read safely and turned back into a segmentor.

Kinds: a plca checkpoint or model file (``.pt``: ``last.pt``, ``final.pt``, ``best_on_val.pt``,
which describe their segmentor and classes), a plca export (``.safetensors`` whose metadata
holds the same), and the PLCA authors' released DeepLab-v2 checkpoints (``{'weights': ...}``,
which describe nothing: the model comes from a config, the class order is theirs).
A run directory stands for its ``checkpoints/final.pt`` (``last.pt`` for an unfinished run); a model
folder (``plca export --format folder``) for its ``model.safetensors``, an export.

Whether a file holds the end of its run (:attr:`ModelFile.final`) is what the file says
(``final`` in a checkpoint's header or an export's metadata), else, for older files, a
``final.pt`` name or a step equal to the config's ``train.iters``; :func:`refuse_unfinished`
stops the tools from scoring or exporting a model of a run that did not reach its end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plca.models.deeplab import is_authors_checkpoint, load_authors_checkpoint
from plca.models.registry import resolved_style
from plca.models.segmentor import Segmentor, SegmentorSpec, build_segmentor
from plca.models.weights import WeightsError, load_strict
from plca.serialization import UnreadableFileError, load_torch_file, read_safetensors, read_safetensors_metadata

#: The ``format`` metadata value of a plca export (``plca-deeplabv2`` is the older name, still read).
EXPORT_FORMAT = "plca-segmentor"
_EXPORT_FORMATS = (EXPORT_FORMAT, "plca-deeplabv2")


@dataclass
class ModelFile:
    """What a trained model file says about itself; ``description`` and ``classes`` None when it says nothing."""

    path: Path
    kind: str  # "plca checkpoint" | "plca export" | "PLCA authors' checkpoint"
    description: dict | None = None  # Segmentor.describe()
    classes: list[str] | None = None
    config: dict | None = None  # the run's config, as plain data
    step: int | None = None
    total_steps: int | None = None  # the run's train.iters, when the config says
    final: bool | None = None  # the step is the run's last; None when the file cannot tell
    run_id: str | None = None  # the run the file belongs to (files from before run ids: None)
    selection: str | None = None  # how a best_on_val.pt was selected (oracle selection)
    _raw: Any = field(default=None, repr=False)

    def progress(self) -> str:
        """``'step 2 of 6'`` (or ``'step 2'``, ``'step unknown'``), with ``', final'`` when it is the run's last."""
        if self.step is None:
            return "step unknown"
        total = f" of {self.total_steps}" if self.total_steps is not None else ""
        return f"step {self.step}{total}{', final' if self.final else ''}"

    def summary(self) -> str:
        if self.description is None:
            return f"'{self.path}' ({self.kind})"
        return describe_model(self.description, self.classes)


def describe_model(description: dict, classes=None) -> str:
    """``'resnet18 (pytorch style) + deeplabv2 head with 9 classes'``."""
    style = f" ({description['style']} style)" if description.get("style") else ""
    count = len(classes) if classes is not None else description.get("num_classes")
    width = f" (width {description['head_width']})" if description.get("head_width") else ""
    return f"{description['backbone']}{style} + {description['head']} head{width} with {count} classes"


#: A model folder's description and weights (:mod:`plca.tools.model_folder`).
MODEL_FOLDER_CONFIG = "config.json"
MODEL_FOLDER_WEIGHTS = "model.safetensors"


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a model folder: a folder with ``config.json`` and ``model.safetensors``."""
    path = Path(path)
    return (path / MODEL_FOLDER_CONFIG).is_file() and (path / MODEL_FOLDER_WEIGHTS).is_file()


#: The models of a run directory, by checkpoint name (``checkpoints/<name>.pt``); best_on_val is oracle selection.
RUN_MODELS: tuple[str, ...] = ("final", "last", "best_on_val")


def resolve_model_path(source: str | Path, which: str = "final") -> Path:
    """``source`` itself when it is a file; ``RUN_DIR/checkpoints/<which>.pt`` for a run directory
    (``which``: one of :data:`RUN_MODELS`; ``"final"`` falls back to ``last.pt`` when the run has not finished);
    ``FOLDER/model.safetensors`` for a model folder."""
    source = Path(source)
    if is_model_folder(source):
        return source / MODEL_FOLDER_WEIGHTS
    if source.is_dir():
        folder = source / "checkpoints"
        candidates = [folder / f"{which}.pt"] + ([folder / "last.pt"] if which == "final" else [])
        for path in candidates:
            if path.is_file():
                return path
        found = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
        hint = f"; it has {', '.join(found)}" if found else "; is this a plca run directory?"
        raise WeightsError(f"run directory '{source}' has no checkpoints/{which}.pt{hint}")
    if not source.is_file():
        raise WeightsError(f"'{source}' is neither a run directory nor a model file")
    return source


def _description_from_config(config: dict) -> tuple[dict, list[str]]:
    model = config.get("model", {}) or {}
    classes = list(config.get("data", {}).get("classes", []))
    backbone = model.get("backbone", "resnet101")
    style = resolved_style(backbone, model.get("style") or None)
    return {"backbone": backbone, "head": model.get("head", "deeplabv2"), "style": style,
            "num_classes": len(classes), "features": model.get("features", "backbone_last"),
            "head_width": model.get("head_width")}, classes


def _export_config(metadata: dict[str, str], path: Path) -> dict | None:
    """The run's config stored in an export's metadata: ``config_json`` (read by the core install) or, in
    exports written before it, the ``config`` YAML text (pyyaml: the ``[train]`` extra)."""
    if "config_json" in metadata:
        try:
            return json.loads(metadata["config_json"])
        except ValueError as error:
            raise WeightsError(f"'{path}': its metadata 'config_json' is not valid JSON ({error})") from None
    if "config" not in metadata:
        return None
    import yaml

    return yaml.safe_load(metadata["config"])


def inspect_model_file(path: str | Path) -> ModelFile:
    """Read a model file's self-description (the weights are memory-mapped, not copied)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            metadata = read_safetensors_metadata(path, "model file")
            if metadata.get("format") not in _EXPORT_FORMATS:
                raise WeightsError(f"'{path}' is not a plca export (metadata format is {metadata.get('format')!r}, "
                                   f"expected '{EXPORT_FORMAT}')")
            config = _export_config(metadata, path)
            if "segmentor" in metadata:
                description, classes = json.loads(metadata["segmentor"]), json.loads(metadata["classes"])
            elif config is not None:
                description, classes = _description_from_config(config)
            else:
                raise WeightsError(f"'{path}' is a plca export without a model description")
            step = int(metadata["step"]) if metadata.get("step") else None
            marker = {"true": True, "false": False}.get(metadata.get("final", ""))
            return ModelFile(path, "plca export", description, list(classes), config, step,
                             **_progress_fields(config, step, marker, path), run_id=metadata.get("run_id") or None)
        raw = load_torch_file(path, "model file", mmap=True)
    except UnreadableFileError as error:
        raise WeightsError(str(error)) from None
    if is_authors_checkpoint(raw):
        return ModelFile(path, "PLCA authors' checkpoint", _raw=raw)
    if not (isinstance(raw, dict) and isinstance(raw.get("model"), dict)):
        raise WeightsError(f"'{path}' is neither a plca checkpoint, a plca export (.safetensors) nor a PLCA "
                           f"authors' checkpoint")
    config = raw.get("config") if isinstance(raw.get("config"), dict) else None
    if isinstance(raw.get("segmentor"), dict):
        description, classes = dict(raw["segmentor"]), list(raw.get("classes") or [])
    elif config is not None:
        description, classes = _description_from_config(config)
    else:
        description, classes = None, None
    step = int(raw["step"]) if raw.get("step") is not None else None
    marker = raw.get("final") if isinstance(raw.get("final"), bool) else None
    selection = raw.get("selection") if isinstance(raw.get("selection"), str) else None
    run = raw.get("run") if isinstance(raw.get("run"), dict) else {}
    run_id = run.get("id") if isinstance(run.get("id"), str) else None
    return ModelFile(path, "plca checkpoint", description, classes, config, step,
                     **_progress_fields(config, step, marker, path), run_id=run_id, selection=selection, _raw=raw)


def _progress_fields(config: dict | None, step: int | None, marker: bool | None, path: Path) -> dict:
    """``total_steps`` and ``final`` of a file: its own ``final`` marker, else (files from before the
    marker) the trainer's ``final.pt`` name or the step against the config's ``train.iters``."""
    train = (config or {}).get("train") if isinstance(config, dict) else None
    total = train.get("iters") if isinstance(train, dict) else None
    total = int(total) if isinstance(total, int) else None
    if marker is None and path.name == "final.pt":
        marker = True
    if marker is None and step is not None and total is not None:
        marker = step >= total
    return {"total_steps": total, "final": marker}


class UnfinishedRunError(WeightsError):
    """A model file holds a step before the end of its run, and the user did not accept that."""


def refuse_unfinished(file: ModelFile, allow_unfinished: bool = False) -> None:
    """Raise :class:`UnfinishedRunError` when ``file`` is not the last step of its run.

    A ``best_on_val.pt`` of an earlier step is accepted when its run finished (a ``final.pt``
    beside it): it was asked for by name, and is labelled as oracle selection wherever it is used.
    Files that cannot tell (no step, or no config: e.g. the PLCA authors' release) are accepted.
    """
    if allow_unfinished or file.final is not False:
        return
    if file.selection is not None and (file.path.parent / "final.pt").is_file():
        return
    run_dir = file.path.parent.parent if file.path.parent.name == "checkpoints" else file.path.parent
    finish = (f"finish it (plca train --resume {run_dir}) or " if file.kind == "plca checkpoint" else "")
    raise UnfinishedRunError(
        f"'{file.path}' holds {file.progress()}: the run did not reach its end, so its model is not the final "
        f"one; {finish}pass --allow-unfinished to use the step-{file.step} model anyway")


def spec_of(description: dict) -> SegmentorSpec:
    return SegmentorSpec(backbone=description["backbone"], head=description["head"], style=description.get("style"),
                         features=description.get("features", "backbone_last"),
                         head_width=description.get("head_width"), hrda=description.get("hrda"))


def load_model_file(file: ModelFile, description: dict | None = None, classes=None) -> Segmentor:
    """The segmentor of ``file`` with its weights (CPU, eval mode).

    ``description`` / ``classes`` are needed only for files that carry none (the authors').
    """
    description = description or file.description
    classes = list(classes if classes is not None else (file.classes or []))
    if description is None:
        raise WeightsError(f"'{file.path}' does not say which network it holds; give the run's config")
    model = build_segmentor(spec_of(description), len(classes) or description["num_classes"])
    if file.kind == "PLCA authors' checkpoint":
        load_authors_checkpoint(model, file.path, classes)
    elif file.kind == "plca export":
        try:
            tensors = read_safetensors(file.path, "model file")[0]
        except UnreadableFileError as error:
            raise WeightsError(str(error)) from None
        load_strict(model, _legacy_keys(tensors), file.path, describe_model(description, classes), ignored=[])
    else:
        load_strict(model, _legacy_keys(file._raw["model"]), file.path, describe_model(description, classes),
                    ignored=[], optional=True)
    return model.eval()


def _legacy_keys(state: dict) -> dict:
    # plca 0.1 named DeepLab-v2's head 'classifier'
    return {("head." + key[len("classifier."):] if key.startswith("classifier.convs.") else key): value
            for key, value in state.items()}
