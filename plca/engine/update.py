"""One optimiser update: gradient accumulation, mixed precision, and the guard against non-finite values."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from plca.engine.distributed import DistInfo, all_true


class UpdateOutcome(enum.Enum):
    APPLIED = "applied"  # the optimiser stepped
    SKIPPED = "skipped"  # non-finite loss or gradient: no step, BatchNorm statistics restored
    DIVERGED = "diverged"  # the step made a weight or buffer non-finite (the model cannot be trusted)


def to_device(batch: dict | None, device: torch.device, channels_last: bool = False) -> dict | None:
    """Images as float ``(B, 3, H, W)``, labels (and a target's ``border_valid`` masks) on ``device``
    (None stays None)."""
    if batch is None:
        return None
    images = batch["image"].to(device, non_blocking=True).float()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    moved = {"image": images, "label": batch["label"].to(device, non_blocking=True)}
    if "border_valid" in batch:
        moved["border_valid"] = batch["border_valid"].to(device, non_blocking=True)
    return moved


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every value of every floating-point tensor is finite (one sync). Each tensor is tested
    value by value: a sum would overflow to inf for large finite values and skip a sound update."""
    checks = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(checks).all().item()) if checks else True


def update(method: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[tuple[dict, dict | None]],
           step: int, info: DistInfo, ddp: nn.Module | None, use_amp: bool, channels_last: bool,
           on_logs: Callable[[dict], None]) -> UpdateOutcome:
    """Forward and backward every ``(source, target)`` micro-batch of ``batches``, then step the optimiser.

    Each micro-batch's loss (and each part a method back-propagates early, see
    :meth:`~plca.methods.base.Method.backward_part`) is divided by the number of micro-batches;
    DDP synchronises gradients on the last backward of the last one only. The step is skipped on
    every process when any loss or gradient is non-finite anywhere, and the BatchNorm statistics
    the forward passes changed are put back. On an exception the statistics are put back too, so
    the model is that of the previous update.
    """
    trained = method.trainable_module()
    buffers = [buffer.detach().clone() for buffer in method.buffers()]
    optimizer.zero_grad(set_to_none=True)
    finite = True
    try:
        for micro, (source, target) in enumerate(batches):
            source = to_device(source, info.device, channels_last)
            target = to_device(target, info.device, channels_last)
            last = micro == len(batches) - 1
            no_sync = ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()
            autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp
                        else contextlib.nullcontext())
            parts_finite: list[Tensor] = []

            def backward_part(loss: Tensor, parts_finite: list[Tensor] = parts_finite) -> None:
                parts_finite.append(torch.isfinite(loss.detach()))
                (loss / len(batches)).backward()

            with no_sync:
                with autocast, method.early_backward(backward_part), method.micro_batch(micro):
                    output = method.training_step(source, target, step)
                finite = finite and bool(torch.stack([torch.isfinite(output.loss.detach()), *parts_finite]).all())
                (output.loss / len(batches)).backward()
            on_logs(output.logs)
    except BaseException:
        optimizer.zero_grad(set_to_none=True)
        _restore(method, buffers)
        raise
    gradients = [p.grad for p in trained.parameters() if p.grad is not None]
    if not all_true(finite and all_finite(gradients), info.device):
        optimizer.zero_grad(set_to_none=True)
        _restore(method, buffers)  # the forward passes may have put NaN into BatchNorm statistics
        return UpdateOutcome.SKIPPED
    optimizer.step()
    if not all_true(all_finite(list(trained.parameters()) + list(trained.buffers())), info.device):
        return UpdateOutcome.DIVERGED
    method.after_update(step + 1)
    return UpdateOutcome.APPLIED


@torch.no_grad()
def _restore(method: nn.Module, saved: Sequence[Tensor]) -> None:
    for buffer, value in zip(method.buffers(), saved):
        buffer.copy_(value)
