"""The run directory: a unique name, exclusive creation, a lock held for the run's life, resume checks.

Guarantees:

- two runs started at the same moment never share a directory (the default name ends in
  a random suffix, and a directory is created exclusively);
- a second process cannot train in a directory another one holds (``RUN_DIR/.lock``, an
  advisory ``flock`` that the kernel releases when the holder dies, so a killed run never
  leaves a stale lock behind);
- a resume is checked against the checkpoint's own config before anything is written.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import time
from pathlib import Path

from plca.config import ConfigError, to_dict, upgrade_config_dict
from plca.engine.optim import effective_warmup
from plca.files import flatten

#: Keys that may differ between a run and its resume (schedule bookkeeping, logging, where things are).
RESUMABLE_CHANGES: tuple[str, ...] = (
    "train.iters", "train.eval_every", "train.checkpoint_every", "train.log_every", "train.image_every",
    "train.max_nonfinite_steps", "data.num_workers", "data.on_error", "device", "output_dir", "run_name",
    "data.source.root", "data.target.root", "data.val.root", "eval.size", "eval.test_time_aggregation", "eval.alpha",
)
#: Keys that change the network: a checkpoint of another network cannot be resumed.
MODEL_KEYS: tuple[str, ...] = ("model.", "data.classes")


class RunDirError(RuntimeError):
    """The run directory is held by another process, or cannot be created."""


def default_run_name(config) -> str:
    """A name that encodes the run's choices and is unique, e.g.
    ``plca_gta5-cityscapes_resnet101_s0_20261124-101500_3fa2c41b``.

    The 8 random hex digits make two names drawn in the same second collide with
    probability 2**-32 (4 digits collided in about 2 % of 50 draws); ``create_unique``
    still takes another name if the directory exists."""
    target = config.data.target or config.data.val
    pair = config.data.source.format + (f"-{target.format}" if target is not None else "")
    backbone = config.model.backbone.replace(":", "-").replace("/", "-")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{config.method}_{pair}_{backbone}_s{config.train.seed}_{stamp}_{secrets.token_hex(4)}"


def create_unique(output_dir: Path, make_name) -> Path:
    """Create a new directory ``output_dir/<make_name()>`` exclusively (another name on a collision)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output_dir '{output_dir}' is a file, not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        path = output_dir / make_name()
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"could not create a new run directory under '{output_dir}' (20 names taken)")


class LockHeldError(RuntimeError):
    """The lock file is held by another process; ``holder`` says which (PID and host)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"'{path}' is held by {holder}")
        self.path, self.holder = path, holder


def acquire_lock(path: Path) -> int:
    """Hold ``path`` (an advisory ``flock``, released by the kernel if the holder dies); write our PID and
    host into it. Returns the file descriptor for :func:`release_lock`; :class:`LockHeldError` if held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise LockHeldError(path, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode())
    return fd


def release_lock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


class RunLock:
    """``RUN_DIR/.lock``: held for the life of the run; names its holder's PID and host."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self._fd = acquire_lock(self.path)
        except LockHeldError as error:
            raise RunDirError(
                f"run directory '{self.path.parent}' is in use by {error.holder}; wait for it to finish or stop it, "
                f"or give this run another run_name"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            release_lock(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def config_differences(requested: dict, stored: dict) -> dict[str, tuple]:
    """Keys whose values differ: ``{key: (stored value, requested value)}``."""
    a, b = flatten(stored), flatten(requested)
    return {key: (a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)}


def check_resume_config(config, stored: dict | None, checkpoint: Path) -> list[str]:
    """Refuse a resume whose config differs from the checkpoint's in anything but :data:`RESUMABLE_CHANGES`.

    A stored config from before a key was renamed (``loss.association`` -> ``plca.association``) is
    compared under today's names. Returns a note per allowed difference, for the log (a longer
    ``train.iters`` without ``train.poly_iters`` also stretches the LR schedule, which is said).
    """
    if stored is None:
        return []
    differences = config_differences(to_dict(config), upgrade_config_dict(stored))  # a run's old keys as today's
    refused = {key: values for key, values in differences.items() if key not in RESUMABLE_CHANGES}
    if refused:
        model = [key for key in refused if key.startswith(MODEL_KEYS)]
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(refused.items())[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        what = "change the model, so its weights cannot be loaded; " if model else ""
        raise ConfigError(
            f"cannot resume from '{checkpoint}': the requested config differs from the run's own in "
            f"{', '.join(refused)[:300]} ({shown}{more}). These keys {what}start a new run (another run_name) "
            f"or resume without them"
        )
    notes = []
    for key, (old, new) in differences.items():
        if key in ("output_dir", "run_name"):
            continue
        note = ""
        if key == "train.iters" and config.train.poly_iters is None:
            note = " (the poly LR schedule now decays over the new length, so the LR changes from here on)"
        if key == "train.iters" and isinstance(old, int) and isinstance(new, int):
            before, after = (effective_warmup(config.train.warmup_iters, n) for n in (old, new))
            if before != after:  # the warmup is capped at a quarter of the run
                note += (f" (the warmup, at most a quarter of the run, now lasts {after} updates instead of "
                         f"{before}: a resume inside it goes back to a warmup LR)")
        notes.append(f"resuming with {key} changed from {old!r} to {new!r}{note}")
    return notes
