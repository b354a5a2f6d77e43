"""The "LSR" regulariser of the PLCA reference training objective."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lsr_loss(logits: Tensor, threshold: float = 10.0) -> Tensor:
    """``mean((l / threshold - 1).detach() * l)`` with ``l = -mean_c log_softmax(logits)_c`` per pixel.

    logits ``(B, K, H, W)``; returns a scalar. Its gradient is ``(l / threshold - 1) dl``: it lowers
    ``l`` (smooths the prediction less) above the threshold and raises it below, keeping
    the per-pixel mean negative log-probability near ``threshold``.
    """
    per_pixel = -F.log_softmax(logits, dim=1).mean(dim=1)
    return ((per_pixel / threshold - 1.0).detach() * per_pixel).mean()
