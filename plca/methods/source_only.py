"""Source-only training: supervised loss on the labelled source domain, the target is never seen.

As in the PLCA reference, the supervised loss is cross-entropy plus Lovasz-softmax at
``loss.lovasz_weight``: this is the baseline PLCA's gain is measured against. It has no ``plca:``
config section: PLCA's terms are not part of it.
"""

from __future__ import annotations

from plca.methods.base import Method, StepOutput
from plca.methods.registry import register_method


@register_method
class SourceOnly(Method):
    name = "source_only"
    uses_target = False  # and no plca: section (it computes no LSR and no association)

    def training_step(self, source: dict, target: dict | None, step: int) -> StepOutput:
        output = self.segment(source["image"], generator=self.step_generator(step))  # HRDA's detail boxes
        loss, logs = self.supervised_loss(output, source["label"])
        logs["loss/total"] = loss.detach()
        return StepOutput(loss=loss, logs=logs)
