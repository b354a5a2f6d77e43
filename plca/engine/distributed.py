"""Process-group set-up for ``torchrun`` (NCCL on GPU, gloo on CPU) and small collective helpers."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class DeviceError(RuntimeError):
    """The configured device does not exist on this machine."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local GPU if there is one, else CPU; ``cuda`` -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device '{name}' is unknown; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' was asked for but PyTorch sees no CUDA GPU (set device=cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}' was asked for but PyTorch sees {torch.cuda.device_count()} GPU(s)")
    return device


def init_distributed(device_name: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); else a single process.

    Every collective waits at most ``timeout_s`` for the other processes; past it the job ends
    with an error instead of hanging on a dead or diverged peer (NCCL: with its asynchronous
    error handling, which PyTorch enables by default).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over all processes (the tensor itself when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def summed_count(count: int, info: DistInfo) -> int:
    """A count each process keeps for itself, summed over all processes (collective under DDP)."""
    if info.enabled:
        mean = all_reduce_mean(torch.tensor([float(count)], device=info.device)).item()
        count = round(mean * info.world_size)
    return count


def all_true(flag: bool, device: torch.device) -> bool:
    """True on every process iff ``flag`` is true on every process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every process iff ``flag`` is true on some process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0.5)


def broadcast_object(value, src: int = 0):
    """``value`` of process ``src`` on every process (``value`` itself when not distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over processes, in place.

    Plain BatchNorm under DDP updates each process's running statistics from its own
    batches only; averaging them before evaluating or saving gives every process the same model.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()
