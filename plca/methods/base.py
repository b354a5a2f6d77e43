"""What a UDA method is here: an ``nn.Module`` that owns its segmentor and computes one training step.

A method holds the student segmentor it trains (and, where it has them, a teacher or
a frozen reference network) as submodules, so ``state_dict()`` and ``.to()`` cover all
of them and the engine checkpoints and resumes any method without knowing its parts.
The engine owns the loop, devices, precision, DDP and checkpoints; a method:

- turns a source batch (and a target batch, if it uses one) into a loss and scalars to
  log (:meth:`Method.training_step`);
- updates what is not trained by the optimiser after each update (:meth:`Method.after_update`,
  e.g. an EMA teacher);
- says which network to evaluate and export (:meth:`Method.inference_model`) and its
  test-time default (:attr:`Method.test_time_aggregation`).

A step with several forward passes may back-propagate a finished part of its loss early
(:meth:`Method.backward_part`, inside :meth:`Method.early_stage`), as DAFormer does with the
source loss before the mixed forward: the part's graph is freed before the next forwards, and
the gradients are the same as one backward of the sum. The engine allows it during its updates
(:meth:`Method.early_backward`); called directly, ``training_step`` returns the whole loss.

A method's own options are a dataclass (:attr:`Method.Options`), read from the config
section named after the method and handed over untouched by the engine. A method that adds
PLCA's terms (:mod:`plca.methods.plca_objective`) says so with :attr:`Method.plca_section` and
gets the ``plca:`` section too. :func:`add_term` adds a weighted term to a loss and logs it.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from plca.data.labels import IGNORE_INDEX
from plca.losses.lovasz import lovasz_softmax_global, lovasz_softmax_reference_ddp
from plca.methods.addons.multi_resolution import multi_resolution_loss


@dataclass
class StepOutput:
    loss: Tensor  # scalar to back-propagate
    logs: dict[str, Tensor] = field(default_factory=dict)  # detached scalars


@dataclass(frozen=True)
class MethodContext:
    """What a method is built from besides its segmentor.

    ``loss``: the loss settings every method shares (:class:`plca.config.LossConfig`); ``options``:
    the method's own section (an instance of its :attr:`Method.Options`, or None); ``plca``: the
    ``plca:`` section (:class:`~plca.methods.plca_objective.PLCAOptions`) for a method with a
    :attr:`Method.plca_section`, else None; ``classes``:
    class names in index order; ``model``: the model section (to build extra networks such
    as a frozen ImageNet model); ``iters``: the run's number of updates; ``seed``: the run's
    seed; ``eval_model``: which network to evaluate (``eval.model``: student | teacher | both).
    """

    loss: Any
    options: Any = None
    plca: Any = None
    classes: tuple[str, ...] = ()
    model: Any = None
    iters: int = 0
    seed: int = 0
    eval_model: str = "student"


class Method(nn.Module):
    """Base class: subclasses set :attr:`name` and implement :meth:`training_step`."""

    name: ClassVar[str] = "method"
    uses_target: ClassVar[bool] = False
    #: dataclass of the method's config section (``<name>:`` in the YAML), or None
    Options: ClassVar[type | None] = None
    #: config values this method changes by default (a nested dict over the config's sections)
    config_defaults: ClassVar[dict] = {}
    #: default of ``eval.test_time_aggregation`` when the config leaves it null
    test_time_aggregation: ClassVar[bool] = False
    #: whether it keeps a teacher network (``eval.model: teacher | both`` are then allowed)
    has_teacher: ClassVar[bool] = False
    #: whether it adds PLCA's terms and reads the ``plca:`` section: ``"on"`` (the section's
    #: reference weights by default), ``"off"`` (every weight 0 unless the config sets it) or None
    #: (no section: a ``plca:`` key is an error)
    plca_section: ClassVar[str | None] = None

    def __init__(self, segmentor: nn.Module, context: MethodContext) -> None:
        super().__init__()
        self.student = segmentor
        self.loss_config = context.loss
        self.options = context.options
        self.plca_options = context.plca
        self.classes = tuple(context.classes)
        self.seed = context.seed
        self.__dict__["_student_forward"] = None  # not a submodule: the engine's DDP wrapper of the student
        self.__dict__["_backward_part"] = None  # the engine's early backward, during its updates only
        self.__dict__["_micro_batch"] = 0  # which micro-batch of the step the engine is forwarding

    # ------------------------------------------------------------------ the engine's side

    def trainable_module(self) -> nn.Module:
        """The module whose parameters the optimiser updates and DDP synchronises."""
        return self.student

    def set_student_forward(self, wrapper: nn.Module | None) -> None:
        """Route the student's training forward passes through ``wrapper`` (DDP), or directly (None)."""
        self.__dict__["_student_forward"] = wrapper

    @contextlib.contextmanager
    def early_backward(self, backward: Callable[[Tensor], None]) -> Iterator[None]:
        """While active, :meth:`backward_part` back-propagates through ``backward(loss)`` (which
        scales the part as the step's loss is scaled and notes whether it is finite)."""
        self.__dict__["_backward_part"] = backward
        try:
            yield
        finally:
            self.__dict__["_backward_part"] = None

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        """While active, :meth:`step_generator` draws the numbers of micro-batch ``index`` of the step:
        under gradient accumulation each micro-batch gets its own ClassMix classes, masks and detail
        boxes, as separate steps would; micro-batch 0 draws what a step without accumulation draws."""
        self.__dict__["_micro_batch"] = int(index)
        try:
            yield
        finally:
            self.__dict__["_micro_batch"] = 0

    def inference_model(self) -> nn.Module:
        """The segmentor to evaluate, export and predict with."""
        return self.student

    def evaluation_models(self) -> dict[str, nn.Module]:
        """The networks validated during and after training, by name; the first is the run's result."""
        return {"student": self.inference_model()}

    def after_update(self, step: int) -> None:
        """Called after every optimiser update (``step`` = updates done so far)."""

    def target_border_margins(self) -> tuple[int, int, int, int] | None:
        """``(top, bottom, left, right)`` pixels of every target image (as stored) that the method wants
        marked in its batches' ``border_valid`` masks ``(B, H, W) bool``; None: no mask."""
        return None

    def training_step(self, source: dict, target: dict | None, step: int) -> StepOutput:
        """Loss and logs of one forward; ``source`` / ``target``: ``{'image': (B, 3, H, W), 'label': (B, H, W)}``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses

    def early_stage(self) -> contextlib.AbstractContextManager:
        """Context for the forward passes of a part given to :meth:`backward_part`: under DDP their
        gradients stay local (``no_sync``) and are all-reduced, summed with the rest, by the step's
        last backward."""
        wrapper = self.__dict__["_student_forward"]
        if self.__dict__["_backward_part"] is not None and hasattr(wrapper, "no_sync"):
            return wrapper.no_sync()
        return contextlib.nullcontext()

    def backward_part(self, loss: Tensor) -> Tensor:
        """Back-propagate the scalar ``loss`` now when the engine allows it, and return what the step's
        loss must still include: a detached zero then, else ``loss`` itself (one backward of the sum)."""
        backward = self.__dict__["_backward_part"]
        if backward is None or not loss.requires_grad:
            return loss
        backward(loss)
        return loss.new_zeros(())

    def step_generator(self, step: int) -> torch.Generator:
        """The step's random numbers (ClassMix, masks, HRDA's detail boxes): a function of (method, seed,
        step, process, micro-batch; see :meth:`micro_batch`), so a resumed run draws the same."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        micro = self.__dict__["_micro_batch"]
        key = f"{self.name}/{self.seed}/{step}/{rank}" + (f"/{micro}" if micro else "")
        return torch.Generator().manual_seed(zlib.crc32(key.encode()))

    def segment(self, images: Tensor, **options) -> dict[str, Tensor]:
        """The student's training forward ``{'features', 'logits'}`` (through DDP when the engine wraps it)."""
        forward = self.__dict__["_student_forward"] or self.student
        return forward(images, **options)

    def supervised_loss(self, output: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`source_loss` of a segmentor's output ``{'logits', ...}`` against labels ``(B, H, W)``; for a
        multi-resolution (HRDA) output, HRDA's sum of the fused and the detail prediction's losses
        (:func:`~plca.methods.addons.multi_resolution.multi_resolution_loss`; the detail's terms are logged
        as ``loss/<term>_detail``)."""
        collected: list[dict[str, Tensor]] = []

        def loss(logits: Tensor, target: Tensor, _weights: Tensor | None) -> Tensor:
            value, term_logs = self.source_loss(logits, target)
            collected.append(term_logs)
            return value

        total, _ = multi_resolution_loss(output, labels, loss)
        logs = collected[0]
        for key, value in (collected[1].items() if len(collected) > 1 else ()):
            if key.startswith("loss/"):
                logs[f"{key}_detail"] = value
        return total, logs

    def source_loss(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy (+ weighted Lovasz-softmax) on logits ``(B, K, h, w)`` upsampled to labels ``(B, H, W)``.

        The cross-entropy is averaged as ``loss.ce_average`` says (see :func:`cross_entropy`). A batch
        without any labelled pixel gives 0 with a zero gradient (and ``data/unlabelled_batch`` 1).
        Under DDP the Lovasz term sorts the pixels of every process together: a collective, so every
        process computes it. ``loss.lovasz_reduction``: ``global``, the exact loss of the global batch
        (:func:`~plca.losses.lovasz.lovasz_softmax_global`), or ``reference``, the PLCA reference's
        per-process class mean (:func:`~plca.losses.lovasz.lovasz_softmax_reference_ddp`).
        """
        upsampled = upsample(logits, labels.shape[-2:]).float()
        ce, valid = cross_entropy(upsampled, labels, average=self.loss_config.ce_average)
        loss, logs = ce, {"loss/source_ce": ce.detach(), "data/unlabelled_batch": (valid == 0).float()}
        if self.loss_config.lovasz_weight > 0:
            lovasz_loss = (lovasz_softmax_reference_ddp if self.loss_config.lovasz_reduction == "reference"
                           else lovasz_softmax_global)
            lovasz = lovasz_loss(upsampled.softmax(dim=1), labels, ignore_index=IGNORE_INDEX)
            loss = add_term(loss, logs, "source_lovasz", lovasz, self.loss_config.lovasz_weight)
        return loss, logs


def add_term(loss: Tensor | None, logs: dict[str, Tensor], name: str, value: Tensor, weight: float = 1.0) -> Tensor:
    """``loss + weight * value`` (``weight * value`` when ``loss`` is None), logging the scalar ``value``
    unweighted and detached as ``logs['loss/<name>']``."""
    logs[f"loss/{name}"] = value.detach()
    weighted = value if weight == 1.0 else weight * value
    return weighted if loss is None else loss + weighted


#: How :func:`cross_entropy` averages (``loss.ce_average``): over the labelled pixels (PyTorch's
#: mean, the PLCA reference) or over all pixels, ignored ones counting 0 (mmseg 0.16 / DAFormer).
CE_AVERAGES: tuple[str, ...] = ("labelled", "all_pixels")


def cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None,
                  average: str = "labelled") -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of ``(B, K, H, W)`` logits against ``(B, H, W)`` labels (255 = ignored).

    ``average``: ``labelled`` divides the sum over labelled pixels by their number (PyTorch's
    ``reduction='mean'`` with ``ignore_index``; 0 with a zero gradient when no pixel is labelled,
    where PyTorch gives NaN); ``all_pixels`` divides it by ``B * H * W`` (mmseg 0.16's
    ``weight_reduce_loss`` with no ``avg_factor``: ignored pixels count 0). With ``weights``
    ``(B, H, W)`` each pixel's loss is multiplied by its weight first. Returns ``(loss, number of
    labelled pixels)``.
    """
    if average not in CE_AVERAGES:
        raise ValueError(f"unknown cross-entropy average {average!r}; choose one of {', '.join(CE_AVERAGES)}")
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).sum()
    if weights is not None:
        per_pixel = per_pixel * weights
    if average == "all_pixels":
        return per_pixel.mean(), valid
    return per_pixel.sum() / valid.clamp(min=1), valid


def upsample(logits: Tensor, size: Sequence[int] | torch.Size) -> Tensor:
    """Bilinear (align_corners False) resize of ``(B, K, h, w)`` to ``(B, K, *size)``."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def resize_labels(labels: Tensor, size: Sequence[int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of labels ``(B, H, W)`` to ``(B, *size)``."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long()
