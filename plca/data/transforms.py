"""Joint image / label transforms for training and evaluation.

A transform is called as ``transform(image, label, rng)`` with ``image`` ``(H, W, 3) uint8``
RGB, ``label`` ``(H, W) uint8`` class indices (255 = ignore) and a ``numpy.random.Generator``
that is its only source of randomness, and returns ``(image (3, h, w) torch.uint8,
label (h, w) torch.int64)``. Normalisation happens on the device, in the model's input code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from plca.data.labels import IGNORE_INDEX

__all__ = ["EvalTransform", "TrainTransform", "resize_image", "resize_label", "to_tensors"]


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, W, 3) uint8`` and ``(H, W) uint8`` arrays -> ``(3, H, W) uint8`` and ``(H, W) int64`` tensors."""
    image_tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    label_tensor = torch.from_numpy(label.astype(np.int64))
    return image_tensor, label_tensor


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(H, W, 3) uint8`` to ``size = (h, w)``."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W) uint8`` to ``size = (h, w)``."""
    height, width = size
    if label.shape[:2] == (height, width):
        return label
    return np.asarray(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} of shape {image.shape}")
    if label.ndim != 2 or label.dtype != np.uint8 or label.shape != image.shape[:2]:
        raise ValueError(f"label must be (H, W) uint8 matching the image {image.shape[:2]}, "
                         f"got {label.dtype} of shape {label.shape}")


def _pair_of_positive_ints(value, name: str) -> tuple[int, int]:
    try:
        first, second = (int(v) for v in value)
        ok = (first, second) == tuple(value) and first > 0 and second > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be two positive integers, got {value!r}")
    return first, second


def _shorter_side_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``shorter`` and the aspect ratio kept (rounded half up)."""
    if height <= width:
        return shorter, max(1, int(width * shorter / height + 0.5))
    return max(1, int(height * shorter / width + 0.5)), shorter


class TrainTransform:
    """Random rescale, horizontal flip and crop, applied identically to image and label.

    1. If ``shorter_side = (lo, hi)``: resize so the shorter side is a random integer in
       ``[lo, hi]`` (inclusive), bilinear for the image, nearest for the label.
    2. If ``flip``: mirror left-right with probability 0.5.
    3. Pad bottom / right (image with 0, label with 255) up to ``crop_size = (h, w)`` if smaller,
       then crop a random ``(h, w)`` window.

    Random numbers are drawn from ``rng`` in this fixed order: shorter side, flip, crop top, crop left.
    """

    def __init__(self, crop_size: tuple[int, int], shorter_side: tuple[int, int] | None = None,
                 flip: bool = True) -> None:
        self.crop_size = _pair_of_positive_ints(crop_size, "crop_size")
        self.shorter_side = None if shorter_side is None else _pair_of_positive_ints(shorter_side, "shorter_side")
        if self.shorter_side is not None and self.shorter_side[0] > self.shorter_side[1]:
            raise ValueError(f"shorter_side must be (lo, hi) with lo <= hi, got {shorter_side!r}")
        self.flip = bool(flip)

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, W, 3) uint8``, ``(H, W) uint8`` -> ``(3, h, w) uint8``, ``(h, w) int64``; ``(h, w) = crop_size``."""
        _check_pair(image, label)
        if self.shorter_side is not None:
            shorter = int(rng.integers(self.shorter_side[0], self.shorter_side[1] + 1))
            size = _shorter_side_size(*image.shape[:2], shorter)
            image, label = resize_image(image, size), resize_label(label, size)
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(crop_h - image.shape[0], 0), max(crop_w - image.shape[1], 0)
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        top = int(rng.integers(0, image.shape[0] - crop_h + 1))
        left = int(rng.integers(0, image.shape[1] - crop_w + 1))
        image = image[top:top + crop_h, left:left + crop_w]
        label = label[top:top + crop_h, left:left + crop_w]
        return to_tensors(image, label)

    def __repr__(self) -> str:
        return f"TrainTransform(crop_size={self.crop_size}, shorter_side={self.shorter_side}, flip={self.flip})"


class EvalTransform:
    """Resize the image to ``size = (h, w)`` (bilinear; ``None`` keeps it); the label keeps its full resolution.

    Evaluation upsamples the predictions to the label, so scores are at full label resolution.
    """

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.size = None if size is None else _pair_of_positive_ints(size, "size")

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, W, 3) uint8``, ``(H, W) uint8`` -> ``(3, h, w) uint8``, ``(H, W) int64``."""
        _check_pair(image, label)
        if self.size is not None:
            image = resize_image(image, self.size)
        return to_tensors(image, label)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"
