"""Saving and restoring a run: what goes into ``last.pt`` and the model files, on every process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from plca.engine.checkpoint import (CheckpointError, atomic_save, load_checkpoint, nonfinite_tensors, rng_state,
                                    set_rng_state)
from plca.engine.distributed import DistInfo, all_true, average_buffers
from plca.engine.state import TrainState


class Checkpointer:
    """Writes ``RUN_DIR/checkpoints/*.pt`` (main process) with every process's RNG state.

    ``save_training`` and ``save_model`` are collective under DDP: every process calls them at
    the same step. A failed write raises :class:`CheckpointError` on every process, saying which
    step the intact ``last.pt`` holds and how to continue.
    """

    def __init__(self, run_dir: Path, info: DistInfo, resume_command: str, total_steps: int | None = None) -> None:
        self.folder = run_dir / "checkpoints"
        self.info = info
        self.resume_command = resume_command
        self.total_steps = total_steps  # the run's train.iters: a file of that step is marked "final"
        self.saved_step: int | None = None  # step held by the last good last.pt

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    def _gather_rng(self) -> list:
        if not self.info.enabled:
            return [rng_state()]
        states = [None] * self.info.world_size
        dist.all_gather_object(states, rng_state())
        return states

    def _write(self, payload: dict, name: str, step: int) -> None:
        failure = None
        if self.total_steps is not None:
            payload["final"] = step >= self.total_steps
        if self.info.is_main:
            bad = nonfinite_tensors(payload["model"])
            if bad:
                failure = CheckpointError(
                    f"not writing {name}: the model holds non-finite values ({len(bad)} tensors, e.g. {bad[0]}); "
                    f"the training has diverged")
            else:
                try:
                    atomic_save(payload, self.folder / name)
                except CheckpointError as error:
                    failure = error
        if not all_true(failure is None, self.info.device):
            intact = (f"it holds step {self.saved_step}" if self.saved_step is not None else "if there is one")
            raise CheckpointError(
                f"{failure or 'the main process could not write a checkpoint'}. Training stopped at step {step}; "
                f"the previous last.pt is intact ({intact}). Free disk space (or fix the folder's permissions) "
                f"and continue with: {self.resume_command}"
            )

    def save_training(self, method: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                      header: dict) -> None:
        """``last.pt``: everything a resumed run needs (``header``: segmentor, classes, config)."""
        average_buffers(method)
        rngs = self._gather_rng()
        payload = {**header, "method": method.state_dict(), "model": method.inference_model().state_dict(),
                   "optimizer": optimizer.state_dict(), "state": state.state_dict(), "step": state.step,
                   "counters": dict(state.counters), "rng": rngs}
        self._write(payload, "last.pt", state.step)
        self.saved_step = state.step

    def save_model(self, model: nn.Module, name: str, step: int, header: dict, **extra) -> None:
        """A weights-only model file (``final.pt``, ``best_on_val.pt``)."""
        average_buffers(model)
        self._write({**header, "model": model.state_dict(), "step": step, **extra}, name, step)

    def link_model(self, name: str, target: str) -> None:
        """Make ``checkpoints/<name>`` the same file as ``checkpoints/<target>`` (a hard link, replacing
        ``name`` atomically); where the file system has no hard links, an atomic copy. Collective."""
        failure = None
        if self.info.is_main:
            source, path = self.folder / target, self.folder / name
            temporary = self.folder / f".{name}.link.tmp"
            try:
                temporary.unlink(missing_ok=True)
                try:
                    os.link(source, temporary)
                except OSError:  # no hard links here (e.g. some network or FAT file systems): one more copy
                    shutil.copyfile(source, temporary)
                os.replace(temporary, path)
            except OSError as error:
                temporary.unlink(missing_ok=True)
                failure = CheckpointError(f"could not write checkpoint '{path}' as a link to '{source}' "
                                          f"({error.strerror or error}); '{source}' is intact")
        if not all_true(failure is None, self.info.device):
            raise failure or CheckpointError("the main process could not link a model file")

    def restore(self, path: Path, method: nn.Module, optimizer: torch.optim.Optimizer,
                state: TrainState) -> list[str]:
        """Load ``path`` (a ``last.pt``) into the method, optimiser, loop state and this process's RNG; the
        notes on what cannot continue exactly (another number of processes than the one that saved it)."""
        checkpoint = load_checkpoint(path)
        if "method" not in checkpoint or "optimizer" not in checkpoint:
            raise CheckpointError(f"'{path}' holds model weights only (a final or best model file), not a training "
                                  f"checkpoint to resume from; resume from the run's checkpoints/last.pt")
        try:
            method.load_state_dict(checkpoint["method"])
        except RuntimeError as error:
            raise CheckpointError(f"'{path}' does not fit this run's model: {_first_line(error)}") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        state.load_state_dict(checkpoint["state"])
        rngs = checkpoint["rng"]
        if self.info.rank < len(rngs) and rngs[self.info.rank] is not None:
            set_rng_state(rngs[self.info.rank])
        self.saved_step = state.step
        if len(rngs) == self.info.world_size:
            return []
        return [f"'{path}' was saved by {len(rngs)} process(es), this run has {self.info.world_size}: the weights, "
                f"optimiser and step continue, but from here on the data order and random draws differ from a run "
                f"that kept {len(rngs)} (the global batch is now {self.info.world_size} x train.batch_size)"]


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
