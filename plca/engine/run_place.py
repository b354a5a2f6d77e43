"""Where a run lives: the directory given to ``--resume``, a named one, or a new unique one.

Creating, naming and locking a directory is :mod:`plca.engine.run_dir`; this module only
decides which directory a call of :func:`plca.engine.trainer.train` uses and whether it
continues from a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plca.config import Config
from plca.engine.checkpoint import CheckpointError
from plca.engine.distributed import DistInfo, broadcast_object
from plca.engine.run_dir import create_unique, default_run_name


@dataclass
class RunPlace:
    run_dir: Path
    resume_from: Path | None  # the last.pt to continue from
    created: bool  # this call created the directory (removed again if the run fails before its first step)


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``, as every stopping message says it."""
    return f"plca train --resume {run_dir}"


def locate_run(config: Config, resume: str | Path | None, info: DistInfo) -> RunPlace:
    """The run directory and checkpoint of this call (the main process creates a new directory).

    ``resume``: a run directory or a checkpoint file in it. Without it, ``config.run_name``
    names the directory under ``output_dir`` (continued when it holds ``checkpoints/last.pt``),
    else a new uniquely named one is created. Collective under DDP (every process gets the
    main process's answer).
    """
    if resume is not None:
        return _given(Path(resume))
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


def _given(resume: Path) -> RunPlace:
    if resume.is_file():
        run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
        return RunPlace(run_dir, resume, created=False)
    if not resume.is_dir():
        raise CheckpointError(f"--resume '{resume}' is neither a run directory nor a checkpoint file")
    last = resume / "checkpoints" / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"run directory '{resume}' has no checkpoints/last.pt to resume from")
    return RunPlace(resume, last, created=False)
