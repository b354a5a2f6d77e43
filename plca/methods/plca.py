"""PLCA: source supervision + pixel-level cycle association at feature and classifier level + LSR.

One step, as the reference computes it: the target batch is forwarded first, then the
source batch (separate forward passes, so each domain's batch gets its own BatchNorm
statistics, and the running statistics lean to the source, forwarded last). Source
image ``b`` is paired with target image ``b``. The loss is the source loss (cross-entropy
+ Lovasz at ``loss.lovasz_weight``) plus PLCA's terms (:func:`~plca.methods.plca_objective.plca_objective`,
weighted by the ``plca:`` section, at the reference's weights by default): LSR on the logits at
their own (1/8) resolution and the two associations. Target labels, when the target dataset
has them, are used for a diagnostic only (``assoc/*_target_acc``) and never reach a loss.
"""

from __future__ import annotations

from torch import nn

from plca.methods.addons.multi_resolution import detail_view
from plca.methods.base import Method, MethodContext, StepOutput
from plca.methods.plca_objective import PLCAOptions, plca_objective
from plca.methods.registry import register_method


@register_method
class PLCA(Method):
    name = "plca"
    uses_target = True
    plca_section = "on"
    test_time_aggregation = True  # the paper's numbers use it

    def __init__(self, segmentor: nn.Module, context: MethodContext) -> None:
        super().__init__(segmentor, context)
        self.plca_options: PLCAOptions = context.plca or PLCAOptions()

    def training_step(self, source: dict, target: dict | None, step: int) -> StepOutput:
        if target is None:
            raise ValueError("PLCA needs a target batch")
        generator = self.step_generator(step)  # HRDA's detail boxes
        tgt = self.segment(target["image"], generator=generator)
        src = self.segment(source["image"], generator=generator)
        loss, logs = self.supervised_loss(src, source["label"])
        # with HRDA, the association and LSR read the detail crops (detail_view: single-scale outputs pass)
        (src_view, src_labels), (tgt_view, tgt_labels) = (detail_view(src, source["label"]),
                                                          detail_view(tgt, target.get("label")))
        terms, term_logs = plca_objective(self.plca_options, src_view, tgt_view, src_labels, tgt_labels)
        loss = loss + terms
        logs.update(term_logs)
        logs["loss/total"] = loss.detach()
        return StepOutput(loss=loss, logs=logs)
