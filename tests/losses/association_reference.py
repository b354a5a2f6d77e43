"""docs/method.md, steps 1-6 of "The association loss", written out with nested loops over pixels, on float64 scalars.

Obviously correct and very slow: only for maps of a few dozen pixels. Every value is a
0-d tensor so autograd gives the reference gradients too. Mean and std of a row are
detached, exactly as docs/method.md step 2 says.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from plca.data.labels import IGNORE_INDEX

EPS = 1e-10


def _pixels(x: Tensor) -> list[list[Tensor]]:
    """``(C, H, W)`` -> a list of pixels, each a list of C 0-d tensors, in row-major order."""
    c, h, w = x.shape
    return [[x[k, r, q] for k in range(c)] for r in range(h) for q in range(w)]


def _cos(u: list[Tensor], v: list[Tensor]) -> Tensor:
    nu = torch.sqrt(sum(a * a for a in u)).clamp(min=1e-12)
    nv = torch.sqrt(sum(b * b for b in v)).clamp(min=1e-12)
    return sum((a / nu) * (b / nv) for a, b in zip(u, v))


def _neg_kl(p: list[Tensor], q: list[Tensor]) -> Tensor:
    """-KL(p || q) = sum_c p_c log(q_c + eps) - sum_c p_c log(p_c + eps)."""
    return sum(a * torch.log(b + EPS) for a, b in zip(p, q)) - sum(a * torch.log(a + EPS) for a in p)


def similarity(rows: list[list[Tensor]], cols: list[list[Tensor]], metric: str) -> list[list[Tensor]]:
    sim = _cos if metric == "cos" else _neg_kl
    return [[sim(u, v) for v in cols] for u in rows]


def softmax_row(values: list[Tensor]) -> list[Tensor]:
    top = max(float(v.detach()) for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def standardised_softmax_row(values: list[Tensor]) -> list[Tensor]:
    """Row minus its detached mean, over its detached unbiased std + 1e-10, then softmax."""
    plain = [float(v.detach()) for v in values]
    n = len(plain)
    mean = sum(plain) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in plain) / (n - 1)) if n > 1 else 0.0
    return softmax_row([(v - mean) / (std + EPS) for v in values])


def first_argmax(values: list[Tensor]) -> int:
    best = 0
    for k, v in enumerate(values):
        if float(v.detach()) > float(values[best].detach()):
            best = k
    return best


def aggregate(pixels: list[list[Tensor]], metric: str, alpha: float) -> list[list[Tensor]]:
    """Step 6: T[:, j] <- (1 - alpha) T[:, j] + alpha sum_k Q(j, k) T[:, k]."""
    sim = similarity(pixels, pixels, metric)
    score = standardised_softmax_row if metric == "cos" else softmax_row
    out = []
    for j, row in enumerate(sim):
        q = score(row)
        out.append([(1 - alpha) * pixels[j][c] + alpha * sum(q[k] * pixels[k][c] for k in range(len(pixels)))
                    for c in range(len(pixels[j]))])
    return out


def pair(source: Tensor, target: Tensor, labels: Tensor, metric: str, aggregate_target: bool, alpha: float,
         ignore_index: int) -> tuple[list[Tensor], dict]:
    """The per-positive losses of one pair ``(C, Hs, Ws)``, ``(C, Ht, Wt)``, labels ``(Hs, Ws)``, and its counts."""
    src, tgt = _pixels(source), _pixels(target)
    if aggregate_target:
        tgt = aggregate(tgt, metric, alpha)
    flat_labels = [int(v) for v in labels.reshape(-1)]
    s_st = similarity(src, tgt, metric)
    s_ts = [list(col) for col in zip(*s_st)] if metric == "cos" else similarity(tgt, src, metric)
    p_st = [standardised_softmax_row(row) for row in s_st]
    p_ts = [standardised_softmax_row(row) for row in s_ts]
    terms, valid, reached, j_of, i_prime_of = [], 0, set(), [], []
    for i, label in enumerate(flat_labels):
        if label == ignore_index:
            j_of.append(-1)
            i_prime_of.append(-1)
            continue
        valid += 1
        j = first_argmax(p_st[i])
        reached.add(j)
        i_back = first_argmax(p_ts[j])
        j_of.append(j)
        i_prime_of.append(i_back)
        if flat_labels[i_back] == label:
            terms.append(-torch.log(p_st[i][j] * p_ts[j][i_back]))
    counts = {"valid": valid, "positive": len(terms), "covered": len(reached), "targets": len(tgt),
              "j": j_of, "i_prime": i_prime_of}
    return terms, counts


def associate(source: Tensor, target: Tensor, labels: Tensor, metric: str, aggregate_target: bool = True,
              alpha: float = 0.5, ignore_index: int = IGNORE_INDEX,
              reduction: str = "pooled") -> tuple[Tensor, float, float]:
    """Batch loss, positive ratio and cover ratio for ``(B, C, H, W)`` maps.

    ``"pooled"``: the mean over the positives of all pairs together; ``"pairs"``: the mean over the
    pairs of each pair's mean (0 for a pair without positives).
    """
    return associate_with_cycles(source, target, labels, metric, aggregate_target, alpha, ignore_index,
                                 reduction)[:3]


def associate_with_cycles(source: Tensor, target: Tensor, labels: Tensor, metric: str, aggregate_target: bool = True,
                          alpha: float = 0.5, ignore_index: int = IGNORE_INDEX, reduction: str = "pooled"):
    """:func:`associate` plus ``j`` and ``i_prime``, ``(B, N)`` lists of ints (-1 at ignored pixels)."""
    zero = source.new_zeros(()) * source.sum()
    all_terms, per_pair, counts = [], [], []
    for b in range(source.shape[0]):
        terms, count = pair(source[b], target[b], labels[b], metric, aggregate_target, alpha, ignore_index)
        all_terms += terms
        per_pair.append(sum(terms) / len(terms) if terms else zero)
        counts.append(count)
    if reduction == "pooled":
        loss = sum(all_terms) / len(all_terms) if all_terms else zero
    else:
        loss = sum(per_pair) / len(per_pair)
    total = {key: sum(c[key] for c in counts) for key in ("valid", "positive", "covered", "targets")}
    positive_ratio = total["positive"] / max(total["valid"], 1)
    cover_ratio = total["covered"] / total["targets"]
    return loss, positive_ratio, cover_ratio, [c["j"] for c in counts], [c["i_prime"] for c in counts]


def aggregate_map(x: Tensor, metric: str, alpha: float) -> Tensor:
    """Step 6 on ``(B, C, H, W)`` through the nested loops, as a tensor of the same shape."""
    out = []
    for b in range(x.shape[0]):
        c, h, w = x[b].shape
        pixels = aggregate(_pixels(x[b]), metric, alpha)
        out.append(torch.stack([torch.stack(p) for p in pixels]).t().reshape(c, h, w))
    return torch.stack(out)
