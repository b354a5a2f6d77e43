"""Collectives for losses computed over the whole global batch of a process group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (default: the world); 1 without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_gather_rows(tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Every process's rows of each tensor, concatenated in rank order.

    ``tensors``: tensors ``(R, ...)`` sharing their row count ``R``, which may differ between
    processes (the trailing shapes and dtypes must agree). Returns one tensor ``(sum_r R_r, ...)`` per
    input, identical on every process, in which this process's own rows are the input itself (still
    differentiable) and the other processes' rows are detached copies. One collective gathers the row
    counts, then each tensor is zero-padded to the largest count and gathered (and the padding dropped).
    Without an initialised process group (or with one process) the inputs come back unchanged.
    """
    world = group_size(group)
    if world == 1:
        return list(tensors)
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise ValueError(f"all_gather_rows: the tensors must share their row count, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    device = tensors[0].device
    count = torch.tensor([rows], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    largest = max(counts)
    if largest == 0:
        return list(tensors)
    rank = dist.get_rank(group)
    gathered = []
    for tensor in tensors:
        padded = tensor.detach().new_zeros((largest, *tensor.shape[1:]))
        padded[:rows] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        gathered.append(torch.cat([tensor if r == rank else parts[r][:counts[r]] for r in range(world)]))
    return gathered


def undo_gradient_averaging(loss: Tensor, world: int) -> Tensor:
    """``loss`` with its value unchanged and its gradient multiplied by ``world``:
    ``loss + (world - 1) * (loss - loss.detach())``. For a loss whose every process back-propagates
    only into its own share of a global quantity: DDP divides the summed gradients by ``world``."""
    if world == 1:
        return loss
    return loss + (world - 1) * (loss - loss.detach())
