"""PLCA's objective: its config section (``plca:``), its table of terms, and the one function that computes them.

PLCA adds three terms to a method's source loss (docs/method.md): LSR on the source and target logits,
and the pixel-level cycle association at feature level (``cos`` on the segmentor's ``features``)
and at classifier level (``kl`` on the class probabilities). Every method that adds them calls
:func:`plca_objective` with its source and target forwards and reads the ``plca:`` config section,
typed by :class:`PLCAOptions`; a method says whether it has the section, and whether the terms
are on by default, with :attr:`plca.methods.base.Method.plca_section` (``plca``: on, at the
reference's weights; ``self_training``: off, every weight 0 unless its config sets it;
``source_only``: no section).

The terms are a table, :data:`TERMS`: each term's name (logged as ``loss/<name>``), the key of
its weight in the section, and a function of the two forwards that returns its unweighted value
and its diagnostics. A new term is a row of the table plus its weight's field in
:class:`PLCAOptions`, both in this file: the config (typing, validation, ``plca config --show``,
the per-method default weight) and every method with the section take it unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plca.data.labels import IGNORE_INDEX
from plca.losses.association import associate
from plca.losses.association_common import IMPLS, REDUCTIONS, SIMILARITY_DTYPES
from plca.losses.lsr import lsr_loss
from plca.methods.base import add_term, resize_labels


@dataclass
class AssociationOptions:
    feature_weight: float = 0.1  # cos association on the model's features (model.features)
    classifier_weight: float = 0.1  # kl association on class probabilities
    aggregate: bool = True  # spatial aggregation of the target map before associating
    alpha: float = 0.5  # (1 - alpha) x + alpha A(x) in the spatial aggregation
    impl: str = "efficient"  # efficient (exact, memory linear in the pixels) | dense (the N x M reference)
    reduction: str = "pooled"  # pooled: one mean over the positives of the whole batch (the reference) | pairs
    similarity_dtype: str = "float32"  # float32 products even under AMP (bf16 flips top-1 cycles) | autocast | bfloat16


@dataclass
class PLCAOptions:
    """The ``plca:`` section. Defaults are the PLCA reference's values."""

    lsr_weight: float = 0.01  # LSR on source and target log-softmax
    lsr_threshold: float = 10.0  # LSR keeps -mean_c log p_c near this value
    association: AssociationOptions = field(default_factory=AssociationOptions)  # the cycle association, two levels

    def validate(self, config=None) -> None:  # noqa: ARG002 - the signature of every section's check
        """Checks that types alone cannot express; raises ``ValueError`` naming the key."""
        for term in TERMS:
            if term.weight(self) < 0:
                raise ValueError(f"plca.{term.weight_key} must be >= 0, got {term.weight(self)}")
        if self.lsr_threshold <= 0:
            raise ValueError(f"plca.lsr_threshold must be > 0, got {self.lsr_threshold}")
        assoc = self.association
        if not 0.0 <= assoc.alpha <= 1.0:
            raise ValueError(f"plca.association.alpha must be in [0, 1], got {assoc.alpha}")
        for key, allowed in (("impl", IMPLS), ("reduction", REDUCTIONS), ("similarity_dtype", SIMILARITY_DTYPES)):
            if getattr(assoc, key) not in allowed:
                raise ValueError(f"plca.association.{key} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(assoc, key)!r}")

    def enabled(self) -> bool:
        """Whether any term has a weight > 0 (a method then forwards the target batch for them)."""
        return any(term.weight(self) > 0 for term in TERMS)


@dataclass(frozen=True)
class PLCAInputs:
    """What a term is computed from: one step's two forwards and the source labels.

    ``source`` / ``target``: segmentor outputs ``{'features': (B, C, h, w), 'logits': (B, K, h', w')}``
    (source image ``b`` is paired with target image ``b``); ``source_labels`` ``(B, H, W)``, 255
    ignored; ``target_labels`` ``(B, H, W)`` or None (None too when every pixel is ignored): for
    diagnostics only, never a loss.
    """

    source: dict[str, Tensor]
    target: dict[str, Tensor]
    source_labels: Tensor
    target_labels: Tensor | None = None


@dataclass(frozen=True)
class PLCATerm:
    """One row of :data:`TERMS`."""

    name: str  # logged as loss/<name> (unweighted)
    weight_key: str  # its weight in the plca: section, dotted below plca. (e.g. association.feature_weight)
    compute: Callable[[PLCAInputs, PLCAOptions], tuple[Tensor, dict[str, Tensor]]]  # unweighted value, diagnostics

    def weight(self, options: PLCAOptions) -> float:
        return functools.reduce(getattr, self.weight_key.split("."), options)


def lsr_term(inputs: PLCAInputs, options: PLCAOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """LSR of the source plus LSR of the target logits, each at its own (1/8) resolution."""
    threshold = options.lsr_threshold
    return (lsr_loss(inputs.source["logits"].float(), threshold)
            + lsr_loss(inputs.target["logits"].float(), threshold)), {}


def feature_association_term(inputs: PLCAInputs, options: PLCAOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """Cycle association (``cos``) of the two feature maps."""
    return _association("feature", "cos", inputs.source["features"], inputs.target["features"], inputs, options)


def classifier_association_term(inputs: PLCAInputs, options: PLCAOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """Cycle association (``kl``) of the two maps of class probabilities."""
    return _association("classifier", "kl", inputs.source["logits"].float().softmax(dim=1),
                        inputs.target["logits"].float().softmax(dim=1), inputs, options)


def _association(level: str, metric: str, source_map: Tensor, target_map: Tensor, inputs: PLCAInputs,
                 options: PLCAOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """The association loss of two maps, the labels resized (nearest) to each map, and its diagnostics
    ``assoc/<level>_{positive_ratio, cover_ratio, target_acc}``."""
    assoc = options.association
    labels = resize_labels(inputs.source_labels, source_map.shape[-2:])
    target_labels = (None if inputs.target_labels is None
                     else resize_labels(inputs.target_labels, target_map.shape[-2:]))
    result = associate(source_map, target_map, labels, metric=metric, aggregate=assoc.aggregate, alpha=assoc.alpha,
                       ignore_index=IGNORE_INDEX, impl=assoc.impl, target_labels=target_labels,
                       reduction=assoc.reduction, similarity_dtype=assoc.similarity_dtype)
    logs = {f"assoc/{level}_positive_ratio": result.positive_ratio.detach().float(),
            f"assoc/{level}_cover_ratio": result.cover_ratio.detach().float()}
    if result.target_accuracy is not None:
        logs[f"assoc/{level}_target_acc"] = result.target_accuracy.detach().float()
    return result.loss, logs


#: PLCA's terms, in the order they are added and logged.
TERMS: list[PLCATerm] = [
    PLCATerm("lsr", "lsr_weight", lsr_term),
    PLCATerm("assoc_feature", "association.feature_weight", feature_association_term),
    PLCATerm("assoc_classifier", "association.classifier_weight", classifier_association_term),
]


def zero_weights() -> dict:
    """``plca:`` data that switches every term off (the defaults of a method whose terms are off)."""
    data: dict = {}
    for term in TERMS:
        *parents, leaf = term.weight_key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = 0.0
    return data


def plca_terms(options: PLCAOptions, source: dict[str, Tensor], target: dict[str, Tensor], source_labels: Tensor,
               target_labels: Tensor | None = None) -> Iterator[tuple[PLCATerm, Tensor, dict[str, Tensor]]]:
    """Each term with a weight > 0: ``(term, unweighted value, diagnostics)`` (arguments as :func:`plca_objective`)."""
    if target_labels is not None and not bool((target_labels != IGNORE_INDEX).any()):
        target_labels = None
    inputs = PLCAInputs(source, target, source_labels, target_labels)
    for term in TERMS:
        if term.weight(options) > 0:
            value, diagnostics = term.compute(inputs, options)
            yield term, value, diagnostics


def plca_objective(options: PLCAOptions, source: dict[str, Tensor], target: dict[str, Tensor],
                   source_labels: Tensor, target_labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PLCA's terms added to a source loss: their weighted sum (a float32 scalar) and their logs.

    ``source`` / ``target``: the segmentor's outputs on the paired batches
    ``{'features': (B, C, h, w), 'logits': (B, K, h', w')}``; ``source_labels`` ``(B, H, W)``
    (255 ignored), resized (nearest) to each map a term reads; ``target_labels`` ``(B, H, W)`` or
    None, for the diagnostics ``assoc/*_target_acc`` only. Logs each term's unweighted value as
    ``loss/<name>`` and its diagnostics; a term of weight 0 is not computed (0 and no logs when
    every weight is 0).
    """
    loss = source["logits"].new_zeros((), dtype=torch.float32)
    logs: dict[str, Tensor] = {}
    for term, value, diagnostics in plca_terms(options, source, target, source_labels, target_labels):
        loss = add_term(loss, logs, term.name, value, term.weight(options))
        logs.update(diagnostics)
    return loss, logs
