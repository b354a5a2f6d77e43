"""Pixel-level cycle association (PLCA) and spatial aggregation: public API and the dense reference.

(Interim dense implementation; see METHOD.md steps 1-7.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-10


@dataclass
class AssociationOutput:
    loss: Tensor
    positive_ratio: Tensor
    cover_ratio: Tensor
    target_accuracy: Tensor | None = None


def _similarity(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """``(N, C), (M, C) -> (N, M)``."""
    if metric == "cos":
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    return a @ torch.log(b + EPS).t() - (a * torch.log(a + EPS)).sum(1, keepdim=True)


def _score(sim: Tensor) -> Tensor:
    mean = sim.mean(1, keepdim=True).detach()
    std = sim.std(1, keepdim=True).detach()
    return torch.softmax((sim - mean) / (std + EPS), dim=1)


def _aggregate_one(x: Tensor, metric: str, alpha: float) -> Tensor:
    """x ``(C, M)`` -> ``(C, M)``."""
    pixels = x.t()
    sim = _similarity(pixels, pixels, metric)
    weights = _score(sim) if metric == "cos" else torch.softmax(sim, dim=1)
    return (1 - alpha) * x + alpha * (weights @ pixels).t()


def spatial_aggregate(x: Tensor, metric: str, alpha: float = 0.5, impl: str = "dense") -> Tensor:
    b, c, h, w = x.shape
    return torch.stack([_aggregate_one(x[i].reshape(c, h * w), metric, alpha).reshape(c, h, w) for i in range(b)])


def associate(source: Tensor, target: Tensor, source_labels: Tensor, metric: str = "cos", aggregate: bool = True,
              alpha: float = 0.5, ignore_index: int = 255, impl: str = "dense",
              target_labels: Tensor | None = None) -> AssociationOutput:
    if aggregate:
        target = spatial_aggregate(target, metric, alpha)
    losses, pos, cover, acc = [], [], [], []
    for b in range(source.shape[0]):
        s = source[b].flatten(1).t()
        t = target[b].flatten(1).t()
        labels = source_labels[b].reshape(-1)
        p_st = _score(_similarity(s, t, metric))
        p_ts = _score(_similarity(s, t, metric).t() if metric == "cos" else _similarity(t, s, metric))
        j = p_st.argmax(1)
        i2 = p_ts[j].argmax(1)
        valid = labels != ignore_index
        positive = valid & (labels == labels[i2])
        idx = torch.arange(len(labels), device=labels.device)
        term = -(torch.log(p_st[idx, j]) + torch.log(p_ts[j, i2])).clamp(max=100)
        losses.append(term[positive].mean() if positive.any() else source.sum() * 0.0)
        pos.append(positive.sum() / valid.sum().clamp(min=1))
        cover.append(torch.unique(j[valid]).numel() / t.shape[0])
        if target_labels is not None:
            reached = target_labels[b].reshape(-1)[j]
            known = valid & (reached != ignore_index)
            acc.append((reached[known] == labels[known]).float().mean() if known.any() else torch.tensor(0.0))
    loss = torch.stack(losses).mean()
    accuracy = torch.stack(acc).mean().detach() if acc else None
    return AssociationOutput(loss, torch.stack(pos).mean().detach(), torch.tensor(cover).mean(), accuracy)


def association_loss(source: Tensor, target: Tensor, source_labels: Tensor, metric: str = "cos",
                     aggregate: bool = True, alpha: float = 0.5, ignore_index: int = 255,
                     impl: str = "dense") -> Tensor:
    return associate(source, target, source_labels, metric, aggregate, alpha, ignore_index, impl).loss
