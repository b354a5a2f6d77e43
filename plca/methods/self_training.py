"""Self-training with an EMA teacher (DACS / DAFormer's recipe), optionally with PLCA's association on top.

One step (every constant is a key of the ``self_training:`` section, DAFormer's value by default):

1. **Source**: the student's supervised loss on the source batch (cross-entropy; Lovasz at
   ``loss.lovasz_weight``, 0 by default here), plus, with ``feature_distance.enabled``, the
   L2 distance of its bottleneck features to a frozen ImageNet model's on thing-class pixels.
2. **Pseudo-labels**: the EMA teacher predicts the *un-augmented* target batch; argmax labels,
   weighted by the fraction of confident pixels (max probability >= ``pseudo_label.threshold``);
   optionally the top / bottom rows get weight 0.
3. **ClassMix**: half of each source image's classes pasted onto its target image (labels: source
   labels there, pseudo-labels elsewhere; weight 1 on source pixels), then colour jitter and
   Gaussian blur; pixel-weighted cross-entropy of the student on the mix.
4. **MIC** (``masking.enabled``): the strongly augmented target with random patches masked must
   predict the pseudo-labels (weighted), at ``masking.weight``.
5. **PLCA on top** (any weight of the ``plca:`` section > 0; all 0 by default here): PLCA's terms
   (LSR and the two associations) of the student's source forward and its forward of the
   **un-mixed, un-augmented** target batch, computed exactly as the ``plca`` method does (the same
   :func:`~plca.methods.plca_objective.plca_objective`). The un-mixed target is used because the
   cycle i -> j -> i' needs target pixels that are all target: a mixed image carries source pixels
   (whose labels would make the cycles trivially positive) and its strong augmentation changes the
   appearance PLCA's feature-level similarity is meant to bridge. It is forwarded first, as in the
   ``plca`` method.

With ``staged_backward`` (default), as DAFormer and MIC do, the source part (1, and 5's terms) is
back-propagated before the teacher and the mixed forward, and with MIC the mix before the masked
forward: one graph at a time in memory, the same gradients as one backward of the sum.

**With HRDA** (``model.hrda.enabled``, :mod:`plca.models.hrda`), as HRDA's ``dacs.py`` and MIC on HRDA
do: every student forward is HRDA's (a context view and a random detail crop, fused) and each
supervised or pseudo-labelled loss is HRDA's ``(1 - lambda_d) * fused + lambda_d * detail``; the
teacher (eval mode) predicts the whole target crop fused with the detail scale by sliding windows;
ClassMix and the pseudo-label weights act on the full-resolution crop; the feature distance compares
the context view's bottleneck with the frozen network's of the same view; MIC masks the whole target
crop, whose HRDA forward draws its own detail crop; PLCA's terms read the detail crops (source and
target), whose embeddings are at full resolution, with the labels of the source's detail box.

After each optimiser update the teacher follows the student (alpha = min(1 - 1/(t + 1), alpha_max)).
The teacher is a submodule: it is in every checkpoint (keys ``teacher.*``) and a resumed run
continues with it exactly. ``eval.model`` picks which network is evaluated and exported (student, as papers report; teacher; or both,
each in ``metrics.json``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plca.data.labels import IGNORE_INDEX
from plca.methods.addons import (EMATeacher, class_mix, detail_view, feature_distance_loss, mask_images,
                                 multi_resolution_loss, normalized_zero, patch_mask, pseudo_label_accuracy,
                                 pseudo_labels, strong_augment, thing_class_indices)
from plca.methods.base import Method, MethodContext, StepOutput, add_term, cross_entropy, upsample
from plca.methods.plca_objective import plca_objective
from plca.methods.registry import register_method


@dataclass
class TeacherOptions:
    alpha: float = 0.999  # alpha_max of the EMA (0.99 in plain DACS)
    batch_norm: str = "batch"  # batch: BatchNorm with the target batch's statistics, as DAFormer | running


@dataclass
class PseudoLabelOptions:
    threshold: float = 0.968  # confidence for a pixel to count in the pseudo-label weight
    ignore_top: int = 0  # rows of the target crop with weight 0 (DAFormer's Cityscapes configs: 15)
    ignore_bottom: int = 0  # (DAFormer's Cityscapes configs: 120; the ego-car)
    # [top, bottom, left, right] pixels at the borders of each target image as stored, weight 0 wherever a
    # crop reaches them (HRDA's pseudo-label cropping v2 on Cityscapes: [30, 240, 30, 30]); null = none
    image_margins: list[int] | None = None


@dataclass
class AugmentOptions:
    mix: str = "class"  # class (ClassMix) | none (the target alone, strongly augmented)
    jitter_strength: float = 0.2  # colour jitter strength s (brightness, contrast, saturation, hue)
    # chance that a batch is colour-jittered: DAFormer's color_jitter_probability 0.2 jitters when a
    # uniform draw exceeds it, i.e. 80 % of the time
    jitter_probability: float = 0.8  # chance that a batch is colour-jittered (see above)
    blur_probability: float = 0.5  # DAFormer's blur=True blurs when a draw exceeds 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])  # Gaussian blur sigma, uniform in [lo, hi]


@dataclass
class FeatureDistanceOptions:
    enabled: bool = False  # ImageNet feature distance on thing classes (needs model.pretrained)
    weight: float = 0.005  # its loss weight (DAFormer's lambda_FD)
    min_ratio: float = 0.75  # share of a feature cell a class must cover for its label to count


@dataclass
class MaskingOptions:  # MIC's masked image consistency
    enabled: bool = False  # MIC: masked target images must predict the pseudo-labels
    weight: float = 1.0  # its loss weight
    patch_size: int = 64  # masked patches are patch_size x patch_size pixels
    ratio: float = 0.7  # share of patches masked


@dataclass
class SelfTrainingOptions:
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    pseudo_label: PseudoLabelOptions = field(default_factory=PseudoLabelOptions)
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    feature_distance: FeatureDistanceOptions = field(default_factory=FeatureDistanceOptions)
    masking: MaskingOptions = field(default_factory=MaskingOptions)
    staged_backward: bool = True  # back-propagate each part (source, then mix with MIC) before the next forward, as DAFormer: same gradients, less memory; false = one backward

    def validate(self, config) -> None:
        """Checks across keys; raises ``ValueError`` naming the key."""
        if not 0.0 <= self.teacher.alpha <= 1.0:
            raise ValueError("self_training.teacher.alpha must be in [0, 1]")
        if self.teacher.batch_norm not in ("batch", "running"):
            raise ValueError("self_training.teacher.batch_norm must be batch or running")
        if not 0.0 <= self.pseudo_label.threshold <= 1.0:
            raise ValueError("self_training.pseudo_label.threshold must be in [0, 1]")
        if self.pseudo_label.ignore_top < 0 or self.pseudo_label.ignore_bottom < 0:
            raise ValueError("self_training.pseudo_label.ignore_top / ignore_bottom must be >= 0")
        margins = self.pseudo_label.image_margins
        if margins is not None:
            if len(margins) != 4 or any(int(m) < 0 for m in margins):
                raise ValueError("self_training.pseudo_label.image_margins must be [top, bottom, left, right], "
                                 f"each >= 0, got {list(margins)}")
            if self.pseudo_label.ignore_top or self.pseudo_label.ignore_bottom:
                raise ValueError("self_training.pseudo_label.image_margins and ignore_top / ignore_bottom are two "
                                 "ways to mask the borders (the image's or the crop's): set one of them (the "
                                 "others null / 0), as HRDA does")
        if self.augment.mix not in ("class", "none"):
            raise ValueError("self_training.augment.mix must be class or none")
        for key in ("jitter_probability", "blur_probability"):
            if not 0.0 <= getattr(self.augment, key) <= 1.0:
                raise ValueError(f"self_training.augment.{key} must be in [0, 1]")
        sigma = self.augment.blur_sigma
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            raise ValueError("self_training.augment.blur_sigma must be [lo, hi] with 0 < lo <= hi")
        if self.feature_distance.enabled and not config.model.pretrained:
            raise ValueError("self_training.feature_distance needs model.pretrained: the frozen ImageNet model it "
                             "measures against is built from those weights (or set "
                             "self_training.feature_distance.enabled=false)")
        if self.feature_distance.weight < 0 or self.masking.weight < 0:
            raise ValueError("self_training.feature_distance.weight and masking.weight must be >= 0")
        if self.masking.patch_size < 1 or not 0.0 <= self.masking.ratio < 1.0:
            raise ValueError("self_training.masking.patch_size must be >= 1 and masking.ratio in [0, 1)")


class FrozenNetwork(nn.Module):
    """A network that never trains: no gradients, always in eval mode, run without autograd."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenNetwork:  # noqa: ARG002
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """The backbone's last map ``(B, C, h, w)`` of RGB 0-255 images."""
        with torch.no_grad():
            return self.network.levels(images)[-1]


@register_method
class SelfTraining(Method):
    name = "self_training"
    uses_target = True
    has_teacher = True
    Options = SelfTrainingOptions
    # DAFormer's losses: plain cross-entropy averaged as mmseg 0.16 does; PLCA's terms only when asked for
    config_defaults = {"loss": {"lovasz_weight": 0.0, "ce_average": "all_pixels"}}
    plca_section = "off"

    def __init__(self, segmentor: nn.Module, context: MethodContext) -> None:
        super().__init__(segmentor, context)
        options: SelfTrainingOptions = context.options or SelfTrainingOptions()
        self.options = options
        self.seed = context.seed
        self.eval_model = context.eval_model
        self.teacher = EMATeacher(segmentor, alpha_max=options.teacher.alpha, batch_norm=options.teacher.batch_norm)
        self.imagenet: FrozenNetwork | None = None
        if options.feature_distance.enabled:
            from plca.models.segmentor import build_segmentor

            self.imagenet = FrozenNetwork(build_segmentor(context.model, len(context.classes)))
        self.thing_classes = thing_class_indices(context.classes)
        self.mask_fill = normalized_zero(segmentor.normalizer.normalization)

    # ------------------------------------------------------------------ the engine's side

    def after_update(self, step: int) -> None:
        self.teacher.update(self.student, step)

    def target_border_margins(self) -> tuple[int, int, int, int] | None:
        margins = self.options.pseudo_label.image_margins
        return None if margins is None else tuple(int(m) for m in margins)  # type: ignore[return-value]

    def inference_model(self) -> nn.Module:
        return self.teacher.model if self.eval_model == "teacher" else self.student

    def evaluation_models(self) -> dict[str, nn.Module]:
        models = {"student": self.student, "teacher": self.teacher.model}
        if self.eval_model == "both":
            return models
        return {self.eval_model: models[self.eval_model]}

    # ------------------------------------------------------------------ one step

    def _generator(self, step: int) -> torch.Generator:
        """The step's random numbers: a function of (seed, step, process), so a resumed run draws the same."""
        return self.step_generator(step)

    def training_step(self, source: dict, target: dict | None, step: int) -> StepOutput:
        if target is None:
            raise ValueError("self-training needs a target batch")
        options = self.options
        generator = self._generator(step)
        logs: dict[str, Tensor] = {}
        # each part's graph is freed before the next part's forwards when the engine allows it
        stage = self.early_stage if options.staged_backward else contextlib.nullcontext
        release = self.backward_part if options.staged_backward else (lambda part: part)
        mix_goes_early = options.masking.enabled  # the masked forward comes after it

        with stage():
            first = self._source_part(source, target, logs, generator)
            total = first.detach()
            loss = release(first)

        labels, weights = self._pseudo_labels(target, logs)
        images, mixed_labels, mixed_weights = target["image"], labels, weights
        if options.augment.mix == "class":
            images, mixed_labels, mixed_weights, _ = class_mix(source["image"], source["label"], target["image"],
                                                               labels, weights, generator)
        images = self._augment(images, generator)
        with stage() if mix_goes_early else contextlib.nullcontext():
            mixed = self.segment(images, generator=generator)
            mix = add_term(None, logs, "mix_ce", pseudo_label_loss(mixed, mixed_labels, mixed_weights))
            total = total + mix.detach()
            loss = loss + (release(mix) if mix_goes_early else mix)

        if options.masking.enabled:
            masks = patch_mask(target["image"], generator, options.masking.patch_size, options.masking.ratio)
            masked = mask_images(self._augment(target["image"], generator), masks.to(target["image"].device),
                                 self.mask_fill)
            masked_out = self.segment(masked, generator=generator)
            masked_part = add_term(None, logs, "masked_ce", pseudo_label_loss(masked_out, labels, weights),
                                   options.masking.weight)
            total = total + masked_part.detach()
            loss = loss + masked_part
        logs["loss/total"] = total
        return StepOutput(loss=loss, logs=logs)

    def _source_part(self, source: dict, target: dict, logs: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """The loss terms of the student's source forward (and, with PLCA on top, of its un-mixed
        target forward, made first): supervised loss, feature distance, PLCA's terms."""
        with_plca = self.plca_options is not None and self.plca_options.enabled()
        tgt = self.segment(target["image"], generator=generator) if with_plca else None
        src = self.segment(source["image"], return_bottleneck=self.imagenet is not None, generator=generator)

        loss, source_logs = self.supervised_loss(src, source["label"])
        logs.update(source_logs)
        if self.imagenet is not None:
            fd = self.options.feature_distance
            # HRDA: the bottleneck is the context view's, and the frozen network sees that view
            reference = self.imagenet(self.student.bottleneck_view(source["image"]))
            distance = feature_distance_loss(src["bottleneck"], reference, source["label"],
                                             self.thing_classes, min_ratio=fd.min_ratio)
            loss = add_term(loss, logs, "feature_distance", distance, fd.weight)
        if with_plca:
            # with HRDA: the detail crops' views (see plca.methods.addons.multi_resolution.detail_view)
            (src_view, src_labels), (tgt_view, tgt_labels) = (detail_view(src, source["label"]),
                                                              detail_view(tgt, target.get("label")))
            terms, term_logs = plca_objective(self.plca_options, src_view, tgt_view, src_labels, tgt_labels)
            loss = loss + terms
            logs.update(term_logs)
        return loss

    def _pseudo_labels(self, target: dict, logs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        opts = self.options.pseudo_label
        teacher_logits = self.teacher(target["image"])["logits"].float()
        labels, weights = pseudo_labels(teacher_logits, target["image"].shape[-2:], opts.threshold,
                                        opts.ignore_top, opts.ignore_bottom)
        if opts.image_margins is not None:
            if "border_valid" not in target:
                raise ValueError("self_training.pseudo_label.image_margins is set but the target batch has no "
                                 "'border_valid' masks (build the target with target_border_margins())")
            weights = weights * target["border_valid"].to(weights.dtype)  # after the confidence share, as HRDA
        logs["pseudo/weight"] = weights.mean()
        logs["pseudo/alpha"] = torch.tensor(self.teacher.alpha(int(self.teacher.step) + 1))
        target_labels = target.get("label")
        if target_labels is not None and bool((target_labels != IGNORE_INDEX).any()):
            # a diagnostic only: the target's labels never reach a loss
            logs["pseudo/accuracy"] = pseudo_label_accuracy(labels, target_labels)
        return labels, weights

    def _augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        opts = self.options.augment
        return strong_augment(images, generator, opts.jitter_strength, opts.jitter_probability, opts.blur_probability,
                              tuple(opts.blur_sigma))


def pseudo_label_loss(output: dict[str, Tensor], labels: Tensor, weights: Tensor) -> Tensor:
    """:func:`weighted_cross_entropy` of a segmentor output's logits upsampled to ``labels`` ``(B, H, W)``;
    for an HRDA output, HRDA's weighted sum of the fused and the detail terms (the detail in its box)."""
    def loss(logits: Tensor, target: Tensor, pixel_weights: Tensor | None) -> Tensor:
        return weighted_cross_entropy(upsample(logits, target.shape[-2:]).float(), target, pixel_weights)

    return multi_resolution_loss(output, labels, loss, weights)[0]


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """DAFormer's pixel-weighted cross-entropy: ``mean over all pixels of weight * CE`` (ignored pixels count 0).

    As mmseg 0.16 computes DAFormer's mix loss (``seg_weight`` = the pseudo-label weights,
    ``weight_reduce_loss`` without ``avg_factor``), whatever ``loss.ce_average`` says for the source.
    logits ``(B, K, H, W)``, labels ``(B, H, W)`` (255 = ignore), weights ``(B, H, W)``.
    """
    return cross_entropy(logits, labels, weights, average="all_pixels")[0]
