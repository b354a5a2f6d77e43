"""Lovasz-softmax loss (Berman, Rannen Triki, Blaschko, CVPR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor


def _lovasz_grad(sorted_foreground: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at errors sorted in decreasing order.

    ``sorted_foreground (P,)``: 1 where the pixel belongs to the class, in error order.
    """
    total = sorted_foreground.sum()
    intersection = total - sorted_foreground.cumsum(0)
    union = total + (1.0 - sorted_foreground).cumsum(0)
    jaccard = 1.0 - intersection / union
    if sorted_foreground.numel() > 1:
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return jaccard


def lovasz_softmax(probs: Tensor, labels: Tensor, classes: str = "present", ignore_index: int = 255) -> Tensor:
    """Lovasz-softmax over all valid pixels of the batch, averaged over classes.

    probs ``(B, K, H, W)`` class probabilities, labels ``(B, H, W)`` int64. ``classes``:
    ``present`` averages over the classes present in the labels, ``all`` over all K.
    Returns a scalar; 0 (still attached to the graph) when no pixel is valid.
    """
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
    num_classes = probs.shape[1]
    flat_probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    flat_probs, flat_labels = flat_probs[valid], flat_labels[valid]
    if flat_labels.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in range(num_classes):
        foreground = (flat_labels == c).to(flat_probs.dtype)
        if classes == "present" and foreground.sum() == 0:
            continue
        errors = (foreground - flat_probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(foreground[order])))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()
