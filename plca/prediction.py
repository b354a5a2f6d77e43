"""Class probabilities of whole images from a trained segmentor: what ``plca predict`` and
:func:`plca.segment` compute, with the test-time settings of a config (:func:`options_from_config`).

Inference is either on the whole (optionally resized) image or with a sliding
window whose logits are averaged where windows overlap; the logits are upsampled to
the input's full size before the softmax; horizontal flip and several scales can be
averaged on top, in probability space (mmsegmentation's inference). Test-time
aggregation (PLCA's) applies to every forward pass; its scores are already
probabilities, averaged and upsampled as they are (the PLCA reference).

Tensors in, tensors out: nothing here reads or writes files, so the core install (torch, numpy,
safetensors) runs it; :mod:`plca.tools.predict` reads the images and writes the PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.config import ConfigError
from plca.evaluation.aggregation import DEFAULT_MAX_PIXELS
from plca.evaluation.evaluator import predict_scores, upsample_scores, upsampled_probabilities

if TYPE_CHECKING:
    from plca.config import Config

__all__ = ["InferenceOptions", "options_from_config", "predict_full", "resize_images", "window_starts"]


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


def test_time_aggregation_enabled(config: Config) -> bool:
    """``eval.test_time_aggregation``, where null means the method's default (on for plca)."""
    from plca.methods import get_method

    tta = config.eval.test_time_aggregation
    return get_method(config.method).test_time_aggregation if tta is None else tta


def options_from_config(config: Config, **given) -> InferenceOptions:
    """Inference options, with ``size``, ``test_time_aggregation``, ``alpha``, ``amp`` and
    ``aggregation_max_pixels`` defaulting to the config."""
    defaults = InferenceOptions(
        size=tuple(config.eval.size) if config.eval.size else None,
        test_time_aggregation=test_time_aggregation_enabled(config),
        alpha=config.eval.alpha,
        amp=config.train.amp,
        aggregation_max_pixels=config.eval.aggregation_max_pixels,
    )
    return replace(defaults, **{key: value for key, value in given.items() if value is not None})
