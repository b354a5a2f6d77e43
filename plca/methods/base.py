"""What a UDA method is here: an object that computes one training step's loss.

The engine owns the loop, devices, precision and checkpoints; a method only
turns a source batch (and, if it uses one, a target batch) into a loss and a
dict of scalars to log. Methods hold no parameters of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.config import LossConfig
from plca.data.labels import IGNORE_INDEX
from plca.losses.lovasz import lovasz_softmax


@dataclass
class StepOutput:
    loss: Tensor  # scalar to back-propagate
    logs: dict[str, Tensor] = field(default_factory=dict)  # detached scalars


class Method:
    """Base class; subclasses implement :meth:`training_step`."""

    name = "method"
    uses_target = False

    def __init__(self, loss: LossConfig) -> None:
        self.loss_config = loss

    def training_step(self, model: nn.Module, source: dict, target: dict | None) -> StepOutput:
        raise NotImplementedError

    def source_loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy (+ weighted Lovasz-softmax) on logits ``(B, K, h, w)`` upsampled to labels ``(B, H, W)``.

        Returns the loss and the upsampled logits' log-terms.
        """
        upsampled = upsample(logits, labels.shape[-2:])
        ce = F.cross_entropy(upsampled.float(), labels, ignore_index=IGNORE_INDEX)
        loss, logs = ce, {"loss/source_ce": ce.detach()}
        if self.loss_config.lovasz_weight > 0:
            lovasz = lovasz_softmax(upsampled.float().softmax(dim=1), labels, ignore_index=IGNORE_INDEX)
            loss = loss + self.loss_config.lovasz_weight * lovasz
            logs["loss/source_lovasz"] = lovasz.detach()
        return loss, logs


def upsample(logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear (align_corners False) resize of ``(B, K, h, w)`` to ``(B, K, *size)``."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def resize_labels(labels: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of labels ``(B, H, W)`` to ``(B, *size)``."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long()
