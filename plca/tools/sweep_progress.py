"""Progress of a local sweep while a run trains: the run's step, time spent and ETA, read from its
``train.log`` (the run itself trains without a progress bar, its output going to the sweep's logs),
and how many of the sweep's runs are done."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: A step line of ``train.log`` (:class:`plca.engine.periodic.ScalarLog`): ``step 40/200 | ...``.
_STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) \|")
_TAIL_BYTES = 65536


def last_logged_step(log: Path) -> tuple[int, int] | None:
    """``(step, iters)`` of the last step line of a ``train.log``, or None (no such line or no file)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    found = _STEP_LINE.findall(text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def duration(seconds: float) -> str:
    """``'45 s'``, ``'12 min 5 s'``, ``'3 h 20 min'``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def progress_line(step: int, iters: int, first_step: int, elapsed: float) -> str:
    """``step 40/200 (20 %), 1 min 3 s, ETA 4 min 12 s``: the ETA extrapolates this attempt's pace
    (from ``first_step``, where it started; set-up time included, so it errs long)."""
    eta = (f"ETA {duration((iters - step) * elapsed / (step - first_step))}" if step > first_step
           else "ETA after its first logged steps")
    return f"step {step}/{iters} ({100 * step // max(iters, 1)} %), {duration(elapsed)}, {eta}"


class RunProgress:
    """While entered, every ``every_s`` seconds: one line ``PREFIX: step ... | SWEEP`` when the run
    logged a new step (``sweep()`` says how far the sweep is). ``every_s <= 0``: silent."""

    def __init__(self, log: Path, echo: Callable[[str], None], prefix: str, sweep: Callable[[], str],
                 every_s: float) -> None:
        self.log, self.echo, self.prefix, self.sweep, self.every_s = log, echo, prefix, sweep, every_s
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> RunProgress:
        if self.every_s > 0:
            self.thread = threading.Thread(target=self._watch, name="plca-sweep-progress", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def _watch(self) -> None:
        started = time.monotonic()
        first = last_logged_step(self.log)  # a resumed run's log holds the previous attempt's steps
        first_step, shown = (first[0] if first else 0), first
        while not self.stopped.wait(self.every_s):
            now = last_logged_step(self.log)
            if now is None or now == shown:
                continue
            shown = now
            self.echo(f"{self.prefix}: {progress_line(*now, first_step, time.monotonic() - started)} | "
                      f"{self.sweep()}")
