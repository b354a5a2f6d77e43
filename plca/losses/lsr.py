"""The "LSR" regulariser of the PLCA reference training objective."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lsr_loss(logits: Tensor, threshold: float = 10.0) -> Tensor:
    """``mean((l / threshold - 1).detach() * l)`` with ``l = -mean_c log_softmax(logits)_c`` per pixel.

    logits ``(B, K, H, W)`` (any ``(B, K, ...)`` works); returns a scalar, the mean over pixels.
    ``l`` is smallest (``log K``) for a uniform prediction and grows as the prediction gets
    peaked. The gradient is ``(l / threshold - 1) dl``: above the threshold it lowers ``l``
    (softens over-confident pixels), below it raises ``l``, keeping ``l`` near ``threshold``.
    """
    if threshold <= 0:
        raise ValueError(f"lsr_loss: threshold must be positive, got {threshold}")
    if logits.dim() < 2:
        raise ValueError(f"lsr_loss: expected logits (B, K, H, W), got shape {tuple(logits.shape)}")
    per_pixel = -F.log_softmax(logits, dim=1).mean(dim=1)
    return ((per_pixel / threshold - 1.0).detach() * per_pixel).mean()
