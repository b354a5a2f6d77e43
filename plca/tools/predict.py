"""``plca predict``: segment images with a trained model and write label, colour and overlay PNGs.

For each input image ``NAME`` it writes, at the input's full resolution::

    OUTPUT/labels/NAME.png   class indices of the config's data.classes (uint8; 255 is never predicted)
    OUTPUT/color/NAME.png    the same, in the Cityscapes palette
    OUTPUT/overlay/NAME.jpg  the colours blended 50 / 50 over the input
    OUTPUT/legend.png        which colour is which class

With ``--split test --submission`` it writes instead the files the dataset's benchmark server scores
(:mod:`plca.tools.submission`).

Inference is either on the whole (optionally resized) image or with a sliding
window whose logits are averaged where windows overlap; the logits are upsampled to
the input's full size before the softmax; horizontal flip and several scales can be
averaged on top, in probability space (mmsegmentation's inference). Test-time
aggregation (PLCA's) applies to every forward pass; its scores are already
probabilities, averaged and upsampled as they are (the PLCA reference).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from plca.config import Config, ConfigError
from plca.data.labels import palette
from plca.engine.distributed import available_cpus
from plca.engine.image_grids import colour_legend
from plca.evaluation.aggregation import DEFAULT_MAX_PIXELS
from plca.evaluation.evaluator import predict_scores, upsample_scores, upsampled_probabilities

if TYPE_CHECKING:
    from plca.tools.submission import SubmissionWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class InferenceOptions:
    """How :func:`predict_full` turns images into probabilities."""

    size: tuple[int, int] | None = None  # resize inputs to (h, w) first (scales multiply it); None = as is
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False  # also average the horizontally flipped image's probabilities
    window: tuple[int, int] | None = None  # sliding window (h, w); None = whole image
    stride: tuple[int, int] | None = None  # sliding-window stride; None = 2/3 of the window
    test_time_aggregation: bool = False
    alpha: float = 0.5
    amp: bool = False
    batch_size: int = 1  # images or windows per forward pass
    aggregation_max_pixels: int | None = DEFAULT_MAX_PIXELS  # exact aggregation up to it, per window above
    progress: bool = False  # a bar over the aggregation's windows (maps over aggregation_max_pixels)

    def __post_init__(self) -> None:
        if self.size is not None and min(self.size) <= 0:
            raise ConfigError(f"--size must be two positive integers, got {list(self.size)}")
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"--scales must be positive numbers, got {list(self.scales)}")
        if self.window is not None and min(self.window) <= 0:
            raise ConfigError(f"--window must be two positive integers, got {list(self.window)}")
        if self.stride is not None and (self.window is None or min(self.stride) <= 0):
            raise ConfigError("--stride needs --sliding-window --window H W and must be positive")
        if self.batch_size <= 0:
            raise ConfigError("--batch-size must be > 0")
        if self.aggregation_max_pixels is not None and self.aggregation_max_pixels <= 0:
            raise ConfigError("eval.aggregation_max_pixels must be null or a positive number of feature pixels")


# --------------------------------------------------------------------------- inference


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels every ``stride`` that cover ``[0, length)``.

    The last window ends exactly at ``length``; a window longer than ``length`` is clipped to it.
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _forward(model: nn.Module, images: Tensor, options: InferenceOptions) -> Tensor:
    """Scores ``(B, K, h, w)`` at the model's output stride (logits, or aggregated probabilities with
    test-time aggregation: :func:`plca.evaluation.evaluator.predict_scores`), ``batch_size`` images per pass."""
    chunks = [predict_scores(model, chunk, options.test_time_aggregation, options.alpha, options.amp,
                             options.aggregation_max_pixels, options.progress)
              for chunk in images.split(options.batch_size)]
    return torch.cat(chunks)


def _sliding_window(model: nn.Module, images: Tensor, options: InferenceOptions) -> Tensor:
    """Scores ``(B, K, H, W)`` at the input size: each window's, upsampled to the window, averaged
    where windows overlap (mmsegmentation's ``slide_inference``)."""
    _, _, height, width = images.shape
    win_h, win_w = min(options.window[0], height), min(options.window[1], width)
    stride_h, stride_w = options.stride or (max(1, -(-2 * win_h // 3)), max(1, -(-2 * win_w // 3)))
    boxes = [(top, left) for top in window_starts(height, win_h, stride_h)
             for left in window_starts(width, win_w, stride_w)]
    batch = images.shape[0]
    per_pass = max(1, options.batch_size // batch)  # windows per forward pass
    total = count = None
    for first in range(0, len(boxes), per_pass):
        group = boxes[first:first + per_pass]
        crops = torch.cat([images[:, :, top:top + win_h, left:left + win_w] for top, left in group])
        scores = upsample_scores(_forward(model, crops, options), (win_h, win_w))
        if total is None:
            total = images.new_zeros((batch, scores.shape[1], height, width))
            count = images.new_zeros((1, 1, height, width))
        for n, (top, left) in enumerate(group):
            total[:, :, top:top + win_h, left:left + win_w] += scores[n * batch:(n + 1) * batch]
            count[:, :, top:top + win_h, left:left + win_w] += 1
    return total / count


def resize_images(images: Tensor, size: tuple[int, int], antialias: bool = False) -> Tensor:
    """Images ``(B, 3, H, W)`` resized bilinearly to ``size``, as float.

    uint8 images go through :func:`plca.data.transforms.resize_image`, exactly as ``plca
    evaluate`` resizes them; float images through ``F.interpolate`` (the same sampling, unrounded).
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images.float()
    if images.dtype == torch.uint8:
        from plca.data.transforms import resize_image

        arrays = [resize_image(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()), size, antialias)
                  for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(images.device).float()
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=antialias)


@torch.no_grad()
def predict_full(model: nn.Module, images: Tensor, options: InferenceOptions = InferenceOptions()) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` at full input resolution for images ``(B, 3, H, W)`` (RGB, 0-255).

    Each (scale, flip) variant is the input resized to ``options.size x scale`` (see
    :func:`resize_images`), then mirrored if flipped, segmented (whole image or sliding window);
    its scores are upsampled bilinearly to ``(H, W)``, turned into probabilities (softmax of the
    logits; test-time-aggregated scores already are) and un-mirrored; the variants' probabilities
    are averaged (:func:`plca.evaluation.evaluator.upsampled_probabilities`, mmsegmentation's order).
    """
    height, width = images.shape[-2:]
    base_h, base_w = options.size or (height, width)
    total, variants = None, 0
    for scale in options.scales:
        scaled = resize_images(images, (max(1, round(base_h * scale)), max(1, round(base_w * scale))))
        for flipped in (False, True) if options.flip else (False,):
            inputs = scaled.flip(-1) if flipped else scaled
            scores = _sliding_window(model, inputs, options) if options.window else _forward(model, inputs, options)
            probs = upsampled_probabilities(scores, (height, width), options.test_time_aggregation)
            if flipped:
                probs = probs.flip(-1)
            total = probs if total is None else total + probs
            variants += 1
    return total / variants


# --------------------------------------------------------------------------- inputs and outputs


@dataclass
class InputImage:
    name: str  # output name without suffix; may contain sub-folders
    path: Path


def list_inputs(source: str | Path, exclude: Path | None = None) -> list[InputImage]:
    """One image file, or every image under a folder (recursively, sorted); names keep sub-folders."""
    from plca.data.io import DatasetError

    source = Path(source)
    if source.is_file():
        return [InputImage(source.stem, source)]
    if not source.is_dir():
        raise DatasetError(f"--input '{source}' is neither an image file nor a folder")
    exclude = exclude.resolve() if exclude is not None else None
    images = []
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if exclude is not None and exclude in path.resolve().parents:
            continue  # earlier predictions written inside the input folder
        images.append(InputImage(path.relative_to(source).with_suffix("").as_posix(), path))
    if not images:
        raise DatasetError(f"--input folder '{source}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    _check_unique(images)
    return images


def dataset_inputs(config: Config, split: str) -> list[InputImage]:
    """The images of ``split`` of the config's validation dataset (``data.val``: format and root)."""
    from plca.data.datasets import build_dataset

    if config.data.val is None:
        raise ConfigError("--split needs data.val in the config (its format and root are used)")
    dataset = build_dataset(config.data.val.format, config.data.val.root, split, classes=config.data.classes,
                            require_labels=False)
    images = [InputImage(sample.name, Path(sample.image)) for sample in dataset.samples]
    _check_unique(images)
    return images


def _check_unique(images: Sequence[InputImage]) -> None:
    from plca.data.io import DatasetError

    seen: dict[str, Path] = {}
    for item in images:
        if item.name in seen:
            raise DatasetError(f"'{seen[item.name]}' and '{item.path}' would both be written as '{item.name}.png'; "
                               f"rename one of them")
        seen[item.name] = item.path


class _ImageFiles(Dataset):
    """Reads input images; a file that fails to load yields its error message instead."""

    def __init__(self, items: Sequence[InputImage]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[InputImage, np.ndarray | None, str | None]:
        from plca.data.io import DatasetError, read_image

        item = self.items[index]
        try:
            return item, read_image(item.path), None
        except (DatasetError, OSError) as error:
            return item, None, str(error)


def _as_is(record):
    return record


def colorize(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """``(H, W, 3) uint8`` palette colours of class indices ``(H, W)``."""
    return palette(classes)[labels]


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3) uint8``: ``(1 - alpha) * image + alpha * colors``."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_outputs(output: Path, name: str, image: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
    """Write ``labels/NAME.png``, ``color/NAME.png`` and ``overlay/NAME.jpg`` under ``output``."""
    colors = colorize(labels, classes)
    for folder, array, suffix, kwargs in (("labels", labels, ".png", {}), ("color", colors, ".png", {}),
                                          ("overlay", overlay(image, colors), ".jpg", {"quality": 90})):
        path = output / folder / f"{name}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, **kwargs)


# --------------------------------------------------------------------------- the command


@dataclass
class PredictSummary:
    output: Path
    written: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def load_model_for_inference(checkpoint: str | Path, config_path: str | Path | None = None,
                             overrides: Sequence[str] = (), allow_unfinished: bool = True) -> tuple[nn.Module, Config]:
    """The model (CPU, eval mode) and its config (see :func:`plca.inference.load_for_inference`)."""
    from plca.inference import load_for_inference

    model, config, _ = load_for_inference(checkpoint, config_path, overrides, allow_unfinished=allow_unfinished)
    return model, config


def _batches(loader: Iterator, batch_size: int) -> Iterator[list[tuple[InputImage, np.ndarray | None, str | None]]]:
    """Group consecutive readable images of equal size (failures travel alone)."""
    group: list = []
    for record in loader:
        image = record[1]
        if group and (image is None or len(group) >= batch_size or group[0][1].shape != image.shape):
            yield group
            group = []
        if image is None:
            yield [record]
        else:
            group.append(record)
    if group:
        yield group


def run_predict(model: nn.Module, config: Config, inputs: Sequence[InputImage], output: str | Path,
                options: InferenceOptions, device: torch.device, num_workers: int = 2,
                progress: bool = True, submission: SubmissionWriter | None = None) -> PredictSummary:
    """Segment every input and write its outputs; unreadable inputs are skipped and listed.

    With ``submission`` only the benchmark server's files are written (and zipped), not labels/, color/
    and overlay/."""
    output = Path(output)
    summary = PredictSummary(output=output)
    options = replace(options, progress=progress)
    model = model.to(device).eval()
    loader = DataLoader(_ImageFiles(inputs), batch_size=None, collate_fn=_as_is,
                        num_workers=min(num_workers, max(len(inputs) - 1, 0), available_cpus()))
    bar = tqdm(total=len(inputs), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    whole_image_batch = 1 if options.window else options.batch_size
    for group in _batches(iter(loader), whole_image_batch):
        item, image, error = group[0]
        if image is None:
            summary.failed.append((str(item.path), error))
            bar.update(1)
            continue
        images = torch.stack([torch.from_numpy(np.ascontiguousarray(rec[1])).permute(2, 0, 1) for rec in group])
        probs = predict_full(model, images.to(device), options)
        labels = probs.argmax(dim=1).to(torch.uint8).cpu().numpy()
        for (item, image, _), label in zip(group, labels):
            if submission is None:
                write_outputs(output, item.name, image, label, config.data.classes)
            else:
                submission(item.name, label)
            summary.written.append(item.name)
        bar.update(len(group))
    bar.close()
    output.mkdir(parents=True, exist_ok=True)
    if submission is not None:
        submission.finish()
    else:
        Image.fromarray(colour_legend(config.data.classes, width=480)).save(output / "legend.png")
    return summary


def options_from_config(config: Config, **given) -> InferenceOptions:
    """Inference options, with ``size``, ``test_time_aggregation``, ``alpha``, ``amp`` and
    ``aggregation_max_pixels`` defaulting to the config."""
    from plca.engine.trainer import test_time_aggregation_enabled

    defaults = InferenceOptions(
        size=tuple(config.eval.size) if config.eval.size else None,
        test_time_aggregation=test_time_aggregation_enabled(config),
        alpha=config.eval.alpha,
        amp=config.train.amp,
        aggregation_max_pixels=config.eval.aggregation_max_pixels,
    )
    return replace(defaults, **{key: value for key, value in given.items() if value is not None})
