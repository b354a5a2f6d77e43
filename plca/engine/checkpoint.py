"""Atomic checkpoints and exact-resume state (method, optimiser, loop state, RNG).

Two kinds of files, both written atomically (temporary file, fsync, rename):

- ``last.pt``, everything a resumed run needs: ``method`` (the method's whole state dict:
  student, teacher, ...), ``optimizer``, ``state`` (:class:`~plca.engine.state.TrainState`),
  ``rng`` (one entry per process), plus ``model`` (the inference network's weights),
  ``segmentor`` (its description), ``classes``, ``config`` and ``step``;
- model files (``final.pt``, ``best_on_val.pt``): only ``model``, ``segmentor``, ``classes``,
  ``config``, ``step`` and the metrics they were selected with, a fraction of the size.

Both also carry ``run`` (``{"id", "method", "data"}``: which run wrote them, see
:mod:`plca.engine.run_identity`) and ``final`` (whether ``step`` is the run's last).

Nothing holding a non-finite tensor is ever written: a diverged model must not replace the
last good checkpoint.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plca.files import atomic_open
from plca.serialization import UnreadableFileError, load_torch_file


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk at any point leaves the previous file at ``path`` intact (see
    :func:`plca.files.atomic_open`); a failed write raises :class:`CheckpointError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(path, "wb") as handle:
            torch.save(obj, handle)
    except (OSError, RuntimeError) as error:  # torch's writer may wrap an I/O error in a RuntimeError
        raise _write_failed(path, error) from error


def _write_failed(path: Path, error: Exception) -> CheckpointError:
    detail = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    try:
        detail += f"; {shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free there"
    except OSError:
        pass
    return CheckpointError(f"could not write checkpoint '{path}' ({detail}); "
                           f"the previous checkpoint there, if any, is intact")


def load_checkpoint(path: str | Path) -> dict:
    """Load a plca checkpoint or model file without executing code (``weights_only=True``)."""
    path = Path(path)
    try:
        state = load_torch_file(path, "checkpoint")
    except UnreadableFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"'{path}' is not a plca training checkpoint (no 'model' entry)")
    return state


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or inf."""
    return [key for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


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
        # as many GPUs as were saved and are visible now (a resume may see fewer or more)
        for index, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)
