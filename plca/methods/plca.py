"""PLCA: source supervision + pixel-level cycle association at feature and classifier level + LSR.

Source and target go through separate forward passes, so each domain's batch
gets its own BatchNorm statistics. Source image ``b`` is paired with target
image ``b``. Target labels, when the target dataset has them, are used for a
diagnostic only (``assoc/*_target_acc``) and never reach a loss.
"""

from __future__ import annotations

from torch import Tensor, nn

from plca.data.labels import IGNORE_INDEX
from plca.losses.association import associate
from plca.losses.lsr import lsr_loss
from plca.methods.base import Method, StepOutput, resize_labels, upsample


class PLCA(Method):
    name = "plca"
    uses_target = True

    def training_step(self, model: nn.Module, source: dict, target: dict | None) -> StepOutput:
        if target is None:
            raise ValueError("PLCA needs a target batch")
        config = self.loss_config
        assoc = config.association
        src = model(source["image"])
        tgt = model(target["image"])
        loss, logs = self.source_loss(src["logits"], source["label"])

        if config.lsr_weight > 0:
            lsr = lsr_loss(upsample(src["logits"], source["label"].shape[-2:]).float(), config.lsr_threshold)
            lsr = lsr + lsr_loss(upsample(tgt["logits"], target["image"].shape[-2:]).float(), config.lsr_threshold)
            loss = loss + config.lsr_weight * lsr
            logs["loss/lsr"] = lsr.detach()

        target_labels = target.get("label")
        has_target_labels = target_labels is not None and bool((target_labels != IGNORE_INDEX).any())
        levels = (
            ("feature", "cos", assoc.feature_weight, src["features"], tgt["features"]),
            ("classifier", "kl", assoc.classifier_weight,
             src["logits"].float().softmax(dim=1), tgt["logits"].float().softmax(dim=1)),
        )
        for level, metric, weight, source_map, target_map in levels:
            if weight <= 0:
                continue
            labels = resize_labels(source["label"], source_map.shape[-2:])
            diag_labels = resize_labels(target_labels, target_map.shape[-2:]) if has_target_labels else None
            result = associate(
                source_map, target_map, labels, metric=metric, aggregate=assoc.aggregate, alpha=assoc.alpha,
                ignore_index=IGNORE_INDEX, impl=assoc.impl, target_labels=diag_labels,
            )
            loss = loss + weight * result.loss
            logs[f"loss/assoc_{level}"] = result.loss.detach()
            logs[f"assoc/{level}_positive_ratio"] = _scalar(result.positive_ratio)
            logs[f"assoc/{level}_cover_ratio"] = _scalar(result.cover_ratio)
            if result.target_accuracy is not None:
                logs[f"assoc/{level}_target_acc"] = _scalar(result.target_accuracy)
        logs["loss/total"] = loss.detach()
        return StepOutput(loss=loss, logs=logs)


def _scalar(value: Tensor) -> Tensor:
    return value.detach().float()
