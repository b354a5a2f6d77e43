"""Test-time spatial aggregation with a bound on its cost: exact up to ``max_pixels`` feature pixels,
per window above.

PLCA's test-time aggregation (:func:`plca.losses.association.spatial_aggregate`, features with
``cos`` then probabilities with ``kl``) relates every feature pixel to every other one: its time is
quadratic in the ``N = h * w`` pixels of the feature map (memory is already linear: the similarity
rows are computed a block at a time and never held whole). A 4000 x 3000 photo at output stride 8
has N = 187,500 and would need 35 billion similarity pairs per aggregation.

The bound (``eval.aggregation_max_pixels``, default :data:`DEFAULT_MAX_PIXELS` = 32,768, which keeps
a 1024 x 2048 Cityscapes image at stride 8, 128 x 256, exact): a map of at most that many pixels is
aggregated exactly, over the whole map, by the very same call as before (bit for bit). A larger map
is aggregated per **window** of at most ``max_pixels`` pixels (about square, e.g. 181 x 181): the
windows advance by 2/3 of their side (the last one ends on the border), and each pixel takes its
value from the window whose centre is nearest to it, so it always sees at least 1/6 of a window of
context on each side (except at the map's border). Why windows rather than aggregation at a capped
feature resolution: a window is the exact operator on a crop of the image, the one that ``plca predict
--sliding-window`` and the reference's own 730 x 1460 evaluation (92 x 183 = 16,836 pixels) already
apply, and it keeps every pixel (a thin pole is not averaged away before the similarities are taken);
a whole-map softmax over 187,500 pixels at a coarser resolution would be an approximation of another
operator. What windows give up: similar pixels farther apart than a window no longer vote for each
other.

Cost above the bound: per axis at most ``1.5 L / win + 1/2`` windows, so at most ``4 N x max_pixels``
similarity pairs per aggregation (``N^2`` for the exact one): time linear in the image area, memory
that of one window plus the map. Just above the bound the overlapping windows cost up to twice what
the exact aggregation would; from about 1.5 times the bound on they cost less, and ever less.
Before a map over the bound (or one over the default bound when
``max_pixels`` is None, i.e. exact at any size) is aggregated, :func:`announce` prints the plan and
an estimate of the seconds, from a rate measured here on a small map of the same channels
(:func:`measured_rate`); a tqdm bar counts the windows. Exact aggregation of a map whose estimated
memory exceeds what the device has free is refused (:class:`AggregationBudgetError`) with the
setting that bounds it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from plca.losses.association import spatial_aggregate
from plca.losses.association_efficient import DEFAULT_BLOCK_ELEMENTS

#: Feature pixels aggregated exactly by default (``eval.aggregation_max_pixels``): 128 x 256.
DEFAULT_MAX_PIXELS = 32768
#: Pair-channels (``pixels^2 x channels``) :func:`measured_rate` times: about half a second on a CPU
#: core, enough that fixed per-call costs do not dominate (a 40 x 40 map underestimates the rate 2-10x).
_CALIBRATION_WORK = 2e9
_RATES: dict[tuple, float] = {}  # measured rates, per (device, dtype, metric, channels)
_ANNOUNCED: set[tuple] = set()  # plans already announced in this process (evaluate: once per image size)


class AggregationBudgetError(ValueError):
    """Exact test-time aggregation of a map that would not fit in the memory the device has free."""


@dataclass(frozen=True)
class Window:
    """A window of the feature map (``top, left, height, width``) and the part of the output it gives,
    its core ``rows = (top0, top1)``, ``cols = (left0, left1)`` (half-open, map coordinates)."""

    top: int
    left: int
    height: int
    width: int
    rows: tuple[int, int]
    cols: tuple[int, int]


@dataclass(frozen=True)
class AggregationPlan:
    """How a ``height x width`` map is aggregated: one window over the whole map (exact) or several."""

    height: int
    width: int
    max_pixels: int | None
    windows: tuple[Window, ...]

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def exact(self) -> bool:
        return len(self.windows) == 1

    @property
    def pairs(self) -> int:
        """Similarity pairs computed per aggregation (``sum`` over the windows of their pixels squared)."""
        return sum((w.height * w.width) ** 2 for w in self.windows)


def _axis(length: int, window: int) -> list[tuple[int, int, int]]:
    """``(start, core_start, core_end)`` of the windows of ``window`` pixels covering ``[0, length)``:
    starts every ``ceil(2 window / 3)``, the last ending at ``length``; each coordinate's core is the
    window whose centre is nearest (ties to the earlier window)."""
    stride = max(1, -(-2 * window // 3))
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] != max(length - window, 0):
        starts.append(length - window)
    # the midpoint between the centres s_i + window / 2 and s_{i+1} + window / 2
    bounds = [0] + [(a + b + window + 1) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return [(start, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def window_shape(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The window ``(h, w)`` of at most ``max_pixels`` pixels: square where the map allows, the full
    height or width of a map narrower than that square (the other side as long as the bound allows)."""
    win_h = min(height, max(1, math.isqrt(max_pixels)))
    win_w = min(width, max(1, max_pixels // win_h))
    return min(height, max(1, max_pixels // win_w)), win_w


def plan_aggregation(height: int, width: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> AggregationPlan:
    """The :class:`AggregationPlan` of a ``height x width`` map under the bound (None: exact at any size)."""
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of feature pixels or None, got {max_pixels}")
    if max_pixels is None or height * width <= max_pixels:
        return AggregationPlan(height, width, max_pixels, (Window(0, 0, height, width, (0, height), (0, width)),))
    win_h, win_w = window_shape(height, width, max_pixels)
    windows = tuple(Window(top, left, win_h, win_w, (r0, r1), (c0, c1))
                    for top, r0, r1 in _axis(height, win_h) for left, c0, c1 in _axis(width, win_w))
    return AggregationPlan(height, width, max_pixels, windows)


def bounded_spatial_aggregate(x: Tensor, metric: str, alpha: float = 0.5,
                              max_pixels: int | None = DEFAULT_MAX_PIXELS, progress: bool = False) -> Tensor:
    """:func:`plca.losses.association.spatial_aggregate` of ``x`` ``(B, C, h, w)`` -> ``(B, C, h, w)``,
    exactly (the same call) when ``h * w <= max_pixels`` or ``max_pixels`` is None, else per window of
    :func:`plan_aggregation` (module docstring); ``progress``: a tqdm bar over the windows."""
    plan = plan_aggregation(x.shape[-2], x.shape[-1], max_pixels)
    if plan.exact:
        return spatial_aggregate(x, metric, alpha)
    out = torch.empty_like(x)
    windows = plan.windows
    if progress:  # tqdm only when asked: plca.segment runs on the core install, which has none
        from tqdm import tqdm

        windows = tqdm(windows, desc=f"aggregate {metric} (windows)", leave=False, dynamic_ncols=True)
    for window in windows:
        crop = x[:, :, window.top:window.top + window.height, window.left:window.left + window.width]
        aggregated = spatial_aggregate(crop, metric, alpha)
        (r0, r1), (c0, c1) = window.rows, window.cols
        out[:, :, r0:r1, c0:c1] = aggregated[:, :, r0 - window.top:r1 - window.top, c0 - window.left:c1 - window.left]
    return out


# --------------------------------------------------------------------------- cost: estimate and budget


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_side(channels: int) -> int:
    """Side of the square map :func:`measured_rate` times: about :data:`_CALIBRATION_WORK` pair-channels."""
    return min(128, max(24, round((_CALIBRATION_WORK / max(channels, 1)) ** 0.25)))


def measured_rate(like: Tensor, metric: str) -> float:
    """Pair-channels per second (``pixels^2 x channels`` / s) of :func:`spatial_aggregate` on this device,
    timed once per process on a square map (:func:`calibration_side`) of ``like``'s channels, dtype and
    device, after an untimed run on a small one (one-off costs: kernels, allocator)."""
    key = (str(like.device), like.dtype, metric, like.shape[1])
    if key not in _RATES:
        side = calibration_side(like.shape[1])
        generator = torch.Generator().manual_seed(0)
        sample = torch.rand(1, like.shape[1], side, side, generator=generator)
        sample = (sample.softmax(dim=1) if metric == "kl" else sample).to(like.device, like.dtype)
        spatial_aggregate(sample[:, :, :16, :16], metric)
        _synchronize(like.device)
        start = time.perf_counter()
        spatial_aggregate(sample, metric)
        _synchronize(like.device)
        _RATES[key] = side ** 4 * like.shape[1] / max(time.perf_counter() - start, 1e-9)
    return _RATES[key]


def estimated_seconds(plan: AggregationPlan, like: Tensor, metric: str) -> float:
    """Seconds to aggregate ``like`` (its channels) under ``plan``, at the :func:`measured_rate`."""
    return plan.pairs * like.shape[1] / measured_rate(like, metric)


def exact_memory_bytes(pixels: int, channels: int, element_size: int = 4) -> int:
    """Memory of one exact aggregation of a map: a few ``pixels x channels`` copies (normalised rows,
    values, output) and the blocks of similarity rows (:data:`DEFAULT_BLOCK_ELEMENTS` each, a few)."""
    return element_size * (4 * pixels * channels + 3 * max(DEFAULT_BLOCK_ELEMENTS, pixels * 16))


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory the device has free, None if unknown. CUDA: ``mem_get_info``; CPU: Linux's MemAvailable
    (free pages plus the page cache the kernel can drop), else the free physical pages."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_budget(plan: AggregationPlan, like: Tensor, free: int | None) -> None:
    """Raise :class:`AggregationBudgetError` when an exact plan over the default bound needs more than ``free``
    bytes."""
    if not plan.exact or plan.pixels <= DEFAULT_MAX_PIXELS or free is None:
        return
    need = exact_memory_bytes(plan.pixels, like.shape[1], like.element_size())
    if need > free:
        raise AggregationBudgetError(
            f"exact test-time aggregation of a {plan.height} x {plan.width} feature map ({plan.pixels:,} pixels, "
            f"{like.shape[1]} channels) needs about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
            f"free on {like.device}: set eval.aggregation_max_pixels={DEFAULT_MAX_PIXELS} (windows of at most that "
            f"many feature pixels, cost linear in the image area) or turn the aggregation off (--no-aggregate, "
            f"eval.test_time_aggregation=false)")


def announce(plan: AggregationPlan, features: Tensor, classes: int,
             write: Callable[[str], None] | None = None) -> str | None:
    """Print (once per plan and channels in this process) the plan and the estimated seconds of the
    test-time aggregation of ``features`` ``(B, E, h, w)`` then of ``classes`` probabilities; None when
    the plan is exact within the default bound (nothing to say), and on every process but the first
    under DDP. ``write``: None = ``tqdm.write`` (``print`` where tqdm is not installed)."""
    if plan.exact and plan.pixels <= DEFAULT_MAX_PIXELS:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return None
    key = (plan, features.shape[1], classes, str(features.device))
    if key in _ANNOUNCED:
        return None
    _ANNOUNCED.add(key)
    probs = features.new_empty((1, classes, 1, 1))
    batch = features.shape[0]
    seconds = batch * (estimated_seconds(plan, features, "cos") + estimated_seconds(plan, probs, "kl"))
    size = f"{plan.height} x {plan.width} feature map ({plan.pixels:,} pixels)"
    if plan.exact:
        how = f"exact over the whole {size}, eval.aggregation_max_pixels=null (quadratic in the pixels)"
    else:
        window = plan.windows[0]
        how = (f"{size} > eval.aggregation_max_pixels={plan.max_pixels:,}: {len(plan.windows)} windows of "
               f"{window.height} x {window.width}")
    line = (f"test-time aggregation: {how}; about {seconds:,.1f} s per {batch} image(s) at the rate measured "
            f"on {features.device} ({features.shape[1]} feature channels, {classes} classes)")
    (write or _write_line)(line)
    return line


def _write_line(line: str) -> None:
    """``tqdm.write`` (which keeps open progress bars intact), or ``print`` on an install without tqdm."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        print(line)
        return
    tqdm.write(line)


def aggregated_probabilities(model, images: Tensor, alpha: float = 0.5, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                             progress: bool = False) -> Tensor:
    """Class probabilities ``(B, K, h, w)`` of ``model`` (a segmentor: ``extract_features``, ``classify``)
    for images ``(B, 3, H, W)`` with the test-time aggregation (features with ``cos``, softmax, then
    probabilities with ``kl``), each bounded by ``max_pixels`` (:func:`bounded_spatial_aggregate`)."""
    features = model.extract_features(images)
    plan = plan_aggregation(features.shape[-2], features.shape[-1], max_pixels)
    check_budget(plan, features, free_memory_bytes(features.device))
    announce(plan, features, int(getattr(model, "num_classes", 19)))
    features = bounded_spatial_aggregate(features, "cos", alpha, max_pixels, progress)
    probs = model.classify(features).float().softmax(dim=1)
    return bounded_spatial_aggregate(probs, "kl", alpha, max_pixels, progress)
