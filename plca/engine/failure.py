"""The failure policy: what stops a run, what is saved before it stops, and the one line that says so.

Between steps, :class:`FailurePolicy` decides:

- a sample that fails to load (``data.on_error: raise``) on any process: ``last.pt`` of the
  previous step is saved (none before the first update) and :class:`~plca.data.io.DatasetError`
  names the file; with ``skip`` the skipped samples are counted and logged, and only a dataset
  without one loadable sample stops the run;
- an update skipped for a non-finite loss or gradient is counted; ``train.max_nonfinite_steps``
  in a row raise :class:`TrainingError`; an update that made the weights non-finite raises at
  once (the checkpointer never writes non-finite weights);
- SIGTERM / SIGINT on any process: every process stops at the same step boundary, saves, and
  raises :class:`TrainingInterrupted`; during the set-up (:class:`StopAtOnce`) the process stops at
  once with it, saving nothing (a resumed run's checkpoint is left as it was);
- any other failure during an update or between updates (e.g. out of memory in a validation):
  :class:`TrainingError` in one line, after saving the last finished step when that is safe
  (one process, the model not inside a run of skipped updates).

The decisions that involve every process (:meth:`FailurePolicy.after_loading`,
:meth:`FailurePolicy.signalled`) are collectives: every process calls them at the same point
of the loop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch

from plca.config import TrainConfig
from plca.data.io import DatasetError
from plca.engine.checkpoint import CheckpointError
from plca.engine.checkpointer import Checkpointer
from plca.engine.distributed import DistInfo, all_true, any_true
from plca.engine.run_place import resume_command
from plca.engine.state import TrainState
from plca.engine.update import UpdateOutcome


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT arrived; a checkpoint was saved before stopping.

    ``signum``: the signal (``None`` when it reached another DDP process only); ``exit_code`` is
    the shell's convention for a process ended by it, 128 + the signal's number (SIGINT 130, SIGTERM 143).
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _SignalArrived(KeyboardInterrupt):
    """Raised by :class:`StopAtOnce`'s handler: a BaseException, so that no ``except Exception`` of the
    set-up (a data check, a logging handler) takes it for a failure of its own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _ignore_repeat(signum, frame) -> None:  # noqa: ARG001
    """StopAtOnce's handler once a signal is being acted on: further ones change nothing."""


class StopAtOnce(StopSignal):
    """Set-up, before the loop: SIGTERM / SIGINT stop the run at once, as :class:`TrainingInterrupted`
    with the message ``describe(signal name)`` (the loop's :class:`StopSignal`, entered inside, takes over
    until the loop ends). Without it SIGTERM would end the process silently and SIGINT with a traceback,
    and neither would reach ``train.log``."""

    def __init__(self, describe: Callable[[str], str]) -> None:
        super().__init__()
        self.describe = describe

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        # a second signal (Ctrl-C twice, SIGTERM then SIGINT) must not interrupt the first one's clean-up
        # nor this class's __exit__: it would end in a traceback with a temporary file left behind
        for sig in self.previous:
            signal.signal(sig, _ignore_repeat)
        raise _SignalArrived(signum)

    def __exit__(self, exc_type, exc, traceback) -> None:
        super().__exit__()
        if isinstance(exc, _SignalArrived):
            raise TrainingInterrupted(self.describe(signal.Signals(exc.signum).name), exc.signum) from None


class FailurePolicy:
    """What the loop does when a step cannot be loaded, computed or followed up.

    ``save_last`` writes ``last.pt`` of the current step (collective under DDP).
    """

    def __init__(self, state: TrainState, checkpointer: Checkpointer, save_last: Callable[[], None],
                 info: DistInfo, run_dir: Path, train: TrainConfig, logger: logging.Logger,
                 on_error: str = "raise") -> None:
        self.state, self.checkpointer, self.save_last = state, checkpointer, save_last
        self.info, self.run_dir, self.train, self.logger = info, run_dir, train, logger
        self.on_error = on_error  # data.on_error
        self.stop = StopSignal()  # entered by the loop: signals become a flag only while it runs

    def catching_signals(self) -> StopSignal:
        """The context (the loop) in which SIGTERM / SIGINT set a flag instead of ending the process."""
        return self.stop

    def after_loading(self, load_error: DatasetError | None, batches: list[tuple[dict, dict | None]]) -> None:
        """Stop (saving first) when a sample failed to load on any process; count the skipped ones.

        Collective: every process calls it once per step, after loading that step's batches.
        """
        if not all_true(load_error is None, self.info.device):
            problem = load_error or "another process could not load a sample (see its message)"
            # under skip, only a dataset without one loadable sample stops a run: skipping is no way out
            way_out = (" or set data.on_error=skip to skip such samples (they are counted)," if self.on_error != "skip"
                       else "")
            if self.state.step == 0 and self.checkpointer.saved_step is None:
                raise DatasetError(f"{problem}\nTraining stopped before its first update; nothing was saved. Fix or "
                                   f"remove the file(s) (plca prepare checks a whole dataset),{way_out} then start the "
                                   f"run again")
            self.save_last()
            raise DatasetError(
                f"{problem}\nTraining stopped at step {self.state.step}; checkpoint saved. Fix or remove the file "
                f"(plca prepare checks a whole dataset),{way_out} then continue with: {resume_command(self.run_dir)}"
            )
        for source, target in batches:
            for message in source["skipped"] + (target["skipped"] if target else []):
                self.state.counters["skipped_samples"] += 1
                self.logger.warning("step %d: %s", self.state.step, message)

    def after_update(self, outcome: UpdateOutcome) -> None:
        """Count a skipped update; stop on too many in a row, or at once on a diverged one."""
        state, train = self.state, self.train
        if outcome is UpdateOutcome.DIVERGED:
            raise TrainingError(
                f"the update of step {state.step} made the model's weights or BatchNorm statistics non-finite: "
                f"training diverged (train.lr={train.lr} is likely too high). {self._last_good()} "
                f"Lower train.lr and start a new run, or resume from it with a lower LR")
        if outcome is UpdateOutcome.SKIPPED:
            state.nonfinite_in_row += 1
            state.counters["skipped_steps"] += 1
            self.logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                                state.step, state.nonfinite_in_row)
            if state.nonfinite_in_row >= train.max_nonfinite_steps:
                raise TrainingError(
                    f"{state.nonfinite_in_row} consecutive steps with a non-finite loss or gradient (step "
                    f"{state.step}); stopping. {self._last_good()} Try a lower train.lr or check the data.")
        else:
            state.nonfinite_in_row = 0

    @contextmanager
    def guard(self, where: str) -> Iterator[None]:
        """Any failure inside becomes :meth:`between_steps`'s one line; the run's own stopping errors
        already say what happened and what was saved, and pass through."""
        try:
            yield
        except (CheckpointError, TrainingError, DatasetError):
            raise
        except Exception as error:  # noqa: BLE001 - the model is that of the last finished update: save it
            self.between_steps(error, where)

    def signalled(self) -> bool:
        """Whether SIGTERM / SIGINT reached any process. Collective: every process asks at the same point."""
        return any_true(self.stop.received is not None, self.info.device)

    def stop_if_signalled(self, saved: bool) -> None:
        """Raise :class:`TrainingInterrupted` when ``saved`` (this step was saved because a signal had
        arrived) or when a signal arrived since (then saved first). Collective unless ``saved``."""
        if not saved:
            if not self.signalled():
                return
            self.save_last()  # the signal came during the logging or the validation of this step
        received = self.stop.received
        name = signal.Signals(received).name if received is not None else "a signal on another process"
        self.logger.warning("stopped by %s at step %d; checkpoint saved", name, self.state.step)
        raise TrainingInterrupted(f"stopped by {name} at step {self.state.step}; checkpoint saved. Resume with: "
                                  f"{resume_command(self.run_dir)}", received)

    def between_steps(self, error: Exception, where: str) -> NoReturn:
        """Save the last finished step (when the model can be trusted and saving is safe), then one line."""
        detail = " ".join(str(error).split()) or type(error).__name__
        out_of_memory = isinstance(error, torch.OutOfMemoryError) or "out of memory" in detail.lower()
        kind = "out of memory" if out_of_memory else type(error).__name__
        hint = (" Lower train.batch_size or train.crop_size (eval.size for a validation), or use train.amp=true "
                "on a GPU." if out_of_memory else "")
        step = self.state.step
        if step == 0 and self.checkpointer.saved_step is None:
            raise TrainingError(f"{kind} {where} at step 0, before anything was trained: {detail[:300]}.{hint}") \
                from error
        saved = ""
        # under DDP the failure may be this process's alone: a collective save would wait for the others forever
        if not self.info.enabled and self.state.nonfinite_in_row == 0:
            try:
                self.save_last()
                saved = f" Checkpoint of step {step} saved."
            except Exception:  # noqa: BLE001 - the original failure is what to report
                saved = ""
        raise TrainingError(f"{kind} {where} at step {step}: {detail[:300]}.{saved or ' ' + self._last_good()}"
                            f"{hint} Continue with: {resume_command(self.run_dir)}") from error

    def _last_good(self) -> str:
        saved = self.checkpointer.saved_step
        if saved is None:
            return "No checkpoint was written yet."
        return f"The last good checkpoint is {self.checkpointer.last_path} (step {saved})."
