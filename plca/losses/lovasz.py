"""Lovasz-softmax loss (Berman, Rannen Triki, Blaschko, CVPR 2018).

For class ``c`` and valid pixels ``i`` let ``m_i = |[y_i = c] - p_ic|`` be the pixel errors.
The Jaccard loss of a set ``M`` of mispredicted pixels is
``J(M) = |M| / |fg u M| = 1 - |fg \\ M| / |fg u M|`` (``fg``: pixels labelled ``c``). Its Lovasz extension,
evaluated at ``m``, is ``sum_k m_(k) (J(M_k) - J(M_(k-1)))`` with the errors sorted in
decreasing order ``m_(1) >= m_(2) >= ...`` and ``M_k`` the ``k`` pixels of largest error
(``J(M_0) = 0``). It is piecewise linear in ``m`` and its gradient is the vector of the
increments ``J(M_k) - J(M_(k-1))``, which do not depend on ``m`` inside a piece.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _jaccard_increments(sorted_foreground: Tensor) -> Tensor:
    """``J(M_k) - J(M_(k-1))`` for each ``k``: the gradient of the Lovasz extension of the Jaccard loss.

    ``sorted_foreground (K, P)``: 1 where the pixel belongs to the class, pixels in
    decreasing order of their error for that class (one row per class).
    """
    foreground_total = sorted_foreground.sum(dim=1, keepdim=True)
    foreground_in_m = sorted_foreground.cumsum(dim=1)
    background_in_m = (1.0 - sorted_foreground).cumsum(dim=1)
    # |fg u M_k| >= 1 for every k >= 1: either fg is not empty or M_k holds a background pixel.
    jaccard = 1.0 - (foreground_total - foreground_in_m) / (foreground_total + background_in_m)
    return torch.diff(jaccard, dim=1, prepend=torch.zeros_like(jaccard[:, :1]))


def lovasz_softmax_per_class(probs: Tensor, labels: Tensor) -> Tensor:
    """Lovasz extension of the Jaccard loss of every class, ``(K,)``, over already-valid pixels.

    probs ``(P, K)`` class probabilities, labels ``(P,)`` int64 in ``[0, K)``; ``P >= 1``.
    """
    num_classes = probs.shape[1]
    classes = torch.arange(num_classes, device=labels.device)
    foreground = (labels.unsqueeze(0) == classes.unsqueeze(1)).to(probs.dtype)  # (K, P)
    errors = (foreground - probs.t()).abs()
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    increments = _jaccard_increments(torch.gather(foreground, 1, order))
    return (errors_sorted * increments).sum(dim=1)


def lovasz_softmax(probs: Tensor, labels: Tensor, classes: str = "present", ignore_index: int = 255) -> Tensor:
    """Lovasz-softmax over all valid pixels of the batch (flattened together), averaged over classes.

    probs ``(B, K, H, W)`` class probabilities (softmax output), labels ``(B, H, W)`` int64.
    ``classes``: ``"present"`` averages over the classes present in the valid labels, ``"all"``
    over all ``K`` (an absent class then costs its largest predicted probability).
    Returns a scalar in the dtype of ``probs`` (at least float32); 0, still attached to the
    graph of ``probs``, when no pixel is valid.
    """
    if classes not in ("present", "all"):
        raise ValueError(f"lovasz_softmax: classes must be 'present' or 'all', got {classes!r}")
    if probs.dim() != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"lovasz_softmax: expected probs (B, K, H, W) and labels (B, H, W), got "
                         f"{tuple(probs.shape)} and {tuple(labels.shape)}")
    num_classes = probs.shape[1]
    dtype = torch.promote_types(probs.dtype, torch.float32)  # exact pixel counts in the cumsums
    flat_probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes).to(dtype)
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != ignore_index
    flat_probs, flat_labels = flat_probs[valid], flat_labels[valid]
    if flat_labels.numel() == 0:
        return probs.sum().to(dtype) * 0.0
    if bool(((flat_labels < 0) | (flat_labels >= num_classes)).any()):
        bad = torch.unique(flat_labels[(flat_labels < 0) | (flat_labels >= num_classes)])[:10].tolist()
        raise ValueError(f"lovasz_softmax: label values {bad} are outside [0, {num_classes}) "
                         f"and are not the ignore index {ignore_index}")
    per_class = lovasz_softmax_per_class(flat_probs, flat_labels)
    if classes == "all":
        return per_class.mean()
    # Weighting instead of indexing keeps the present-class selection free of host syncs.
    present = torch.bincount(flat_labels, minlength=num_classes) > 0
    return (per_class * present).sum() / present.sum()
