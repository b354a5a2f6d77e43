"""Pixel-level cycle association (METHOD.md, "The loss, exactly", steps 1-7) and spatial aggregation.

Public API: :func:`spatial_aggregate`, :func:`associate`, :func:`association_loss` and
:class:`AssociationOutput`. Each takes ``impl``:

- ``"dense"`` (this module): materialises the ``N x M`` similarity and probability
  matrices and follows METHOD.md literally. It is the reference the tests check
  against a nested-loop implementation, and that ``"efficient"`` is checked against.
- ``"efficient"`` (:mod:`plca.losses.association_efficient`, the default): the same
  numbers computed over blocks of rows, memory linear in the pixel count.

Notation: a source map has ``N = Hs * Ws`` pixels, a target map ``M = Ht * Wt``.
Source image ``b`` is paired with target image ``b``; the batch loss is the mean
over the pairs of each pair's loss.

Conventions shared by both implementations:

- a row is standardised with its own mean and unbiased std (both detached), plus
  ``1e-10`` on the std; a row of a single element has std 0 (its softmax is 1);
- ``cos`` normalises vectors with :func:`torch.nn.functional.normalize` (eps 1e-12);
- the per-pixel loss is ``min(-log P_ST(i, j) - log P_TS(j, i'), 100)`` in log space,
  mirroring the clamp of :func:`torch.nn.functional.binary_cross_entropy`;
- under ``torch.autocast`` the matrix products may run in reduced precision, every
  statistic (std, softmax, logsumexp) and the loss are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("cos", "kl")
IMPLS = ("dense", "efficient")
STD_EPS = 1e-10  # added to a row's std before dividing
LOG_EPS = 1e-10  # inside log(p + eps) of the KL similarity
LOSS_CLAMP = 100.0  # binary_cross_entropy clamps log at -100
IGNORE_INDEX = 255


@dataclass
class AssociationOutput:
    """Result of :func:`associate`.

    ``loss``: scalar, differentiable. The others are detached scalars over the whole batch:
    ``positive_ratio`` = positives / valid (non-ignored) source pixels (0 without valid pixels);
    ``cover_ratio`` = fraction of target pixels that are ``j(i)`` of some valid source pixel;
    ``target_accuracy`` (only when target labels are given) = among valid source pixels whose
    ``j(i)`` has a non-ignored target label, the fraction with ``label(j(i)) == label(i)``
    (0 when there is none). Diagnostics only; never part of the loss.
    """

    loss: Tensor
    positive_ratio: Tensor
    cover_ratio: Tensor
    target_accuracy: Tensor | None = None


# --------------------------------------------------------------------------- validation


def check_metric_impl(metric: str, impl: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


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
                 metric: str, impl: str, alpha: float) -> None:
    """Raise ValueError naming the argument and the shapes on any inconsistency."""
    check_metric_impl(metric, impl)
    check_alpha(alpha)
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


def pair_statistics(valid_labels: Tensor, j: Tensor, i_prime: Tensor, source_labels: Tensor, num_targets: int,
                    ignore_index: int, target_labels: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Positive mask and diagnostic counts of one image pair.

    ``valid_labels`` ``(V,)``: labels of the valid source pixels; ``j`` ``(V,)``: their target pixel
    ``j(i)``; ``i_prime`` ``(V,)``: the source pixel ``i'(i)``; ``source_labels`` ``(N,)`` all source
    labels; ``target_labels`` ``(M,)`` or None. Returns ``(positive (V,) bool, counts)``.
    """
    positive = valid_labels == source_labels[i_prime]
    covered = torch.zeros(num_targets, dtype=torch.bool, device=j.device)
    covered[j] = True
    counts = {
        "valid": torch.tensor(float(valid_labels.numel()), device=j.device),
        "positive": positive.sum().float(),
        "covered": covered.sum().float(),
        "targets": torch.tensor(float(num_targets), device=j.device),
    }
    if target_labels is not None:
        hit = target_labels[j]
        labelled = hit != ignore_index
        counts["target_labelled"] = labelled.sum().float()
        counts["target_correct"] = (labelled & (hit == valid_labels)).sum().float()
    return positive, counts


def pair_loss(terms: Tensor, positive: Tensor) -> Tensor:
    """Mean over the positives of ``min(terms, 100)``; 0 (with zero gradient) without positives."""
    clamped = terms.clamp(max=LOSS_CLAMP)
    selected = torch.where(positive, clamped, torch.zeros_like(clamped))
    return selected.sum() / positive.sum().clamp(min=1)


def batch_output(losses: list[Tensor], counts: list[dict[str, Tensor]], with_target: bool) -> AssociationOutput:
    """Average the pair losses and turn the summed counts into ratios."""
    total = {key: torch.stack([c[key] for c in counts]).sum() for key in counts[0]}
    accuracy = None
    if with_target:
        accuracy = (total["target_correct"] / total["target_labelled"].clamp(min=1)).detach()
    return AssociationOutput(
        loss=torch.stack(losses).mean(),
        positive_ratio=(total["positive"] / total["valid"].clamp(min=1)).detach(),
        cover_ratio=(total["covered"] / total["targets"]).detach(),
        target_accuracy=accuracy,
    )


# --------------------------------------------------------------------------- dense reference


def _standardise(s: Tensor) -> Tensor:
    """Rows of ``s`` ``(R, n)`` minus their detached mean, over their detached std + 1e-10."""
    return (s - s.detach().mean(dim=1, keepdim=True)) / (row_std(s) + STD_EPS)


def dense_similarity(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """``s(i, j)`` ``(N, M)`` between the columns of ``a`` ``(C, N)`` and ``b`` ``(C, M)``.

    cos: cosine similarity; kl: ``-KL(a_i || b_j) = sum_c a_ic log(b_jc + eps) - sum_c a_ic log(a_ic + eps)``.
    """
    dtype = stat_dtype(a)
    if metric == "cos":
        return (F.normalize(a, dim=0).t() @ F.normalize(b, dim=0)).to(dtype)
    cross = (a.t() @ torch.log(b + LOG_EPS)).to(dtype)
    entropy = (a * torch.log(a + LOG_EPS)).sum(dim=0).to(dtype)
    return cross - entropy[:, None]


def dense_aggregate_map(x: Tensor, metric: str, alpha: float) -> Tensor:
    """``(1 - alpha) x + alpha A(x)`` for one map ``x`` ``(C, M)`` (METHOD.md step 6)."""
    s = dense_similarity(x, x, metric)
    if metric == "cos":
        s = _standardise(s)
    q = s.softmax(dim=1)  # (M, M), Q(j, k)
    aggregated = x.to(q.dtype) @ q.t()  # A[:, j] = sum_k Q(j, k) x[:, k]
    return ((1 - alpha) * x + alpha * aggregated).to(x.dtype)


def dense_spatial_aggregate(x: Tensor, metric: str, alpha: float) -> Tensor:
    """Dense :func:`spatial_aggregate` of ``x`` ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    return torch.stack([dense_aggregate_map(x[i].reshape(c, h * w), metric, alpha).reshape(c, h, w)
                        for i in range(b)])


def dense_pair(source: Tensor, target: Tensor, labels: Tensor, metric: str, ignore_index: int,
               target_labels: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and counts of one pair: ``source`` ``(C, N)``, ``target`` ``(C, M)`` (already aggregated),
    ``labels`` ``(N,)``, ``target_labels`` ``(M,)`` or None."""
    s_st = dense_similarity(source, target, metric)  # (N, M)
    s_ts = s_st.t() if metric == "cos" else dense_similarity(target, source, metric)  # (M, N)
    z_st, z_ts = _standardise(s_st), _standardise(s_ts)
    log_p_st, log_p_ts = z_st.log_softmax(dim=1), z_ts.log_softmax(dim=1)
    with torch.no_grad():
        j_all = z_st.softmax(dim=1).argmax(dim=1)  # (N,) j(i) = argmax_j P_ST(i, j)
        back = z_ts.softmax(dim=1).argmax(dim=1)  # (M,) argmax_i' P_TS(j, i')
    valid = (labels != ignore_index).nonzero().squeeze(1)
    j = j_all[valid]
    i_prime = back[j]
    positive, counts = pair_statistics(labels[valid], j, i_prime, labels, target.shape[1], ignore_index,
                                       target_labels)
    terms = -log_p_st[valid, j] - log_p_ts[j, i_prime]
    return pair_loss(terms, positive), counts


def dense_associate(source: Tensor, target: Tensor, source_labels: Tensor, metric: str, aggregate: bool,
                    alpha: float, ignore_index: int, target_labels: Tensor | None) -> AssociationOutput:
    """Dense :func:`associate` (inputs already validated)."""
    b, c = source.shape[:2]
    losses, counts = [], []
    for k in range(b):
        tgt = target[k].reshape(c, -1)
        if aggregate:
            tgt = dense_aggregate_map(tgt, metric, alpha)
        loss, count = dense_pair(source[k].reshape(c, -1), tgt, source_labels[k].reshape(-1), metric,
                                 ignore_index, None if target_labels is None else target_labels[k].reshape(-1))
        losses.append(loss)
        counts.append(count)
    return batch_output(losses, counts, target_labels is not None)


# --------------------------------------------------------------------------- public API


def spatial_aggregate(x: Tensor, metric: str, alpha: float = 0.5, impl: str = "efficient",
                      block_size: int | None = None) -> Tensor:
    """Spatial aggregation (METHOD.md step 6): ``(1 - alpha) * x + alpha * A(x)``.

    ``x`` ``(B, C, H, W)`` -> ``(B, C, H, W)``. ``A(x)[:, j] = sum_k Q(j, k) x[:, k]`` with ``Q`` the
    row-softmax of the map's self-similarity: for ``"cos"`` (x are features) the rows of the cosine
    similarity are standardised first (detached mean and unbiased std + 1e-10); for ``"kl"`` (x are
    class probabilities ``(B, K, H, W)``) ``Q`` is a plain softmax of ``-KL(p_j || p_k)``.
    Gradients flow through ``Q`` (both sides) and ``x``. ``block_size`` (rows per block) only
    affects ``impl="efficient"``.
    """
    check_metric_impl(metric, impl)
    check_alpha(alpha)
    _check_map("x", x)
    if impl == "dense":
        return dense_spatial_aggregate(x, metric, alpha)
    from plca.losses.association_efficient import efficient_spatial_aggregate

    return efficient_spatial_aggregate(x, metric, alpha, block_size)


def associate(source: Tensor, target: Tensor, source_labels: Tensor, metric: str = "cos", aggregate: bool = True,
              alpha: float = 0.5, ignore_index: int = IGNORE_INDEX, impl: str = "efficient",
              target_labels: Tensor | None = None, block_size: int | None = None) -> AssociationOutput:
    """Pixel-level cycle association loss of source image ``b`` with target image ``b``, plus diagnostics.

    ``source`` ``(B, C, Hs, Ws)``, ``target`` ``(B, C, Ht, Wt)``: features for ``metric="cos"``,
    softmax probabilities for ``"kl"``. ``source_labels`` ``(B, Hs, Ws)`` integer, at the map's size;
    ``target_labels`` ``(B, Ht, Wt)`` only for the diagnostic ``target_accuracy``. With ``aggregate``
    the target map is spatially aggregated first (same metric). The loss is the mean over the pairs
    of ``mean_{positive i} min(-log P_ST(i, j(i)) - log P_TS(j(i), i'(i)), 100)`` (0 for a pair
    without positives). ``block_size`` (rows per block) only affects ``impl="efficient"``.
    """
    check_inputs(source, target, source_labels, target_labels, metric, impl, alpha)
    if impl == "dense":
        return dense_associate(source, target, source_labels, metric, aggregate, alpha, ignore_index, target_labels)
    from plca.losses.association_efficient import efficient_associate

    return efficient_associate(source, target, source_labels, metric, aggregate, alpha, ignore_index,
                               target_labels, block_size)


def association_loss(source: Tensor, target: Tensor, source_labels: Tensor, metric: str = "cos",
                     aggregate: bool = True, alpha: float = 0.5, ignore_index: int = IGNORE_INDEX,
                     impl: str = "efficient", block_size: int | None = None) -> Tensor:
    """Scalar loss of :func:`associate` (same arguments, no diagnostics)."""
    return associate(source, target, source_labels, metric, aggregate, alpha, ignore_index, impl,
                     block_size=block_size).loss
