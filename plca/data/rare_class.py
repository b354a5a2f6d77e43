"""Rare Class Sampling (DAFormer): draw source images that hold rare classes more often.

1. Per-image per-class pixel counts of the source labels and each label's size
   (:class:`ClassStatistics`, computed once and cached as JSON). DAFormer counts the label files
   as stored (``tools/convert_datasets/gta.py``: GTA5 at its full 1914 x 1052, before the
   training pipeline's resize to 1280 x 704); the image threshold refers to the counted maps.
2. ``f_c``: class ``c``'s share of all labelled source pixels. The class of a sample is drawn
   with probability ``softmax((1 - f) / T)`` (:func:`rcs_class_probabilities`, ``T = 0.01``).
3. The image: uniform among the images with *more than* ``min_pixels`` (DAFormer: 3000) pixels
   of ``c``, or, relative to each image's own size, more than ``min_pixels_ratio`` x its pixels
   (height x width of the counted map, ignored pixels included; 3000 / (1914 x 1052) = 0.00149
   reproduces DAFormer's choice on GTA5).
4. The crop: :func:`retry_until_class` re-draws the random crop (the whole random transform:
   rescale, flip, window) up to ``retries`` (10) times while the crop's label, at the scale it is
   cropped at, holds at most ``min_pixels * min_crop_ratio`` (DAFormer: 1500) pixels of ``c``, or
   at most ``min_crop_pixels_ratio`` x the crop's pixels (1500 / 512^2 = 0.5722 %; 0.005723
   reproduces DAFormer's 512 x 512 crops); the last draw is kept whatever it holds (DAFormer's loop).

Candidate classes are those with at least one pixel in the data and at least one image above
its threshold; a class without such an image is left out and the softmax taken over the rest
(DAFormer asserts instead). :class:`RareClassSampler` derives each draw only from
``(seed, index)``, so a resumed run draws the same sequence without saving any state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plca.data.io import DatasetError
from plca.data.labels import IGNORE_INDEX
from plca.files import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["DAFORMER_MIN_PIXELS", "ClassStatistics", "RareClassDataset", "RareClassSampler",
           "cached_class_statistics", "class_pixel_counts", "crop_threshold", "crop_with_class", "image_thresholds",
           "pixels_of_class", "rare_class_dataset", "rcs_class_probabilities", "retry_until_class"]

_FORMAT = "plca.class_statistics"
#: 2 adds each label's size; version-1 files still load (without sizes: absolute thresholds only)
_VERSION = 2
_READABLE_VERSIONS = (1, 2)
#: DAFormer's image threshold, the default when no relative one is given
DAFORMER_MIN_PIXELS = 3000
#: separates the sampler's random stream from the other users of (seed, index)
_STREAM = 0x52435300


def _as_numpy(label: Any) -> np.ndarray:
    if isinstance(label, torch.Tensor):
        return label.detach().cpu().numpy()
    return np.asarray(label)


def class_pixel_counts(label_maps: Iterable[Any], num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``(N, num_classes) int64``: pixels of each class in each label map (numpy arrays or tensors)."""
    rows = []
    for position, label in enumerate(label_maps):
        values = _as_numpy(label).reshape(-1).astype(np.int64)
        values = values[values != ignore_index]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"label map {position} holds values outside [0, {num_classes}) and {ignore_index}: "
                             f"{sorted(set(np.unique(values).tolist()) - set(range(num_classes)))[:5]}")
        rows.append(np.bincount(values, minlength=num_classes))
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_classes), dtype=np.int64)


def rcs_class_probabilities(frequencies: Sequence[float] | np.ndarray, temperature: float = 0.01) -> np.ndarray:
    """``softmax((1 - f) / temperature)`` of class frequencies ``f`` ``(K,)``, in float64."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = (1.0 - np.asarray(frequencies, dtype=np.float64)) / temperature
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


@dataclass(frozen=True)
class ClassStatistics:
    """Pixel counts ``counts`` ``(N, K) int64`` of the ``K`` ``classes`` in each of ``N`` images.

    ``names``: the images' sample names, in the same order (optional; checked on load when given).
    ``sizes``: ``(N, 2) int64``, ``(height, width)`` of each counted label map (optional: files
    written before plca stored them have none; the relative image threshold needs them).
    """

    classes: tuple[str, ...]
    counts: np.ndarray
    names: tuple[str, ...] | None = None
    sizes: np.ndarray | None = None

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts)
        if counts.ndim != 2 or counts.shape[1] != len(self.classes):
            raise ValueError(f"counts must be (images, {len(self.classes)} classes), got shape {counts.shape}")
        if self.names is not None and len(self.names) != counts.shape[0]:
            raise ValueError(f"{len(self.names)} names for {counts.shape[0]} images")
        object.__setattr__(self, "counts", counts.astype(np.int64))
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
        if self.sizes is not None:
            sizes = np.asarray(self.sizes, dtype=np.int64)
            sizes = sizes.reshape(0, 2) if sizes.size == 0 else sizes
            if sizes.shape != (counts.shape[0], 2) or (sizes < 1).any():
                raise ValueError(f"sizes must be one (height, width) >= 1 per image ({counts.shape[0]}), "
                                 f"got shape {np.shape(self.sizes)}")
            if (counts.sum(axis=1) > sizes.prod(axis=1)).any():
                raise ValueError("an image counts more labelled pixels than its size holds")
            object.__setattr__(self, "sizes", sizes.astype(np.int64))

    @classmethod
    def from_label_maps(cls, label_maps: Iterable[Any], classes: Sequence[str],
                        names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX) -> ClassStatistics:
        """Counts and sizes of the label maps (numpy arrays or tensors), read once each."""
        sizes: list[tuple[int, int]] = []

        def recording_sizes():
            for label in label_maps:
                shape = tuple(label.shape)
                if len(shape) != 2:
                    raise ValueError(f"label map {len(sizes)} must be (H, W), got shape {shape}")
                sizes.append((int(shape[0]), int(shape[1])))
                yield label

        counts = class_pixel_counts(recording_sizes(), len(classes), ignore_index)
        return cls(tuple(classes), counts, None if names is None else tuple(names),
                   np.array(sizes, dtype=np.int64).reshape(-1, 2))

    @property
    def num_images(self) -> int:
        return int(self.counts.shape[0])

    @property
    def areas(self) -> np.ndarray | None:
        """``(N,) int64``: pixels of each counted label map (height x width, ignored pixels included), or None."""
        return None if self.sizes is None else self.sizes.prod(axis=1)

    @property
    def totals(self) -> np.ndarray:
        """``(K,) int64``: pixels of each class over all images."""
        return self.counts.sum(axis=0)

    @property
    def frequencies(self) -> np.ndarray:
        """``(K,) float64``: ``f_c``, each class's share of all labelled pixels (zeros if there are none)."""
        totals = self.totals
        return totals / totals.sum() if totals.sum() > 0 else np.zeros(len(self.classes))

    def save(self, path: str | Path) -> None:
        """Write the statistics as JSON (through a temporary file, so a crash leaves no half file)."""
        path = Path(path)
        payload = {"format": _FORMAT, "version": _VERSION, "classes": list(self.classes),
                   "names": None if self.names is None else list(self.names), "counts": self.counts.tolist(),
                   "sizes": None if self.sizes is None else self.sizes.tolist()}
        atomic_write_json(path, payload, indent=None)

    @classmethod
    def load(cls, path: str | Path, classes: Sequence[str] | None = None, num_images: int | None = None,
             names: Sequence[str] | None = None) -> ClassStatistics:
        """Read a file written by :meth:`save`, checking it against what the run expects.

        Version-1 files (written before the sizes were stored) load with ``sizes`` None. Raises
        :class:`DatasetError` naming the file when it is unreadable or corrupt, or when its
        classes, number of images or sample names differ from ``classes`` / ``num_images`` / ``names``.
        """
        path = Path(path)
        advice = "delete it to have the statistics computed again"
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DatasetError(f"{path}: cannot read the class-statistics cache ({error}); {advice}") from error
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise DatasetError(f"{path}: not a class-statistics cache (no format {_FORMAT!r}); {advice}")
        version = payload.get("version")
        if version not in _READABLE_VERSIONS or isinstance(version, bool):
            raise DatasetError(f"{path}: class-statistics cache version {version!r}, expected one of "
                               f"{', '.join(map(str, _READABLE_VERSIONS))}; {advice}")
        stored_classes, stored_names, rows = payload.get("classes"), payload.get("names"), payload.get("counts")
        if not isinstance(stored_classes, list) or not all(isinstance(c, str) for c in stored_classes):
            raise DatasetError(f"{path}: 'classes' must be a list of class names; {advice}")
        if stored_names is not None and (not isinstance(stored_names, list)
                                         or not all(isinstance(n, str) for n in stored_names)):
            raise DatasetError(f"{path}: 'names' must be a list of sample names or null; {advice}")
        if not isinstance(rows, list) or not all(
                isinstance(row, list) and len(row) == len(stored_classes)
                and all(_natural(v) for v in row) for row in rows):
            raise DatasetError(f"{path}: 'counts' must be one list of {len(stored_classes)} non-negative integers "
                               f"per image; {advice}")
        if stored_names is not None and len(stored_names) != len(rows):
            raise DatasetError(f"{path}: {len(stored_names)} names for {len(rows)} count rows; {advice}")
        stored_sizes = payload.get("sizes") if version >= 2 else None
        if stored_sizes is not None:
            if not isinstance(stored_sizes, list) or len(stored_sizes) != len(rows) or not all(
                    isinstance(size, list) and len(size) == 2 and all(_natural(v) and v > 0 for v in size)
                    for size in stored_sizes):
                raise DatasetError(f"{path}: 'sizes' must be null or one [height, width] of positive integers per "
                                   f"count row; {advice}")
            if any(sum(row) > size[0] * size[1] for row, size in zip(rows, stored_sizes)):
                raise DatasetError(f"{path}: an image counts more labelled pixels than its size holds; {advice}")
        if classes is not None and tuple(classes) != tuple(stored_classes):
            raise DatasetError(f"{path}: cached for classes {stored_classes}, but the run's classes are "
                               f"{list(classes)}; {advice}")
        if num_images is not None and len(rows) != num_images:
            raise DatasetError(f"{path}: cached for {len(rows)} images, but the dataset has {num_images}; {advice}")
        if names is not None:
            if stored_names is None:
                raise DatasetError(f"{path}: the cache stores no sample names to check against the dataset's; {advice}")
            if tuple(names) != tuple(stored_names):
                first = next((i for i, (a, b) in enumerate(zip(names, stored_names)) if a != b),
                             min(len(names), len(stored_names)))
                raise DatasetError(f"{path}: cached for other samples (first difference at position {first}); {advice}")
        counts = np.array(rows, dtype=np.int64).reshape(len(rows), len(stored_classes))
        sizes = None if stored_sizes is None else np.array(stored_sizes, dtype=np.int64).reshape(len(rows), 2)
        return cls(tuple(stored_classes), counts, None if stored_names is None else tuple(stored_names), sizes)


def _natural(value: Any) -> bool:
    """A JSON integer >= 0 (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def cached_class_statistics(path: str | Path, classes: Sequence[str], names: Sequence[str],
                            label_maps: Callable[[], Iterable[Any]],
                            ignore_index: int = IGNORE_INDEX) -> ClassStatistics:
    """The statistics cached at ``path`` if it exists (checked against ``classes`` and ``names``),
    else computed from ``label_maps()`` (one map per name, in order) and saved there."""
    path = Path(path)
    if path.exists():
        return ClassStatistics.load(path, classes, len(names), names)
    stats = ClassStatistics.from_label_maps(label_maps(), classes, names, ignore_index)
    if stats.num_images != len(names):
        raise DatasetError(f"{len(names)} samples but {stats.num_images} label maps for {path}")
    stats.save(path)
    return stats


def image_thresholds(stats: ClassStatistics, min_pixels: int | None = None,
                     min_pixels_ratio: float | None = None) -> np.ndarray:
    """``(N,) float64``: the pixels of a class each image must hold *more than* to be drawn for it.

    ``min_pixels``: the same count for every image (in pixels of the counted maps); or
    ``min_pixels_ratio``: that share of each image's own pixels (``height x width`` of its counted
    map, ignored pixels included), which needs ``stats.sizes``. Give at most one; neither is
    DAFormer's ``min_pixels = 3000``.
    """
    if min_pixels is not None and min_pixels_ratio is not None:
        raise ValueError(f"give min_pixels ({min_pixels}) or min_pixels_ratio ({min_pixels_ratio}), not both")
    if min_pixels_ratio is None:
        min_pixels = DAFORMER_MIN_PIXELS if min_pixels is None else min_pixels
        if min_pixels < 0:
            raise ValueError(f"min_pixels must be >= 0, got {min_pixels}")
        return np.full(stats.num_images, float(min_pixels))
    if not 0.0 <= min_pixels_ratio < 1.0:
        raise ValueError(f"min_pixels_ratio must be in [0, 1), got {min_pixels_ratio}")
    if stats.areas is None:
        raise ValueError("min_pixels_ratio needs each image's size, which these class statistics do not store "
                         "(written by an older plca): compute them again")
    return float(min_pixels_ratio) * stats.areas.astype(np.float64)


class RareClassSampler:
    """Draws ``(class, image)`` pairs for Rare Class Sampling, each a pure function of ``(seed, index)``.

    An image is eligible for class ``c`` if it holds more pixels of ``c`` than its threshold
    (:func:`image_thresholds`: ``min_pixels``, or ``min_pixels_ratio`` of its own pixels).
    Attributes: ``classes`` (candidate class indices, ascending), ``probabilities`` (their
    sampling probabilities), ``image_thresholds`` ``(N,)``, ``images_with_class`` (class index ->
    indices of the eligible images) and ``dropped_classes`` (present in the data, but in no
    eligible image: never drawn).
    """

    def __init__(self, stats: ClassStatistics, temperature: float = 0.01, min_pixels: int | None = None,
                 seed: int = 0, min_pixels_ratio: float | None = None) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.image_thresholds = image_thresholds(stats, min_pixels, min_pixels_ratio)
        self.min_pixels_ratio = None if min_pixels_ratio is None else float(min_pixels_ratio)
        self.min_pixels = None if min_pixels_ratio is not None else int(
            DAFORMER_MIN_PIXELS if min_pixels is None else min_pixels)
        self.temperature, self.seed = float(temperature), int(seed)
        present = np.flatnonzero(stats.totals > 0)
        enough = {int(c): np.flatnonzero(stats.counts[:, c] > self.image_thresholds) for c in present}
        self.classes = np.array([c for c in present if enough[int(c)].size > 0], dtype=np.int64)
        self.dropped_classes = tuple(int(c) for c in present if enough[int(c)].size == 0)
        if self.classes.size == 0:
            raise DatasetError(f"rare class sampling: no class passes the image threshold: none of the "
                               f"{stats.num_images} images holds "
                               f"{self.describe_threshold('any class')}; lower "
                               f"{'min_pixels' if self.min_pixels is not None else 'min_pixels_ratio'}")
        self.images_with_class = {int(c): enough[int(c)] for c in self.classes}
        self.probabilities = rcs_class_probabilities(stats.frequencies[self.classes], self.temperature)

    def describe_threshold(self, what: str = "it") -> str:
        """What an eligible image holds, in words: ``more than 3000 pixels of it`` or
        ``it on more than 0.149 % of its pixels``."""
        if self.min_pixels is not None:
            return f"more than {self.min_pixels} pixels of {what}"
        return f"{what} on more than {100 * self.min_pixels_ratio:.4g} % of its pixels"

    def rng(self, index: int) -> np.random.Generator:
        """The random stream of draw ``index`` (the sampler takes its first two numbers)."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return np.random.default_rng([_STREAM, self.seed, int(index)])

    def sample(self, index: int) -> tuple[int, int]:
        """``(class index, image index)`` of draw ``index``."""
        rng = self.rng(index)
        class_index = int(self.classes[rng.choice(self.classes.size, p=self.probabilities)])
        candidates = self.images_with_class[class_index]
        return class_index, int(candidates[rng.integers(candidates.size)])


def pixels_of_class(label: Any, class_index: int) -> int:
    """Pixels of ``class_index`` in a label map (numpy array or tensor)."""
    if isinstance(label, torch.Tensor):
        return int((label == class_index).sum().item())
    return int(np.count_nonzero(np.asarray(label) == class_index))


def crop_threshold(crop_pixels: int, min_pixels: int | None = DAFORMER_MIN_PIXELS,
                   min_crop_ratio: float | None = 0.5, min_crop_pixels_ratio: float | None = None) -> float | None:
    """The pixels of the class a crop of ``crop_pixels`` pixels must hold *more than*; None: no check.

    ``min_crop_pixels_ratio`` (when given): that share of the crop's pixels; else DAFormer's
    ``min_pixels * min_crop_ratio``. A ratio ``<= 0`` (or None) turns the check off, as DAFormer
    skips the loop for ``min_crop_ratio <= 0``.
    """
    if min_crop_pixels_ratio is not None:
        return None if min_crop_pixels_ratio <= 0 else float(min_crop_pixels_ratio) * int(crop_pixels)
    if min_crop_ratio is None or min_crop_ratio <= 0:
        return None
    if min_pixels is None:
        raise ValueError("min_crop_ratio multiplies min_pixels: give min_pixels, or min_crop_pixels_ratio instead")
    return float(min_pixels) * float(min_crop_ratio)


def _label_pixels(label: Any) -> int:
    return int(label.numel()) if isinstance(label, torch.Tensor) else int(np.asarray(label).size)


def retry_until_class(draw: Callable[[], tuple[Any, Any]], class_index: int,
                      min_pixels: int | None = DAFORMER_MIN_PIXELS, min_crop_ratio: float | None = 0.5,
                      retries: int = 10, min_crop_pixels_ratio: float | None = None) -> tuple[Any, Any]:
    """Call ``draw() -> (image, label)`` until the label holds more than :func:`crop_threshold` pixels
    of ``class_index`` (``min_pixels * min_crop_ratio``, or ``min_crop_pixels_ratio`` x the label's
    pixels when that is given), at most ``1 + retries`` times; the last draw is returned in any case.

    With no threshold (a ratio ``<= 0``) the first draw is returned unchecked (DAFormer skips the loop).
    """
    def threshold(label: Any) -> float | None:
        return crop_threshold(_label_pixels(label), min_pixels, min_crop_ratio, min_crop_pixels_ratio)

    sample = draw()
    if threshold(sample[1]) is None:
        return sample
    for _ in range(retries):
        if pixels_of_class(sample[1], class_index) > threshold(sample[1]):
            break
        sample = draw()
    return sample


def crop_with_class(image: np.ndarray, label: np.ndarray, crop_size: tuple[int, int], class_index: int,
                    rng: np.random.Generator, min_pixels: int | None = DAFORMER_MIN_PIXELS,
                    min_crop_ratio: float | None = 0.5, retries: int = 10,
                    min_crop_pixels_ratio: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop_size = (h, w)`` window of ``image`` ``(H, W, ...)`` and ``label`` ``(H, W)``,
    re-drawn as in :func:`retry_until_class`; window corners come from ``rng``."""
    crop_h, crop_w = (int(v) for v in crop_size)
    height, width = label.shape[:2]
    if image.shape[:2] != (height, width):
        raise ValueError(f"image {image.shape[:2]} and label {label.shape[:2]} differ in size")
    if crop_h > height or crop_w > width or crop_h < 1 or crop_w < 1:
        raise ValueError(f"crop_size {(crop_h, crop_w)} does not fit a {height} x {width} image")

    def draw() -> tuple[np.ndarray, np.ndarray]:
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        return image[top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]

    return retry_until_class(draw, class_index, min_pixels, min_crop_ratio, retries, min_crop_pixels_ratio)


class RareClassDataset:
    """A training dataset whose draws follow Rare Class Sampling.

    Addressed like :class:`~plca.data.datasets.SegmentationDataset` by the training stream
    (``set_epoch`` then ``fetch(index)``), but draw ``(epoch, index)`` becomes the draw number
    ``epoch * len + index`` of ``sampler``, which picks a class and an image holding it; the
    image's random transform is then re-drawn (:func:`retry_until_class`) until the crop, as
    the transform rescaled and cropped it, holds enough of the class: more than
    ``sampler.min_pixels * min_crop_ratio`` pixels, or, with ``min_crop_pixels_ratio``, more than
    that share of the crop's pixels. Everything depends only on (seed, epoch, index): workers and
    resumed runs see the same samples. A sample that fails to load behaves as in the wrapped dataset
    (``on_error``).
    """

    def __init__(self, dataset, sampler: RareClassSampler, min_crop_ratio: float | None = 0.5, retries: int = 10,
                 min_crop_pixels_ratio: float | None = None) -> None:
        if dataset.transform is None:
            raise ValueError("rare class sampling needs a training transform (random crops to re-draw)")
        crop_threshold(1, sampler.min_pixels, min_crop_ratio, min_crop_pixels_ratio)  # refuses what cannot work
        self.dataset = dataset
        self.sampler = sampler
        self.min_crop_ratio = None if min_crop_ratio is None else float(min_crop_ratio)
        self.min_crop_pixels_ratio = None if min_crop_pixels_ratio is None else float(min_crop_pixels_ratio)
        self.retries = int(retries)
        self.epoch = 0
        self.description = f"{dataset.description} (rare class sampling)"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        return self.fetch(index)[0]

    def fetch(self, index: int, warn: bool = False) -> tuple[dict, list[str]]:
        draw = self.epoch * len(self.dataset) + int(index)
        class_index, image_index = self.sampler.sample(draw)
        try:
            image, label = self.dataset.load_pair(image_index)
        except DatasetError:
            if self.dataset.on_error == "raise":
                raise
            return self.dataset.fetch(image_index, warn)
        rng = self.sampler.rng(draw)
        rng.random(2)  # the sampler's own two numbers
        image_tensor, label_tensor = retry_until_class(lambda: self.dataset.transform(image, label, rng), class_index,
                                                       self.sampler.min_pixels, self.min_crop_ratio, self.retries,
                                                       self.min_crop_pixels_ratio)
        return self.dataset.item(image_index, image_tensor, label_tensor), []


def rare_class_dataset(dataset, options, cache_dir: Path, seed: int) -> RareClassDataset:
    """``dataset`` wrapped in Rare Class Sampling, its class statistics read from / cached to a file.

    ``options``: :class:`plca.config.RareClassSamplingConfig`; the cache is ``options.stats`` or,
    when null, a file in ``cache_dir`` named after the statistics' version, the dataset's samples
    and classes (a cache of an older version is not read, but computed again under a new name).
    A statistics file without image sizes (version 1) serves absolute thresholds only; with
    ``min_pixels_ratio`` it is a :class:`DatasetError` naming the file.
    """
    import hashlib

    names = [sample.name for sample in dataset.samples]
    if options.stats:
        path = Path(options.stats)
    else:
        key = hashlib.sha1(json.dumps([_VERSION, dataset.description, list(dataset.classes), names])
                           .encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"class_statistics_{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    stats = cached_class_statistics(path, dataset.classes, names,
                                    lambda: (dataset.load_pair(i)[1] for i in range(len(dataset))))
    if options.min_pixels_ratio is not None and stats.sizes is None:
        raise DatasetError(f"{path}: these class statistics store no image sizes (written by an older plca), which "
                           f"data.rare_class_sampling.min_pixels_ratio needs; write them again with `plca prepare "
                           f"FORMAT ROOT --split SPLIT --rcs-stats {path}` (or delete the file: the run then computes "
                           f"them)")
    sampler = RareClassSampler(stats, options.temperature, options.min_pixels, seed,
                               min_pixels_ratio=options.min_pixels_ratio)
    if sampler.dropped_classes:
        log.warning("rare class sampling never draws %s: no source image holds %s",
                    ", ".join(stats.classes[c] for c in sampler.dropped_classes), sampler.describe_threshold())
    return RareClassDataset(dataset, sampler, options.min_crop_ratio, options.retries,
                            min_crop_pixels_ratio=options.min_crop_pixels_ratio)
