"""The training loop: set-up, the loop that is the run's story, and the end of a run.

Each duty lives in its own module:

- what a step computes: the method (:mod:`plca.methods`), built with the run's other parts from
  the config in :mod:`plca.engine.build`; one update: :mod:`plca.engine.update`;
- which directory a run uses and whether it resumes: :mod:`plca.engine.run_place` (its name and
  lock: :mod:`plca.engine.run_dir`);
- the files in it: checkpoints :mod:`plca.engine.checkpointer`; ``config.yaml``, ``run.json``
  and the ``*.jsonl`` logs :mod:`plca.engine.run_files`; ``train.log`` and TensorBoard
  :mod:`plca.engine.logger`;
- after each update, as hooks: scalars, image grids and checkpoints :mod:`plca.engine.periodic`;
  validation and the best-on-val model :mod:`plca.engine.validation`;
- what stops a run and what is saved first: :mod:`plca.engine.failure`.

A run lives in one directory::

    RUN_DIR/config.yaml                 the resolved config (data roots absolute)
    RUN_DIR/run.json                    how to reproduce it: versions, git commit, command, times, run id
    RUN_DIR/train.log                   the log: data checks, loss terms, validations, resumes, stops
    RUN_DIR/tb/                         TensorBoard events
    RUN_DIR/scalars.jsonl               the logged scalars (losses, LR, diagnostics), one line per log step
    RUN_DIR/eval_history.jsonl          one line per validation
    RUN_DIR/checkpoints/last.pt         everything needed to resume (written atomically)
    RUN_DIR/checkpoints/final.pt        the final model (weights only)
    RUN_DIR/checkpoints/best_on_val.pt  the model of the best validation (weights only; see below; a hard
                                        link to final.pt when the final validation is the best)
    RUN_DIR/metrics.json                the final model's metrics (+ the best validation's, labelled)

``best_on_val.pt`` is selected on the validation set, which for these benchmarks is the
target's test set: reporting it is oracle model selection. The README and every tool
evaluate the final model, and refuse a model of a run that did not reach its end unless told
(``--allow-unfinished``). Every checkpoint carries the run's id (:mod:`plca.engine.run_identity`):
a resume from another run's checkpoint is refused before anything is written.

What can go wrong, and what happens (the decisions between steps: :mod:`plca.engine.failure`;
the data checks: :mod:`plca.data.checks`; checkpoint writes: :mod:`plca.engine.checkpointer`):

- bad data: every file of every dataset is checked before training starts; a sample that
  still fails to load stops the run with the file's name after saving the last finished
  step (``data.on_error: raise``), or is skipped and counted (``skip``);
- a non-finite loss or gradient: the update is skipped (BatchNorm statistics restored) and
  counted; ``train.max_nonfinite_steps`` in a row stop the run; an update that makes the
  weights non-finite stops it at once, and no checkpoint with non-finite values is written;
- SIGTERM / SIGINT (on any process): every process stops at the same step boundary and the
  run is saved; during the set-up the run stops at once and saves nothing (a resumed run's
  checkpoint stays as it was); either way ``train.log`` ends with the stop line stderr gets;
  any other failure between steps (e.g. out of memory in a validation) saves too;
- a failed checkpoint write (full disk): the previous checkpoint is intact, the run stops saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from plca.config import Config
from plca.data.build import RunDatasets, build_run_datasets, check_run_datasets
from plca.data.io import DatasetError
from plca.engine.build import absolute_roots, build_training_method, checkpoint_header, seed_everything
from plca.engine.checkpoint import load_checkpoint
from plca.engine.checkpointer import Checkpointer
from plca.engine.distributed import (DistInfo, all_true, available_cpus, barrier, broadcast_object, init_distributed,
                                     summed_count)
from plca.engine.failure import FailurePolicy, StopAtOnce, TrainingError, TrainingInterrupted
from plca.engine.loader import batch_stream
from plca.engine.logger import TensorBoard, close_run_log, setup_logger
from plca.engine.optim import effective_warmup, optimizer_from_config, scheduled_lr, set_lr
from plca.engine.periodic import Hook, ImageGrids, PeriodicCheckpoint, ScalarLog, StepEnd
from plca.engine.run_dir import RunLock, check_resume_config
from plca.engine.run_files import prepare_run_dir, record_run
from plca.engine.run_identity import directory_run, new_run_id, resume_identity
from plca.engine.run_place import RunPlace, locate_run, resume_command
from plca.engine.state import TrainState
from plca.engine.stop_report import record_stop
from plca.engine.update import update
from plca.engine.validation import Validation, test_time_aggregation_enabled
from plca.files import atomic_write_json

__all__ = ["RunResult", "TrainingError", "TrainingInterrupted", "absolute_roots", "build_training_method",
           "checkpoint_header", "resume_command", "seed_everything", "test_time_aggregation_enabled", "train"]


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict | None
    model: nn.Module | None = None  # the trained inference model (unwrapped from DDP)


# --------------------------------------------------------------------------- entry point


def train(config: Config, resume: str | Path | None = None, max_steps: int | None = None,
          progress: bool = True, data_check: str = "labels", argv: list[str] | None = None) -> RunResult:
    """Train according to ``config``; return the run directory, the last step and the final metrics.

    ``resume``: a run directory (or its ``last.pt``) to continue from. A run whose ``run_name``
    is given and whose directory already holds a checkpoint resumes by itself. Either way the
    requested config is checked against the checkpoint's before anything is written.
    ``max_steps``: stop (with a checkpoint) after this many updates in this call, as if interrupted.
    ``data_check``: how the dataset files are checked before training (``none``, ``headers``,
    ``labels``; see :mod:`plca.data.checks`). ``argv``: the command line, for the run record.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1 (updates in this call), got {max_steps}")
    config = absolute_roots(config)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first call
    info = init_distributed(config.device, config.train.collective_timeout_s)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.train.deterministic
    place = locate_run(config, resume, info)
    lock = RunLock(place.run_dir)
    if info.is_main:
        try:
            lock.acquire()
        except BaseException:
            if place.created:
                shutil.rmtree(place.run_dir, ignore_errors=True)
            raise
    session = _Session(config, info, place, progress, data_check, argv)
    try:
        return session.run(max_steps)
    except BaseException as error:
        if info.is_main and place.created and session.state.step == 0 and session.checkpointer.saved_step is None:
            lock.release()
            shutil.rmtree(place.run_dir, ignore_errors=True)  # a run that never started leaves nothing behind
        elif isinstance(error, Exception):
            record_stop(session.logger, "train", error)  # train.log ends with what stderr says
        raise
    finally:
        session.close()
        lock.release()


class _Session:
    """One call of :func:`train`: set-up, the loop, and the end of the run."""

    def __init__(self, config: Config, info: DistInfo, place: RunPlace, progress: bool, data_check: str,
                 argv: list[str] | None) -> None:
        self.config, self.info, self.place = config, info, place
        self.run_dir = place.run_dir
        self.progress, self.data_check, self.argv = progress, data_check, argv
        self.state = TrainState()
        self.checkpointer = Checkpointer(self.run_dir, info, resume_command(self.run_dir), config.train.iters)
        self.run_id: str | None = None
        self.logger = setup_logger(None, info.is_main)  # the console only, until the run directory may change
        self.board: TensorBoard | None = None
        self.streams: list = []
        self.started = time.time()

    def close(self) -> None:
        for stream in self.streams:  # now, not when an exception's traceback lets go of them
            stream.close()
        if self.board is not None:
            self.board.close()
        close_run_log(self.logger)

    # ------------------------------------------------------------------ set-up

    def run(self, max_steps: int | None) -> RunResult:
        with StopAtOnce(self._stopped_in_set_up):  # until the loop catches the signals itself
            finished = self._set_up()
            if finished is not None:
                return finished
            paused = self._loop(max_steps)
        if paused is not None:
            return paused
        with StopAtOnce(self._stopped_in_finish):  # the final validation and saves
            return self._finish()

    def _stopped_in_set_up(self, signal_name: str) -> str:
        """The stop line of a signal that arrived before the loop."""
        text = f"stopped by {signal_name} during the set-up, before the first update; "
        if self.place.resume_from is None:
            return text + "nothing was saved: run the same command again"
        return (text + f"the checkpoint of step {self.state.step} is unchanged. Resume with: "
                f"{resume_command(self.run_dir)}")

    def _stopped_in_finish(self, signal_name: str) -> str:
        """The stop line of a signal that arrived after the last update, before the run was finished."""
        return (f"stopped by {signal_name} after the last update (step {self.state.step}), during the final "
                f"validation or save; checkpoints/last.pt holds that step. Finish with: {resume_command(self.run_dir)}")

    def _set_up(self) -> RunResult | None:
        """Everything before the loop; the result of a run that had already finished, else None."""
        config, info, state = self.config, self.info, self.state
        seed_everything(config.train.seed + info.rank)
        self.method = method = build_training_method(config, info.device)
        self.optimizer = optimizer_from_config(method.trainable_module(), config.train)
        resume_notes: list[str] = []
        if self.place.resume_from is not None:
            resume_notes = self._resume(self.place.resume_from)
            if state.step >= config.train.iters:
                if self._final_written():
                    return self._already_finished()
                resume_notes.append(f"step {state.step} is the run's last, but the run stopped before its final "
                                    f"validation and save: doing them now")
        else:
            self.run_id = broadcast_object(directory_run(self.run_dir)[0] or new_run_id())
        self.header = checkpoint_header(config, method, self.run_id)
        self._open_run_dir(resume_notes)
        self.board = TensorBoard(self.run_dir / "tb" if info.is_main else None)
        self.datasets = self._datasets()
        self.ddp = self._wrap_for_ddp()
        warmup = effective_warmup(config.train.warmup_iters, config.train.iters)
        if warmup < config.train.warmup_iters:
            self.logger.info("warmup shortened from %d to %d updates (a quarter of train.iters)",
                             config.train.warmup_iters, warmup)
        self.failures = FailurePolicy(state, self.checkpointer, self._save_last, info, self.run_dir, config.train,
                                      self.logger, on_error=config.data.on_error)
        self.validation = Validation(config, self.datasets.val, method, state, self.checkpointer, self.header,
                                     self.board, info, self.run_dir, self.logger, self.progress)
        return None

    def _open_run_dir(self, resume_notes: list[str]) -> None:
        """From here on the run writes to its directory: ``train.log`` (first, how the run starts),
        then ``config.yaml``, ``run.json`` and the logs cut back to the resumed step."""
        barrier()
        self.logger = logger = setup_logger(self.run_dir, self.info.is_main)
        weights_note = getattr(self.method.trainable_module(), "weights_note", None)
        if weights_note and self.place.resume_from is None:
            logger.info("%s", weights_note)
        if self.place.resume_from is not None:
            logger.info("resumed from %s at step %d", self.place.resume_from, self.state.step)
            for note in resume_notes:
                logger.warning("%s", note)
        if self.info.is_main:
            prepare_run_dir(self.run_dir, self.config, self.state.step, self.argv, self.started, logger, self.run_id)
        barrier()

    def _resume(self, path: Path) -> list[str]:
        """Restore the run from ``path`` (refused when it belongs to another run, or its config differs in
        what cannot change); the notes on what the requested config changes."""
        checkpoint = load_checkpoint(path)
        self.run_id, notes = resume_identity(self.run_dir, checkpoint, path)
        notes += check_resume_config(self.config, checkpoint.get("config"), path)
        del checkpoint
        notes += self.checkpointer.restore(path, self.method, self.optimizer, self.state)
        return notes

    def _final_written(self) -> bool:
        """Whether the run's end was written: ``final.pt`` and, with a validation set, ``metrics.json``."""
        written = (self.run_dir / "checkpoints" / "final.pt").is_file() and (
            self.config.data.val is None or (self.run_dir / "metrics.json").is_file())
        return bool(broadcast_object(written))

    def _already_finished(self) -> RunResult:
        self.logger = setup_logger(self.run_dir, self.info.is_main)
        metrics_path = self.run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        self.logger.info("the run in %s is already finished (step %d of %d); nothing to do", self.run_dir,
                         self.state.step, self.config.train.iters)
        return RunResult(self.run_dir, self.state.step, metrics, self.method.inference_model())

    def _datasets(self) -> RunDatasets:
        config, info = self.config, self.info
        datasets = build_run_datasets(config.data, config.train, config.eval.size, self.method.uses_target,
                                      info.world_size, cache_dir=Path(config.output_dir) / ".cache",
                                      target_border_margins=self.method.target_border_margins())
        self.logger.info("run dir %s | %s on %d process(es), %s | source %d images%s%s", self.run_dir, config.method,
                         info.world_size, info.device, len(datasets.source),
                         f", target {len(datasets.target)}" if datasets.target is not None else "",
                         f", val {len(datasets.val)}" if datasets.val is not None else "")
        check_run_datasets(datasets, self.data_check, config.data.on_error, info.rank, info.world_size,
                           self.logger, agree=lambda ok: all_true(ok, info.device), train=config.train)
        return datasets

    def _wrap_for_ddp(self) -> nn.Module | None:
        info, train = self.info, self.config.train
        self.method.train()
        if not info.enabled:
            return None
        trained = self.method.trainable_module()
        if info.device.type == "cuda" and train.sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(trained)
        ddp = DistributedDataParallel(trained, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.method.set_student_forward(ddp)
        return ddp

    def _streams(self):
        config, info, train = self.config, self.info, self.config.train
        workers = min(config.data.num_workers, available_cpus())
        if workers < config.data.num_workers:
            self.logger.info("data.num_workers %d lowered to %d, the CPUs this process may use",
                             config.data.num_workers, workers)
        args = dict(rank=info.rank, world_size=info.world_size, num_workers=workers,
                    pin_memory=info.device.type == "cuda", start=self.state.step * train.accumulation)
        source = batch_stream(self.datasets.source, train.batch_size, train.seed, **args)
        target = (batch_stream(self.datasets.target, train.batch_size, train.seed + 1, **args)
                  if self.datasets.target is not None else None)
        self.streams += [stream for stream in (source, target) if stream is not None]
        return source, target

    def _hooks(self, bar: tqdm) -> tuple[ScalarLog, list[Hook]]:
        """The duties after each update, in the order every process runs them (their collectives line up)."""
        config, info = self.config, self.info
        scalars = ScalarLog(config.train, self.state, self.optimizer, self.board, bar, info, self.run_dir, self.logger)
        return scalars, [scalars, ImageGrids(self.method, self.board, config.train, config.data.classes, info),
                         PeriodicCheckpoint(config.train.checkpoint_every, self.state, self._save_last),
                         self.validation]

    # ------------------------------------------------------------------ the loop

    def _loop(self, max_steps: int | None) -> RunResult | None:
        """Each step: load its batches, update, run the hooks, stop where a signal or ``max_steps`` says.
        The result of a run paused by ``max_steps``; None when it reached ``train.iters``."""
        config, train, state, failures = self.config, self.config.train, self.state, self.failures
        source_stream, target_stream = self._streams()
        use_amp = train.amp and self.info.device.type == "cuda"
        bar = tqdm(total=train.iters, initial=state.step, desc=config.method, dynamic_ncols=True,
                   disable=not (self.progress and self.info.is_main))
        scalars, hooks = self._hooks(bar)
        steps_this_call = 0
        with failures.catching_signals(), bar:
            while state.step < train.iters:
                set_lr(self.optimizer, scheduled_lr(train, state.step))
                batches = self._next_batches(source_stream, target_stream)
                with failures.guard("during the update"):
                    outcome = update(self.method, self.optimizer, batches, state.step, self.info, self.ddp, use_amp,
                                     train.channels_last, scalars.collect)
                failures.after_update(outcome)
                state.step += 1
                steps_this_call += 1
                bar.update(1)
                stopping = failures.signalled()
                pausing = max_steps is not None and steps_this_call >= max_steps and state.step < train.iters
                end = StepEnd(state.step, last=state.step == train.iters, stopping=stopping or pausing,
                              batch=batches[0])
                with failures.guard("between updates"):
                    for hook in hooks:
                        hook.after_step(end)
                failures.stop_if_signalled(saved=stopping)
                if pausing:
                    return RunResult(self.run_dir, state.step, None, self.method.inference_model())
        return None

    def _next_batches(self, source_stream, target_stream) -> list[tuple[dict, dict | None]]:
        """Every micro-batch of the step, loaded before any computation: a sample that fails to load
        leaves the model exactly as after the previous step, which is then saved."""
        batches, load_error = [], None
        try:
            for _ in range(self.config.train.accumulation):
                source = next(source_stream)
                batches.append((source, next(target_stream) if target_stream is not None else None))
        except DatasetError as error:
            load_error = error
        self.failures.after_loading(load_error, batches)
        return batches

    def _save_last(self) -> None:
        self.checkpointer.save_training(self.method, self.optimizer, self.state, self.header)

    # ------------------------------------------------------------------ the end

    def _finish(self) -> RunResult:
        config, state, info = self.config, self.state, self.info
        model = self.method.inference_model()
        metrics = self.validation.run(final=True)
        self.checkpointer.save_model(model, "final.pt", state.step, self.header, metrics=metrics)
        if self.validation.best_is_final:
            self.checkpointer.link_model("best_on_val.pt", "final.pt")  # one copy on disk, not two
        if metrics is not None:
            metrics.update(method=config.method, skipped_steps=state.counters["skipped_steps"],
                           skipped_samples=summed_count(state.counters["skipped_samples"], info), model="final",
                           checkpoint="checkpoints/final.pt", total_steps=config.train.iters, run_id=self.run_id)
            best = self.validation.best_on_val()
            if best is not None and info.is_main:
                metrics["best_on_val"] = best
        if info.is_main:
            if metrics is not None:
                atomic_write_json(self.run_dir / "metrics.json", metrics)
            record_run(self.run_dir, config, self.argv, self.started, time.time(), self.logger, self.run_id)
            self.logger.info("finished at step %d. Run dir %s: metrics.json (final model), checkpoints/final.pt "
                             "(final model), checkpoints/last.pt (to resume)%s", state.step, self.run_dir,
                             ", checkpoints/best_on_val.pt (oracle selection)" if metrics is not None else "")
        return RunResult(self.run_dir, state.step, metrics, model)
