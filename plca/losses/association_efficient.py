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

The autograd functions below keep only their inputs and O(rows) statistics for backward and
recompute ``block x n`` logits there; no ``N x M`` matrix is ever stored.

Precision: the matrix products run in the autocast dtype when autocast is on (else the input
dtype); every statistic, softmax, logsumexp and the loss are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from plca.losses.association import (
    LOG_EPS,
    STD_EPS,
    AssociationOutput,
    batch_output,
    pair_loss,
    pair_statistics,
    row_std,
    stat_dtype,
)

#: Default block: as many rows as keep one ``rows x n`` float32 block near 32 MB.
DEFAULT_BLOCK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------- helpers


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype on x's device when autocast is on there, else x's own dtype."""
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


def _no_autocast(x: Tensor):
    """Autocast off inside the autograd functions: they cast explicitly."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def block_rows(block_size: int | None, n_columns: int) -> int:
    """Rows per block: ``block_size`` or, when None, about DEFAULT_BLOCK_ELEMENTS / n_columns."""
    if block_size is None:
        return max(16, DEFAULT_BLOCK_ELEMENTS // max(n_columns, 1))
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive number of rows, got {block_size}")
    return int(block_size)


def _add_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out += a @ b`` with ``out`` in the statistics dtype and ``a``, ``b`` in the matmul dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_((a @ b).to(out.dtype))


def _block_logits(q_block: Tensor, k_t: Tensor, dtype: torch.dtype, standardise: bool) -> tuple[Tensor, Tensor]:
    """Raw similarities ``q_block @ k_t`` ``(b, n)`` in ``dtype`` and each row's scale ``(b,)``:
    ``1 / (std + 1e-10)`` when standardising, else 1."""
    s = (q_block @ k_t).to(dtype)
    if standardise:
        scale = 1.0 / (row_std(s)[:, 0] + STD_EPS)
    else:
        scale = torch.ones(s.shape[0], dtype=dtype, device=s.device)
    return s, scale


# --------------------------------------------------------------------------- association rows


class _RowArgmaxNLL(Function):
    """Per selected row ``r`` of ``z = scale_r * (q_r . k_c)``: argmax ``c*`` (first on ties) and
    ``nll_r = logsumexp_c z_rc - z_rc*`` (= -log softmax at the argmax). ``scale_r`` is the detached
    ``1 / (std_c(q_r . k_c) + 1e-10)`` when standardising.

    Inputs: ``q`` ``(R, C)``, ``k`` ``(n, C)``, ``rows`` ``(r,)`` distinct row indices into ``q``.
    Outputs ``nll`` ``(r,)`` (differentiable w.r.t. q and k) and ``index`` ``(r,)``.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, rows: Tensor, standardise: bool, block: int,
                mm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        dtype = stat_dtype(q)
        count = rows.numel()
        nll = torch.empty(count, dtype=dtype, device=q.device)
        index = torch.empty(count, dtype=torch.long, device=q.device)
        s_max = torch.empty(count, dtype=dtype, device=q.device)
        scale = torch.empty(count, dtype=dtype, device=q.device)
        with _no_autocast(q):
            k_t = k.to(mm_dtype).t()
            for start in range(0, count, block):
                part = slice(start, start + block)
                s, scale[part] = _block_logits(q.index_select(0, rows[part]).to(mm_dtype), k_t, dtype, standardise)
                s_max[part], index[part] = s.max(dim=1)
                nll[part] = s.sub_(s_max[part, None]).mul_(scale[part, None]).exp_().sum(dim=1).log_()
        ctx.save_for_backward(q, k, rows, index, s_max, scale, nll)
        ctx.block, ctx.mm_dtype = block, mm_dtype
        ctx.mark_non_differentiable(index)
        return nll, index

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nll: Tensor, _grad_index: Tensor | None):
        q, k, rows, index, s_max, scale, nll = ctx.saved_tensors
        dtype, mm_dtype = nll.dtype, ctx.mm_dtype
        grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device)
        active = (grad_nll != 0).nonzero().squeeze(1)  # rows outside the loss need no work
        with _no_autocast(q):
            k_m = k.to(mm_dtype)
            for start in range(0, active.numel(), ctx.block):
                sel = active[start:start + ctx.block]
                q_block = q.index_select(0, rows[sel]).to(mm_dtype)
                s = (q_block @ k_m.t()).to(dtype)
                # softmax(z) - onehot(argmax), times d loss / d nll and the row scale (dz/ds)
                g = s.sub_(s_max[sel, None]).mul_(scale[sel, None]).sub_(nll[sel, None]).exp_()
                g[torch.arange(sel.numel(), device=g.device), index[sel]] -= 1
                g.mul_((grad_nll[sel] * scale[sel])[:, None])
                g = g.to(mm_dtype)
                grad_q.index_add_(0, rows[sel], (g @ k_m).to(dtype))
                _add_product(grad_k, g.t(), q_block)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), None, None, None, None


# --------------------------------------------------------------------------- aggregation


class _Aggregate(Function):
    """``(1 - alpha) v + alpha softmax(z) v`` with ``z_jk = scale_j (q_j . k_k)``, blockwise over rows j.

    ``q``, ``k`` ``(M, C)``, ``v`` ``(M, Cv)`` -> ``(M, Cv)``; ``scale_j`` is the detached
    ``1 / (std_k(q_j . k_k) + 1e-10)`` when standardising, else 1.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, alpha: float, standardise: bool, block: int,
                mm_dtype: torch.dtype) -> Tensor:
        dtype = stat_dtype(v)
        m = q.shape[0]
        out = torch.empty(v.shape, dtype=dtype, device=v.device)
        s_max = torch.empty(m, dtype=dtype, device=q.device)
        scale = torch.empty(m, dtype=dtype, device=q.device)
        log_sum = torch.empty(m, dtype=dtype, device=q.device)
        with _no_autocast(q):
            k_t, v_m = k.to(mm_dtype).t(), v.to(mm_dtype)
            for start in range(0, m, block):
                part = slice(start, start + block)
                s, scale[part] = _block_logits(q[part].to(mm_dtype), k_t, dtype, standardise)
                s_max[part] = s.amax(dim=1)
                e = s.sub_(s_max[part, None]).mul_(scale[part, None]).exp_()
                total = e.sum(dim=1)
                log_sum[part] = total.log()
                attended = (e.to(mm_dtype) @ v_m).to(dtype) / total[:, None]
                out[part] = torch.lerp(v[part].to(dtype), attended, alpha) if alpha != 1 else attended
        ctx.save_for_backward(q, k, v, s_max, scale, log_sum)
        ctx.alpha, ctx.block, ctx.mm_dtype = alpha, block, mm_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, s_max, scale, log_sum = ctx.saved_tensors
        alpha, mm_dtype, dtype = ctx.alpha, ctx.mm_dtype, s_max.dtype
        grad_out = grad_out.to(dtype)
        grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
        grad_k = torch.zeros(k.shape, dtype=dtype, device=k.device)
        grad_v = grad_out * (1 - alpha)
        with _no_autocast(q):
            k_m, v_m = k.to(mm_dtype), v.to(mm_dtype)
            for start in range(0, q.shape[0], ctx.block):
                part = slice(start, start + ctx.block)
                q_block = q[part].to(mm_dtype)
                p = (q_block @ k_m.t()).to(dtype)
                p.sub_(s_max[part, None]).mul_(scale[part, None]).sub_(log_sum[part, None]).exp_()  # softmax
                g = (grad_out[part] * alpha).to(mm_dtype)  # d loss / d attended
                _add_product(grad_v, p.to(mm_dtype).t(), g)
                dp = (g @ v_m.t()).to(dtype)  # d loss / d softmax
                dp.mul_(p)
                # softmax backward: p * (dp - sum(p * dp)), then d z / d s = scale
                dz = dp.sub_(p.mul_(dp.sum(dim=1, keepdim=True))).mul_(scale[part, None]).to(mm_dtype)
                grad_q[part] = (dz @ k_m).to(dtype)
                _add_product(grad_k, dz.t(), q_block)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def aggregate_rows(x: Tensor, metric: str, alpha: float, block_size: int | None) -> Tensor:
    """Spatial aggregation of one map given as rows ``x`` ``(M, C)`` -> ``(M, C)`` (statistics dtype)."""
    block = block_rows(block_size, x.shape[0])
    mm_dtype = matmul_dtype(x)
    if metric == "cos":
        normalised = F.normalize(x, dim=1)
        return _Aggregate.apply(normalised, normalised, x, float(alpha), True, block, mm_dtype)
    return _Aggregate.apply(x, torch.log(x + LOG_EPS), x, float(alpha), False, block, mm_dtype)


def efficient_spatial_aggregate(x: Tensor, metric: str, alpha: float, block_size: int | None = None) -> Tensor:
    """Blockwise :func:`plca.losses.association.spatial_aggregate`: ``(B, C, H, W)`` -> same."""
    b, c, h, w = x.shape
    maps = [aggregate_rows(x[i].reshape(c, h * w).t(), metric, alpha, block_size).t().reshape(c, h, w)
            for i in range(b)]
    return torch.stack(maps).to(x.dtype)


# --------------------------------------------------------------------------- association


def _pair(source: Tensor, target: Tensor, labels: Tensor, metric: str, ignore_index: int,
          target_labels: Tensor | None, block_size: int | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and counts of one pair given as rows: ``source`` ``(N, C)``, ``target`` ``(M, C)``
    (already aggregated), ``labels`` ``(N,)``, ``target_labels`` ``(M,)`` or None."""
    n, m = source.shape[0], target.shape[0]
    if metric == "cos":
        source_n, target_n = F.normalize(source, dim=1), F.normalize(target, dim=1)
        forth, back = (source_n, target_n), (target_n, source_n)
    else:
        forth = (source, torch.log(target + LOG_EPS))
        back = (target, torch.log(source + LOG_EPS))
    valid = (labels != ignore_index).nonzero().squeeze(1)
    nll_st, j = _RowArgmaxNLL.apply(*forth, valid, True, block_rows(block_size, m), matmul_dtype(source))
    # the way back is needed only from the target pixels some valid source pixel reached
    reached, slot = torch.unique(j, return_inverse=True)
    nll_ts, back_index = _RowArgmaxNLL.apply(*back, reached, True, block_rows(block_size, n), matmul_dtype(target))
    i_prime = back_index[slot]
    positive, counts = pair_statistics(labels[valid], j, i_prime, labels, m, ignore_index, target_labels)
    return pair_loss(nll_st + nll_ts[slot], positive), counts


def efficient_associate(source: Tensor, target: Tensor, source_labels: Tensor, metric: str, aggregate: bool,
                        alpha: float, ignore_index: int, target_labels: Tensor | None,
                        block_size: int | None = None) -> AssociationOutput:
    """Blockwise :func:`plca.losses.association.associate` (inputs already validated)."""
    b, c = source.shape[:2]
    losses, counts = [], []
    for k in range(b):
        tgt = target[k].reshape(c, -1).t()
        if aggregate:
            tgt = aggregate_rows(tgt, metric, alpha, block_size)
        loss, count = _pair(source[k].reshape(c, -1).t(), tgt, source_labels[k].reshape(-1), metric, ignore_index,
                            None if target_labels is None else target_labels[k].reshape(-1), block_size)
        losses.append(loss)
        counts.append(count)
    return batch_output(losses, counts, target_labels is not None)
