"""``RUN_DIR/run.json``: what is needed to reproduce a run, and where it ran.

::

    {"format": 1, "run_id": "3f2a...", "seed": 0, "argv": [...], "command": "plca train ...", "config": {...},
     "environment": {...},                      # of the session that started the run
     "started": "2026-11-24T10:15:00.123+01:00", "finished": "..." or null,
     "duration_s": ...,                         # the sessions' running time, summed
     "sessions": [{"started", "finished", "argv", "environment"}, ...]}   # one per start or resume

:func:`write_run_record` is called when a run starts (``finished=None``) and again when it
ends; a resumed run is one more session. The file is replaced atomically, so a reader never
sees half of it. ``run_id`` names the run (see :mod:`plca.engine.run_identity`); every
checkpoint of the run carries the same id.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from plca.files import atomic_write_json

RUN_RECORD = "run.json"
_GIT_TIMEOUT_S = 5.0


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """stdout of ``git ARGS`` run in ``cwd``; None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(package_dir: str | Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout that holds the ``plca`` package's source files.

    ``(None, None)`` when git is absent, or the package is not tracked by a checkout (e.g. an
    installed wheel, even one inside some other repository). ``dirty``: tracked files changed or
    untracked files present (``git status --porcelain``).
    """
    if package_dir is None:
        package_dir = Path(__file__).resolve().parent.parent  # plca/engine/run_record.py -> plca/
    package_dir = Path(package_dir).resolve()
    # the package's own __init__.py must be tracked, else the commit would describe another project
    if _git(["ls-files", "--error-unmatch", "__init__.py"], package_dir) is None:
        return None, None
    commit = _git(["rev-parse", "HEAD"], package_dir)
    status = _git(["status", "--porcelain"], package_dir)
    return (commit.strip() if commit else None), (bool(status.strip()) if status is not None else None)


def environment() -> dict:
    """Versions and hardware of this process: ``plca_version``, ``git_commit``, ``git_dirty``,
    ``python``, ``torch``, ``cuda``, ``cudnn``, ``gpu_count``, ``gpus`` (model names),
    ``hostname``, ``platform``, ``plugins`` (what :mod:`plca.plugins` loaded). A value that cannot be
    known is None."""
    import torch

    from plca.plugins import loaded_plugins
    from plca.version import __version__

    commit, dirty = git_state()
    gpus: list[str] = []
    try:
        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    except RuntimeError:  # a broken driver: report no GPU rather than fail the run
        gpus = []
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError:
        cudnn = None
    return {
        "plca_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "plugins": list(loaded_plugins()),
    }


def _timestamp(value: float | datetime | str | None) -> str | None:
    """ISO 8601 with the local UTC offset, to the millisecond (``value``: Unix time, datetime or ISO text)."""
    if value is None or isinstance(value, str):
        return value
    moment = value if isinstance(value, datetime) else datetime.fromtimestamp(float(value))
    return moment.astimezone().isoformat(timespec="milliseconds")


def read_run_record(run_dir: str | Path) -> dict | None:
    """``run_dir/run.json`` as a dict; None when it is missing or not valid JSON."""
    path = Path(run_dir) / RUN_RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _command(argv: Sequence[str]) -> str:
    """``argv`` as a shell command; ``python -m plca.cli`` runs show as such, so they can be pasted."""
    argv = list(argv)
    if argv and Path(argv[0]).name == "cli.py" and Path(argv[0]).parent.name == "plca":
        argv = [sys.executable, "-m", "plca.cli", *argv[1:]]
    return shlex.join(argv)


def write_run_record(run_dir: str | Path, config_dict: dict, argv: Sequence[str] | None, seed: int,
                     started: float | datetime | str, finished: float | datetime | str | None = None,
                     run_id: str | None = None) -> Path:
    """Write (or update) ``run_dir/run.json`` atomically; return its path.

    ``started``: when this session began (Unix time, datetime or ISO text); a call with the
    ``started`` of a session already recorded updates that session (e.g. adds ``finished``),
    any other ``started`` adds a session (a resume). ``argv``: the command line (default
    ``sys.argv``). The environment is measured once per session. ``run_id``: the run's id (None
    keeps the one already recorded).
    """
    run_dir = Path(run_dir)
    argv = list(sys.argv if argv is None else argv)
    started_at, finished_at = _timestamp(started), _timestamp(finished)
    record = read_run_record(run_dir) or {}
    sessions = [s for s in record.get("sessions", []) if isinstance(s, dict)]
    session = next((s for s in sessions if s.get("started") == started_at), None)
    if session is None:
        session = {"started": started_at, "finished": None, "argv": argv, "environment": environment()}
        sessions.append(session)
    session["finished"] = finished_at
    first, last = sessions[0], sessions[-1]
    duration = sum((datetime.fromisoformat(s["finished"]) - datetime.fromisoformat(s["started"])).total_seconds()
                   for s in sessions if s.get("finished") and s.get("started"))
    record = {
        "format": 1,
        "run_id": run_id or record.get("run_id"),
        "seed": seed,
        "argv": first["argv"],
        "command": _command(first["argv"]),
        "config": config_dict,
        "environment": first["environment"],
        "started": first["started"],
        "finished": last.get("finished"),
        "duration_s": round(duration, 3),
        "sessions": sessions,
    }
    path = run_dir / RUN_RECORD
    atomic_write_json(path, record, default=str)
    return path
