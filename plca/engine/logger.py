"""Run logging: a text log in the run directory, TensorBoard scalars, and mean-of-window scalars."""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

from torch import Tensor


def setup_logger(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Logger ``plca`` writing to stderr and ``run_dir/train.log`` (main process only)."""
    logger = logging.getLogger("plca")
    close_run_log(logger)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if run_dir is not None and is_main:
        handler = _RunLogHandler(run_dir / "train.log")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def close_run_log(logger: logging.Logger) -> None:
    """Detach and close the ``train.log`` handler of ``logger``: once a run ends, later lines of the same
    process (a second run, a notebook's next cell) no longer go into its log, and its file is closed."""
    for handler in [handler for handler in logger.handlers if isinstance(handler, _RunLogHandler)]:
        logger.removeHandler(handler)
        handler.close()


class _RunLogHandler(logging.FileHandler):
    """``train.log``; a failed write (a full disk) is said once on stderr instead of a traceback per record."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: ARG002
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"plca: cannot write {self.baseFilename} ({getattr(error, 'strerror', None) or error}); "
                  f"the log goes on on the console only", file=sys.stderr)


class ScalarWindow:
    """Running means of logged scalars between two log steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, logs: dict[str, Tensor | float]) -> None:
        for key, value in logs.items():
            self.sums[key] += float(value)
            self.counts[key] += 1

    def means(self) -> dict[str, float]:
        result = {key: self.sums[key] / self.counts[key] for key in sorted(self.sums)}
        self.sums.clear()
        self.counts.clear()
        return result


class TensorBoard:
    """SummaryWriter on the main process; a no-op elsewhere."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
