"""Pixel-level cycle association (docs/method.md, "The association loss", steps 1-6) and spatial aggregation.

Public API: :func:`spatial_aggregate`, :func:`associate`, :func:`association_loss` and
:class:`AssociationOutput`. Each takes ``impl``:

- ``"dense"`` (this module): materialises the ``N x M`` similarity and probability
  matrices and follows docs/method.md literally. It is the reference the tests check
  against a nested-loop implementation, and that ``"efficient"`` is checked against.
- ``"efficient"`` (:mod:`plca.losses.association_efficient`, the default): the same
  numbers computed over blocks of rows, memory linear in the pixel count.

Notation: a source map has ``N = Hs * Ws`` pixels, a target map ``M = Ht * Wt``.
Source image ``b`` is paired with target image ``b``. Over a batch the loss is, by default
(``reduction="pooled"``), the mean over the positives of *all* pairs pooled together, as the
reference computes it (one binary cross-entropy over the masked products of the whole batch):
a pair with many positives weighs more than one with few. ``reduction="pairs"`` is the mean
over the pairs of each pair's own mean (a pair without positives counts as 0).

Conventions shared by both implementations:

- a row is standardised with its own mean and unbiased std (both detached), plus
  ``1e-10`` on the std; a row of a single element has std 0 (its softmax is 1);
- ``cos`` normalises vectors with :func:`torch.nn.functional.normalize` (eps 1e-12);
- the per-pixel loss is ``min(-log P_ST(i, j) - log P_TS(j, i'), 100)`` in log space,
  mirroring the clamp of :func:`torch.nn.functional.binary_cross_entropy`;
- precision (``similarity_dtype``): by default (``"float32"``) every matrix product, those of
  the similarities and those of the spatial aggregation, runs in float32 (float64 for float64
  inputs) even under ``torch.autocast``: inputs are cast up and the products run with autocast
  disabled, because bfloat16 similarities flip the top-1 association ``j(i)`` / ``i'(i)`` of a
  noticeable share of the pixels. On CUDA a float32 matmul may still use TF32 when the user enables
  it globally (``torch.backends.cuda.matmul.allow_tf32`` or
  ``torch.set_float32_matmul_precision("high")``). ``"autocast"`` lets the products follow the
  surrounding autocast (its dtype when it is on, else the inputs' dtype) and ``"bfloat16"`` forces
  bfloat16 products, both for speed. Every statistic (std, softmax, logsumexp) and the loss are
  float32 (float64 for float64 inputs) in all cases. Call ``backward`` after the autocast region,
  as PyTorch advises: inside it the dense implementation's backward products would follow autocast
  (the efficient one's explicit backward does not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from plca.data.labels import IGNORE_INDEX

from plca.losses.association_common import (  # noqa: F401 - re-exported
    METRICS,
    IMPLS,
    REDUCTIONS,
    SIMILARITY_DTYPES,
    STD_EPS,
    LOG_EPS,
    LOSS_CLAMP,
    AssociationOutput,
    check_metric_impl,
    check_similarity_dtype,
    check_reduction,
    _check_map,
    _check_labels,
    check_alpha,
    check_inputs,
    row_std,
    stat_dtype,
    autocast_dtype,
    similarity_matmul_dtype,
    no_autocast,
    pair_statistics,
    pair_loss_sum,
    batch_output,
)


# --------------------------------------------------------------------------- dense reference


def _standardise(s: Tensor) -> Tensor:
    """Rows of ``s`` ``(R, n)`` minus their detached mean, over their detached std + 1e-10."""
    return (s - s.detach().mean(dim=1, keepdim=True)) / (row_std(s) + STD_EPS)


def dense_similarity(a: Tensor, b: Tensor, metric: str, mm_dtype: torch.dtype | None = None) -> Tensor:
    """``s(i, j)`` ``(N, M)`` between the columns of ``a`` ``(C, N)`` and ``b`` ``(C, M)``, in the
    statistics dtype; the product in ``mm_dtype`` (None: the statistics dtype).

    cos: cosine similarity; kl: ``-KL(a_i || b_j) = sum_c a_ic log(b_jc + eps) - sum_c a_ic log(a_ic + eps)``.
    """
    dtype = stat_dtype(a)
    mm_dtype = mm_dtype or dtype
    a, b = a.to(dtype), b.to(dtype)
    if metric == "cos":
        return (F.normalize(a, dim=0).to(mm_dtype).t() @ F.normalize(b, dim=0).to(mm_dtype)).to(dtype)
    cross = (a.to(mm_dtype).t() @ torch.log(b + LOG_EPS).to(mm_dtype)).to(dtype)
    entropy = (a * torch.log(a + LOG_EPS)).sum(dim=0)
    return cross - entropy[:, None]


def dense_aggregate_map(x: Tensor, metric: str, alpha: float, mm_dtype: torch.dtype | None = None) -> Tensor:
    """``(1 - alpha) x + alpha A(x)`` for one map ``x`` ``(C, M)`` (docs/method.md step 6), in the
    statistics dtype; products in ``mm_dtype`` (None: the statistics dtype)."""
    s = dense_similarity(x, x, metric, mm_dtype)
    if metric == "cos":
        s = _standardise(s)
    q = s.softmax(dim=1)  # (M, M), Q(j, k)
    mm_dtype = mm_dtype or q.dtype
    aggregated = (x.to(mm_dtype) @ q.to(mm_dtype).t()).to(q.dtype)  # A[:, j] = sum_k Q(j, k) x[:, k]
    return (1 - alpha) * x.to(q.dtype) + alpha * aggregated


def dense_spatial_aggregate(x: Tensor, metric: str, alpha: float, similarity_dtype: str = "float32") -> Tensor:
    """Dense :func:`spatial_aggregate` of ``x`` ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    mm_dtype = similarity_matmul_dtype(x, similarity_dtype)
    with no_autocast(x):
        maps = [dense_aggregate_map(x[i].reshape(c, h * w), metric, alpha, mm_dtype).reshape(c, h, w)
                for i in range(b)]
    return torch.stack(maps).to(x.dtype)


def dense_pair(source: Tensor, target: Tensor, labels: Tensor, metric: str, ignore_index: int,
               target_labels: Tensor | None, mm_source: torch.dtype | None = None,
               mm_target: torch.dtype | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Loss sum over the positives, counts and cycle (:func:`pair_statistics`) of one pair: ``source``
    ``(C, N)``, ``target`` ``(C, M)`` (already aggregated), ``labels`` ``(N,)``, ``target_labels`` ``(M,)``
    or None; the way forth's products in ``mm_source``, the way back's in ``mm_target``."""
    s_st = dense_similarity(source, target, metric, mm_source)  # (N, M)
    s_ts = s_st.t() if metric == "cos" else dense_similarity(target, source, metric, mm_target)  # (M, N)
    z_st, z_ts = _standardise(s_st), _standardise(s_ts)
    log_p_st, log_p_ts = z_st.log_softmax(dim=1), z_ts.log_softmax(dim=1)
    with torch.no_grad():
        j_all = z_st.softmax(dim=1).argmax(dim=1)  # (N,) j(i) = argmax_j P_ST(i, j)
        back = z_ts.softmax(dim=1).argmax(dim=1)  # (M,) argmax_i' P_TS(j, i')
    valid = (labels != ignore_index).nonzero().squeeze(1)
    j = j_all[valid]
    i_prime = back[j]
    positive, counts, cycle = pair_statistics(valid, j, i_prime, labels, target.shape[1], ignore_index,
                                              target_labels)
    terms = -log_p_st[valid, j] - log_p_ts[j, i_prime]
    return pair_loss_sum(terms, positive), counts, cycle


def dense_associate(source: Tensor, target: Tensor, source_labels: Tensor, metric: str, aggregate: bool,
                    alpha: float, ignore_index: int, target_labels: Tensor | None, reduction: str = "pooled",
                    similarity_dtype: str = "float32") -> AssociationOutput:
    """Dense :func:`associate` (inputs already validated)."""
    b, c = source.shape[:2]
    # resolved while the caller's autocast state holds; the way back starts from the aggregated map
    mm_source = similarity_matmul_dtype(source, similarity_dtype)
    mm_target = similarity_matmul_dtype(target, similarity_dtype)
    aggregated_like = torch.empty(0, dtype=stat_dtype(target), device=target.device)
    mm_back = similarity_matmul_dtype(aggregated_like, similarity_dtype) if aggregate else mm_target
    sums, counts, cycles = [], [], []
    with no_autocast(source):
        for k in range(b):
            tgt = target[k].reshape(c, -1)
            if aggregate:
                tgt = dense_aggregate_map(tgt, metric, alpha, mm_target)
            loss_sum, count, cycle = dense_pair(
                source[k].reshape(c, -1), tgt, source_labels[k].reshape(-1), metric, ignore_index,
                None if target_labels is None else target_labels[k].reshape(-1), mm_source, mm_back)
            sums.append(loss_sum)
            counts.append(count)
            cycles.append(cycle)
    return batch_output(sums, counts, cycles, target_labels is not None, reduction)


# --------------------------------------------------------------------------- public API


def spatial_aggregate(x: Tensor, metric: str, alpha: float = 0.5, impl: str = "efficient",
                      block_size: int | None = None, similarity_dtype: str = "float32") -> Tensor:
    """Spatial aggregation (docs/method.md step 6): ``(1 - alpha) * x + alpha * A(x)``.

    ``x`` ``(B, C, H, W)`` -> ``(B, C, H, W)``. ``A(x)[:, j] = sum_k Q(j, k) x[:, k]`` with ``Q`` the
    row-softmax of the map's self-similarity: for ``"cos"`` (x are features) the rows of the cosine
    similarity are standardised first (detached mean and unbiased std + 1e-10); for ``"kl"`` (x are
    class probabilities ``(B, K, H, W)``) ``Q`` is a plain softmax of ``-KL(p_j || p_k)``.
    Gradients flow through ``Q`` (both sides) and ``x``. ``block_size`` (rows per block) only
    affects ``impl="efficient"``. ``similarity_dtype``: precision of the products, ``"float32"``
    (default, also under autocast), ``"autocast"`` or ``"bfloat16"`` (module docstring).
    """
    check_metric_impl(metric, impl)
    check_alpha(alpha)
    check_similarity_dtype(similarity_dtype)
    _check_map("x", x)
    if impl == "dense":
        return dense_spatial_aggregate(x, metric, alpha, similarity_dtype)
    from plca.losses.association_efficient import efficient_spatial_aggregate

    return efficient_spatial_aggregate(x, metric, alpha, block_size, similarity_dtype=similarity_dtype)


def associate(source: Tensor, target: Tensor, source_labels: Tensor, metric: str = "cos", aggregate: bool = True,
              alpha: float = 0.5, ignore_index: int = IGNORE_INDEX, impl: str = "efficient",
              target_labels: Tensor | None = None, block_size: int | None = None, reduction: str = "pooled",
              similarity_dtype: str = "float32") -> AssociationOutput:
    """Pixel-level cycle association loss of source image ``b`` with target image ``b``, plus diagnostics.

    ``source`` ``(B, C, Hs, Ws)``, ``target`` ``(B, C, Ht, Wt)``: features for ``metric="cos"``,
    softmax probabilities for ``"kl"``. ``source_labels`` ``(B, Hs, Ws)`` integer, at the map's size;
    ``target_labels`` ``(B, Ht, Wt)`` only for the diagnostic ``target_accuracy``. With ``aggregate``
    the target map is spatially aggregated first (same metric). Each positive source pixel ``i``
    costs ``min(-log P_ST(i, j(i)) - log P_TS(j(i), i'(i)), 100)``; ``reduction="pooled"`` (default,
    the reference's) averages these over the positives of the whole batch, ``"pairs"`` averages each
    pair's mean over the pairs (0 for a pair without positives). 0, with a zero gradient, without
    positives. ``block_size`` (rows per block) only affects ``impl="efficient"``.
    ``similarity_dtype``: precision of the products, ``"float32"`` (default, also under autocast),
    ``"autocast"`` or ``"bfloat16"`` (module docstring).
    """
    check_inputs(source, target, source_labels, target_labels, metric, impl, alpha, reduction, similarity_dtype)
    if impl == "dense":
        return dense_associate(source, target, source_labels, metric, aggregate, alpha, ignore_index, target_labels,
                               reduction, similarity_dtype)
    from plca.losses.association_efficient import efficient_associate

    return efficient_associate(source, target, source_labels, metric, aggregate, alpha, ignore_index,
                               target_labels, block_size, reduction=reduction, similarity_dtype=similarity_dtype)


def association_loss(source: Tensor, target: Tensor, source_labels: Tensor, metric: str = "cos",
                     aggregate: bool = True, alpha: float = 0.5, ignore_index: int = IGNORE_INDEX,
                     impl: str = "efficient", block_size: int | None = None, reduction: str = "pooled",
                     similarity_dtype: str = "float32") -> Tensor:
    """Scalar loss of :func:`associate` (same arguments, no diagnostics)."""
    return associate(source, target, source_labels, metric, aggregate, alpha, ignore_index, impl,
                     block_size=block_size, reduction=reduction, similarity_dtype=similarity_dtype).loss
