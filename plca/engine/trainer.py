"""The training loop: run directory, method, data streams, updates, logging, checkpoints, validation.

What a step computes belongs to the method (:mod:`plca.methods`), one update to
:mod:`plca.engine.update`, saving and restoring to :mod:`plca.engine.checkpointer`.
A run lives in one directory::

    RUN_DIR/config.yaml                 the resolved config (data roots absolute)
    RUN_DIR/run.json                    how to reproduce it: versions, git commit, command, times
    RUN_DIR/train.log                   the log: data checks, loss terms, validations, resumes, stops
    RUN_DIR/tb/                         TensorBoard events
    RUN_DIR/scalars.jsonl               the logged scalars (losses, LR, diagnostics), one line per log step
    RUN_DIR/eval_history.jsonl          one line per validation
    RUN_DIR/checkpoints/last.pt         everything needed to resume (written atomically)
    RUN_DIR/checkpoints/final.pt        the final model (weights only)
    RUN_DIR/checkpoints/best_on_val.pt  the model of the best validation (weights only; see below)
    RUN_DIR/metrics.json                the final model's metrics (+ the best validation's, labelled)

``best_on_val.pt`` is selected on the validation set, which for these benchmarks is the
target's test set: reporting it is oracle model selection. The README and every tool
evaluate the final model.

What can go wrong, and what happens:

- bad data: every file of every dataset is checked before training starts; a sample that
  still fails to load stops the run with the file's name after saving the last finished
  step (``data.on_error: raise``), or is skipped and counted (``skip``);
- a non-finite loss or gradient: the update is skipped (BatchNorm statistics restored) and
  counted; ``train.max_nonfinite_steps`` in a row stop the run; an update that makes the
  weights non-finite stops it at once, and no checkpoint with non-finite values is written;
- SIGTERM / SIGINT (on any process): every process stops at the same step boundary and the
  run is saved; any other failure between steps (e.g. out of memory in a validation) saves too;
- a failed checkpoint write (full disk): the previous checkpoint is intact, the run stops saying so.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from plca.config import Config, save_config, to_dict
from plca.data.build import RunDatasets, build_run_datasets, check_run_datasets
from plca.data.io import DatasetError
from plca.engine.checkpoint import CheckpointError, load_checkpoint
from plca.engine.checkpointer import Checkpointer
from plca.engine.distributed import (DistInfo, all_reduce_mean, all_true, any_true, available_cpus, average_buffers,
                                     barrier, broadcast_object, init_distributed)
from plca.engine.image_grids import log_image_grid
from plca.engine.loader import batch_stream
from plca.engine.logger import ScalarWindow, TensorBoard, setup_logger
from plca.engine.optim import effective_warmup, optimizer_from_config, scheduled_lr, set_lr
from plca.engine.run_dir import RunDirError, RunLock, check_resume_config, create_unique, default_run_name
from plca.engine.state import TrainState
from plca.engine.update import UpdateOutcome, update
from plca.evaluation.evaluator import evaluate
from plca.evaluation.metrics import summarize
from plca.methods import Method, MethodContext, build_method
from plca.models import build_segmentor


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived; a checkpoint was saved before stopping."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict | None
    model: nn.Module | None = None  # the trained inference model (unwrapped from DDP)


def resume_command(run_dir: Path) -> str:
    return f"plca train --resume {run_dir}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def absolute_roots(config: Config) -> Config:
    """``config`` with its dataset roots as absolute paths (the saved config then works from anywhere)."""
    data = config.data
    changes = {name: replace(spec, root=str(Path(spec.root).expanduser().absolute()))
               for name in ("source", "target", "val") if (spec := getattr(data, name)) is not None and spec.root}
    return replace(config, data=replace(data, **changes))


def test_time_aggregation_enabled(config: Config) -> bool:
    """``eval.test_time_aggregation``, where null means the method's default (on for plca)."""
    from plca.methods import get_method

    tta = config.eval.test_time_aggregation
    return get_method(config.method).test_time_aggregation if tta is None else tta


def build_training_method(config: Config, device: torch.device) -> Method:
    """The config's method around a freshly built segmentor, on ``device``."""
    segmentor = build_segmentor(config.model, len(config.data.classes))
    context = MethodContext(loss=config.loss, options=config.method_options, plca=config.plca,
                            classes=tuple(config.data.classes),
                            model=config.model, iters=config.train.iters, seed=config.train.seed,
                            eval_model=config.eval.model)
    method = build_method(config.method, segmentor, context).to(device)
    if config.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


def checkpoint_header(config: Config, method: Method) -> dict:
    """What every checkpoint and model file says about itself."""
    return {"segmentor": method.inference_model().describe(), "classes": list(config.data.classes),
            "config": to_dict(config)}


# --------------------------------------------------------------------------- the run directory


@dataclass
class RunPlace:
    run_dir: Path
    resume_from: Path | None  # the last.pt to continue from
    created: bool  # this call created the directory (removed again if the run fails before its first step)


def _locate_run(config: Config, resume: str | Path | None, info: DistInfo) -> RunPlace:
    if resume is not None:
        resume = Path(resume)
        if resume.is_file():
            run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
            return RunPlace(run_dir, resume, created=False)
        if not resume.is_dir():
            raise CheckpointError(f"--resume '{resume}' is neither a run directory nor a checkpoint file")
        last = resume / "checkpoints" / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"run directory '{resume}' has no checkpoints/last.pt to resume from")
        return RunPlace(resume, last, created=False)
    output_dir = Path(config.output_dir)
    if config.run_name:
        run_dir = output_dir / config.run_name
        last = run_dir / "checkpoints" / "last.pt"
        created = False
        if info.is_main and not run_dir.exists():
            create_unique(output_dir, lambda: config.run_name)
            created = True
        return RunPlace(run_dir, last if last.is_file() else None, created=broadcast_object(created))
    name = create_unique(output_dir, lambda: default_run_name(config)).name if info.is_main else None
    return RunPlace(output_dir / broadcast_object(name), None, created=True)


def _truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the lines of ``path`` logged after ``after_step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= after_step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
    config = absolute_roots(config)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first call
    info = init_distributed(config.device, config.train.collective_timeout_s)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.train.deterministic
    place = _locate_run(config, resume, info)
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
    except BaseException:
        if info.is_main and place.created and session.state.step == 0 and session.checkpointer.saved_step is None:
            lock.release()
            shutil.rmtree(place.run_dir, ignore_errors=True)  # a run that never started leaves nothing behind
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
        self.checkpointer = Checkpointer(self.run_dir, info, resume_command(self.run_dir))
        self.logger = setup_logger(None, info.is_main)  # the console only, until the run directory may change
        self.board: TensorBoard | None = None
        self.streams: list = []
        self.started = time.time()

    def close(self) -> None:
        for stream in self.streams:  # now, not when an exception's traceback lets go of them
            stream.close()
        if self.board is not None:
            self.board.close()

    # ------------------------------------------------------------------ set-up

    def run(self, max_steps: int | None) -> RunResult:
        config, info, logger = self.config, self.info, self.logger
        seed_everything(config.train.seed + info.rank)
        self.method = method = build_training_method(config, info.device)
        self.optimizer = optimizer_from_config(method.trainable_module(), config.train)
        self.header = checkpoint_header(config, method)
        if self.place.resume_from is not None:
            self._resume(self.place.resume_from)
            if self.state.step >= config.train.iters:
                return self._already_finished()
        barrier()
        self.logger = logger = setup_logger(self.run_dir, info.is_main)  # now also RUN_DIR/train.log
        weights_note = getattr(method.trainable_module(), "weights_note", None)
        if weights_note and self.place.resume_from is None:
            logger.info("%s", weights_note)
        if self.place.resume_from is not None:
            logger.info("resumed from %s at step %d", self.place.resume_from, self.state.step)
            for note in self.resume_notes:
                logger.warning("%s", note)
        if info.is_main:
            try:
                save_config(config, self.run_dir / "config.yaml")
                (self.run_dir / "checkpoints").mkdir(exist_ok=True)
                for name in ("scalars.jsonl", "eval_history.jsonl"):
                    _truncate_jsonl(self.run_dir / name, self.state.step)
            except OSError as error:
                raise RunDirError(f"cannot write to the run directory '{self.run_dir}': "
                                  f"{error.strerror or error}{_free_space(self.run_dir)}") from None
            _record_run(self.run_dir, config, self.argv, self.started, None, logger)
            for stale in (self.run_dir / "checkpoints").glob(".*.tmp"):
                stale.unlink(missing_ok=True)  # left by a checkpoint write cut short (the checkpoint is intact)
        barrier()
        self.board = TensorBoard(self.run_dir / "tb" if info.is_main else None)
        self.datasets = self._datasets()
        self.ddp = self._wrap_for_ddp()
        warmup = effective_warmup(config.train.warmup_iters, config.train.iters)
        if warmup < config.train.warmup_iters:
            logger.info("warmup shortened from %d to %d updates (a quarter of train.iters)",
                        config.train.warmup_iters, warmup)
        return self._loop(max_steps)

    def _resume(self, path: Path) -> None:
        stored = load_checkpoint(path).get("config")
        self.resume_notes = check_resume_config(self.config, stored, path)
        self.checkpointer.restore(path, self.method, self.optimizer, self.state)

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
                                      info.world_size, cache_dir=Path(config.output_dir) / ".cache")
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

    # ------------------------------------------------------------------ the loop

    def _loop(self, max_steps: int | None) -> RunResult:
        config, train, state = self.config, self.config.train, self.state
        source_stream, target_stream = self._streams()
        use_amp = train.amp and self.info.device.type == "cuda"
        window = ScalarWindow()
        bar = tqdm(total=train.iters, initial=state.step, desc=config.method, dynamic_ncols=True,
                   disable=not (self.progress and self.info.is_main))
        steps_this_call = 0
        with _StopSignal() as stop, bar:
            while state.step < train.iters:
                set_lr(self.optimizer, scheduled_lr(train, state.step))
                batches = self._next_batches(source_stream, target_stream)
                try:
                    outcome = update(self.method, self.optimizer, batches, state.step, self.info, self.ddp, use_amp,
                                     train.channels_last, lambda logs: self._collect(window, logs))
                except Exception as error:  # noqa: BLE001 - the model is that of the last update: save it
                    self._fail_between_steps(error, "during the update")
                self._after_update(outcome)
                self.last_batches = batches[0]
                state.step += 1
                steps_this_call += 1
                bar.update(1)
                stopping = any_true(stop.received is not None, self.info.device)
                pausing = max_steps is not None and steps_this_call >= max_steps and state.step < train.iters
                try:
                    self._periodic(window, bar, stopping or pausing)
                except (CheckpointError, TrainingError, DatasetError):
                    raise
                except Exception as error:  # noqa: BLE001
                    self._fail_between_steps(error, "between updates")
                if not stopping and any_true(stop.received is not None, self.info.device):
                    self._save_last()  # the signal came during the logging or the validation of this step
                    stopping = True
                if stopping:
                    self.logger.warning("stopped by a signal at step %d; checkpoint saved", state.step)
                    raise TrainingInterrupted(f"stopped by signal {stop.received or 'on another process'} at step "
                                              f"{state.step}; checkpoint saved. Resume with: "
                                              f"{resume_command(self.run_dir)}")
                if pausing:
                    return RunResult(self.run_dir, state.step, None, self.method.inference_model())
        return self._finish()

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
        if not all_true(load_error is None, self.info.device):
            self._save_last()
            raise DatasetError(
                f"{load_error or 'another process could not load a sample (see its message)'}\n"
                f"Training stopped at step {self.state.step}; checkpoint saved. Fix or remove the file (plca prepare "
                f"checks a whole dataset), or set data.on_error=skip to skip such samples (they are counted), "
                f"then continue with: {resume_command(self.run_dir)}"
            )
        for source, target in batches:
            for message in source["skipped"] + (target["skipped"] if target else []):
                self.state.counters["skipped_samples"] += 1
                self.logger.warning("step %d: %s", self.state.step, message)
        return batches

    def _collect(self, window: ScalarWindow, logs: dict) -> None:
        if float(logs.pop("data/unlabelled_batch", 0.0)) > 0:
            self.state.counters["unlabelled_batches"] += 1
        window.add(logs)

    def _after_update(self, outcome: UpdateOutcome) -> None:
        state, train = self.state, self.config.train
        if outcome is UpdateOutcome.DIVERGED:
            raise TrainingError(
                f"the update of step {state.step} made the model's weights or BatchNorm statistics non-finite: "
                f"training diverged (train.lr={train.lr} is likely too high). {self._last_good()} "
                f"Lower train.lr and start a new run, or resume from it with a lower LR")
        if outcome is UpdateOutcome.SKIPPED:
            state.nonfinite_in_row += 1
            state.counters["skipped_steps"] += 1
            self.logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                                state.step, state.nonfinite_in_row)
            if state.nonfinite_in_row >= train.max_nonfinite_steps:
                raise TrainingError(
                    f"{state.nonfinite_in_row} consecutive steps with a non-finite loss or gradient (step "
                    f"{state.step}); stopping. {self._last_good()} Try a lower train.lr or check the data.")
        else:
            state.nonfinite_in_row = 0

    def _last_good(self) -> str:
        saved = self.checkpointer.saved_step
        if saved is None:
            return "No checkpoint was written yet."
        return f"The last good checkpoint is {self.checkpointer.last_path} (step {saved})."

    def _fail_between_steps(self, error: Exception, where: str) -> None:
        """Save the last finished step (when the model can be trusted and saving is safe), then one line."""
        detail = " ".join(str(error).split()) or type(error).__name__
        out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in detail.lower()
        kind = "out of memory" if out_of_memory else type(error).__name__
        hint = (" Lower train.batch_size or train.crop_size (eval.size for a validation), or use train.amp=true "
                "on a GPU." if out_of_memory else "")
        if self.state.step == 0 and self.checkpointer.saved_step is None:
            raise TrainingError(f"{kind} {where} at step 0, before anything was trained: {detail[:300]}.{hint}") \
                from error
        saved = ""
        if not self.info.enabled and self.state.nonfinite_in_row == 0:
            try:
                self._save_last()
                saved = f" Checkpoint of step {self.state.step} saved."
            except Exception:  # noqa: BLE001 - the original failure is what to report
                saved = ""
        raise TrainingError(f"{kind} {where} at step {self.state.step}: {detail[:300]}.{saved or ' ' + self._last_good()}"
                            f"{hint} Continue with: {resume_command(self.run_dir)}") from error

    def _save_last(self) -> None:
        self.checkpointer.save_training(self.method, self.optimizer, self.state, self.header)

    def _periodic(self, window: ScalarWindow, bar, stopping: bool) -> None:
        """Logging, images, checkpoints and validation after an update."""
        state, train = self.state, self.config.train
        step, last_step = state.step, state.step == train.iters
        if step % train.log_every == 0 or last_step:
            self._log_scalars(window, bar)
        image_every = train.image_every if train.image_every is not None else max(1, min(1000, train.iters // 5))
        if image_every and step % image_every == 0 and self.info.is_main:
            self._log_images()
        periodic = step % train.checkpoint_every == 0 or last_step
        # during a run of skipped steps the model is that of the last good update; the end is saved anyway
        if (periodic and (state.nonfinite_in_row == 0 or last_step)) or stopping:
            self._save_last()
        if train.eval_every and step % train.eval_every == 0 and not last_step and not stopping:
            self._validate()

    def _log_scalars(self, window: ScalarWindow, bar) -> None:
        state = self.state
        scalars = window.means()
        scalars["data/unlabelled_batches"] = state.counters["unlabelled_batches"]
        scalars["lr"] = self.optimizer.param_groups[0]["lr"]
        scalars["skipped_steps"] = state.counters["skipped_steps"]
        scalars["data/skipped_samples"] = self._total("skipped_samples")
        self.board.scalars(scalars, state.step)
        if self.info.is_main:
            _append_jsonl(self.run_dir / "scalars.jsonl", {"step": state.step, **scalars}, self.logger)
        bar.set_postfix(loss=f"{scalars.get('loss/total', math.nan):.3f}")
        terms = " ".join(f"{key.split('/', 1)[1]} {value:.4g}" for key, value in scalars.items()
                         if key.startswith("loss/"))
        self.logger.info("step %d/%d | %s | lr %.3g", state.step, self.config.train.iters, terms, scalars["lr"])

    def _total(self, counter: str) -> int:
        """A counter summed over all processes (each counts its own)."""
        count = self.state.counters[counter]
        if self.info.enabled:
            mean = all_reduce_mean(torch.tensor([float(count)], device=self.info.device)).item()
            count = round(mean * self.info.world_size)
        return count

    @torch.no_grad()
    def _log_images(self) -> None:
        """TensorBoard grids (input, prediction, label) of the current source and target batches."""
        model = self.method.inference_model()
        was_training = model.training
        model.eval()
        for domain, batch in zip(("source", "target"), self.last_batches):
            if batch is None:
                continue
            images = batch["image"].to(self.info.device).float()
            logits = model(images)["logits"].float()
            logits = F.interpolate(logits, size=batch["label"].shape[-2:], mode="bilinear", align_corners=False)
            log_image_grid(self.board, f"images/{domain}", batch["image"], logits.argmax(1).cpu(), batch["label"],
                           self.config.data.classes, self.state.step)
        model.train(was_training)

    def _validate(self) -> dict | None:
        """Metrics of the method's evaluation models on the validation set; the first model's are the
        run's (top level), the others' go under their names (e.g. ``teacher``)."""
        config, info, state = self.config, self.info, self.state
        if self.datasets.val is None:
            return None
        tta = test_time_aggregation_enabled(config)
        results = {}
        for name, model in self.method.evaluation_models().items():
            average_buffers(model)
            confusion = evaluate(model, self.datasets.val, len(config.data.classes), info.device,
                                 test_time_aggregation=tta, alpha=config.eval.alpha,
                                 amp=config.train.amp and info.device.type == "cuda", rank=info.rank,
                                 world_size=info.world_size, progress=self.progress)
            results[name] = summarize(confusion.matrix.cpu(), config.data.classes)
        (primary, metrics), others = next(iter(results.items())), list(results.items())[1:]
        metrics.update(step=state.step, test_time_aggregation=tta, evaluated=primary)
        for name, extra in others:
            metrics[name] = extra
        if info.is_main:
            self.board.scalars({"val/mIoU": metrics["mIoU"], "val/pixel_accuracy": metrics["pixel_accuracy"],
                                **{f"val/{name}_mIoU": extra["mIoU"] for name, extra in others}}, state.step)
            _append_jsonl(self.run_dir / "eval_history.jsonl", metrics, self.logger)
            self.logger.info("validation at step %d: %s %.2f (%s)%s", state.step, metrics["protocol"], metrics["mIoU"],
                             primary, "".join(f", {name} {extra['mIoU']:.2f}" for name, extra in others))
        if metrics["mIoU"] > state.best_miou:
            state.best_miou, state.best_step = metrics["mIoU"], state.step
            self.checkpointer.save_model(self.method.inference_model(), "best_on_val.pt", state.step, self.header,
                                         metrics=metrics, selection="best validation mIoU (oracle model selection)")
        return metrics

    # ------------------------------------------------------------------ the end

    def _finish(self) -> RunResult:
        config, state, info = self.config, self.state, self.info
        model = self.method.inference_model()
        metrics = self._validate()
        self.checkpointer.save_model(model, "final.pt", state.step, self.header, metrics=metrics)
        if metrics is not None:
            metrics.update(method=config.method, skipped_steps=state.counters["skipped_steps"],
                           skipped_samples=self._total("skipped_samples"), model="final")
            history = _read_jsonl(self.run_dir / "eval_history.jsonl")
            best = max(history, key=lambda m: m["mIoU"]) if history else None
            if best is not None and info.is_main:
                metrics["best_on_val"] = {
                    "note": "the best of the validations during training, selected on the validation set: "
                            "oracle model selection, not a result to report",
                    "step": best["step"], "mIoU": best["mIoU"], "protocol": best["protocol"],
                    "per_class_IoU": best["per_class_IoU"], "checkpoint": "checkpoints/best_on_val.pt"}
        if info.is_main:
            if metrics is not None:
                (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            _record_run(self.run_dir, config, self.argv, self.started, time.time(), self.logger)
            self.logger.info("finished at step %d. Run dir %s: metrics.json (final model), checkpoints/final.pt "
                             "(final model), checkpoints/last.pt (to resume)%s", state.step, self.run_dir,
                             ", checkpoints/best_on_val.pt (oracle selection)" if metrics is not None else "")
        return RunResult(self.run_dir, state.step, metrics, model)


def _free_space(folder: Path) -> str:
    try:
        return f" ({shutil.disk_usage(folder).free / 2**30:.2f} GiB free there)"
    except OSError:
        return ""


def _append_jsonl(path: Path, record: dict, logger) -> None:
    """One JSON line; a failure (e.g. a full disk) is a warning, never the end of the run."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        logger.warning("could not append to %s (%s); training goes on", path, error)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record_run(run_dir: Path, config: Config, argv, started: float, finished: float | None, logger) -> None:
    """``run.json``: what is needed to reproduce the run (versions, commit, command, times)."""
    try:
        from plca.engine.run_record import write_run_record
    except ImportError:
        return
    try:
        write_run_record(run_dir, to_dict(config), argv, config.train.seed, started, finished)
    except OSError as error:
        logger.warning("could not write %s (%s)", run_dir / "run.json", error)
