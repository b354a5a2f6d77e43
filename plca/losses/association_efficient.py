"""Blockwise cycle association and spatial aggregation: the numbers of the dense reference in
:mod:`plca.losses.association`, with memory linear in the pixel count.

Why this is exact:

- A standardised row ``(s - mean) / sigma`` and ``s / sigma`` differ by a constant per row, which
  softmax, log-softmax and argmax ignore; mean and sigma are detached, so the gradients agree too.
  A row's std is computed from the row itself, which a block of full rows holds.
- For ``kl``, ``s(i, j) = p_i . log(p_j + eps) - p_i . log(p_i + eps)``: the second term is constant
  along the row, so a row's logits are the dot products ``p_i . log(p_j + eps)`` and its std is that
  of the dot products. Its gradient is exactly zero in the dense version too (softmax minus one-hot
  sums to zero along a row).
- The association needs, per row, only the argmax, the logit at the argmax and the logsumexp;
  equal similarities stay equal, so the argmax (first maximal index) is that of the dense softmax.
- Spatial aggregation is attention: cos: queries and keys the normalised features, each row scaled
  by its 1/sigma, values the raw features; kl: queries p, keys log(p + eps), values p, no scaling.
  The row scales come from the keys' covariance (:func:`covariance_row_scale`) before it starts.
  Two backends compute it: blockwise (:class:`_CosineAggregate`, which works the symmetric cos
  similarity in tiles, each used twice; :class:`_Aggregate` for kl) and
  :func:`torch.nn.functional.scaled_dot_product_attention` (:func:`sdpa_aggregate`).

Memory. The autograd functions below keep only their inputs and O(rows) statistics for backward
and recompute ``block x n`` logits there, into one preallocated buffer per pass; no ``N x M``
matrix is ever stored. For ``cos`` they take the raw features and their row norms and normalise
on the fly (a query block is normalised, a block of logits is divided by the key norms), so no
normalised ``(N + M) x C`` copy is kept from forward to backward, and the gradient w.r.t. the
normalised rows is turned into the gradient w.r.t. the raw rows in place. The SDPA backend is only
run on a fused kernel (never the math fallback, which would materialise ``M x M``).

Precision: the matrix products run in the dtype that ``similarity_dtype`` names (see
:mod:`plca.losses.association`; by default float32, float64 for float64 inputs, also under autocast);
every statistic, softmax, logsumexp and the loss are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from plca.losses.association_common import (
    LOG_EPS,
    STD_EPS,
    AssociationOutput,
    batch_output,
    no_autocast,
    pair_loss_sum,
    pair_statistics,
    row_std,
    similarity_matmul_dtype,
    stat_dtype,
)

#: Default block: as many rows as make one ``rows x n`` float32 block of at least 32 MiB. At least:
#: glibc serves allocations above 32 MiB with mmap and returns them to the OS when freed; smaller
#: ones may come from the heap and stay resident after they are freed.
DEFAULT_BLOCK_ELEMENTS = 1 << 23
NORM_EPS = 1e-12  # F.normalize's eps
_ROW_CHUNK = 4096  # rows per chunk of the row-wise helpers (no R x C temporaries)


# --------------------------------------------------------------------------- helpers


def block_rows(block_size: int | None, n_columns: int) -> int:
    """Rows per block: ``block_size`` or, when None, ``ceil(DEFAULT_BLOCK_ELEMENTS / n_columns)``."""
    if block_size is None:
        return max(16, -(-DEFAULT_BLOCK_ELEMENTS // max(n_columns, 1)))
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive number of rows, got {block_size}")
    return int(block_size)


def _add_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out += a @ b`` with ``out`` in the statistics dtype and ``a``, ``b`` in the matmul dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_((a @ b).to(out.dtype))


def _cast_up(x: Tensor, similarity_dtype: str) -> Tensor:
    """``x`` in the statistics dtype for float32 products (a no-op for float32 / float64 inputs), so that
    the normalised rows are not rounded to the inputs' reduced precision; else ``x`` itself."""
    return x.to(stat_dtype(x)) if similarity_dtype == "float32" else x


def _log_eps(p: Tensor) -> Tensor:
    """``log(p + 1e-10)`` in the statistics dtype (the keys of the kl similarity)."""
    return torch.log(p.to(stat_dtype(p)) + LOG_EPS)


def _row_norms(x: Tensor) -> Tensor:
    """Euclidean norm of each row of ``x`` ``(R, C)`` -> ``(R,)`` in the statistics dtype."""
    return torch.linalg.vector_norm(x, dim=1, dtype=stat_dtype(x))


def _inverse(norm: Tensor | None) -> Tensor | None:
    """``1 / max(norm, 1e-12)``: the factor of ``F.normalize``; None stays None."""
    return None if norm is None else 1.0 / norm.clamp_min(NORM_EPS)


def _normalize_backward_(grad: Tensor, x: Tensor, norm: Tensor) -> Tensor:
    """In place: ``grad`` w.r.t. ``F.normalize(x, dim=1)`` -> w.r.t. the rows ``x``, that is
    ``(grad - n (n . grad)) / |x|`` where ``|x| >= 1e-12``, else ``grad / 1e-12`` (the clamp)."""
    denominator = norm.clamp_min(NORM_EPS)
    for start in range(0, x.shape[0], _ROW_CHUNK):
        part = slice(start, start + _ROW_CHUNK)
        # with the unit rows n (not |x|^3, which overflows for large rows): (grad - n (n . grad)) / |x|
        unit, g = x[part].to(grad.dtype) / denominator[part, None], grad[part]
        dot = (unit * g).sum(dim=1)
        dot = torch.where(norm[part] >= NORM_EPS, dot, torch.zeros_like(dot))
        g.addcmul_(unit, dot[:, None], value=-1).div_(denominator[part, None])
    return grad


class _NormalizeRows(Function):
    """``F.normalize(x, dim=1)`` of rows ``x`` ``(R, C)`` with a backward that allocates one ``R x C``
    tensor (autograd's chain through norm, clamp and division holds several at once)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        norm = _row_norms(x)
        ctx.save_for_backward(x, norm)
        return x * _inverse(norm)[:, None].to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        x, norm = ctx.saved_tensors
        return _normalize_backward_(grad.to(norm.dtype, copy=True), x, norm).to(x.dtype)


def normalize_rows(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=1)`` with the lean backward of :class:`_NormalizeRows`."""
    return _NormalizeRows.apply(x)


def _query_block(q: Tensor, index: Tensor | slice, inverse_norm: Tensor | None, mm_dtype: torch.dtype) -> Tensor:
    """Rows ``index`` of ``q``, normalised when ``inverse_norm`` ``(R,)`` is given, in ``mm_dtype``."""
    block = q[index] if isinstance(index, slice) else q.index_select(0, index)
    if inverse_norm is not None:
        block = block.to(inverse_norm.dtype) * inverse_norm[index, None]
    return block.to(mm_dtype)


def _logits(buffer: Tensor, q_block: Tensor, k_t: Tensor, column_scale: Tensor | None) -> Tensor:
    """``q_block @ k_t`` ``(b, n)``, times ``column_scale`` ``(n,)`` if given (the inverse key norms),
    written into ``buffer[:b]`` (statistics dtype) rather than a new tensor."""
    s = buffer[:q_block.shape[0]]
    if q_block.dtype == s.dtype:
        torch.mm(q_block, k_t, out=s)
    else:
        s.copy_(q_block @ k_t)
    if column_scale is not None:
        s.mul_(column_scale)
    return s


def _row_scale(s: Tensor) -> Tensor:
    """``1 / (std + 1e-10)`` of each row of ``s`` ``(b, n)``: ``(b,)``."""
    return 1.0 / (row_std(s)[:, 0] + STD_EPS)


# --------------------------------------------------------------------------- association rows


def _rows_forward(q: Tensor, k: Tensor, rows: Tensor, block: int, mm_dtype: torch.dtype,
                  q_inverse_norm: Tensor | None, k_inverse_norm: Tensor | None) -> tuple[Tensor, ...]:
    """Per selected row ``r`` of the standardised ``z = scale_r * s_r``, ``s_rc = q_r . k_c`` (of the
    normalised rows when the inverse norms are given): ``nll_r = logsumexp_c z_rc - z_rc*``
    (= -log softmax at the argmax), the argmax ``c*`` (first on ties), the raw row max and ``scale_r``
    = the detached ``1 / (std_c(s_rc) + 1e-10)``, each ``(r,)``.
    ``q`` ``(R, C)``, ``k`` ``(n, C)``, ``rows`` ``(r,)`` row indices into ``q``."""
    dtype = stat_dtype(q)
    count = rows.numel()
    nll = torch.empty(count, dtype=dtype, device=q.device)
    index = torch.empty(count, dtype=torch.long, device=q.device)
    s_max = torch.empty(count, dtype=dtype, device=q.device)
    scale = torch.empty(count, dtype=dtype, device=q.device)
    k_t = k.to(mm_dtype).t()
    buffer = torch.empty(min(block, count), k.shape[0], dtype=dtype, device=q.device)
    for start in range(0, count, block):
        part = slice(start, start + block)
        s = _logits(buffer, _query_block(q, rows[part], q_inverse_norm, mm_dtype), k_t, k_inverse_norm)
        scale[part] = _row_scale(s)
        s_max[part], index[part] = s.max(dim=1)
        nll[part] = s.sub_(s_max[part, None]).mul_(scale[part, None]).exp_().sum(dim=1).log_()
    return nll, index, s_max, scale


def _rows_backward(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, rows: Tensor, stats: tuple[Tensor, ...],
                   grad_nll: Tensor, block: int, mm_dtype: torch.dtype, q_inverse_norm: Tensor | None,
                   k_inverse_norm: Tensor | None) -> None:
    """Add the gradient of ``sum_r grad_nll_r * nll_r`` (:func:`_rows_forward`) into ``grad_q``,
    ``grad_k`` (statistics dtype; one buffer may serve both). With inverse norms given these are the
    gradients w.r.t. the *normalised* rows. Recomputes the rows with a non-zero ``grad_nll`` only.
    ``stats``: ``(nll, index, s_max, scale)``."""
    nll, index, s_max, scale = stats
    dtype = nll.dtype
    active = (grad_nll != 0).nonzero().squeeze(1)  # rows outside the loss need no work
    k_m = k.to(mm_dtype)
    buffer = torch.empty(min(block, active.numel()), k.shape[0], dtype=dtype, device=q.device)
    for start in range(0, active.numel(), block):
        sel = active[start:start + block]
        q_block = _query_block(q, rows[sel], q_inverse_norm, mm_dtype)
        s = _logits(buffer, q_block, k_m.t(), k_inverse_norm)
        # softmax(z) - onehot(argmax), times d loss / d nll and the row scale (dz/ds)
        g = s.sub_(s_max[sel, None]).mul_(scale[sel, None]).sub_(nll[sel, None]).exp_()
        g[torch.arange(sel.numel(), device=g.device), index[sel]] -= 1
        g.mul_((grad_nll[sel] * scale[sel])[:, None])
        _add_product(grad_k, g.to(mm_dtype).t(), q_block)
        if k_inverse_norm is not None:  # s = q_block @ (k * inverse norm).T
            g.mul_(k_inverse_norm)
        grad_q.index_add_(0, rows[sel], (g.to(mm_dtype) @ k_m).to(dtype))


class _CycleNLL(Function):
    """Both hops of the cycle of one image pair, blockwise (:func:`_rows_forward` twice).

    Way forth: the rows ``valid`` ``(V,)`` of ``source_q`` ``(N, C)`` against ``target_k`` ``(M, C)`` give
    ``nll_st`` ``(V,)`` and ``j`` ``(V,)``. Way back, only from the target pixels reached:
    ``reached`` ``(R,)`` = the distinct ``j``, ``slot`` ``(V,)`` = position of each ``j`` in ``reached``;
    the rows ``reached`` of ``target_q`` ``(M, C)`` against ``source_k`` ``(N, C)`` give ``nll_ts`` ``(R,)``
    and ``back`` ``(R,)``. Rows are standardised both ways. ``target_q`` / ``source_k`` None mean the
    way forth's tensors (cos: the way back is the transpose); one gradient buffer per tensor then
    serves both hops. ``normalise``: the similarity is that of the normalised rows (cos), computed
    from the raw rows and their norms. Differentiable outputs: ``nll_st``, ``nll_ts``.
    """

    @staticmethod
    def forward(ctx, source_q: Tensor, target_k: Tensor, target_q: Tensor | None, source_k: Tensor | None,
                valid: Tensor, block_size: int | None, mm_st: torch.dtype, mm_ts: torch.dtype, normalise: bool):
        shared = target_q is None
        if shared:
            target_q, source_k = target_k, source_q
        elif normalise:
            raise ValueError("normalise needs the way back to use the way forth's tensors")
        n, m = source_q.shape[0], target_q.shape[0]
        with no_autocast(source_q):
            norms = (_row_norms(source_q), _row_norms(target_k)) if normalise else ()
            inv_source, inv_target = (_inverse(norm) for norm in norms) if normalise else (None, None)
            stats_st = _rows_forward(source_q, target_k, valid, block_rows(block_size, m), mm_st, inv_source,
                                     inv_target)
            j = stats_st[1]
            reached, slot = torch.unique(j, return_inverse=True)
            stats_ts = _rows_forward(target_q, source_k, reached, block_rows(block_size, n), mm_ts, inv_target,
                                     inv_source)
        inputs = (source_q, target_k) if shared else (source_q, target_k, target_q, source_k)
        ctx.save_for_backward(*inputs, valid, reached, *stats_st, *stats_ts, *norms)
        ctx.shared, ctx.normalise, ctx.block_size, ctx.mm = shared, normalise, block_size, (mm_st, mm_ts)
        ctx.mark_non_differentiable(j, reached, slot, stats_ts[1])
        return stats_st[0], j, reached, slot, stats_ts[0], stats_ts[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_st: Tensor, _j, _reached, _slot, grad_ts: Tensor, _back):
        saved = list(ctx.saved_tensors)
        inputs = [saved.pop(0) for _ in range(2 if ctx.shared else 4)]
        valid, reached = saved.pop(0), saved.pop(0)
        stats_st, stats_ts, norms = saved[:4], saved[4:8], saved[8:]
        source_q, target_k = inputs[:2]
        target_q, source_k = (target_k, source_q) if ctx.shared else inputs[2:]
        inv_source, inv_target = (_inverse(norm) for norm in norms) if ctx.normalise else (None, None)
        dtype = stats_st[0].dtype
        grads = [torch.zeros(x.shape, dtype=dtype, device=x.device) for x in inputs]
        g_source_q, g_target_k = grads[:2]
        g_target_q, g_source_k = (g_target_k, g_source_q) if ctx.shared else grads[2:]
        n, m = source_q.shape[0], target_q.shape[0]
        with no_autocast(source_q):
            _rows_backward(g_target_q, g_source_k, target_q, source_k, reached, stats_ts, grad_ts.to(dtype),
                           block_rows(ctx.block_size, n), ctx.mm[1], inv_target, inv_source)
            _rows_backward(g_source_q, g_target_k, source_q, target_k, valid, stats_st, grad_st.to(dtype),
                           block_rows(ctx.block_size, m), ctx.mm[0], inv_source, inv_target)
            for grad, x, norm in zip(grads, inputs, norms):  # normalised rows -> raw rows
                _normalize_backward_(grad, x, norm)
        out = [grad.to(x.dtype) for grad, x in zip(grads, inputs)]
        if ctx.shared:
            out += [None, None]
        return (*out, None, None, None, None, None)


# --------------------------------------------------------------------------- aggregation


class _Aggregate(Function):
    """Spatial aggregation of the kl level, ``(1 - alpha) q + alpha softmax(q k^T) q``, blockwise over
    rows: ``q`` ``(M, K)`` the class probabilities (queries and values), ``k`` ``(M, K)`` their
    ``log(p + eps)`` (keys), a plain softmax (no standardisation, docs/method.md step 6). Keeps the
    per-row max and logsumexp for backward, which recomputes ``block x M`` logits.
    Returns ``(M, K)`` in the statistics dtype.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, alpha: float, block: int, mm_dtype: torch.dtype) -> Tensor:
        dtype = stat_dtype(q)
        m = q.shape[0]
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        s_max = torch.empty(m, dtype=dtype, device=q.device)
        log_sum = torch.empty(m, dtype=dtype, device=q.device)
        with no_autocast(q):
            k_t, v_m = k.to(mm_dtype).t(), q.to(mm_dtype)
            buffer = torch.empty(min(block, m), k.shape[0], dtype=dtype, device=q.device)
            for start in range(0, m, block):
                part = slice(start, start + block)
                s = _logits(buffer, _query_block(q, part, None, mm_dtype), k_t, None)
                s_max[part] = s.amax(dim=1)
                e = s.sub_(s_max[part, None]).exp_()
                total = e.sum(dim=1)
                log_sum[part] = total.log()
                attended = out[part]
                if e.dtype == mm_dtype:
                    torch.mm(e, v_m, out=attended)
                else:
                    attended.copy_(e.to(mm_dtype) @ v_m)
                attended.div_(total[:, None])
                if alpha != 1:  # (1 - alpha) q + alpha A(q), as the dense reference writes it
                    attended.mul_(alpha).add_(q[part].to(dtype), alpha=1 - alpha)
        ctx.save_for_backward(q, k, s_max, log_sum)
        ctx.alpha, ctx.block, ctx.mm_dtype = alpha, block, mm_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, s_max, log_sum = ctx.saved_tensors
        alpha, mm_dtype, dtype = ctx.alpha, ctx.mm_dtype, s_max.dtype
        grad_out = grad_out.to(dtype)
        grad_q = grad_out * (1 - alpha)  # as values: the direct part, then P^T (alpha grad_out)
        grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device)
        m = q.shape[0]
        with no_autocast(q):
            k_m, v_m = k.to(mm_dtype), q.to(mm_dtype)
            rows = min(ctx.block, m)
            p_buffer = torch.empty(rows, m, dtype=dtype, device=q.device)
            dp_buffer = torch.empty(rows, m, dtype=dtype, device=q.device)
            for start in range(0, m, ctx.block):
                part = slice(start, start + ctx.block)
                q_block = _query_block(q, part, None, mm_dtype)
                p = _logits(p_buffer, q_block, k_m.t(), None)
                p.sub_(s_max[part, None]).sub_(log_sum[part, None]).exp_()  # softmax
                g = (grad_out[part] * alpha).to(mm_dtype)  # d loss / d attended
                _add_product(grad_q, p.to(mm_dtype).t(), g)
                dp = _logits(dp_buffer, g, v_m.t(), None)  # d loss / d softmax
                dp.mul_(p)
                dz = dp.sub_(p.mul_(dp.sum(dim=1, keepdim=True)))  # softmax backward: p * (dp - sum(p * dp))
                _add_product(grad_k, dz.to(mm_dtype).t(), q_block)
                _add_product(grad_q[part], dz.to(mm_dtype), k_m)  # as queries
        return grad_q.to(q.dtype), grad_k.to(k.dtype), None, None, None


#: Rows per side of a tile of the symmetric cos similarity (:class:`_CosineAggregate`) by default.
DEFAULT_TILE = 1024


def _tiles(m: int, tile: int):
    """The tiles ``(rows i, rows j)`` of the upper triangle of an ``m x m`` matrix, ``i <= j``, as slices."""
    starts = range(0, m, tile)
    return [(slice(i, min(i + tile, m)), slice(j, min(j + tile, m))) for i in starts for j in starts if j >= i]


def _scratch(flat: Tensor, rows: int, columns: int) -> Tensor:
    """A contiguous ``(rows, columns)`` view of the front of the flat buffer ``flat``."""
    return flat[:rows * columns].view(rows, columns)


def _online_softmax_update(s: Tensor, rows: slice, columns: slice, x: Tensor, scale: Tensor, row_max: Tensor,
                           row_sum: Tensor, attended: Tensor, work: Tensor, mm_dtype: torch.dtype) -> None:
    """Fold the logits ``s`` ``(r, c)`` of the rows ``rows`` against the columns ``columns`` into their
    running max, sum of ``exp(scale (s - max))`` and unnormalised ``sum exp(.) x[column]`` (rescaled
    when the max grows, as in online softmax)."""
    new_max = torch.maximum(row_max[rows], s.amax(dim=1))
    factor = ((row_max[rows] - new_max) * scale[rows]).exp_()  # 0 on the first tile (max -inf)
    e = torch.sub(s, new_max[:, None], out=_scratch(work, *s.shape)).mul_(scale[rows, None]).exp_()
    row_sum[rows] = row_sum[rows] * factor + e.sum(dim=1)
    out = attended[rows]
    out.mul_(factor[:, None])
    _add_product(out, e.to(mm_dtype), x[columns].to(mm_dtype))
    row_max[rows] = new_max


class _CosineAggregate(Function):
    """Spatial aggregation of the cos level: ``(1 - alpha) x + alpha softmax(z) x`` with
    ``z_jk = scale_j (xn_j . xn_k)``, ``xn`` the normalised rows of ``x`` ``(M, C)`` and ``scale_j`` the
    detached ``1 / (std_k + 1e-10)`` of row j (from the covariance, :func:`covariance_row_scale`).

    The similarity ``xn xn^T`` is symmetric, so it is worked in tiles ``(i, j)``, ``i <= j``: a tile
    serves row block i (columns j) and, transposed, row block j (columns i). Forward keeps per row a
    running max, sum of exponentials and the unnormalised output (online softmax). Backward recomputes
    each tile once, takes ``rowsum(P * dP) = grad_out . (out - (1 - alpha) x)`` from the output (as
    flash attention does), and sums the two uses' logit gradients before the products with ``xn``.
    In ``M x M x C`` products: 1.5 forward and 3.5 backward, against 2 + 4 for the dense version and
    2 + 5 for row blocks with recomputation; memory: ``O(M C + tile^2)``, no normalised copy.
    Returns ``(M, C)`` in the statistics dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float, tile: int, mm_dtype: torch.dtype) -> Tensor:
        dtype = stat_dtype(x)
        m = x.shape[0]
        with no_autocast(x):
            norm = _row_norms(x)
            inverse = _inverse(norm)
            scale = covariance_row_scale(x, x, tile, inverse, inverse)
            row_max = torch.full((m,), float("-inf"), dtype=dtype, device=x.device)
            row_sum = torch.zeros(m, dtype=dtype, device=x.device)
            attended = torch.zeros(x.shape, dtype=dtype, device=x.device)
            side = min(tile, m)
            buffer, work = (torch.empty(side * side, dtype=dtype, device=x.device) for _ in range(2))
            for rows, columns in _tiles(m, tile):
                q_rows = _query_block(x, rows, inverse, mm_dtype)
                q_columns = q_rows if columns == rows else _query_block(x, columns, inverse, mm_dtype)
                s = _logits(_scratch(buffer, side, columns.stop - columns.start), q_rows, q_columns.t(), None)
                _online_softmax_update(s, rows, columns, x, scale, row_max, row_sum, attended, work, mm_dtype)
                if columns != rows:
                    _online_softmax_update(s.t(), columns, rows, x, scale, row_max, row_sum, attended, work,
                                           mm_dtype)
            out = attended.div_(row_sum[:, None])
            if alpha != 1:  # (1 - alpha) x + alpha A(x), as the dense reference writes it
                out.mul_(alpha).add_(x.to(dtype), alpha=1 - alpha)
        log_sum = row_sum.log_()
        ctx.save_for_backward(x, out, norm, scale, row_max, log_sum)
        ctx.alpha, ctx.tile, ctx.mm_dtype = alpha, tile, mm_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, out, norm, scale, row_max, log_sum = ctx.saved_tensors
        alpha, tile, mm_dtype, dtype = ctx.alpha, ctx.tile, ctx.mm_dtype, out.dtype
        m = x.shape[0]
        inverse = _inverse(norm)
        grad_out = grad_out.to(dtype)
        grad_x = grad_out * (1 - alpha)  # the values' direct part, then P^T (alpha grad_out)
        grad_normalised = torch.zeros(x.shape, dtype=dtype, device=x.device)
        with no_autocast(x):
            # rowsum(P * dP) with dP = alpha grad_out x^T: alpha grad_out . A(x) = grad_out . (out - (1 - alpha) x)
            delta = torch.empty(m, dtype=dtype, device=x.device)
            for start in range(0, m, tile):  # one tile x C temporary
                part = slice(start, start + tile)
                delta[part] = (x[part].to(dtype) * (alpha - 1)).add_(out[part]).mul_(grad_out[part]).sum(dim=1)
            side = min(tile, m)
            buffers = [torch.empty(side * side, dtype=dtype, device=x.device) for _ in range(5)]

            def logit_grad(s: Tensor, rows: slice, columns: slice, p_buffer: Tensor, dz_buffer: Tensor) -> Tensor:
                """For the rows ``rows`` against ``columns``: add ``P^T (alpha g)`` to the columns' value
                gradient and return ``dz = P * (dP - delta) * scale`` ``(r, c)``."""
                r, c = s.shape
                p = torch.sub(s, row_max[rows, None], out=_scratch(p_buffer, r, c))
                p.mul_(scale[rows, None]).sub_(log_sum[rows, None]).exp_()
                g = (grad_out[rows] * alpha).to(mm_dtype)
                _add_product(grad_x[columns], p.to(mm_dtype).t(), g)
                dz = _scratch(dz_buffer, r, c)
                if dz.dtype == mm_dtype:
                    torch.mm(g, x[columns].to(mm_dtype).t(), out=dz)
                else:
                    dz.copy_(g @ x[columns].to(mm_dtype).t())
                return dz.sub_(delta[rows, None]).mul_(p).mul_(scale[rows, None])

            for rows, columns in _tiles(m, tile):
                q_rows = _query_block(x, rows, inverse, mm_dtype)
                q_columns = q_rows if columns == rows else _query_block(x, columns, inverse, mm_dtype)
                s = _logits(_scratch(buffers[0], side, columns.stop - columns.start), q_rows, q_columns.t(), None)
                dz = logit_grad(s, rows, columns, buffers[1], buffers[2])
                if columns != rows:  # s(j, i) = s(i, j): both uses' gradients w.r.t. s(i, j), summed
                    dz.add_(logit_grad(s.t(), columns, rows, buffers[3], buffers[4]).t())
                else:
                    dz.add_(dz.t().clone())
                _add_product(grad_normalised[rows], dz.to(mm_dtype), q_columns)
                if columns != rows:
                    _add_product(grad_normalised[columns], dz.to(mm_dtype).t(), q_rows)
            _normalize_backward_(grad_normalised, x, norm)
        return grad_x.add_(grad_normalised).to(x.dtype), None, None, None


def covariance_row_scale(q: Tensor, k: Tensor, block: int, q_inverse_norm: Tensor | None = None,
                         k_inverse_norm: Tensor | None = None) -> Tensor:
    """Detached ``1 / (std_j(q_i . k_j) + 1e-10)`` ``(R,)`` for ``q`` ``(R, C)``, ``k`` ``(n, C)``,
    without the ``R x n`` matrix when that is cheaper. With inverse norms ``(R,)`` / ``(n,)`` given,
    the rows are scaled by them first (the cos similarity of raw rows, with no normalised copy).

    ``q_i . k_j - mean_j(q_i . k_j) = q_i . (k_j - mean(k))``, so the unbiased variance of row i is
    ``q_i^T Cov(k) q_i`` with ``Cov(k)`` the ``C x C`` unbiased covariance of the keys: O(n C^2) for
    the covariance plus O(C^2) per row. The keys are centred before the product, so there is no
    ``E[s^2] - E[s]^2`` cancellation: in float32 this agrees with the row std of the dense float32
    similarity to about 1e-7 relative, the dense value's own error (checked against float64). When
    ``2 C >= n`` the ``R x n`` products are the cheaper way and the std is taken from ``block``-row
    blocks of them. Always in the statistics dtype (float32 under autocast).
    Works in chunks of rows: no ``R x C`` or ``n x C`` temporary.
    """
    dtype = stat_dtype(q)
    n, c = k.shape

    def rows_of(x: Tensor, inverse: Tensor | None, start: int, count: int) -> Tensor:
        part = x[start:start + count].detach().to(dtype)
        return part if inverse is None else part * inverse[start:start + count, None]

    def chunks(x: Tensor, inverse: Tensor | None, count: int):
        return (rows_of(x, inverse, start, count) for start in range(0, x.shape[0], count))

    with torch.no_grad(), no_autocast(q):
        if n < 2:  # a single-element row has std 0
            return torch.full((q.shape[0],), 1.0 / STD_EPS, dtype=dtype, device=q.device)
        if 2 * c >= n:
            k_t = rows_of(k, k_inverse_norm, 0, n).t()
            std = torch.cat([row_std(rows @ k_t)[:, 0] for rows in chunks(q, q_inverse_norm, block)])
        else:
            mean = sum(rows.sum(dim=0) for rows in chunks(k, k_inverse_norm, _ROW_CHUNK)) / n
            covariance = torch.zeros(c, c, dtype=dtype, device=k.device)
            for rows in chunks(k, k_inverse_norm, _ROW_CHUNK):
                centred = rows - mean
                covariance.addmm_(centred.t(), centred)
            covariance.div_(n - 1)
            variance = [(rows @ covariance).mul_(rows).sum(dim=1) for rows in chunks(q, q_inverse_norm, _ROW_CHUNK)]
            std = torch.cat(variance).clamp_(min=0).sqrt_()
        return 1.0 / (std + STD_EPS)


def _fused_sdpa_only():
    """Restrict SDPA to its fused kernels (flash / memory-efficient / cuDNN; on CPU: flash): its math
    fallback materialises the ``M x M`` attention matrix. No restriction on torch < 2.3."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        fused.append(SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(fused)


def _pad_columns(x: Tensor, width: int) -> Tensor:
    """``x`` ``(R, c)`` zero-padded to ``(R, width)``, rows contiguous (fused kernels want stride 1)."""
    return x.contiguous() if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]))


def sdpa_aggregate(q: Tensor, k: Tensor, v: Tensor, alpha: float, scale: Tensor | None,
                   mm_dtype: torch.dtype, heads: int | None = None) -> Tensor:
    """``(1 - alpha) v + alpha softmax(z) v`` with ``z_jk = scale_j (q_j . k_k)`` through
    :func:`torch.nn.functional.scaled_dot_product_attention`, restricted to its fused kernels.

    ``q``, ``k`` ``(M, C)``, ``v`` ``(M, Cv)`` -> ``(M, Cv)`` in the statistics dtype; ``scale`` ``(M,)``
    detached (None: 1) is folded into the queries, SDPA's own scale is 1. Differentiable w.r.t. q, k, v
    through SDPA's own backward. Raises RuntimeError("No available kernel ...") when no fused kernel
    takes the inputs. Two layout details serve the fused kernels:

    - the channel dims are zero-padded to one common multiple of 8 (the dot products and the kept
      output columns are unchanged): fused kernels want equal, aligned head sizes;
    - on CPU the query rows are split into one group per thread, each an attention "head" sharing
      ``k`` and ``v``: PyTorch's CPU flash-attention backward parallelises over batch x heads only,
      so with one head its backward runs on one thread (and its small GEMMs, called outside a
      parallel region, thrash when the cores are busy: 20-40x slower measured on 2 shared cores).
      The price is a key and a value gradient per head, O(threads * M * C) memory. ``heads``
      overrides the number of groups (default: the thread count on CPU, 1 elsewhere).

    Under autocast q, k, v go in as the autocast dtype; the kernels keep the softmax statistics
    (running max, logsumexp) in float32.
    """
    dtype = stat_dtype(v)
    m, cv = v.shape
    width = -(-max(q.shape[1], cv) // 8) * 8
    with no_autocast(q):
        if scale is not None:
            q = q.to(dtype) * scale[:, None]
        q, k, v_m = (_pad_columns(t.to(mm_dtype), width) for t in (q, k, v))
        if heads is None:
            heads = torch.get_num_threads() if q.device.type == "cpu" else 1
        heads = max(1, min(heads, m))
        rows = -(-m // heads)
        if rows * heads != m:  # zero query rows pad the last group; outputs dropped, gradients 0
            q = F.pad(q, (0, 0, 0, rows * heads - m))
        q = q.view(1, heads, rows, width)
        k = k[None, None].expand(1, heads, -1, -1)
        v_m = v_m[None, None].expand(1, heads, -1, -1)
        with _fused_sdpa_only():
            attended = F.scaled_dot_product_attention(q, k, v_m, scale=1.0)
        attended = attended.reshape(heads * rows, width)[:m, :cv].to(dtype)
    return (1 - alpha) * v.to(dtype) + alpha * attended if alpha != 1 else attended  # as the dense reference


#: Spatial aggregation backends; see :func:`resolve_aggregate_backend` for ``"auto"``.
AGGREGATE_BACKENDS = ("auto", "blockwise", "sdpa")

#: ``"auto"`` uses SDPA on CPU for maps of at most this many channels.
SDPA_MAX_CHANNELS = 512


def resolve_aggregate_backend(backend: str, x: Tensor) -> str:
    """``"blockwise"`` (:class:`_CosineAggregate` for cos, :class:`_Aggregate` for kl) or ``"sdpa"``
    (:func:`sdpa_aggregate`) for rows ``x`` ``(M, C)``.

    ``"auto"``: SDPA on CPU when ``C <= SDPA_MAX_CHANNELS``, else blockwise. Measured on CPU (2 cores,
    M = 92 x 183, forward + backward, ``bench/association.py --part aggregate``), both exact to about
    1e-6 relative to dense in float32:

    - small C (kl on 19 class probabilities, or cos at C = 256): SDPA's fused flash kernel is 3.6x
      (C = 19) and 1.7x (C = 256) faster; the blockwise path is bound by elementwise passes over
      ``block x M`` logits there, and SDPA's extra copies (see :func:`sdpa_aggregate`) are small;
    - C = 1024 and 2048 (cos on backbone features): no faster (same matmul work, at the CPU's peak
      either way) but about three ``M x C`` tensors more at the peak (scaled queries, a contiguous
      copy of the values, SDPA's output, one key and value gradient per head), which the memory bar
      of the whole loss (1/8 of dense at C = 2048) cannot afford.

    Other devices (CUDA): blockwise. SDPA has fused GPU kernels, but for cos (head size 2048, past
    flash attention's limit, so the memory-efficient kernel) whether they beat cuBLAS blocks is
    unmeasured; measure with the same bench before switching.
    """
    if backend not in AGGREGATE_BACKENDS:
        raise ValueError(f"aggregate backend must be one of {AGGREGATE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "sdpa" if x.device.type == "cpu" and x.shape[1] <= SDPA_MAX_CHANNELS else "blockwise"
    return backend


def aggregate_rows(x: Tensor, metric: str, alpha: float, block_size: int | None, backend: str = "auto",
                   similarity_dtype: str = "float32") -> Tensor:
    """Spatial aggregation of one map given as rows ``x`` ``(M, C)`` -> ``(M, C)`` (statistics dtype).

    ``backend``: one of :data:`AGGREGATE_BACKENDS`. When SDPA has no fused kernel for the inputs the
    blockwise path runs instead (with a warning), so memory stays linear either way.
    ``similarity_dtype``: the products' precision (:func:`plca.losses.association.similarity_matmul_dtype`).
    """
    block = block_rows(block_size, x.shape[0])
    mm_dtype = similarity_matmul_dtype(x, similarity_dtype)
    x = _cast_up(x, similarity_dtype)
    cos = metric == "cos"
    if resolve_aggregate_backend(backend, x) == "sdpa":
        if cos:
            q = k = normalize_rows(x)
            scale = covariance_row_scale(q, k, block)
        else:
            q, k, scale = x, _log_eps(x), None
        try:
            return sdpa_aggregate(q, k, x, float(alpha), scale, mm_dtype)
        except RuntimeError as error:
            if "No available kernel" not in str(error):
                raise
            warnings.warn(f"spatial aggregation: no fused SDPA kernel for {tuple(x.shape)} {mm_dtype} on "
                          f"{x.device}; using the blockwise path", RuntimeWarning, stacklevel=2)
    if cos:  # queries = keys = the normalised rows, values = the raw rows; the similarity is symmetric
        return _CosineAggregate.apply(x, float(alpha), block_size or DEFAULT_TILE, mm_dtype)
    return _Aggregate.apply(x, _log_eps(x), float(alpha), block, mm_dtype)


def efficient_spatial_aggregate(x: Tensor, metric: str, alpha: float, block_size: int | None = None,
                                backend: str = "auto", similarity_dtype: str = "float32") -> Tensor:
    """Memory-linear :func:`plca.losses.association.spatial_aggregate`: ``(B, C, H, W)`` -> same.
    ``backend``, ``similarity_dtype``: see :func:`aggregate_rows`."""
    b, c, h, w = x.shape
    maps = [aggregate_rows(x[i].reshape(c, h * w).t(), metric, alpha, block_size, backend,
                           similarity_dtype).t().reshape(c, h, w)
            for i in range(b)]
    return torch.stack(maps).to(x.dtype)


# --------------------------------------------------------------------------- association


def _pair(source: Tensor, target: Tensor, labels: Tensor, metric: str, ignore_index: int,
          target_labels: Tensor | None, block_size: int | None, similarity_dtype: str = "float32",
          ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Loss sum over the positives, counts and cycle (:func:`plca.losses.association.pair_statistics`)
    of one pair given as rows: ``source`` ``(N, C)``, ``target`` ``(M, C)`` (already aggregated),
    ``labels`` ``(N,)``, ``target_labels`` ``(M,)`` or None."""
    mm_source = similarity_matmul_dtype(source, similarity_dtype)
    mm_target = similarity_matmul_dtype(target, similarity_dtype)
    source, target = _cast_up(source, similarity_dtype), _cast_up(target, similarity_dtype)
    cos = metric == "cos"
    if cos:  # the way back is the transpose of the same similarity (of the normalised rows)
        tensors = (source, target, None, None)
    else:  # -KL(p_j || p_i) computed afresh
        tensors = (source, _log_eps(target), target, _log_eps(source))
    valid = (labels != ignore_index).nonzero().squeeze(1)
    nll_st, j, _reached, slot, nll_ts, back_index = _CycleNLL.apply(
        *tensors, valid, block_size, mm_source, mm_target, cos)
    i_prime = back_index[slot]
    positive, counts, cycle = pair_statistics(valid, j, i_prime, labels, target.shape[0], ignore_index,
                                              target_labels)
    return pair_loss_sum(nll_st + nll_ts[slot], positive), counts, cycle


def efficient_associate(source: Tensor, target: Tensor, source_labels: Tensor, metric: str, aggregate: bool,
                        alpha: float, ignore_index: int, target_labels: Tensor | None,
                        block_size: int | None = None, aggregate_backend: str = "auto", reduction: str = "pooled",
                        similarity_dtype: str = "float32") -> AssociationOutput:
    """Blockwise :func:`plca.losses.association.associate` (inputs already validated);
    ``aggregate_backend``: see :func:`aggregate_rows`."""
    b, c = source.shape[:2]
    sums, counts, cycles = [], [], []
    for k in range(b):
        tgt = target[k].reshape(c, -1).t()
        if aggregate:
            tgt = aggregate_rows(tgt, metric, alpha, block_size, aggregate_backend, similarity_dtype)
        loss_sum, count, cycle = _pair(
            source[k].reshape(c, -1).t(), tgt, source_labels[k].reshape(-1), metric, ignore_index,
            None if target_labels is None else target_labels[k].reshape(-1), block_size, similarity_dtype)
        sums.append(loss_sum)
        counts.append(count)
        cycles.append(cycle)
    return batch_output(sums, counts, cycles, target_labels is not None, reduction)
