"""How a command that stopped says so: one line (or, for an unforeseen failure, the traceback),
the same on stderr and in the run's ``train.log``, and the exit status.

- an error a user can fix (:data:`REPORTED_ERRORS`): ``plca COMMAND: error: MESSAGE``, status 2;
- SIGTERM / SIGINT (:class:`~plca.engine.failure.TrainingInterrupted`): ``plca COMMAND: MESSAGE``,
  status 128 + the signal's number (SIGINT 130, SIGTERM 143), as a shell reports a process the
  signal ended;
- anything else: Python's traceback (a bug to report), status 1.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from plca.config import ConfigError
from plca.data.io import DatasetError
from plca.engine.checkpoint import CheckpointError
from plca.engine.distributed import DeviceError
from plca.engine.failure import TrainingError, TrainingInterrupted
from plca.engine.run_dir import RunDirError
from plca.evaluation.aggregation import AggregationBudgetError
from plca.models.weights import WeightsError
from plca.serialization import UnreadableFileError

#: Errors with a message that says what went wrong and what to do: printed as one line, status 2.
REPORTED_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, WeightsError, CheckpointError,
                                                TrainingError, RunDirError, DeviceError, UnreadableFileError,
                                                AggregationBudgetError)


def stop_text(command: str, error: BaseException) -> str:
    """What stderr gets when ``plca COMMAND`` stops with ``error`` (one line, or a traceback)."""
    if isinstance(error, TrainingInterrupted):
        return f"plca {command}: {error}"
    if isinstance(error, REPORTED_ERRORS):
        return f"plca {command}: error: {error}"
    return "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip("\n")


def exit_status(error: BaseException) -> int:
    """The exit status of a command stopped by ``error`` (see the module's docstring)."""
    if isinstance(error, TrainingInterrupted):
        return error.exit_code
    return 2 if isinstance(error, REPORTED_ERRORS) else 1


def record_stop(logger: logging.Logger, command: str, error: BaseException) -> None:
    """Write :func:`stop_text` to the log files of ``logger`` only (``train.log``): the console
    handler is left out, since the command prints the same text to stderr itself."""
    text = stop_text(command, error)
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (text,), None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).name == "train.log":
            handler.handle(record)
            handler.flush()
