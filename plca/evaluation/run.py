"""Score a saved model on a config's validation set (``plca evaluate``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from plca.config import Config, ConfigError
from plca.data.datasets import build_dataset
from plca.data.transforms import EvalTransform
from plca.engine.checkpoint import load_checkpoint
from plca.engine.distributed import resolve_device
from plca.evaluation.evaluator import evaluate
from plca.evaluation.metrics import summarize
from plca.models.weights import WeightsError, load_authors_checkpoint, load_safetensors_into


def load_trained_weights(model: nn.Module, path: str | Path, classes) -> str:
    """Load trained weights into ``model`` from any supported file; return the format's name.

    Formats: a plca training checkpoint (``{'model': ...}``), an exported ``.safetensors``,
    or the PLCA authors' released checkpoint (``{'weights': ...}``, their class order).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        load_safetensors_into(model, path)
        return "safetensors"
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise WeightsError(
            f"cannot load '{path}': truncated, not a PyTorch file, or it holds objects other than tensors "
            f"(refused for safety: loading it could run code). Detail: {str(error).splitlines()[0]}"
        ) from None
    if isinstance(raw, dict) and "model" in raw:
        model.load_state_dict(load_checkpoint(path)["model"])
        return "plca checkpoint"
    if isinstance(raw, dict) and "weights" in raw:
        load_authors_checkpoint(model, path, classes)
        return "PLCA authors' checkpoint"
    raise WeightsError(f"'{path}' is neither a plca checkpoint, a .safetensors export nor an authors' checkpoint")


def evaluate_checkpoint(config: Config, checkpoint: str | Path, test_time_aggregation: bool | None = None,
                        progress: bool = True) -> dict:
    """Metrics (see :func:`plca.evaluation.metrics.summarize`) of ``checkpoint`` on ``config.data.val``."""
    from plca.engine.trainer import build_model, test_time_aggregation_enabled

    if config.data.val is None:
        raise ConfigError("data.val is not set: evaluation needs a labelled validation set")
    device = resolve_device(config.device)
    # Trained weights replace everything, so ImageNet weights are not needed.
    model = build_model(replace(config, model=replace(config.model, pretrained=None)), device)
    fmt = load_trained_weights(model, checkpoint, config.data.classes)
    val = build_dataset(config.data.val.format, config.data.val.root, config.data.val.split,
                        classes=config.data.classes,
                        transform=EvalTransform(tuple(config.eval.size) if config.eval.size else None))
    tta = test_time_aggregation_enabled(config) if test_time_aggregation is None else test_time_aggregation
    confusion = evaluate(model, val, len(config.data.classes), device, test_time_aggregation=tta,
                         alpha=config.eval.alpha, amp=config.train.amp, progress=progress)
    metrics = summarize(confusion.matrix.cpu(), config.data.classes)
    metrics.update(checkpoint=str(checkpoint), checkpoint_format=fmt, test_time_aggregation=tta,
                   images=len(val))
    return metrics

