"""Atomic checkpoints and exact-resume state (model, optimiser, step, RNG)."""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk at any point leaves the previous file at ``path`` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # like tempfile.mkstemp, but the file gets the usual permissions (0666 minus the umask), not 0600
    tmp_name = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise _write_failed(path, error) from error
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(error, (OSError, RuntimeError)):  # torch's writer may wrap an I/O error in a RuntimeError
            raise _write_failed(path, error) from error
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_failed(path: Path, error: Exception) -> CheckpointError:
    detail = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    try:
        detail += f"; {shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free there"
    except OSError:
        pass
    return CheckpointError(f"could not write checkpoint '{path}' ({detail}); "
                           f"the previous checkpoint there, if any, is intact")


def load_checkpoint(path: str | Path) -> dict:
    """Load a training checkpoint without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure becomes one clear message
        raise CheckpointError(
            f"cannot load checkpoint '{path}': it is truncated, not a PyTorch file, or holds objects other than "
            f"tensors and plain containers (refused for safety). Detail: {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"'{path}' is not a plca training checkpoint (no 'model' entry)")
    return state


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
