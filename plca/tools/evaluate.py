"""Score a trained model on a validation set (``plca evaluate``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from plca.config import ConfigError
from plca.data.datasets import build_dataset
from plca.data.transforms import EvalTransform
from plca.engine.distributed import DeviceError, resolve_device
from plca.engine.trainer import test_time_aggregation_enabled
from plca.evaluation.evaluator import PerImageScores, evaluate
from plca.evaluation.metrics import summarize
from plca.inference import load_for_inference
from plca.tools.gallery import write_gallery


def evaluate_checkpoint(source: str | Path, config_path: str | Path | None = None, overrides: Sequence[str] = (),
                        test_time_aggregation: bool | None = None, progress: bool = True, *, gallery: int = 0,
                        gallery_dir: str | Path | None = None, panel_width: int = 512) -> tuple[dict, list[str]]:
    """Metrics (see :func:`plca.evaluation.metrics.summarize`) of the model in ``source`` on ``data.val``,
    and the class names.

    ``source``: a model file (``.pt``, ``.safetensors``, the authors' ``.pth``) or a run directory
    (its final model). The config is the file's own (``overrides`` applied) unless ``config_path``
    is given; see :func:`plca.inference.load_for_inference`.

    With ``gallery=N`` the same pass also scores each image, and the N images with the lowest and
    the N with the highest per-image mIoU are written by :func:`plca.tools.gallery.write_gallery`
    into ``gallery_dir`` (default: ``<model file stem>.gallery`` next to the model file); the
    metrics then hold ``"gallery": {"dir", "lowest", "highest"}`` (names and scores).
    """
    if gallery < 0:
        raise ConfigError(f"--gallery must be a positive number of images, got {gallery}")

    model, config, file = load_for_inference(source, config_path, overrides)
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
    metrics.update(checkpoint=str(file.path), checkpoint_format=file.kind, step=file.step,
                   test_time_aggregation=tta, images=len(val), model=file.summary())
    if image_scores is not None:
        folder = Path(gallery_dir) if gallery_dir is not None else file.path.with_name(f"{file.path.stem}.gallery")
        val_set = config.data.val
        index = write_gallery(folder, image_scores, val, config.data.classes, panel_width,
                              description=f"Model `{file.path}` ({file.kind}) on data.val: {val_set.format} "
                                          f"`{val_set.root}` split {val_set.split}.")
        metrics["gallery"] = {"dir": str(folder), **{kind: [{key: entry[key] for key in ("name", "mIoU", "file")}
                                                           for entry in index[kind]]
                                                    for kind in ("lowest", "highest")}}
    return metrics, list(config.data.classes)
