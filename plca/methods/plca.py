"""PLCA: source supervision + pixel-level cycle association at feature and classifier level + LSR.

One step, as the reference computes it: the target batch is forwarded first, then the
source batch (separate forward passes, so each domain's batch gets its own BatchNorm
statistics, and the running statistics lean to the source, forwarded last). Source
image ``b`` is paired with target image ``b``. LSR is applied to the logits at their
own (1/8) resolution. Target labels, when the target dataset has them, are used for a
diagnostic only (``assoc/*_target_acc``) and never reach a loss.
"""

from __future__ import annotations

from torch import Tensor

from plca.data.labels import IGNORE_INDEX
from plca.losses.association import associate
from plca.losses.lsr import lsr_loss
from plca.methods.base import Method, StepOutput, resize_labels
from plca.methods.registry import register_method


@register_method
class PLCA(Method):
    name = "plca"
    uses_target = True
    test_time_aggregation = True  # the paper's numbers use it

    def training_step(self, source: dict, target: dict | None, step: int) -> StepOutput:
        if target is None:
            raise ValueError("PLCA needs a target batch")
        config = self.loss_config
        tgt = self.segment(target["image"])
        src = self.segment(source["image"])
        loss, logs = self.source_loss(src["logits"], source["label"])
        if config.lsr_weight > 0:
            lsr = lsr_terms(src["logits"], tgt["logits"], config.lsr_threshold)
            loss = loss + config.lsr_weight * lsr
            logs["loss/lsr"] = lsr.detach()
        assoc_loss, assoc_logs = association_terms(src, tgt, source["label"], target.get("label"), config.association)
        loss = loss + assoc_loss
        logs.update(assoc_logs)
        logs["loss/total"] = loss.detach()
        return StepOutput(loss=loss, logs=logs)


def lsr_terms(source_logits: Tensor, target_logits: Tensor, threshold: float) -> Tensor:
    """LSR of the source plus LSR of the target logits, each ``(B, K, h, w)`` at its own resolution."""
    return lsr_loss(source_logits.float(), threshold) + lsr_loss(target_logits.float(), threshold)


def association_terms(src: dict[str, Tensor], tgt: dict[str, Tensor], source_labels: Tensor,
                      target_labels: Tensor | None, assoc) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted feature-level (cos) and classifier-level (kl) association losses, and their diagnostics.

    ``src`` / ``tgt``: segmentor outputs ``{'features': (B, C, h, w), 'logits': (B, K, h', w')}``;
    ``source_labels`` ``(B, H, W)``, resized (nearest) to each level's map; ``target_labels``
    (or None) for the diagnostic only. ``assoc``: :class:`plca.config.AssociationConfig`.
    """
    has_target_labels = target_labels is not None and bool((target_labels != IGNORE_INDEX).any())
    levels = (
        ("feature", "cos", assoc.feature_weight, src["features"], tgt["features"]),
        ("classifier", "kl", assoc.classifier_weight,
         src["logits"].float().softmax(dim=1), tgt["logits"].float().softmax(dim=1)),
    )
    total = src["logits"].new_zeros((), dtype=src["logits"].dtype).float()
    logs: dict[str, Tensor] = {}
    for level, metric, weight, source_map, target_map in levels:
        if weight <= 0:
            continue
        labels = resize_labels(source_labels, source_map.shape[-2:])
        diag_labels = resize_labels(target_labels, target_map.shape[-2:]) if has_target_labels else None
        result = associate(
            source_map, target_map, labels, metric=metric, aggregate=assoc.aggregate, alpha=assoc.alpha,
            ignore_index=IGNORE_INDEX, impl=assoc.impl, target_labels=diag_labels, reduction=assoc.reduction,
            similarity_dtype=assoc.similarity_dtype,
        )
        total = total + weight * result.loss
        logs[f"loss/assoc_{level}"] = result.loss.detach()
        logs[f"assoc/{level}_positive_ratio"] = result.positive_ratio.detach().float()
        logs[f"assoc/{level}_cover_ratio"] = result.cover_ratio.detach().float()
        if result.target_accuracy is not None:
            logs[f"assoc/{level}_target_acc"] = result.target_accuracy.detach().float()
    return total, logs
