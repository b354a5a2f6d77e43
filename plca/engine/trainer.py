"""The training loop: devices, DDP, mixed precision, accumulation, checkpoints, resume, evaluation.

What a step computes belongs to the method (``plca.methods``); this module
only runs it. A run lives in one directory::

    RUN_DIR/config.yaml         the resolved config
    RUN_DIR/train.log           the log
    RUN_DIR/tb/                 TensorBoard events
    RUN_DIR/scalars.jsonl       the logged scalars (losses, LR, diagnostics), one line per log step
    RUN_DIR/checkpoints/last.pt the latest checkpoint (written atomically)
    RUN_DIR/checkpoints/best.pt the best one by validation mIoU
    RUN_DIR/eval_history.jsonl  one line per validation
    RUN_DIR/metrics.json        final metrics

What can go wrong, and what happens (issue: reliability):

- bad data: every file of every dataset is checked before training starts
  (:func:`plca.data.checks.check_files`); a sample that still fails to load
  during training stops the run with the dataset's message naming the file and
  a checkpoint of the last finished step (``data.on_error: raise``), or is
  skipped, logged and counted (``skip``: ``data/skipped_samples``);
- a non-finite loss or gradient: the update is skipped (BatchNorm statistics
  restored too) and counted (``skipped_steps``); ``train.max_nonfinite_steps`` in
  a row stop the run, the last good checkpoint intact;
- SIGTERM / SIGINT: a checkpoint is written at the end of the current step;
- a failed checkpoint write (full disk): the previous checkpoint is intact and
  the run stops saying so.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from plca.config import Config, save_config, to_dict
from plca.data.checks import check_files
from plca.data.datasets import build_dataset
from plca.data.io import DatasetError
from plca.data.transforms import EvalTransform, TrainTransform
from plca.engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state
from plca.engine.distributed import DistInfo, all_reduce_mean, all_true, average_buffers, barrier, init_distributed
from plca.engine.loader import batch_stream
from plca.engine.logger import ScalarWindow, TensorBoard, setup_logger
from plca.engine.optim import build_optimizer, poly_lr, set_lr
from plca.evaluation.evaluator import evaluate
from plca.evaluation.metrics import summarize
from plca.methods import build_method
from plca.models.deeplab import build_deeplab_v2


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived; a checkpoint was saved before stopping."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict | None
    model: nn.Module | None = None  # the trained model (unwrapped from DDP)


def default_run_name(config: Config) -> str:
    """A name that encodes the run's choices, e.g. ``plca_gta5-cityscapes_resnet101_s0_20261124-101500``."""
    target = config.data.target or config.data.val
    pair = config.data.source.format + (f"-{target.format}" if target is not None else "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{config.method}_{pair}_{config.model.backbone}_s{config.train.seed}_{stamp}"


def _shared_run_dir(config: Config, info: DistInfo) -> Path:
    name = config.run_name or default_run_name(config)
    if info.enabled:
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    return Path(config.output_dir) / name


def test_time_aggregation_enabled(config: Config) -> bool:
    """``eval.test_time_aggregation``, where null means on for plca and off otherwise."""
    tta = config.eval.test_time_aggregation
    return config.method == "plca" if tta is None else tta


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_datasets(config: Config, method_uses_target: bool) -> tuple:
    data, train = config.data, config.train
    transform = TrainTransform(
        crop_size=tuple(train.crop_size),
        shorter_side=tuple(train.shorter_side) if train.shorter_side else None,
        flip=train.flip,
    )
    common = dict(classes=data.classes, on_error=data.on_error)
    source = build_dataset(data.source.format, data.source.root, data.source.split, transform=transform,
                           seed=train.seed, **common)
    target = None
    if method_uses_target:
        target = build_dataset(data.target.format, data.target.root, data.target.split, transform=transform,
                               seed=train.seed + 1, require_labels=False, **common)
    val = None
    if data.val is not None:
        val = build_dataset(data.val.format, data.val.root, data.val.split,
                            transform=EvalTransform(tuple(config.eval.size) if config.eval.size else None),
                            seed=train.seed, **common)
    return source, target, val


def check_datasets(datasets: dict, level: str, on_error: str, info: DistInfo, logger) -> None:
    """Check the files of each dataset before training (each process a share of the samples).

    Bad files are a :class:`DatasetError` naming them under ``on_error="raise"``, and a warning
    under ``"skip"`` (they are then skipped, and counted, when loaded).
    """
    failed = ""
    for name, dataset in datasets.items():
        if dataset is None or level == "none":
            continue
        started = time.time()
        report = check_files(dataset, level, indices=range(info.rank, len(dataset), info.world_size))
        if report.resized:
            logger.warning("%s: %d label(s) differ in size from their image and are resized when loaded "
                           "(nearest), e.g. %s", dataset.description, len(report.resized), report.resized[0])
        if not report.ok:
            if on_error == "skip":
                logger.warning("%s (data.on_error is skip: these samples are skipped and counted when loaded)",
                               report.message())
            elif not failed:
                failed = (f"{name} data: {report.message()} Or set data.on_error=skip to skip bad samples (they "
                          f"are counted and logged).")
        logger.info("checked the files of the %s data (%s) in %.1f s", name, level, time.time() - started)
    if not all_true(not failed, info.device):
        raise DatasetError(failed or "another process found bad dataset files (see its message)")


def _remove_stale_temporaries(folder: Path, logger) -> None:
    """Temporary files of checkpoint writes cut short by a crash or SIGKILL (the checkpoints are intact)."""
    for path in folder.glob(".*.tmp"):
        try:
            path.unlink()
            logger.info("removed %s, left by an interrupted checkpoint write", path)
        except OSError:
            pass


def _append_jsonl(path: Path, record: dict, logger) -> None:
    """One JSON line; a failure (e.g. a full disk) is a warning, never the end of the run."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        logger.warning("could not append to %s (%s); training goes on", path, error)


def build_model(config: Config, device: torch.device) -> nn.Module:
    model = build_deeplab_v2(
        num_classes=len(config.data.classes), backbone=config.model.backbone, style=config.model.style,
        pretrained=config.model.pretrained,
    )
    model = model.to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    images = batch["image"].to(device, non_blocking=True).float()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return {"image": images, "label": batch["label"].to(device, non_blocking=True)}


def _grads_finite(model: nn.Module) -> bool:
    norms = [p.grad.detach().abs().sum() for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms).sum()).item()) if norms else True


@torch.no_grad()
def _log_images(board: TensorBoard, model: nn.Module, source: dict, target: dict | None, classes, step: int) -> None:
    """TensorBoard grids (input, prediction, label) of the current source and target batches."""
    from plca.tools.report import log_image_grid

    model.eval()
    for domain, batch in (("source", source), ("target", target)):
        if batch is None:
            continue
        logits = model(batch["image"])["logits"]
        logits = F.interpolate(logits.float(), size=batch["label"].shape[-2:], mode="bilinear", align_corners=False)
        log_image_grid(board, f"images/{domain}", batch["image"].cpu(), logits.argmax(1).cpu(),
                       batch["label"].cpu(), classes, step)
    model.train()


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignal":
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


def train(config: Config, resume: str | Path | None = None, max_steps: int | None = None,
          progress: bool = True, data_check: str = "labels") -> RunResult:
    """Train according to ``config``; return the run directory, the last step and the final metrics.

    ``resume``: a run directory (or a checkpoint file) to continue from. A run whose
    ``run_name`` is given and whose directory already holds a checkpoint resumes by itself.
    ``max_steps``: stop (with a checkpoint) after this many updates in this call, as if interrupted.
    ``data_check``: how the dataset files are checked before training (``none``, ``headers``,
    ``labels``; see :mod:`plca.data.checks`).
    """
    info = init_distributed(config.device)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.train.deterministic

    if resume is not None:
        resume = Path(resume)
        run_dir = resume.parent.parent if resume.is_file() else resume
        checkpoint_path = resume if resume.is_file() else resume / "checkpoints" / "last.pt"
    else:
        run_dir = _shared_run_dir(config, info)
        checkpoint_path = run_dir / "checkpoints" / "last.pt"
        if not (config.run_name and checkpoint_path.is_file()):
            checkpoint_path = None
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    barrier()
    logger = setup_logger(run_dir, info.is_main)
    board = TensorBoard(run_dir / "tb" if info.is_main else None)
    streams: list = []  # the data streams, whose worker processes must stop whatever happens
    try:
        return _train(config, info, run_dir, checkpoint_path, max_steps, progress, logger, board, data_check,
                      streams)
    finally:
        for stream in streams:  # now, not when an exception's traceback lets go of them
            stream.close()
        board.close()


def _train(config, info, run_dir, checkpoint_path, max_steps, progress, logger, board, data_check,
           streams: list) -> RunResult:
    train_cfg = config.train
    seed_everything(train_cfg.seed + info.rank)
    method = build_method(config.method, config.loss)
    source_set, target_set, val_set = _build_datasets(config, method.uses_target)
    logger.info("run dir %s | %d processes on %s | source %d images%s%s", run_dir, info.world_size, info.device,
                len(source_set), f", target {len(target_set)}" if target_set is not None else "",
                f", val {len(val_set)}" if val_set is not None else "")
    check_datasets({"source": source_set, "target": target_set, "val": val_set}, data_check, config.data.on_error,
                   info, logger)
    if info.is_main:
        _remove_stale_temporaries(run_dir / "checkpoints", logger)

    model = build_model(config, info.device)
    optimizer = build_optimizer(model, train_cfg.lr, train_cfg.momentum, train_cfg.weight_decay,
                                train_cfg.head_lr_mult)
    start_step, best_miou = 0, -1.0
    counters = {"skipped_steps": 0, "skipped_samples": 0}  # over the whole run, kept in checkpoints
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, best_miou = int(state["step"]), float(state.get("best_mIoU", -1.0))
        counters.update({key: int(value) for key, value in state.get("counters", {}).items() if key in counters})
        rng = state["rng"][info.rank] if info.rank < len(state["rng"]) else None
        if rng is not None:
            set_rng_state(rng)
        logger.info("resumed from %s at step %d", checkpoint_path, start_step)

    train_model: nn.Module = model
    if info.enabled:
        if info.device.type == "cuda" and train_cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            train_model = model
        train_model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    model.train()

    accumulation = train_cfg.accumulation
    loader_args = dict(rank=info.rank, world_size=info.world_size, num_workers=config.data.num_workers,
                       pin_memory=info.device.type == "cuda")
    source_stream = batch_stream(source_set, train_cfg.batch_size, train_cfg.seed, start=start_step * accumulation,
                                 **loader_args)
    target_stream = (batch_stream(target_set, train_cfg.batch_size, train_cfg.seed + 1,
                                  start=start_step * accumulation, **loader_args)
                     if target_set is not None else None)
    streams += [stream for stream in (source_stream, target_stream) if stream is not None]
    poly_iters = train_cfg.poly_iters or train_cfg.iters
    use_amp = train_cfg.amp and info.device.type == "cuda"
    window = ScalarWindow()
    nonfinite_in_row = 0
    tta = test_time_aggregation_enabled(config)
    saved_step = start_step if checkpoint_path is not None else None  # step of the last good last.pt

    def save(step: int, name: str = "last.pt") -> None:
        nonlocal saved_step
        average_buffers(model)
        rngs = [rng_state()]
        if info.enabled:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng_state())
        failure = None
        if info.is_main:
            try:
                atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "best_mIoU": best_miou, "rng": rngs, "config": to_dict(config),
                             "counters": dict(counters)},
                            run_dir / "checkpoints" / name)
            except CheckpointError as error:
                failure = error
        if not all_true(failure is None, info.device):
            previous = (f"it holds step {saved_step}" if name == "last.pt" and saved_step is not None
                        else "if there is one")
            raise CheckpointError(
                f"{failure or 'the main process could not write a checkpoint'}. Training stopped at step {step}; "
                f"the previous {name} is intact ({previous}). Free disk space (or fix the folder's permissions) "
                f"and continue with: plca train --resume {run_dir}"
            )
        if name == "last.pt":
            saved_step = step

    def skipped_samples() -> int:
        """Samples skipped so far by all processes (each counts its own)."""
        count = counters["skipped_samples"]
        if info.enabled:
            count = round(all_reduce_mean(torch.tensor([float(count)], device=info.device)).item() * info.world_size)
        return count

    def validate(step: int) -> dict | None:
        nonlocal best_miou
        if val_set is None:
            return None
        average_buffers(model)
        confusion = evaluate(model, val_set, len(config.data.classes), info.device, test_time_aggregation=tta,
                             alpha=config.eval.alpha, amp=use_amp, rank=info.rank, world_size=info.world_size,
                             progress=progress)
        metrics = summarize(confusion.matrix.cpu(), config.data.classes)
        metrics.update(step=step, test_time_aggregation=tta)
        if info.is_main:
            board.scalars({"val/mIoU": metrics["mIoU"], "val/pixel_accuracy": metrics["pixel_accuracy"]}, step)
            _append_jsonl(run_dir / "eval_history.jsonl", metrics, logger)
            logger.info("step %d: %s %.2f", step, metrics["protocol"], metrics["mIoU"])
        if metrics["mIoU"] > best_miou:
            best_miou = metrics["mIoU"]
            save(step, "best.pt")
        return metrics

    bar = tqdm(total=train_cfg.iters, initial=start_step, desc=config.method, dynamic_ncols=True,
               disable=not (progress and info.is_main))
    step = start_step
    steps_this_call = 0
    with _StopSignal() as stop:
        while step < train_cfg.iters:
            set_lr(optimizer, poly_lr(train_cfg.lr, step, poly_iters, train_cfg.poly_power))
            optimizer.zero_grad(set_to_none=True)
            # every batch of the step is loaded before any computation, so a sample that fails to
            # load leaves the model exactly as after the previous step, which is then saved
            batches, load_error = [], None
            try:
                for _ in range(accumulation):
                    source_batch = next(source_stream)
                    batches.append((source_batch, next(target_stream) if target_stream is not None else None))
            except DatasetError as error:
                load_error = error
            if not all_true(load_error is None, info.device):
                bar.close()
                save(step)
                raise DatasetError(
                    f"{load_error or 'another process could not load a sample (see its message)'}\n"
                    f"Training stopped at step {step}; checkpoint saved. Fix or remove the file (plca prepare "
                    f"checks a whole dataset), or set data.on_error=skip to skip such samples (they are counted), "
                    f"then continue with: plca train --resume {run_dir}"
                )
            for source_batch, target_batch in batches:
                for message in source_batch["skipped"] + (target_batch["skipped"] if target_batch else []):
                    counters["skipped_samples"] += 1
                    logger.warning("step %d: %s", step, message)
            buffers = [buffer.detach().clone() for buffer in model.buffers()]
            finite = True
            for micro, (source_batch, target_batch) in enumerate(batches):
                source = _to_device(source_batch, info.device, train_cfg.channels_last)
                target = (_to_device(target_batch, info.device, train_cfg.channels_last)
                          if target_batch is not None else None)
                sync = micro == accumulation - 1 or not info.enabled
                no_sync = train_model.no_sync() if not sync else contextlib.nullcontext()
                autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp
                            else contextlib.nullcontext())
                with no_sync, autocast:
                    output = method.training_step(train_model, source, target)
                finite = finite and bool(torch.isfinite(output.loss).item())
                with no_sync:
                    (output.loss / accumulation).backward()
                window.add(output.logs)
            finite = all_true(finite and _grads_finite(model), info.device)
            if finite:
                optimizer.step()
                nonfinite_in_row = 0
            else:
                nonfinite_in_row += 1
                counters["skipped_steps"] += 1
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():  # the forward passes may have put NaN into BatchNorm statistics
                    for buffer, saved in zip(model.buffers(), buffers):
                        buffer.copy_(saved)
                logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                               step, nonfinite_in_row)
                if nonfinite_in_row >= train_cfg.max_nonfinite_steps:
                    raise TrainingError(
                        f"{nonfinite_in_row} consecutive steps with a non-finite loss or gradient (step {step}); "
                        f"stopping. The last good checkpoint is {run_dir / 'checkpoints' / 'last.pt'}. "
                        f"Try a lower train.lr or check the data."
                    )
            step += 1
            steps_this_call += 1
            bar.update(1)

            if step % train_cfg.log_every == 0 or step == train_cfg.iters:
                scalars = window.means()
                scalars["lr"] = optimizer.param_groups[0]["lr"]
                scalars["skipped_steps"] = counters["skipped_steps"]
                scalars["data/skipped_samples"] = skipped_samples()
                board.scalars(scalars, step)
                if info.is_main:
                    _append_jsonl(run_dir / "scalars.jsonl", {"step": step, **scalars}, logger)
                bar.set_postfix(loss=f"{scalars.get('loss/total', math.nan):.3f}")
                logger.debug("step %d %s", step, scalars)
            if train_cfg.image_every and step % train_cfg.image_every == 0 and info.is_main:
                _log_images(board, model, source, target, config.data.classes, step)
            stopping = stop.received is not None or (max_steps is not None and steps_this_call >= max_steps)
            periodic = step % train_cfg.checkpoint_every == 0 or step == train_cfg.iters
            # during a run of skipped steps the model is that of the last good update; the end is saved anyway
            if (periodic and (nonfinite_in_row == 0 or step == train_cfg.iters)) or stopping:
                save(step)
            if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < train_cfg.iters:
                validate(step)
            if stop.received is not None:
                bar.close()
                raise TrainingInterrupted(
                    f"stopped by signal {stop.received} at step {step}; checkpoint saved. "
                    f"Resume with: plca train --resume {run_dir}"
                )
            if max_steps is not None and steps_this_call >= max_steps and step < train_cfg.iters:
                bar.close()
                return RunResult(run_dir=run_dir, step=step, metrics=None, model=model)
    bar.close()

    metrics = validate(step)
    skipped = skipped_samples()
    if metrics is not None and info.is_main:
        metrics.update(method=config.method, skipped_steps=counters["skipped_steps"], skipped_samples=skipped)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return RunResult(run_dir=run_dir, step=step, metrics=metrics, model=model)
