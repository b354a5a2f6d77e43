"""The run directory's files other than checkpoints: ``config.yaml``, ``run.json`` and the JSON-lines logs.

The layout is listed in :mod:`plca.engine.trainer`. Checkpoints are written by
:mod:`plca.engine.checkpointer`, ``train.log`` by :mod:`plca.engine.logger`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from plca.config import Config, save_config, to_dict
from plca.engine.run_dir import RunDirError
from plca.files import atomic_write_text

JSONL_LOGS = ("scalars.jsonl", "eval_history.jsonl")


def prepare_run_dir(run_dir: Path, config: Config, step: int, argv: Sequence[str] | None, started: float,
                    logger: logging.Logger, run_id: str | None = None) -> None:
    """Ready ``run_dir`` for training from ``step`` (main process): the config, ``checkpoints/``, the
    JSON-lines logs cut back to ``step``, ``run.json``, and no temporary file of a cut-short write."""
    try:
        save_config(config, run_dir / "config.yaml")
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        for name in JSONL_LOGS:
            truncate_jsonl(run_dir / name, step)
    except OSError as error:
        raise RunDirError(f"cannot write to the run directory '{run_dir}': "
                          f"{error.strerror or error}{_free_space(run_dir)}") from None
    record_run(run_dir, config, argv, started, None, logger, run_id)
    for stale in (run_dir / "checkpoints").glob(".*.tmp"):
        stale.unlink(missing_ok=True)  # left by a checkpoint write cut short (the checkpoint is intact)


def record_run(run_dir: Path, config: Config, argv: Sequence[str] | None, started: float, finished: float | None,
               logger: logging.Logger, run_id: str | None = None) -> None:
    """``run.json``: what is needed to reproduce the run (versions, commit, command, times, run id)."""
    try:
        from plca.engine.run_record import write_run_record
    except ImportError:
        return
    try:
        write_run_record(run_dir, to_dict(config), argv, config.train.seed, started, finished, run_id=run_id)
    except OSError as error:
        logger.warning("could not write %s (%s)", run_dir / "run.json", error)


def append_jsonl(path: Path, record: dict, logger: logging.Logger) -> None:
    """One JSON line; a failure (e.g. a full disk) is a warning, never the end of the run."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        logger.warning("could not append to %s (%s); training goes on", path, error)


def read_jsonl(path: Path) -> list[dict]:
    """Every record of ``path`` (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop the lines of ``path`` logged after ``after_step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= after_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _free_space(folder: Path) -> str:
    try:
        return f" ({shutil.disk_usage(folder).free / 2**30:.2f} GiB free there)"
    except OSError:
        return ""
