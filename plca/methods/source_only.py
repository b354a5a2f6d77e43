"""Source-only training: supervised loss on the labelled source domain, the target is never seen."""

from __future__ import annotations

from torch import nn

from plca.methods.base import Method, StepOutput


class SourceOnly(Method):
    name = "source_only"
    uses_target = False

    def training_step(self, model: nn.Module, source: dict, target: dict | None = None) -> StepOutput:
        output = model(source["image"])
        loss, logs = self.source_loss(output["logits"], source["label"])
        logs["loss/total"] = loss.detach()
        return StepOutput(loss=loss, logs=logs)
