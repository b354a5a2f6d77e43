"""Score a trained model on a validation set (``plca evaluate``).

The metrics say what they scored: the data (format, root, split, number of images), the
checkpoint (path, step of how many, whether it is the run's final model, run id), the
protocol and the test-time options. By default they are written next to the model file as
``<model stem>.<format>-<split>-<root hash>.metrics.json`` (:func:`default_metrics_path`), so
the same model scored on other data writes another file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from plca.config import Config, ConfigError
from plca.data.datasets import build_dataset
from plca.data.transforms import EvalTransform
from plca.engine.distributed import DeviceError, resolve_device
from plca.engine.trainer import test_time_aggregation_enabled
from plca.evaluation.evaluator import PerImageScores, evaluate
from plca.evaluation.metrics import summarize
from plca.inference import load_for_inference
from plca.models.trained import ModelFile
from plca.tools.gallery import default_gallery_dir, write_gallery


def evaluate_checkpoint(source: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = (),
                        test_time_aggregation: bool | None = None, progress: bool = True, *, gallery: int = 0,
                        gallery_dir: str | Path | None = None, panel_width: int = 512,
                        allow_unfinished: bool = False) -> tuple[dict, list[str]]:
    """Metrics (see :func:`plca.evaluation.metrics.summarize`) of the model in ``source`` on ``data.val``,
    and the class names.

    ``source``: a model file (``.pt``, ``.safetensors``, the authors' ``.pth``) or a run directory
    (its final model). The config is the file's own (``overrides`` applied) unless ``config_path``
    is given; see :func:`plca.inference.load_for_inference`.

    With ``gallery=N`` the same pass also scores each image, and the N images with the lowest and
    the N with the highest per-image mIoU are written by :func:`plca.tools.gallery.write_gallery`
    into ``gallery_dir`` (default: the metrics file's name with ``.gallery`` for ``.metrics.json``); the
    metrics then hold ``"gallery": {"dir", "lowest", "highest"}`` (names and scores).

    A model of a run that did not reach its end is refused unless ``allow_unfinished``
    (:func:`plca.models.trained.refuse_unfinished`).
    """
    if gallery < 0:
        raise ConfigError(f"--gallery must be a positive number of images, got {gallery}")

    model, config, file = load_for_inference(source, config_path, overrides, allow_unfinished=allow_unfinished)
    if config.data.val is None:
        raise ConfigError("data.val is not set: evaluation needs a labelled validation set "
                          "(e.g. data.val.format=folder data.val.root=/path data.val.split=val)")
    try:
        device = resolve_device(config.device)
    except DeviceError as error:
        raise ConfigError(str(error)) from None
    val = build_dataset(config.data.val.format, config.data.val.root, config.data.val.split,
                        classes=config.data.classes,
                        transform=EvalTransform(tuple(config.eval.size) if config.eval.size else None,
                                                antialias=config.data.resize_antialias))
    tta = test_time_aggregation_enabled(config) if test_time_aggregation is None else test_time_aggregation
    image_scores = PerImageScores(gallery) if gallery else None
    confusion = evaluate(model.to(device), val, len(config.data.classes), device, test_time_aggregation=tta,
                         alpha=config.eval.alpha, amp=config.train.amp, progress=progress, image_scores=image_scores,
                         aggregation_max_pixels=config.eval.aggregation_max_pixels)
    metrics = summarize(confusion.matrix.cpu(), config.data.classes)
    metrics.update(scored_what(file, config, len(val), tta))
    if image_scores is not None:
        folder = Path(gallery_dir) if gallery_dir is not None else default_gallery_dir(default_metrics_path(metrics))
        val_set = config.data.val
        index = write_gallery(folder, image_scores, val, config.data.classes, panel_width,
                              description=f"Model `{file.path}` ({file.kind}) on data.val: {val_set.format} "
                                          f"`{val_set.root}` split {val_set.split}.")
        metrics["gallery"] = {"dir": str(folder), **{kind: [{key: entry[key] for key in ("name", "mIoU", "file")}
                                                           for entry in index[kind]]
                                                    for kind in ("lowest", "highest")}}
    return metrics, list(config.data.classes)


def scored_what(file: ModelFile, config: Config, images: int, aggregation: bool) -> dict:
    """The metrics' record of what was scored: checkpoint, data, test-time options."""
    val = config.data.val
    return {
        "checkpoint": str(file.path), "checkpoint_format": file.kind, "step": file.step,
        "total_steps": file.total_steps, "final": file.final, "run_id": file.run_id, "model": file.summary(),
        "data": {"format": val.format, "root": str(val.root), "split": val.split, "images": images},
        "images": images, "test_time_aggregation": aggregation,
        "test_time": {"size": list(config.eval.size) if config.eval.size else None, "aggregation": aggregation,
                      "alpha": config.eval.alpha if aggregation else None,
                      "aggregation_max_pixels": config.eval.aggregation_max_pixels if aggregation else None,
                      "amp": bool(config.train.amp)},
    }


def data_key(data: dict) -> str:
    """``'<format>-<split>-<8 hex digits of the root's absolute path>'``: a file-name part naming the data."""
    root = str(Path(data["root"]).expanduser().absolute())
    split = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(data["split"]))
    return f"{data['format']}-{split}-{hashlib.sha256(root.encode()).hexdigest()[:8]}"


def default_metrics_path(metrics: dict) -> Path:
    """``<model stem>.<data key>.metrics.json`` next to the model file of ``metrics`` (see :func:`data_key`)."""
    checkpoint = Path(metrics["checkpoint"])
    return checkpoint.with_name(f"{checkpoint.stem}.{data_key(metrics['data'])}.metrics.json")


def describe_scored(metrics: dict) -> list[str]:
    """What ``metrics`` scored, as the lines ``plca evaluate`` prints above the table."""
    data, options = metrics["data"], metrics["test_time"]
    final = {True: "final", False: "NOT the run's final model", None: "not known whether final"}[metrics["final"]]
    step = "step unknown" if metrics["step"] is None else f"step {metrics['step']}" + (
        f" of {metrics['total_steps']}" if metrics["total_steps"] is not None else "")
    bound = options.get("aggregation_max_pixels")
    aggregation = (f"on (alpha {options['alpha']}, exact up to {bound} feature pixels, per window above)"
                   if bound else f"on (alpha {options['alpha']}, exact at any size)") if options["aggregation"] else "off"
    return [f"checkpoint: {metrics['checkpoint']} ({metrics['checkpoint_format']}, {step}, {final})",
            f"data: {data['format']} '{data['root']}' split {data['split']}, {data['images']} images",
            f"protocol: {metrics['protocol']} | test time: size {options['size'] or 'as is'}, "
            f"aggregation {aggregation}"]
