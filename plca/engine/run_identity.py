"""Which run a directory and a checkpoint belong to: the run id, and the check made before a resume.

A run gets an id (``uuid4`` hex) when its directory is first used; ``run.json`` records it
(:mod:`plca.engine.run_record`), and every checkpoint and model file carries it in its header
(``run``: ``{"id", "method", "data"}``, the data being each dataset's format, root and split),
beside the network's description (``segmentor``).
A resume whose checkpoint carries another run's id is refused, naming both runs, before
anything in the directory is written: a checkpoint copied in from another run must not
continue there as if it were the directory's own.

Files from before run ids: a checkpoint without one is resumed with a warning (it cannot be
checked), unless its method differs from the one the directory's ``run.json`` records; a
directory without one takes the checkpoint's.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from plca.engine.checkpoint import CheckpointError
from plca.engine.run_record import read_run_record


def new_run_id() -> str:
    """A fresh run id: 32 hex digits."""
    return uuid.uuid4().hex


def describe_data(config) -> dict:
    """``{"source": {"format", "root", "split"}, "target": ..., "val": ...}`` of ``config.data`` (unset ones left out)."""
    data = {}
    for name in ("source", "target", "val"):
        spec = getattr(config.data, name)
        if spec is not None:
            data[name] = {"format": spec.format, "root": str(spec.root), "split": spec.split}
    return data


def directory_run(run_dir: Path) -> tuple[str | None, str | None]:
    """``(run id, method)`` that ``run_dir/run.json`` records (None for what it does not say)."""
    record = read_run_record(run_dir) or {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    run_id = record.get("run_id")
    method = config.get("method")
    return (run_id if isinstance(run_id, str) else None), (method if isinstance(method, str) else None)


def checkpoint_run(checkpoint: dict) -> tuple[str | None, str | None]:
    """``(run id, method)`` a checkpoint's header gives (its ``run`` entry, else its config's method)."""
    run = checkpoint.get("run") if isinstance(checkpoint.get("run"), dict) else {}
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    run_id, method = run.get("id"), run.get("method", config.get("method"))
    return (run_id if isinstance(run_id, str) else None), (method if isinstance(method, str) else None)


def resume_identity(run_dir: Path, checkpoint: dict, path: Path) -> tuple[str, list[str]]:
    """The run id a resume of ``checkpoint`` (loaded from ``path``) in ``run_dir`` continues, and warnings.

    Raises :class:`CheckpointError` naming both runs (ids and methods) when the checkpoint belongs
    to another run than the directory.
    """
    dir_id, dir_method = directory_run(run_dir)
    ckpt_id, ckpt_method = checkpoint_run(checkpoint)
    foreign = (dir_id is not None and ckpt_id is not None and dir_id != ckpt_id) or (
        (dir_id is None or ckpt_id is None) and None not in (dir_method, ckpt_method) and dir_method != ckpt_method)
    if foreign:
        raise CheckpointError(
            f"cannot resume from '{path}': it belongs to run {ckpt_id or '(no id)'} ({ckpt_method}), but the "
            f"directory '{run_dir}' holds run {dir_id or '(no id)'} ({dir_method}). A checkpoint continues only "
            f"the run that wrote it: resume from that run's own directory, or start a new run")
    warnings = []
    if ckpt_id is None:
        warnings.append(f"'{path}' carries no run id (written by a plca from before run ids), so it cannot be "
                        f"checked to belong to '{run_dir}'; resuming it as this directory's run")
    return dir_id or ckpt_id or new_run_id(), warnings
