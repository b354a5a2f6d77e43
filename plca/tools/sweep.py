"""``plca sweep``: every grid combination x every seed, one run directory each, a manifest, one table.

The sweep directory is the config's ``output_dir`` (after the overrides)::

    SWEEP_DIR/manifest.json            the config, overrides, grid and seeds, and per run: its overrides,
                                       status (pending / running / finished / failed), exit code, the
                                       last lines of its stderr, start and end time, Slurm job id
    SWEEP_DIR/runs/<name>/             the run directories; <name> encodes the grid values and the seed,
                                       e.g. ``train.lr=0.01_s0``
    SWEEP_DIR/logs/<name>.out, .err    each run's stdout and stderr (every attempt, appended)
    SWEEP_DIR/slurm/                   submitit's job files (``--launcher slurm``)
    SWEEP_DIR/results.md, .csv, .png   mean +- sd over seeds per configuration (:mod:`plca.tools.sweep_table`)

Each run is ``python -m plca.cli train CONFIG OVERRIDES`` in a subprocess (through
``torch.distributed.run`` for several processes per node). Running the same command again
skips the finished runs (``metrics.json`` present), resumes the interrupted ones
(``--resume``) and tries the failed ones again. Another grid or seed set in the same
directory adds runs; another base config is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from plca.engine.run_dir import LockHeldError, acquire_lock, release_lock
from plca.files import atomic_write_json, flatten
from plca.plugins import ENV_VAR
from plca.tools.sweep_progress import RunProgress
from plca.tools.sweep_table import (DEFAULT_FLAG_RANGE, MANIFEST, SweepError, aggregate, format_summary,
                                    read_manifest, write_results)

#: Keys the sweep sets itself for every run.
RESERVED_KEYS = ("run_name", "output_dir", "train.seed")
LAUNCHERS = ("local", "slurm", "submitit-local")
#: Exit statuses of a run stopped by SIGINT (130) or SIGTERM (143), after saving a checkpoint.
INTERRUPTED_EXITS = (130, 143)
_STDERR_TAIL = 20
_STOP_WAIT_S = 80.0  # how long a preempted job waits for its run to save a checkpoint
_ALIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the plan


def split_values(text: str) -> list[str]:
    """``'0.01,0.02'`` -> ``['0.01', '0.02']``; commas inside brackets or quotes do not split
    (``'[1,2],[3,4]'`` -> ``['[1,2]', '[3,4]']``)."""
    values, current, depth, quote = [], "", 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    return [value.strip() for value in values]


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``['train.lr=0.01,0.02', 'method=plca']`` -> ``{'train.lr': ['0.01', '0.02'], 'method': ['plca']}``."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid '{spec}' must look like key.path=value1,value2")
        if key in RESERVED_KEYS:
            hint = "use --seeds" if key == "train.seed" else "the sweep names and places its runs itself"
            raise SweepError(f"--grid '{spec}': {key} cannot be a grid key ({hint})")
        if key in grid:
            raise SweepError(f"--grid: key '{key}' is given twice; list all its values in one --grid {key}=a,b")
        values = split_values(raw)
        if any(not value for value in values):
            raise SweepError(f"--grid '{spec}' has an empty value")
        if len(set(values)) != len(values):
            raise SweepError(f"--grid '{spec}' repeats a value")
        grid[key] = values
    return grid


def parse_seeds(values: Sequence[str | int]) -> list[int]:
    """Seeds from ``['0', '1', '2']`` or ``['0,1,2']``, duplicates dropped, order kept."""
    seeds: list[int] = []
    for value in values:
        for part in str(value).split(","):
            try:
                seed = int(part)
            except ValueError:
                raise SweepError(f"--seeds: '{part}' is not an integer") from None
            if seed < 0:
                raise SweepError(f"--seeds: {seed} is negative; seeds must be >= 0")
            seeds += [seed] if seed not in seeds else []
    if not seeds:
        raise SweepError("--seeds needs at least one seed")
    return seeds


def run_name(params: dict[str, str], seed: int) -> str:
    """The run directory's name: ``train.lr=0.01_s0``, made safe for a file system.

    A name whose text had to be changed (characters other than letters, digits and ``._=,+-``)
    or shortened (over 120 characters) ends in a hash of the full text, so two runs never share it.
    """
    raw = "_".join([*(f"{key}={value}" for key, value in params.items()), f"s{seed}"])
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", raw).strip("-.")
    if safe == raw and len(raw) <= 120:
        return raw
    digest = hashlib.sha1(raw.encode()).hexdigest()[:6]
    return f"{safe[:100]}-{digest}"


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: its name, grid values, seed and the overrides ``plca train`` gets."""

    name: str
    params: dict[str, str]
    seed: int
    overrides: tuple[str, ...]


def plan_runs(grid: dict[str, list[str]], seeds: Sequence[int], base_overrides: Sequence[str],
              runs_dir: str | Path) -> list[PlannedRun]:
    """The cartesian product of the grid values x seeds (seeds innermost), in grid order."""
    shared = [o for o in base_overrides if o.partition("=")[0].strip() != "output_dir"]  # each run's is set below
    runs = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        for seed in seeds:
            name = run_name(params, seed)
            overrides = (*shared, *(f"{k}={v}" for k, v in params.items()), f"train.seed={seed}",
                         f"output_dir={runs_dir}", f"run_name={name}")
            runs.append(PlannedRun(name, params, seed, overrides))
    return runs


def _check_overrides(overrides: Sequence[str], grid: dict[str, list[str]]) -> None:
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in ("run_name", "train.seed"):
            raise SweepError(f"override '{override}': the sweep sets {key} for each run "
                             f"({'use --seeds' if key == 'train.seed' else 'from the grid values and seed'})")
        if key in grid:
            raise SweepError(f"'{key}' is both an override ('{override}') and a --grid key; give it once")


# --------------------------------------------------------------------------- one run, as a job


_CHILD: subprocess.Popen | None = None  # the training process of the job running in this process


@dataclass
class TrainJob:
    """One run as a callable: ``job()`` trains (or resumes) it in a subprocess and returns the exit code.

    Picklable (plain fields, a top-level class), so submitit can send it to a Slurm node. On a
    node it decides when it starts whether to resume (``checkpoints/last.pt`` present), and
    with ``nnodes > 1`` it joins the other nodes through a c10d rendezvous on the job's first
    host. ``checkpoint`` is submitit's hook for a preempted or timed-out job: the run is asked
    to stop (SIGTERM: it saves at the next step boundary) and the job is requeued, to resume.
    """

    config: str
    overrides: list[str]
    run_dir: str
    stdout: str
    stderr: str
    cwd: str
    nproc_per_node: int = 1
    nnodes: int = 1
    env: dict[str, str] = field(default_factory=dict)

    def resumes(self) -> bool:
        return (Path(self.run_dir) / "checkpoints" / "last.pt").is_file()

    def command(self, rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
        """The command line of this run, now (``--resume`` when it has a checkpoint)."""
        train = ["-m", "plca.cli", "train", self.config, *self.overrides, "--no-progress"]
        if self.resumes():
            train += ["--resume", self.run_dir]
        python = [sys.executable]
        if self.nnodes > 1:
            if rdzv_endpoint is None:
                raise SweepError("a run on several nodes needs a rendezvous endpoint (it runs as a Slurm job)")
            return [*python, "-m", "torch.distributed.run", "--nnodes", str(self.nnodes), "--nproc_per_node",
                    str(self.nproc_per_node), "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint,
                    "--rdzv_id", rdzv_id or "plca", *train]
        if self.nproc_per_node > 1:
            return [*python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(self.nproc_per_node), *train]
        return [*python, *train]

    def __call__(self) -> int:
        global _CHILD
        stdout, stderr, node = self.stdout, self.stderr, 0
        endpoint = rdzv_id = None
        if self.nnodes > 1:
            import submitit

            job_env = submitit.JobEnvironment()
            node, rdzv_id = job_env.node, job_env.job_id
            port = 20000 + int(hashlib.sha1(rdzv_id.encode()).hexdigest(), 16) % 20000
            endpoint = f"{job_env.hostnames[0]}:{port}"
            if node > 0:  # every node logs, each to its own files
                stdout, stderr = f"{stdout}.node{node}", f"{stderr}.node{node}"
        command = self.command(endpoint, rdzv_id)
        Path(stdout).parent.mkdir(parents=True, exist_ok=True)
        with open(stdout, "a") as out, open(stderr, "a") as err:
            header = f"=== {_now()} on {socket.gethostname()}: {shlex.join(command)}\n"
            for handle in (out, err):
                handle.write(header)
                handle.flush()
            _CHILD = subprocess.Popen(command, cwd=self.cwd, stdout=out, stderr=err,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
            try:
                return _CHILD.wait()
            except KeyboardInterrupt:  # the run got the SIGINT too: it saves and stops (exit 130)
                return _CHILD.wait()
            finally:
                _CHILD = None

    def checkpoint(self):
        """submitit's preemption / timeout hook: stop the run cleanly, requeue this job."""
        import submitit

        child = _CHILD
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(self)


def plugin_env() -> dict[str, str]:
    """``{PLCA_PLUGINS: ...}`` when it is set here: a job carries it to a Slurm node whatever the job's
    environment there (the plugin modules must be importable on the node)."""
    return {ENV_VAR: os.environ[ENV_VAR]} if os.environ.get(ENV_VAR) else {}


def stderr_tail(path: str | Path, lines: int = _STDERR_TAIL) -> list[str]:
    """The last ``lines`` lines of the latest attempt in a run's stderr log."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, line in enumerate(text) if line.startswith("=== ")]
    return text[(starts[-1] + 1 if starts else 0):][-lines:]


# --------------------------------------------------------------------------- Slurm options


@dataclass
class SlurmOptions:
    """Resources of each run's Slurm job (``time_min``: the job's time limit in minutes)."""

    partition: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    time_min: int = 24 * 60
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    folder: str | None = None  # submitit's files; default SWEEP_DIR/slurm
    additional: dict[str, str] = field(default_factory=dict)  # slurm_additional_parameters
    poll_s: float = 30.0


def parse_slurm_args(pairs: Sequence[str]) -> dict[str, str]:
    """``['constraint=a100', 'account=lab']`` -> ``{'constraint': 'a100', 'account': 'lab'}``."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--slurm-arg '{pair}' must look like key=value (an sbatch option without '--')")
        parsed[key.strip().lstrip("-").replace("-", "_")] = value
    return parsed


# --------------------------------------------------------------------------- manifest


def _plain(data):
    """JSON round trip: tuples become lists, as they are once read back from the manifest."""
    return json.loads(json.dumps(data, default=str))


def check_same_sweep(manifest: dict, base_config: dict, grid: dict[str, list[str]], sweep_dir: Path) -> None:
    """Refuse to add runs of another base config, or over other grid keys, to an existing sweep."""
    old_keys = list(manifest.get("grid") or {})
    if manifest.get("runs") and set(old_keys) != set(grid):
        raise SweepError(
            f"sweep directory '{sweep_dir}' holds runs over the grid keys [{', '.join(old_keys) or 'none'}], this "
            f"sweep is over [{', '.join(grid) or 'none'}]; one sweep directory holds one set of grid keys: give "
            f"this sweep another output_dir")
    ignored = set(RESERVED_KEYS) | set(grid) | set(old_keys)
    old, new = flatten(manifest.get("base_config") or {}), flatten(_plain(base_config))
    differences = [(key, old.get(key, "(absent)"), new.get(key, "(absent)")) for key in sorted(set(old) | set(new))
                   if key not in ignored and old.get(key, "(absent)") != new.get(key, "(absent)")]
    if differences:
        shown = "; ".join(f"{key}: {a!r} in the sweep, {b!r} now" for key, a, b in differences[:6])
        more = f" (and {len(differences) - 6} more keys)" if len(differences) > 6 else ""
        raise SweepError(
            f"sweep directory '{sweep_dir}' holds runs of another base config (from '{manifest.get('config')}' "
            f"with overrides {manifest.get('base_overrides', [])}): {shown}{more}. Results of different base "
            f"configs are not mixed: give this sweep another output_dir, or use the same config and overrides")


def _new_manifest(config: str, overrides: Sequence[str], base_config: dict) -> dict:
    return {"format": 1, "config": config, "config_path": str(Path(config).absolute()),
            "base_overrides": list(overrides), "base_config": _plain(base_config), "grid": {}, "seeds": [],
            "created": _now(), "updated": _now(), "invocations": [], "runs": []}


def _merge_plan(manifest: dict, planned: Sequence[PlannedRun], grid: dict[str, list[str]],
                seeds: Sequence[int]) -> list[dict]:
    """Add the planned runs (and grid values, seeds) to ``manifest``; return their entries, in plan order."""
    for key, values in grid.items():
        known = manifest["grid"].setdefault(key, [])
        known += [value for value in values if value not in known]
    manifest["seeds"] += [seed for seed in seeds if seed not in manifest["seeds"]]
    entries = {entry["name"]: entry for entry in manifest["runs"]}
    chosen = []
    for run in planned:
        entry = entries.get(run.name)
        if entry is None:
            entry = {"name": run.name, "run_dir": f"runs/{run.name}", "params": run.params, "seed": run.seed,
                     "status": "pending", "action": None, "attempts": 0, "started": None, "finished": None,
                     "returncode": None, "stderr_tail": None, "job_id": None,
                     "log": {"stdout": f"logs/{run.name}.out", "stderr": f"logs/{run.name}.err"}}
            manifest["runs"].append(entry)
            entries[run.name] = entry
        entry["overrides"] = list(run.overrides)
        chosen.append(entry)
    return chosen


class _SweepLock:
    """``SWEEP_DIR/.sweep.lock``: one ``plca sweep`` at a time in a directory (released if it dies)."""

    def __init__(self, sweep_dir: Path) -> None:
        self.path, self.fd = sweep_dir / ".sweep.lock", None

    def __enter__(self) -> _SweepLock:
        try:
            self.fd = acquire_lock(self.path)
        except LockHeldError as error:
            raise SweepError(f"another plca sweep is running in '{self.path.parent}' ({error.holder}); "
                             f"wait for it to finish or stop it") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            release_lock(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepOutcome:
    """What a call of :func:`run_sweep` did, by run name."""

    sweep_dir: Path
    trained: list[str] = field(default_factory=list)  # started or resumed
    skipped: list[str] = field(default_factory=list)  # finished before
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # still queued or running on Slurm
    interrupted: bool = False
    results: dict[str, Path] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else 0


class _Sweep:
    """One call of :func:`run_sweep` while it holds the sweep directory."""

    def __init__(self, sweep_dir: Path, manifest: dict, config: str, echo: Callable[[str], None],
                 progress_every_s: float = 0.0) -> None:
        self.dir, self.manifest, self.config, self.echo = sweep_dir, manifest, config, echo
        self.outcome = SweepOutcome(sweep_dir)
        self.progress_every_s = progress_every_s
        self.entries: list[dict] = []  # this call's runs

    def done(self) -> str:
        """How far this call's runs are: ``sweep: 2 of 6 runs done (1 failed)``."""
        finished = sum(entry.get("status") == "finished" for entry in self.entries)
        failed = sum(entry.get("status") == "failed" for entry in self.entries)
        return (f"sweep: {finished + failed} of {len(self.entries)} runs done"
                + (f" ({failed} failed)" if failed else ""))

    def save(self) -> None:
        self.manifest["updated"] = _now()
        atomic_write_json(self.dir / MANIFEST, self.manifest)

    def job(self, entry: dict, nproc_per_node: int, nnodes: int = 1) -> TrainJob:
        return TrainJob(config=str(Path(self.config).absolute()), overrides=entry["overrides"],
                        run_dir=str((self.dir / entry["run_dir"]).absolute()),
                        stdout=str((self.dir / entry["log"]["stdout"]).absolute()),
                        stderr=str((self.dir / entry["log"]["stderr"]).absolute()),
                        cwd=os.getcwd(), nproc_per_node=nproc_per_node, nnodes=nnodes, env=plugin_env())

    def finished_before(self, entry: dict) -> bool:
        if (self.dir / entry["run_dir"] / "metrics.json").is_file():
            entry.update(status="finished", action="skipped")
            self.outcome.skipped.append(entry["name"])
            return True
        return False

    def start(self, entry: dict, job: TrainJob, launcher: str) -> None:
        entry.pop("note", None)
        entry.update(status="running" if launcher == "local" else "pending",
                     action="resumed" if job.resumes() else "started", attempts=entry.get("attempts", 0) + 1,
                     started=_now() if launcher == "local" else None, finished=None, returncode=None,
                     stderr_tail=None, launcher=launcher, command=job.command("<first node>:<port>", "<job id>")
                     if job.nnodes > 1 else job.command())
        self.outcome.trained.append(entry["name"])

    def end(self, entry: dict, returncode: int | None, error: str | None = None) -> None:
        entry.update(finished=_now(), returncode=returncode)
        if returncode == 0:
            entry["status"] = "finished"
            if not (self.dir / entry["run_dir"] / "metrics.json").is_file():
                entry["note"] = "no metrics.json: the config has no data.val, so nothing to average"
            self.echo(f"  {entry['name']}: finished{self._miou(entry)} | {self.done()}")
            return
        entry["status"] = "failed"
        entry["stderr_tail"] = stderr_tail(self.dir / entry["log"]["stderr"]) + ([error] if error else [])
        self.outcome.failed.append(entry["name"])
        last = next((line for line in reversed(entry["stderr_tail"]) if line.strip()), "")
        self.echo(f"  {entry['name']}: FAILED (exit {returncode}){': ' + last.strip() if last else ''} "
                  f"[log: {self.dir / entry['log']['stderr']}] | {self.done()}")

    def _miou(self, entry: dict) -> str:
        try:
            metrics = json.loads((self.dir / entry["run_dir"] / "metrics.json").read_text())
            return f", {metrics.get('protocol', 'mIoU')} {metrics['mIoU']:.2f}"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    # ------------------------------------------------------------------ here, one run after another

    def run_local(self, entries: list[dict], nproc_per_node: int) -> None:
        for index, entry in enumerate(entries, start=1):
            prefix = f"[{index}/{len(entries)}] {entry['name']}"
            if self.finished_before(entry):
                self.echo(f"{prefix}: finished before, skipped")
                self.save()
                continue
            job = self.job(entry, nproc_per_node)
            self.start(entry, job, "local")
            self.save()
            self.echo(f"{prefix}: {'resuming' if entry['action'] == 'resumed' else 'training'} "
                      f"(log: {self.dir / entry['log']['stderr']})")
            started = time.monotonic()
            try:
                with RunProgress(Path(job.run_dir) / "train.log", self.echo, f"  {entry['name']}", self.done,
                                 self.progress_every_s):
                    returncode = job()
            except KeyboardInterrupt:
                returncode = 130
            if returncode in INTERRUPTED_EXITS:  # Ctrl-C or SIGTERM: it saved, a re-run resumes it
                entry.update(status="pending", finished=_now(), returncode=returncode,
                             note="interrupted; the same plca sweep command resumes it")
                self.outcome.interrupted = True
                self.save()
                self.echo(f"  {entry['name']}: interrupted after {time.monotonic() - started:.0f} s; "
                          f"the sweep stops here (run the same command again to resume)")
                return
            self.end(entry, returncode)
            self.save()

    # ------------------------------------------------------------------ through submitit

    def run_submitit(self, entries: list[dict], slurm: SlurmOptions, cluster: str, nproc_per_node: int,
                     wait: bool) -> None:
        try:
            import submitit
        except ImportError:
            raise SweepError("--launcher slurm needs the submitit package (pip install submitit)") from None

        folder = Path(slurm.folder) if slurm.folder else self.dir / "slurm"
        pattern = str((folder / "%j").absolute())
        executor = submitit.AutoExecutor(folder=pattern, cluster=cluster)
        parameters = {"name": f"plca-{self.dir.name}", "timeout_min": slurm.time_min, "nodes": slurm.nodes,
                      "tasks_per_node": 1, "gpus_per_node": slurm.gpus_per_node or None,
                      "cpus_per_task": slurm.cpus_per_task, "mem_gb": slurm.mem_gb, "slurm_partition": slurm.partition,
                      "slurm_additional_parameters": slurm.additional or None}
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        jobs: dict[str, object] = {}
        submit = []
        for entry in entries:
            if self.finished_before(entry):
                self.echo(f"{entry['name']}: finished before, skipped")
                continue
            old = self._still_queued(entry, cluster)
            if old is not None:
                jobs[entry["name"]] = old
                self.outcome.trained.append(entry["name"])
                self.echo(f"{entry['name']}: still queued or running as job {entry['job_id']}, not submitted again")
                continue
            submit.append(entry)
        if submit:
            prepared = [(entry, self.job(entry, nproc_per_node, slurm.nodes)) for entry in submit]
            with executor.batch():
                submitted = [executor.submit(job) for _, job in prepared]
            try:
                (folder / "%j").rmdir()  # an empty folder named after the pattern itself, left by submitit
            except OSError:
                pass
            for (entry, job), handle in zip(prepared, submitted):
                self.start(entry, job, cluster if cluster == "slurm" else "submitit-local")
                entry.update(job_id=str(handle.job_id), job_folder=pattern)
                jobs[entry["name"]] = handle
                self.echo(f"{entry['name']}: submitted as job {handle.job_id}")
        self.save()
        if not wait:
            self.outcome.waiting = list(jobs)
            return
        self._wait(entries, jobs, slurm.poll_s if cluster == "slurm" else 1.0)

    def _still_queued(self, entry: dict, cluster: str):
        """The Slurm job of a run submitted by an earlier call, if it is still queued or running."""
        if cluster != "slurm" or not entry.get("job_id") or entry.get("status") not in ("pending", "running"):
            return None
        import submitit

        job = submitit.SlurmJob(folder=entry.get("job_folder") or str(self.dir / "slurm" / "%j"),
                                job_id=entry["job_id"])
        return job if job.state in _ALIVE_STATES else None

    def _wait(self, entries: list[dict], jobs: dict, poll_s: float) -> None:
        by_name = {entry["name"]: entry for entry in entries}
        pending = dict(jobs)
        self.echo(f"waiting for {len(pending)} job(s) (Ctrl-C stops waiting, the jobs go on)")
        try:
            while pending:
                for name, job in list(pending.items()):
                    entry = by_name[name]
                    if job.done():
                        returncode, error = None, None
                        try:
                            returncode = job.result()
                        except Exception as failure:  # the job itself failed (killed, timed out, ...)
                            error = " ".join(str(failure).split())[-500:]
                        self.end(entry, returncode if isinstance(returncode, int) else None, error)
                        del pending[name]
                    elif entry["status"] == "pending" and job.state == "RUNNING":
                        entry.update(status="running", started=_now())
                self.save()
                if pending:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            self.outcome.waiting = list(pending)
            self.echo(f"stopped waiting; {len(pending)} job(s) go on. Run the same command again to collect them")
        self.save()


def _processes_per_node(launcher: str, nproc_per_node: int | None, slurm: SlurmOptions) -> int:
    """The processes each run starts per node: 1 locally, one per GPU on Slurm, unless given."""
    if launcher == "local":
        if slurm.nodes > 1:
            raise SweepError("--nodes is for --launcher slurm; a local run uses this machine only")
        nproc = nproc_per_node or 1
    else:
        nproc = nproc_per_node or max(1, slurm.gpus_per_node)
        if slurm.gpus_per_node > 0 and nproc != slurm.gpus_per_node:
            raise SweepError(f"--nproc-per-node {nproc} differs from --gpus-per-node {slurm.gpus_per_node}: "
                             f"on Slurm each GPU runs one process")
    if nproc < 1:
        raise SweepError(f"--nproc-per-node must be >= 1, got {nproc}")
    return nproc


def run_sweep(config: str | Path, seeds: Sequence[int], grid: dict[str, list[str]] | Sequence[str] = (),
              overrides: Sequence[str] = (), launcher: str = "local", nproc_per_node: int | None = None,
              slurm: SlurmOptions | None = None, flag_range: float = DEFAULT_FLAG_RANGE, wait: bool = True,
              dry_run: bool = False, echo: Callable[[str], None] = print,
              progress_every_s: float = 30.0) -> SweepOutcome:
    """Run (or continue) the sweep of ``config`` + ``overrides`` over ``grid`` x ``seeds``; write the results.

    ``grid``: ``{key: [values]}`` or ``--grid`` strings (``key=v1,v2``); ``launcher``: ``local``
    (here, one run after another), ``slurm`` (one Slurm job per run, through submitit) or
    ``submitit-local`` (submitit's local executor: the Slurm code path on this machine).
    ``wait``: for Slurm, wait for the jobs and then write the results. ``progress_every_s``: with
    ``local``, how often the running run's step and ETA are said (when it logged a new step; 0: never). Raises
    :class:`SweepError` for a bad request and :class:`plca.config.ConfigError` for a bad config.
    """
    from plca.config import load_config, to_dict

    config = str(config)
    if launcher not in LAUNCHERS:
        raise SweepError(f"--launcher '{launcher}' is unknown; choose one of {', '.join(LAUNCHERS)}")
    if not Path(config).is_file():
        raise SweepError(f"config file '{config}' does not exist")
    grid = parse_grid(grid) if not isinstance(grid, dict) else {k: [str(v) for v in vs] for k, vs in grid.items()}
    seeds = parse_seeds(seeds)
    overrides = list(overrides)
    _check_overrides(overrides, grid)
    slurm = slurm or SlurmOptions()
    nproc = _processes_per_node(launcher, nproc_per_node, slurm)
    base = load_config(config, overrides)
    base_config = to_dict(base)
    sweep_dir = Path(base.output_dir)
    runs_dir = (sweep_dir / "runs").absolute()
    planned = plan_runs(grid, seeds, overrides, runs_dir)
    if base.data.val is None:
        echo("warning: the config has no data.val, so the runs write no metrics.json and nothing can be averaged")
    if dry_run:
        if (sweep_dir / MANIFEST).is_file():
            check_same_sweep(read_manifest(sweep_dir), base_config, grid, sweep_dir)
        echo(f"sweep dir {sweep_dir}: {len(planned)} run(s)")
        for run in planned:
            done = (runs_dir / run.name / "metrics.json").is_file()
            resume = (runs_dir / run.name / "checkpoints" / "last.pt").is_file()
            action = "finished, would skip" if done else "would resume" if resume else "would train"
            echo(f"  {run.name}: {action}: plca train {shlex.join([config, *run.overrides])}")
        return SweepOutcome(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with _SweepLock(sweep_dir):
        if (sweep_dir / MANIFEST).is_file():
            manifest = read_manifest(sweep_dir)
            check_same_sweep(manifest, base_config, grid, sweep_dir)
        else:
            manifest = _new_manifest(config, overrides, base_config)
        entries = _merge_plan(manifest, planned, grid, seeds)
        manifest["invocations"].append({"time": _now(), "argv": list(sys.argv), "launcher": launcher,
                                        "grid": grid, "seeds": list(seeds), "nproc_per_node": nproc})
        sweep = _Sweep(sweep_dir, manifest, config, echo, progress_every_s)
        sweep.entries = entries
        sweep.save()
        echo(f"sweep dir {sweep_dir}: {len(entries)} run(s) in this call, {len(manifest['runs'])} in the sweep")
        if launcher == "local":
            sweep.run_local(entries, nproc)
        else:
            if launcher == "submitit-local" and slurm.nodes > 1:
                raise SweepError("--launcher submitit-local runs on one node; use --nodes 1")
            sweep.run_submitit(entries, slurm, "slurm" if launcher == "slurm" else "local", nproc, wait)
        outcome = sweep.outcome
        table = aggregate(sweep_dir, flag_range)
        outcome.results = write_results(table, sweep_dir)
    if table.rows:
        echo(format_summary(table))
    echo(f"results: {', '.join(str(path) for path in outcome.results.values())}")
    if outcome.failed:
        echo(f"{len(outcome.failed)} run(s) failed: {', '.join(outcome.failed)} (see manifest.json and logs/)")
    if outcome.waiting:
        echo(f"{len(outcome.waiting)} run(s) still queued or running; run the same command again to collect them")
    return outcome
