"""Pseudo-labels from a teacher's logits, with DAFormer's confidence weight.

The logits are upsampled (bilinear) to the image size first, then soft-maxed; the label is
the arg-max class and the weight of every pixel is one number for the **whole batch**: the
fraction of the batch's pixels whose maximum probability reaches ``threshold`` (DAFormer's
``torch.sum(ps_large_p).item() / ps_size`` with ``ps_size`` the size of the whole
``(B, H, W)`` label tensor). The top ``ignore_top`` and bottom ``ignore_bottom`` rows then get
weight 0 (Cityscapes' rectification borders), after the fraction is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from plca.data.labels import IGNORE_INDEX

__all__ = ["pseudo_label_accuracy", "pseudo_labels"]


@torch.no_grad()
def pseudo_labels(teacher_logits: Tensor, size: Sequence[int] | torch.Size, threshold: float = 0.968,
                  ignore_top: int = 0, ignore_bottom: int = 0) -> tuple[Tensor, Tensor]:
    """Labels ``(B, H, W)`` int64 and weights ``(B, H, W)`` float32 from logits ``(B, K, h, w)``.

    ``size = (H, W)``: the image size the logits are upsampled to (bilinear, align_corners False).
    The result carries no autograd history.
    """
    if teacher_logits.dim() != 4:
        raise ValueError(f"teacher_logits must be (B, K, h, w), got shape {tuple(teacher_logits.shape)}")
    if ignore_top < 0 or ignore_bottom < 0:
        raise ValueError(f"ignore_top / ignore_bottom must be >= 0, got {ignore_top} / {ignore_bottom}")
    height, width = (int(v) for v in size)
    logits = teacher_logits.detach().float()
    if tuple(logits.shape[-2:]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    fraction = (confidence >= threshold).sum().float() / confidence.numel()
    weight = fraction.expand_as(confidence).clone()
    if ignore_top > 0:
        weight[:, :ignore_top] = 0.0
    if ignore_bottom > 0:
        weight[:, max(height - ignore_bottom, 0):] = 0.0
    return labels, weight


@torch.no_grad()
def pseudo_label_accuracy(labels: Tensor, target_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Share of the pixels labelled in ``target_labels`` ``(B, H, W)`` where ``labels`` agrees.

    A diagnostic (the true target labels never reach a loss); a float32 scalar, NaN when no
    pixel of ``target_labels`` is labelled.
    """
    if labels.shape != target_labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and target_labels {tuple(target_labels.shape)} differ in shape")
    valid = target_labels != ignore_index
    counted = valid.sum()
    correct = ((labels == target_labels) & valid).sum()
    if int(counted) == 0:
        return torch.tensor(float("nan"), device=labels.device)
    return correct.float() / counted.float()
