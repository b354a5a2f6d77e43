"""HRDA's losses and views of a multi-resolution segmentor's output (:mod:`plca.models.hrda`).

A single-scale output ``{'features', 'logits'}`` passes through unchanged, so every method computes
the same code path with or without ``model.hrda``. A multi-resolution output (it has ``detail_logits``)
is turned into HRDA's loss (``HRDAHead.losses``): ``(1 - w) * L(fused logits, labels) + w * L(detail
logits, labels in the detail box)``, ``w`` its ``detail_loss_weight`` (HRDA's lambda_d, 0.1).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from plca.models.multi_resolution import crop

__all__ = ["detail_view", "is_multi_resolution", "multi_resolution_loss"]

#: ``loss(logits (B, K, h, w), labels (B, H, W), weights (B, H, W) or None) -> scalar``
PixelLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def is_multi_resolution(output: dict[str, Tensor]) -> bool:
    """Whether ``output`` is a multi-resolution segmentor's training output."""
    return "detail_logits" in output


def _box(output: dict[str, Tensor]) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in output["detail_box"].tolist())  # type: ignore[return-value]


def multi_resolution_loss(output: dict[str, Tensor], labels: Tensor, loss: PixelLoss,
                          weights: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """HRDA's weighted sum of ``loss`` on the fused and on the detail prediction, and the detail term alone.

    ``labels`` / ``weights`` ``(B, H, W)`` cover the training crop; the detail term sees their detail box.
    A single-scale output gives ``(loss(logits, labels, weights), None)``.
    """
    fused = loss(output["logits"], labels, weights)
    if not is_multi_resolution(output):
        return fused, None
    box = _box(output)
    detail = loss(output["detail_logits"], crop(labels, box), None if weights is None else crop(weights, box))
    weight = float(output["detail_loss_weight"])
    return (1.0 - weight) * fused + weight * detail, detail


def detail_view(output: dict[str, Tensor], labels: Tensor | None) -> tuple[dict[str, Tensor], Tensor | None]:
    """The detail view of a multi-resolution output as a single-scale one, ``{'features', 'logits'}``, with
    ``labels`` ``(B, H, W)`` cropped to its box (None stays None); a single-scale output as it is."""
    if not is_multi_resolution(output):
        return output, labels
    view = {"features": output["features"], "logits": output["detail_logits"]}
    return view, None if labels is None else crop(labels, _box(output))
