"""Lovasz-softmax loss (Berman, Rannen Triki, Blaschko, CVPR 2018).

For class ``c`` and valid pixels ``i`` let ``m_i = |[y_i = c] - p_ic|`` be the pixel errors.
The Jaccard loss of a set ``M`` of mispredicted pixels is
``J(M) = |M| / |fg u M| = 1 - |fg \\ M| / |fg u M|`` (``fg``: pixels labelled ``c``). Its Lovasz extension,
evaluated at ``m``, is ``sum_k m_(k) (J(M_k) - J(M_(k-1)))`` with the errors sorted in
decreasing order ``m_(1) >= m_(2) >= ...`` and ``M_k`` the ``k`` pixels of largest error
(``J(M_0) = 0``). It is piecewise linear in ``m`` and its gradient is the vector of the
increments ``J(M_k) - J(M_(k-1))``, which do not depend on ``m`` inside a piece.

:func:`lovasz_softmax` takes the pixels of its own batch; :func:`lovasz_softmax_global` those of
the whole global batch of a process group (DDP): the exact loss of the global batch.
:func:`lovasz_softmax_reference_ddp` is the PLCA reference's multi-GPU version
(``solver/lov_softmax_multigpu.py``), which sorts the global batch too but averages, on each
process, over the classes present in that process's own labels only (see its docstring for how
its weight differs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from plca.data.labels import IGNORE_INDEX
from plca.losses.distributed import all_gather_rows, group_size, undo_gradient_averaging


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
    # stable: equal errors keep the pixel order, so every process of a group sorts alike
    errors_sorted, order = torch.sort(errors, dim=1, descending=True, stable=True)
    increments = _jaccard_increments(torch.gather(foreground, 1, order))
    return (errors_sorted * increments).sum(dim=1)


def _check_arguments(probs: Tensor, labels: Tensor, classes: str, name: str) -> None:
    if classes not in ("present", "all"):
        raise ValueError(f"{name}: classes must be 'present' or 'all', got {classes!r}")
    if probs.dim() != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"{name}: expected probs (B, K, H, W) and labels (B, H, W), got "
                         f"{tuple(probs.shape)} and {tuple(labels.shape)}")


def _valid_pixels(probs: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(P, K)`` probabilities (at least float32, differentiable) and ``(P,)`` int64 labels of the
    pixels whose label is not ``ignore_index``."""
    num_classes = probs.shape[1]
    dtype = torch.promote_types(probs.dtype, torch.float32)  # exact pixel counts in the cumsums
    flat_probs = probs.permute(0, 2, 3, 1).reshape(-1, num_classes).to(dtype)
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != ignore_index
    return flat_probs[valid], flat_labels[valid]


def _check_label_range(labels: Tensor, num_classes: int, ignore_index: int, name: str) -> None:
    outside = (labels < 0) | (labels >= num_classes)
    if bool(outside.any()):
        bad = torch.unique(labels[outside])[:10].tolist()
        raise ValueError(f"{name}: label values {bad} are outside [0, {num_classes}) "
                         f"and are not the ignore index {ignore_index}")


def _class_mean(per_class: Tensor, labels: Tensor, classes: str) -> Tensor:
    """Mean of ``per_class`` ``(K,)`` over all classes or over those present in ``labels``."""
    if classes == "all":
        return per_class.mean()
    # Weighting instead of indexing keeps the present-class selection free of host syncs.
    present = torch.bincount(labels, minlength=per_class.shape[0]) > 0
    return (per_class * present).sum() / present.sum()


def lovasz_softmax(probs: Tensor, labels: Tensor, classes: str = "present",
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Lovasz-softmax over all valid pixels of the batch (flattened together), averaged over classes.

    probs ``(B, K, H, W)`` class probabilities (softmax output), labels ``(B, H, W)`` int64.
    ``classes``: ``"present"`` averages over the classes present in the valid labels, ``"all"``
    over all ``K`` (an absent class then costs its largest predicted probability).
    Returns a scalar in the dtype of ``probs`` (at least float32); 0, still attached to the
    graph of ``probs``, when no pixel is valid.
    """
    _check_arguments(probs, labels, classes, "lovasz_softmax")
    flat_probs, flat_labels = _valid_pixels(probs, labels, ignore_index)
    if flat_labels.numel() == 0:
        return probs.sum().to(flat_probs.dtype) * 0.0
    _check_label_range(flat_labels, probs.shape[1], ignore_index, "lovasz_softmax")
    return _class_mean(lovasz_softmax_per_class(flat_probs, flat_labels), flat_labels, classes)


def lovasz_softmax_global(probs: Tensor, labels: Tensor, classes: str = "present",
                          ignore_index: int = IGNORE_INDEX, group: dist.ProcessGroup | None = None) -> Tensor:
    """Lovasz-softmax over the valid pixels of every process of ``group`` together (default: the world).

    Same arguments as :func:`lovasz_softmax`, for this process's share of the batch. Every process's
    valid pixels (probabilities and labels, counts may differ) are gathered
    (:func:`plca.losses.distributed.all_gather_rows`, rank order) and each class's errors are sorted
    over all of them; ``"present"`` means present anywhere in the global batch. Every process must
    call it (it is a collective), with the same ``K`` and ``classes``.

    Value: the Lovasz-softmax of the global batch, the same on every process, equal to
    :func:`lovasz_softmax` run by one process on all images. Gradient: each process back-propagates
    only into its own pixels (the others' are detached), so the global gradient is the *sum* over the
    processes of their gradients, while DDP *averages* them (sum / world size). The returned tensor's
    gradient is therefore scaled by the world size (value unchanged,
    :func:`plca.losses.distributed.undo_gradient_averaging`): after DDP's averaging the parameter
    gradient of ``w * lovasz_softmax_global(...)`` equals the gradient of ``w`` times the global
    Lovasz computed by one process on all images. Use it only where the gradients are averaged over
    ``group`` (DDP); a plain ``backward`` on one process gives ``world`` times that process's share.

    The PLCA reference's multi-GPU version differs (:func:`lovasz_softmax_reference_ddp`): it
    sorts the same global errors, but each process averages its share over the classes present in
    its *own* labels, so a class's share weighs ``1 / |classes of that process|`` instead of
    ``1 / |classes of the global batch|``, and a process's pixels add nothing for a class that only
    other processes' labels hold. (The further ``world_size x ITER_SIZE`` factor on the reference's
    Lovasz weight is a separate matter, see the README on the Lovasz weight.)

    Without an initialised process group, or with one process, it is :func:`lovasz_softmax`.
    Memory: each process holds the probabilities of the whole global batch's valid pixels and a
    ``(K, P_global)`` sort.
    """
    world = group_size(group)
    if world == 1:
        return lovasz_softmax(probs, labels, classes, ignore_index)
    name = "lovasz_softmax_global"
    _check_arguments(probs, labels, classes, name)
    local_probs, local_labels = _valid_pixels(probs, labels, ignore_index)
    flat_probs, flat_labels = all_gather_rows([local_probs, local_labels], group)
    if flat_labels.numel() == 0:
        return probs.sum().to(local_probs.dtype) * 0.0
    # checked on the gathered labels, so that every process raises, not one while the others wait
    _check_label_range(flat_labels, probs.shape[1], ignore_index, name)
    loss = _class_mean(lovasz_softmax_per_class(flat_probs, flat_labels), flat_labels, classes)
    return undo_gradient_averaging(loss, world)


def _increments_by_pixel(probs: Tensor, labels: Tensor) -> Tensor:
    """``(K, P)``: each pixel's Lovasz gradient (Jaccard increment) for each class, in pixel order.

    probs ``(P, K)``, labels ``(P,)`` as in :func:`lovasz_softmax_per_class` (no gradient flows).
    ``lovasz_softmax_per_class(probs, labels)[c] == (errors[c] * increments[c]).sum()``.
    """
    classes = torch.arange(probs.shape[1], device=labels.device)
    foreground = (labels.unsqueeze(0) == classes.unsqueeze(1)).to(probs.dtype)
    errors = (foreground - probs.detach().t()).abs()
    _, order = torch.sort(errors, dim=1, descending=True, stable=True)
    increments = _jaccard_increments(torch.gather(foreground, 1, order))
    return torch.zeros_like(increments).scatter_(1, order, increments)


def lovasz_softmax_reference_ddp(probs: Tensor, labels: Tensor, classes: str = "present",
                                 ignore_index: int = IGNORE_INDEX,
                                 group: dist.ProcessGroup | None = None) -> Tensor:
    """The PLCA reference's multi-GPU Lovasz-softmax (``solver/lov_softmax_multigpu.py``), under DDP.

    Same arguments and collective as :func:`lovasz_softmax_global`. Every process's valid pixels are
    gathered and each class's errors sorted over all of them, which gives each pixel its Lovasz
    gradient ``g_ic`` (the increments of the global sort). Then each process keeps its own pixels:
    ``world x mean over c of sum_i m_ic g_ic``, the mean over the classes present in *this process's*
    valid labels (``"present"``) or over all ``K`` (``"all"``); 0 (attached) when this process has no
    valid pixel. The value differs between processes; the gradient of process ``r`` flows into its
    own pixels only.

    Against :func:`lovasz_softmax_global`: after DDP's averaging, the gradient is
    ``sum_r (1 / |C_r|) sum_{c in C_r} grad(share_rc)`` instead of
    ``(1 / |C|) sum_c sum_r grad(share_rc)`` (``C_r``: classes of process ``r``; ``C``: of the
    global batch). Both are equal when every process holds every class of the global batch; else a
    process's shares weigh more (``|C_r| < |C|``) and its pixels' errors on the classes only other
    processes hold (false positives) are not penalised. With one process it is :func:`lovasz_softmax`.
    Memory: as :func:`lovasz_softmax_global`, plus the ``(K, P_global)`` increments in pixel order.
    """
    world = group_size(group)
    if world == 1:
        return lovasz_softmax(probs, labels, classes, ignore_index)
    name = "lovasz_softmax_reference_ddp"
    _check_arguments(probs, labels, classes, name)
    local_probs, local_labels = _valid_pixels(probs, labels, ignore_index)
    owner = torch.full_like(local_labels, dist.get_rank(group))
    flat_probs, flat_labels, owners = all_gather_rows([local_probs, local_labels, owner], group)
    if flat_labels.numel() == 0:
        return probs.sum().to(local_probs.dtype) * 0.0
    # checked on the gathered labels, so that every process raises, not one while the others wait
    _check_label_range(flat_labels, probs.shape[1], ignore_index, name)
    if local_labels.numel() == 0:
        return probs.sum().to(local_probs.dtype) * 0.0
    increments = _increments_by_pixel(flat_probs, flat_labels)[:, owners == dist.get_rank(group)]
    class_ids = torch.arange(probs.shape[1], device=labels.device)
    foreground = (local_labels.unsqueeze(0) == class_ids.unsqueeze(1)).to(local_probs.dtype)
    errors = (foreground - local_probs.t()).abs()
    return world * _class_mean((errors * increments).sum(dim=1), local_labels, classes)
