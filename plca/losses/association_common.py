"""Shared pieces of the two association implementations: constants, the output, input checks, statistics.

See :mod:`plca.losses.association` for the formulas and the conventions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

METRICS = ("cos", "kl")
IMPLS = ("dense", "efficient")
REDUCTIONS = ("pooled", "pairs")
SIMILARITY_DTYPES = ("float32", "autocast", "bfloat16")
STD_EPS = 1e-10  # added to a row's std before dividing
LOG_EPS = 1e-10  # inside log(p + eps) of the KL similarity
LOSS_CLAMP = 100.0  # binary_cross_entropy clamps log at -100


@dataclass
class AssociationOutput:
    """Result of :func:`associate`.

    ``loss``: scalar, differentiable (see ``reduction`` in :func:`associate`). The others are detached,
    over the whole batch: ``positive_ratio`` = positives / valid (non-ignored) source pixels (0 without
    valid pixels); ``cover_ratio`` = fraction of target pixels that are ``j(i)`` of some valid source
    pixel; ``target_accuracy`` (only when target labels are given) = among valid source pixels whose
    ``j(i)`` has a non-ignored target label, the fraction with ``label(j(i)) == label(i)`` (0 when there
    is none); ``j`` and ``i_prime``: ``(B, N)`` int64, the cycle of each source pixel ``i`` (row-major
    index into its pair's target map, resp. source map), -1 at ignored source pixels.
    Diagnostics only; never part of the loss.
    """

    loss: Tensor
    positive_ratio: Tensor
    cover_ratio: Tensor
    target_accuracy: Tensor | None = None
    j: Tensor | None = None
    i_prime: Tensor | None = None


# --------------------------------------------------------------------------- validation


def check_metric_impl(metric: str, impl: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_similarity_dtype(similarity_dtype: str) -> None:
    if similarity_dtype not in SIMILARITY_DTYPES:
        raise ValueError(f"similarity_dtype must be one of {SIMILARITY_DTYPES}, got {similarity_dtype!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_map(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_labels(name: str, labels: Tensor, feature_name: str, features: Tensor) -> None:
    expected = (features.shape[0], *features.shape[2:])
    if not isinstance(labels, Tensor) or tuple(labels.shape) != expected:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name} must have shape (B, H, W) = {expected} to match {feature_name} "
                         f"{tuple(features.shape)}, got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")


def check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def check_inputs(source: Tensor, target: Tensor, source_labels: Tensor, target_labels: Tensor | None,
                 metric: str, impl: str, alpha: float, reduction: str = "pooled",
                 similarity_dtype: str = "float32") -> None:
    """Raise ValueError naming the argument and the shapes on any inconsistency."""
    check_metric_impl(metric, impl)
    check_alpha(alpha)
    check_reduction(reduction)
    check_similarity_dtype(similarity_dtype)
    _check_map("source", source)
    _check_map("target", target)
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"source and target must have the same batch size, got source {tuple(source.shape)} "
                         f"and target {tuple(target.shape)}")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target must have the same channel count, got source "
                         f"{tuple(source.shape)} and target {tuple(target.shape)}")
    if source.device != target.device:
        raise ValueError(f"source and target must be on the same device, got {source.device} and {target.device}")
    _check_labels("source_labels", source_labels, "source", source)
    if target_labels is not None:
        _check_labels("target_labels", target_labels, "target", target)


# --------------------------------------------------------------------------- shared helpers


def row_std(s: Tensor) -> Tensor:
    """Detached unbiased std of each row of ``s`` ``(R, n)`` -> ``(R, 1)``; 0 when ``n == 1``."""
    s = s.detach()
    if s.shape[1] < 2:
        return s.new_zeros(s.shape[0], 1)
    return s.std(dim=1, keepdim=True)


def stat_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (also for bf16/fp16 inputs and under autocast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype on x's device when autocast is on there (float64 stays float64), else x's dtype."""
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if enabled and x.dtype != torch.float64:
        try:
            return torch.get_autocast_dtype(device_type)
        except AttributeError:  # torch < 2.4
            return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    return x.dtype


def similarity_matmul_dtype(x: Tensor, similarity_dtype: str) -> torch.dtype:
    """dtype of the matrix products for inputs like ``x`` (see the module docstring): ``"float32"``:
    float32 (float64 for float64 inputs), whatever autocast says; ``"autocast"``: :func:`autocast_dtype`;
    ``"bfloat16"``: bfloat16. Call it where the caller's autocast state is still in effect."""
    check_similarity_dtype(similarity_dtype)
    if similarity_dtype == "float32":
        return stat_dtype(x)
    if similarity_dtype == "autocast":
        return autocast_dtype(x)
    return torch.bfloat16


def no_autocast(x: Tensor):
    """Autocast off on x's device (the products cast explicitly); a no-op elsewhere."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def pair_statistics(valid: Tensor, j: Tensor, i_prime: Tensor, source_labels: Tensor, num_targets: int,
                    ignore_index: int, target_labels: Tensor | None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Positive mask, diagnostic counts and cycle indices of one image pair.

    ``valid`` ``(V,)``: indices of the valid source pixels; ``j`` ``(V,)``: their target pixel ``j(i)``;
    ``i_prime`` ``(V,)``: the source pixel ``i'(i)``; ``source_labels`` ``(N,)`` all source labels;
    ``target_labels`` ``(M,)`` or None. Returns ``(positive (V,) bool, counts, cycle (2, N))`` with
    ``cycle[0] = j(i)``, ``cycle[1] = i'(i)`` and -1 at ignored source pixels.
    """
    valid_labels = source_labels[valid]
    positive = valid_labels == source_labels[i_prime]
    covered = torch.zeros(num_targets, dtype=torch.bool, device=j.device)
    covered[j] = True
    counts = {
        "valid": torch.tensor(float(valid.numel()), device=j.device),
        "positive": positive.sum().float(),
        "covered": covered.sum().float(),
        "targets": torch.tensor(float(num_targets), device=j.device),
    }
    if target_labels is not None:
        hit = target_labels[j]
        labelled = hit != ignore_index
        counts["target_labelled"] = labelled.sum().float()
        counts["target_correct"] = (labelled & (hit == valid_labels)).sum().float()
    cycle = torch.full((2, source_labels.numel()), -1, dtype=torch.long, device=j.device)
    cycle[0, valid] = j
    cycle[1, valid] = i_prime
    return positive, counts, cycle


def pair_loss_sum(terms: Tensor, positive: Tensor) -> Tensor:
    """Sum over the positives of ``min(terms, 100)``; 0 (with zero gradient) without positives."""
    clamped = terms.clamp(max=LOSS_CLAMP)
    return torch.where(positive, clamped, torch.zeros_like(clamped)).sum()


def batch_output(loss_sums: list[Tensor], counts: list[dict[str, Tensor]], cycles: list[Tensor],
                 with_target: bool, reduction: str) -> AssociationOutput:
    """Reduce the pairs' loss sums (``"pooled"``: their total over the batch's positive count;
    ``"pairs"``: the mean of each pair's sum over its own positive count) and turn the summed counts
    into ratios. A batch (``"pooled"``) or pair (``"pairs"``) without positives contributes 0."""
    total = {key: torch.stack([c[key] for c in counts]).sum() for key in counts[0]}
    sums = torch.stack(loss_sums)
    positives = torch.stack([c["positive"] for c in counts]).to(sums.dtype)
    if reduction == "pooled":
        loss = sums.sum() / positives.sum().clamp(min=1)
    else:
        loss = (sums / positives.clamp(min=1)).mean()
    accuracy = None
    if with_target:
        accuracy = (total["target_correct"] / total["target_labelled"].clamp(min=1)).detach()
    cycle = torch.stack(cycles)  # (B, 2, N)
    return AssociationOutput(
        loss=loss,
        positive_ratio=(total["positive"] / total["valid"].clamp(min=1)).detach(),
        cover_ratio=(total["covered"] / total["targets"]).detach(),
        target_accuracy=accuracy,
        j=cycle[:, 0],
        i_prime=cycle[:, 1],
    )
