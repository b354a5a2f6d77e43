"""The periodic duties after an update, as hooks: scalar logging, image grids, checkpoints.

Each hook keeps its own schedule in :meth:`after_step`; the loop calls every hook after every
update, in one fixed order, on every process, so the collectives inside (a counter summed
over processes, a checkpoint's RNG gathering) line up. The validation hook is
:class:`plca.engine.validation.Validation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plca.config import TrainConfig
from plca.engine.distributed import DistInfo, summed_count
from plca.engine.image_grids import log_image_grid
from plca.engine.logger import ScalarWindow, TensorBoard
from plca.engine.run_files import append_jsonl
from plca.engine.state import TrainState

if TYPE_CHECKING:
    from plca.methods import Method


@dataclass(frozen=True)
class StepEnd:
    """What the hooks are told after an update."""

    step: int  # updates done
    last: bool  # the run's last update (``train.iters``)
    stopping: bool  # this call ends after this step (a signal, ``max_steps``): save now, do not validate
    batch: tuple[dict, dict | None]  # the update's first (source, target) micro-batch; target None without one


class Hook(Protocol):
    """Told about every update, on every process; decides itself whether anything is due."""

    def after_step(self, end: StepEnd) -> None: ...


class ScalarLog:
    """Every ``train.log_every`` updates and after the last: the means of the scalars the updates
    logged since the previous time, the LR and the run's counters, to TensorBoard, ``scalars.jsonl``,
    the progress bar and ``train.log``. Collective under DDP (the skipped samples are summed)."""

    def __init__(self, train: TrainConfig, state: TrainState, optimizer: torch.optim.Optimizer, board: TensorBoard,
                 bar: tqdm, info: DistInfo, run_dir: Path, logger: logging.Logger) -> None:
        self.train, self.state, self.optimizer, self.board, self.bar = train, state, optimizer, board, bar
        self.info, self.path, self.logger = info, run_dir / "scalars.jsonl", logger
        self.window = ScalarWindow()

    def collect(self, logs: dict) -> None:
        """The scalars of one micro-batch (the update's ``on_logs``)."""
        if float(logs.pop("data/unlabelled_batch", 0.0)) > 0:
            self.state.counters["unlabelled_batches"] += 1
        self.window.add(logs)

    def after_step(self, end: StepEnd) -> None:
        if end.step % self.train.log_every == 0 or end.last:
            self._write()

    def _write(self) -> None:
        state = self.state
        scalars = self.window.means()
        scalars["data/unlabelled_batches"] = state.counters["unlabelled_batches"]
        scalars["lr"] = self.optimizer.param_groups[0]["lr"]
        scalars["skipped_steps"] = state.counters["skipped_steps"]
        scalars["data/skipped_samples"] = summed_count(state.counters["skipped_samples"], self.info)
        self.board.scalars(scalars, state.step)
        if self.info.is_main:
            append_jsonl(self.path, {"step": state.step, **scalars}, self.logger)
        self.bar.set_postfix(loss=f"{scalars.get('loss/total', math.nan):.3f}")
        terms = " ".join(f"{key.split('/', 1)[1]} {value:.4g}" for key, value in scalars.items()
                         if key.startswith("loss/"))
        self.logger.info("step %d/%d | %s | lr %.3g", state.step, self.train.iters, terms, scalars["lr"])


class ImageGrids:
    """Every ``train.image_every`` updates (by default a fifth of the run, at most 1000), on the main
    process: TensorBoard grids (input, prediction, label) of the update's source and target batches."""

    def __init__(self, method: Method, board: TensorBoard, train: TrainConfig, classes: Sequence[str],
                 info: DistInfo) -> None:
        self.method, self.board, self.classes, self.info = method, board, classes, info
        self.every = train.image_every if train.image_every is not None else max(1, min(1000, train.iters // 5))

    @torch.no_grad()
    def after_step(self, end: StepEnd) -> None:
        if not (self.every and end.step % self.every == 0 and self.info.is_main):
            return
        model = self.method.inference_model()
        was_training = model.training
        model.eval()
        for domain, batch in zip(("source", "target"), end.batch):
            if batch is None:
                continue
            images = batch["image"].to(self.info.device).float()
            logits = model(images)["logits"].float()  # (B, C, h, w)
            logits = F.interpolate(logits, size=batch["label"].shape[-2:], mode="bilinear", align_corners=False)
            log_image_grid(self.board, f"images/{domain}", batch["image"], logits.argmax(1).cpu(), batch["label"],
                           self.classes, end.step)
        model.train(was_training)


class PeriodicCheckpoint:
    """``last.pt`` every ``train.checkpoint_every`` updates, after the last, and when the call stops
    (``save_last`` is collective under DDP)."""

    def __init__(self, every: int, state: TrainState, save_last: Callable[[], None]) -> None:
        self.every, self.state, self.save_last = every, state, save_last

    def after_step(self, end: StepEnd) -> None:
        due = end.step % self.every == 0 or end.last
        # during a run of skipped steps the model is that of the last good update; the end is saved anyway
        if (due and (self.state.nonfinite_in_row == 0 or end.last)) or end.stopping:
            self.save_last()
