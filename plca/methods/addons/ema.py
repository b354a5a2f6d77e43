"""An exponential-moving-average (mean) teacher of a student network.

After the student's ``k``-th optimiser update the teacher's parameters become

    alpha_k * teacher + (1 - alpha_k) * student,    alpha_k = min(1 - 1 / (k + 1), alpha_max)

(DAFormer's ``_update_ema(iter)`` with ``iter`` = the updates done so far: its first update,
after one optimiser step, uses alpha 0.5; the teacher starts as an exact copy of the student).

Buffers (BatchNorm running statistics and counters) are *copied* from the student at every
update. DAFormer averages parameters only and runs its teacher in training mode with dropout and
drop-path off, so its BatchNorm layers normalise with the target batch's own statistics; that is
``batch_norm="batch"`` here (the default): dropout and drop-path stay off (eval mode) and only the
BatchNorm layers use the batch's statistics, without changing the running ones. With
``batch_norm="running"`` the teacher normalises with the running statistics, which the copy from
the student keeps current (the student's estimate) instead of frozen at their initial values.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMATeacher", "ema_alpha"]


def ema_alpha(step: int, alpha_max: float = 0.999) -> float:
    """``min(1 - 1 / (step + 1), alpha_max)``: the weight of the old teacher at update ``step``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), alpha_max)


class EMATeacher(nn.Module):
    """A frozen copy of ``student`` that follows it by exponential moving average.

    The copy is ``self.model`` (state-dict keys ``model.*``, so ``teacher.model.*`` inside a
    method that names it ``teacher``), with ``requires_grad`` off everywhere and always in eval
    mode: :meth:`train` is overridden so that a parent's ``.train()`` never turns dropout,
    drop-path or BatchNorm's batch statistics back on. :meth:`forward` runs without autograd.
    ``step`` (an int64 buffer, saved in the state dict) is the student update the teacher last
    followed.

    Pass the plain student module, not a DDP wrapper of it, and build the teacher after the
    student's initial weights are loaded (or call :meth:`copy_from` then).
    """

    step: Tensor

    def __init__(self, student: nn.Module, alpha_max: float = 0.999, batch_norm: str = "batch") -> None:
        super().__init__()
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
        if batch_norm not in ("batch", "running"):
            raise ValueError(f"batch_norm must be 'batch' or 'running', got {batch_norm!r}")
        self.alpha_max = float(alpha_max)
        self.batch_norm = batch_norm
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        for param in self.model.parameters():
            param.grad = None  # a deep copy would carry the student's current gradients
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        """Stay in eval mode whatever ``mode`` is."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), self._batch_statistics():
            return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def _batch_statistics(self):
        """With ``batch_norm="batch"``: BatchNorm layers normalise with the batch's statistics for
        this call (momentum 0 keeps the running statistics as they are); everything else stays in eval."""
        layers = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
            if self.batch_norm == "batch" else []
        saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                 for m in layers]
        for m in layers:
            m.train(True)
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, count) in zip(layers, saved):
                m.train(False)
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)

    def alpha(self, step: int) -> float:
        return ema_alpha(step, self.alpha_max)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of ``student`` again (``step`` back to 0)."""
        self._follow(student, alpha=0.0)
        self.step.zero_()

    @torch.no_grad()
    def update(self, student: nn.Module, step: int | None = None) -> float:
        """Move the parameters towards ``student`` after its update ``step`` and copy its buffers.

        ``step``: the student updates done so far (``self.step + 1`` when None). Returns the alpha used.
        """
        step = int(self.step) + 1 if step is None else int(step)
        alpha = self.alpha(step)
        self._follow(student, alpha)
        self.step.fill_(step)
        return alpha

    def _follow(self, student: nn.Module, alpha: float) -> None:
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student.named_parameters())
        teacher_buffers = dict(self.model.named_buffers())
        student_buffers = dict(student.named_buffers())
        if teacher_params.keys() != student_params.keys() or teacher_buffers.keys() != student_buffers.keys():
            missing = sorted((teacher_params.keys() | teacher_buffers.keys())
                             ^ (student_params.keys() | student_buffers.keys()))
            raise ValueError(f"the student's structure differs from the teacher's: {missing[:5]} "
                             f"are in only one of them (pass the plain student, not a wrapper)")
        for name, teacher_param in teacher_params.items():
            source = student_params[name].detach()
            if source.shape != teacher_param.shape:
                raise ValueError(f"parameter {name!r}: student shape {tuple(source.shape)} != "
                                 f"teacher shape {tuple(teacher_param.shape)}")
            if teacher_param.is_floating_point() and alpha > 0.0:
                teacher_param.mul_(alpha).add_(source.to(teacher_param.dtype), alpha=1.0 - alpha)
            else:
                teacher_param.copy_(source)
        for name, teacher_buffer in teacher_buffers.items():
            teacher_buffer.copy_(student_buffers[name].detach())
