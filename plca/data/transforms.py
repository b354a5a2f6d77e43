"""Joint image / label transforms for training and evaluation.

A transform is called as ``transform(image, label, rng)`` with ``image`` ``(H, W, 3) uint8``
RGB, ``label`` ``(H, W) uint8`` class indices (255 = ignore) and a ``numpy.random.Generator``
that is its only source of randomness, and returns ``(image (3, h, w) torch.uint8,
label (h, w) torch.int64)``. Normalisation happens on the device, in the model's input code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from plca.data.labels import IGNORE_INDEX

__all__ = ["CAT_MAX_REDRAWS", "EvalTransform", "TrainTransform", "crop_larger_than_images", "resize_image", "resize_label",
           "resize_warnings", "to_tensors", "window_is_varied"]


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, W, 3) uint8`` and ``(H, W) uint8`` arrays -> ``(3, H, W) uint8`` and ``(H, W) int64`` tensors."""
    image_tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    label_tensor = torch.from_numpy(label.astype(np.int64))
    return image_tensor, label_tensor


def resize_image(image: np.ndarray, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """Bilinear resize of ``(H, W, 3) uint8`` to ``size = (h, w)``, rounded to uint8.

    ``antialias=False`` (the default): output pixel ``x`` samples the source at
    ``(x + 0.5) * W / w - 0.5`` (half-pixel centres, clamped to the border) and interpolates its
    two neighbours per axis, whatever the scale: the sampling of cv2's ``INTER_LINEAR``, with which
    mmcv (mmsegmentation, DAFormer) resizes images. Downscaling by more than 2 skips source pixels
    (aliasing), as there. ``antialias=True``: Pillow's bilinear filter, which widens with the
    downscale factor and averages every source pixel (what the PLCA reference gets from
    torchvision's ``resize`` of PIL images); the same as the default when upscaling.
    """
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    if antialias:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return resized[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W) uint8`` to ``size = (h, w)``."""
    height, width = size
    if label.shape[:2] == (height, width):
        return label
    from PIL import Image

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


def _ordered(pair: tuple, value, name: str) -> tuple:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be (lo, hi) with lo <= hi, got {value!r}")
    return pair


def _ratio_range(value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
        ok = bool(np.isfinite([low, high]).all()) and 0 < low
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"scale_range must be two positive ratios (lo, hi), got {value!r}")
    return _ordered((low, high), value, "scale_range")


def _shorter_side_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``shorter`` and the aspect ratio kept (rounded half up)."""
    if height <= width:
        return shorter, max(1, int(width * shorter / height + 0.5))
    return max(1, int(height * shorter / width + 0.5)), shorter


def _ratio_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """``(h, w)`` of an image scaled by ``ratio`` (rounded half up, at least 1)."""
    return max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))


class TrainTransform:
    """Random rescale, horizontal flip and crop, applied identically to image and label.

    1. Rescale (bilinear for the image, see :func:`resize_image` and ``antialias``; nearest for
       the label), one of:
       ``shorter_side = (lo, hi)``: the shorter side becomes a random integer in ``[lo, hi]``
       (inclusive); ``scale_range = (lo, hi)``: both sides are multiplied by one random ratio
       drawn uniformly from ``[lo, hi]``, relative to each image's own size (mmsegmentation's
       ``ratio_range`` without a fixed base scale). Neither: no rescale.
    2. If ``flip``: mirror left-right with probability 0.5.
    3. Pad bottom / right (image with 0, label with 255) up to ``crop_size = (h, w)`` if smaller,
       then crop a random ``(h, w)`` window. With ``cat_max_ratio < 1`` (mmsegmentation's
       ``RandomCrop``, 0.75 in DAFormer) a window is re-drawn, up to :data:`CAT_MAX_REDRAWS`
       times, while its labelled pixels hold fewer than two classes or one class covers
       ``cat_max_ratio`` of them or more; the last window is kept unchecked.

    Random numbers are drawn from ``rng`` in this fixed order: shorter side or ratio, flip, crop
    top, crop left (then top, left of each re-drawn window).
    """

    def __init__(self, crop_size: tuple[int, int], shorter_side: tuple[int, int] | None = None,
                 flip: bool = True, scale_range: tuple[float, float] | None = None,
                 cat_max_ratio: float = 1.0, antialias: bool = False) -> None:
        self.antialias = bool(antialias)
        self.crop_size = _pair_of_positive_ints(crop_size, "crop_size")
        if not 0.0 < float(cat_max_ratio) <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1] (1 = any window), got {cat_max_ratio!r}")
        self.cat_max_ratio = float(cat_max_ratio)
        if shorter_side is not None and scale_range is not None:
            raise ValueError(f"shorter_side {shorter_side!r} and scale_range {scale_range!r} are two ways to rescale: "
                             f"give one of them (the other null)")
        self.shorter_side = None if shorter_side is None else _ordered(
            _pair_of_positive_ints(shorter_side, "shorter_side"), shorter_side, "shorter_side")
        self.scale_range = None if scale_range is None else _ratio_range(scale_range)
        self.flip = bool(flip)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 valid: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
        """``(H, W, 3) uint8``, ``(H, W) uint8`` -> ``(3, h, w) uint8``, ``(h, w) int64``; ``(h, w) = crop_size``.

        ``valid``: an optional ``(H, W)`` mask of the image's pixels (e.g. where pseudo-labels may be
        trusted) that follows the label's rescale (nearest), flip, padding (with 0) and crop; it is
        returned third, ``(h, w) bool``. It draws no random numbers, so the crop is the same with or
        without it.
        """
        _check_pair(image, label)
        if valid is not None and valid.shape != label.shape:
            raise ValueError(f"valid mask {valid.shape} and label {label.shape} differ in shape")
        size = None
        if self.shorter_side is not None:
            shorter = int(rng.integers(self.shorter_side[0], self.shorter_side[1] + 1))
            size = _shorter_side_size(*image.shape[:2], shorter)
        elif self.scale_range is not None:
            size = _ratio_size(*image.shape[:2], float(rng.uniform(*self.scale_range)))
        if size is not None:
            image, label = resize_image(image, size, self.antialias), resize_label(label, size)
            valid = None if valid is None else resize_label(valid.astype(np.uint8), size)
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
            valid = None if valid is None else valid[:, ::-1]
        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(crop_h - image.shape[0], 0), max(crop_w - image.shape[1], 0)
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
            valid = None if valid is None else np.pad(valid, ((0, pad_h), (0, pad_w)), constant_values=0)
        top, left = self._window(label, rng)
        image = image[top:top + crop_h, left:left + crop_w]
        label = label[top:top + crop_h, left:left + crop_w]
        if valid is None:
            return to_tensors(image, label)
        valid = valid[top:top + crop_h, left:left + crop_w]
        # a copy: after a rescale without a flip, a window as wide as the image is a contiguous view of
        # PIL's read-only array, which torch.from_numpy would warn about (once per worker)
        return (*to_tensors(image, label), torch.from_numpy(valid.astype(bool)))

    def _window(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of the crop window in the padded ``(H, W)`` label."""
        crop_h, crop_w = self.crop_size

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, label.shape[0] - crop_h + 1)), int(rng.integers(0, label.shape[1] - crop_w + 1))

        top, left = draw()
        if self.cat_max_ratio >= 1.0:
            return top, left
        for _ in range(CAT_MAX_REDRAWS):
            if window_is_varied(label[top:top + crop_h, left:left + crop_w], self.cat_max_ratio):
                break
            top, left = draw()
        return top, left

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, shorter_side={self.shorter_side}, "
                f"scale_range={self.scale_range}, flip={self.flip}, cat_max_ratio={self.cat_max_ratio}, "
                f"antialias={self.antialias})")


#: Re-draws of a crop window whose classes are too uniform (mmsegmentation's RandomCrop: 10).
CAT_MAX_REDRAWS = 10


def window_is_varied(label: np.ndarray, cat_max_ratio: float) -> bool:
    """Whether a label window ``(h, w)`` holds at least two classes, none covering ``cat_max_ratio``
    or more of its labelled (not :data:`IGNORE_INDEX`) pixels."""
    counts = np.bincount(label[label != IGNORE_INDEX].ravel())
    counts = counts[counts > 0]
    return bool(len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio)


# ----------------------------------------------------------------------------------------------
# Whether a configured rescale / crop suits the images: warnings, never errors.

#: A rescale beyond these factors of an image's own size is probably meant for other images.
MAX_UPSCALE = 2.0
MIN_DOWNSCALE = 0.25


def _counted(image_sizes: Mapping[tuple[int, int], int] | Iterable[tuple[int, int]]) -> Counter:
    if isinstance(image_sizes, Mapping):
        return Counter({tuple(size): int(count) for size, count in image_sizes.items()})
    return Counter(tuple(size) for size in image_sizes)


def _fits(size: tuple[int, int], crop: tuple[int, int]) -> bool:
    return size[0] >= crop[0] and size[1] >= crop[1]


def _padded_share(height: int, width: int, crop: tuple[int, int], shorter_side: tuple[int, int] | None,
                  scale_range: tuple[float, float] | None) -> tuple[float, float | None]:
    """For one image size: the share of its training crops that are padded (the rescale drawn
    leaves it smaller than the crop) and the rescale below which that happens (the shorter side,
    or the ratio; ``None`` without a rescale, where every crop of a too small image is padded)."""
    if shorter_side is not None:
        low, high = shorter_side
        # the rescaled size grows with the shorter side drawn: the padded sides are those below the first that fits
        first_fit = next((side for side in range(low, high + 1)
                          if _fits(_shorter_side_size(height, width, side), crop)), high + 1)
        return (first_fit - low) / (high - low + 1), float(first_fit)
    if scale_range is not None:
        low, high = scale_range
        # int(h * r + 0.5) >= crop_h  <=>  r >= (crop_h - 0.5) / h: the ratio from which the crop fits
        threshold = max((crop[0] - 0.5) / height, (crop[1] - 0.5) / width)
        if high <= low:
            return float(low < threshold), threshold
        return min(max((threshold - low) / (high - low), 0.0), 1.0), threshold
    return (0.0 if _fits((height, width), crop) else 1.0), None


def _below_text(thresholds: list[float], shorter_side: tuple[int, int] | None,
                scale_range: tuple[float, float] | None) -> str:
    """Where the crop is larger than the image, in the configuration's terms."""
    if shorter_side is None and scale_range is None:
        return "at their own size (no rescale is configured: train.shorter_side / train.scale_range)"
    low, high = min(thresholds), max(thresholds)
    if shorter_side is not None:
        span = f"{low:.0f}" if low == high else f"{low:.0f}..{high:.0f} (by image size)"
        drawn = f"[{shorter_side[0]}, {shorter_side[1]}]"
        if low > shorter_side[1]:
            return f"at every train.shorter_side drawn from {drawn}"
        return f"when the train.shorter_side drawn from {drawn} is below {span}"
    span = f"{low:.3g}" if f"{low:.3g}" == f"{high:.3g}" else f"{low:.3g}..{high:.3g} (by image size)"
    drawn = f"[{scale_range[0]:g}, {scale_range[1]:g}]"
    if low > scale_range[1]:
        return f"at every train.scale_range ratio drawn from {drawn}"
    return f"when the train.scale_range ratio drawn from {drawn} is below {span}"


def crop_larger_than_images(crop_size: tuple[int, int],
                            image_sizes: Mapping[tuple[int, int], int] | Iterable[tuple[int, int]],
                            shorter_side: tuple[int, int] | None = None,
                            scale_range: tuple[float, float] | None = None) -> str | None:
    """A warning if the crop is larger than some images at some rescale drawn, else None: at which
    rescales, and the share of all training crops that is (those crops are padded).

    ``crop_size`` and the ``image_sizes`` are ``(height, width)``; ``image_sizes`` is either a
    mapping size -> number of images (e.g. :attr:`~plca.data.checks.FileCheckReport.image_sizes`)
    or an iterable of sizes. Such crops are padded (image 0, label 255 = ignore), so part of each
    teaches nothing: worth a warning, not an error. The share assumes every image is drawn
    equally often, the rescale as :class:`TrainTransform` draws it (uniform ratio, uniform integer side).
    """
    crop = _pair_of_positive_ints(crop_size, "crop_size")
    sizes = _counted(image_sizes)
    small, thresholds, padded = {}, [], 0.0
    for size, count in sizes.items():
        share, threshold = _padded_share(*size, crop, shorter_side, scale_range)
        if share > 0:
            small[size] = count
            padded += share * count
            if threshold is not None:
                thresholds.append(threshold)
    if not small:
        return None
    smallest = min(small, key=lambda size: size[0] * size[1])
    return (f"the crop {crop[1]}x{crop[0]} (train.crop_size [{crop[0]}, {crop[1]}]) is larger than "
            f"{sum(small.values())} of {sum(sizes.values())} images (e.g. {smallest[1]}x{smallest[0]}) "
            f"{_below_text(thresholds, shorter_side, scale_range)}: {100 * padded / sum(sizes.values()):.1f} % of "
            f"the training crops are padded with ignored pixels; lower train.crop_size or rescale the images up")


def resize_warnings(image_sizes: Mapping[tuple[int, int], int] | Iterable[tuple[int, int]],
                    crop_size: tuple[int, int] | None = None, shorter_side: tuple[int, int] | None = None,
                    scale_range: tuple[float, float] | None = None) -> list[str]:
    """Warnings when the configured rescale is far from the images' own size (an upscale beyond
    :data:`MAX_UPSCALE` or a downscale below :data:`MIN_DOWNSCALE`), or the crop is larger than
    images (see :func:`crop_larger_than_images`). ``image_sizes`` as there, ``(height, width)``."""
    sizes = _counted(image_sizes)
    if not sizes:
        return []
    found = []
    shorter = [min(size) for size in sizes]
    if shorter_side is not None:
        high, low = shorter_side[1] / min(shorter), shorter_side[0] / max(shorter)
        sides = f"{min(shorter)}" if min(shorter) == max(shorter) else f"{min(shorter)}..{max(shorter)}"
        what = f"train.shorter_side [{shorter_side[0]}, {shorter_side[1]}] (the images' shorter side is {sides} px)"
    elif scale_range is not None:
        high, low = scale_range[1], scale_range[0]
        what = f"train.scale_range [{scale_range[0]:g}, {scale_range[1]:g}] (ratios of each image's own size)"
    else:
        high = low = 1.0
        what = ""
    if high > MAX_UPSCALE:
        found.append(f"{what} upscales images up to {high:.1f}x: is the rescale meant for images of another size?")
    if low < MIN_DOWNSCALE:
        found.append(f"{what} downscales images down to {low:.2f}x: is the rescale meant for images of another "
                        f"size?")
    if crop_size is not None:
        crop = crop_larger_than_images(crop_size, sizes, shorter_side, scale_range)
        if crop is not None:
            found.append(crop)
    return found


class EvalTransform:
    """Resize the image to ``size = (h, w)`` (bilinear, see :func:`resize_image` and ``antialias``;
    ``None`` keeps it); the label keeps its full resolution.

    Evaluation upsamples the predictions to the label, so scores are at full label resolution.
    """

    def __init__(self, size: tuple[int, int] | None = None, antialias: bool = False) -> None:
        self.size = None if size is None else _pair_of_positive_ints(size, "size")
        self.antialias = bool(antialias)

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, W, 3) uint8``, ``(H, W) uint8`` -> ``(3, h, w) uint8``, ``(H, W) int64``."""
        _check_pair(image, label)
        if self.size is not None:
            image = resize_image(image, self.size, self.antialias)
        return to_tensors(image, label)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, antialias={self.antialias})"
