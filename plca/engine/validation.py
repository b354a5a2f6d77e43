"""Validation during training and the best-on-val model.

Every ``train.eval_every`` updates (and once more for the final model, from the trainer) the
method's evaluation models are measured on ``data.val``; each validation is a line of
``RUN_DIR/eval_history.jsonl`` and a line of ``train.log``, and the best one so far (by the
first model's mIoU) is saved as ``checkpoints/best_on_val.pt``. For these benchmarks the
validation set is the target's test set, so the best-on-val model is oracle model selection:
it is labelled so wherever it appears, and the final model is the one to report.

When the final model's validation is the best, ``best_on_val.pt`` is not written a second
time: the trainer makes it a hard link to ``final.pt`` (one copy on disk; see
:meth:`plca.engine.checkpointer.Checkpointer.link_model`), and ``metrics.json`` says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from plca.config import Config
from plca.engine.checkpointer import Checkpointer
from plca.engine.distributed import DistInfo, average_buffers
from plca.engine.logger import TensorBoard
from plca.engine.periodic import StepEnd
from plca.engine.run_files import append_jsonl, read_jsonl
from plca.engine.state import TrainState
from plca.evaluation.evaluator import evaluate
from plca.evaluation.metrics import summarize
from plca.prediction import test_time_aggregation_enabled

if TYPE_CHECKING:
    from plca.methods import Method

_ORACLE_NOTE = ("the best of the validations during training, selected on the validation set: "
                "oracle model selection, not a result to report")


class Validation:
    """The validation hook (see :mod:`plca.engine.periodic`) and the final model's validation.

    Collective under DDP: every process evaluates its share of ``val`` and gets the same metrics.
    ``val``: the validation dataset, or None (then nothing is validated).
    """

    def __init__(self, config: Config, val, method: Method, state: TrainState, checkpointer: Checkpointer,
                 header: dict, board: TensorBoard, info: DistInfo, run_dir: Path, logger: logging.Logger,
                 progress: bool) -> None:
        self.config, self.val, self.method, self.state = config, val, method, state
        self.checkpointer, self.header, self.board, self.info = checkpointer, header, board, info
        self.history, self.logger, self.progress = run_dir / "eval_history.jsonl", logger, progress
        self.best_is_final = False  # the final model's validation was the best: best_on_val.pt is to link final.pt

    def after_step(self, end: StepEnd) -> None:
        every = self.config.train.eval_every
        # the last step is validated as the final model (by the trainer); a call that is stopping does not wait
        if every and end.step % every == 0 and not end.last and not end.stopping:
            self.run()

    def run(self, final: bool = False) -> dict | None:
        """Metrics of the method's evaluation models on the validation set; the first model's are the
        run's (top level), the others' go under their names (e.g. ``teacher``). ``final``: this is the
        final model's validation (a best one is then not saved here; the trainer links it). It draws
        nothing from torch's global generators (the evaluation's DataLoader has its own), so a run resumed
        from the checkpoint saved just before a validation continues exactly."""
        config, info, state = self.config, self.info, self.state
        if self.val is None:
            return None
        tta = test_time_aggregation_enabled(config)
        results = {}
        for name, model in self.method.evaluation_models().items():
            average_buffers(model)
            confusion = evaluate(model, self.val, len(config.data.classes), info.device,
                                 test_time_aggregation=tta, alpha=config.eval.alpha,
                                 amp=config.train.amp and info.device.type == "cuda", rank=info.rank,
                                 world_size=info.world_size, progress=self.progress,
                                 aggregation_max_pixels=config.eval.aggregation_max_pixels)
            results[name] = summarize(confusion.matrix.cpu(), config.data.classes)
        (primary, metrics), others = next(iter(results.items())), list(results.items())[1:]
        metrics.update(step=state.step, final=state.step >= config.train.iters, test_time_aggregation=tta,
                       evaluated=primary)
        for name, extra in others:
            metrics[name] = extra
        if info.is_main:
            self.board.scalars({"val/mIoU": metrics["mIoU"], "val/pixel_accuracy": metrics["pixel_accuracy"],
                                **{f"val/{name}_mIoU": extra["mIoU"] for name, extra in others}}, state.step)
            append_jsonl(self.history, metrics, self.logger)
            self.logger.info("validation at step %d: %s %.2f (%s)%s", state.step, metrics["protocol"], metrics["mIoU"],
                             primary, "".join(f", {name} {extra['mIoU']:.2f}" for name, extra in others))
        if metrics["mIoU"] > state.best_miou:
            state.best_miou, state.best_step = metrics["mIoU"], state.step
            self.best_is_final = final
            if not final:
                self.checkpointer.save_model(self.method.inference_model(), "best_on_val.pt", state.step, self.header,
                                             metrics=metrics,
                                             selection="best validation mIoU (oracle model selection)")
        return metrics

    def best_on_val(self) -> dict | None:
        """The best validation of ``eval_history.jsonl`` for ``metrics.json``, labelled as oracle selection."""
        history = read_jsonl(self.history)
        if not history:
            return None
        best = max(history, key=lambda m: m["mIoU"])
        entry = {"note": _ORACLE_NOTE, "step": best["step"], "final": best["step"] >= self.config.train.iters,
                 "mIoU": best["mIoU"], "protocol": best["protocol"], "per_class_IoU": best["per_class_IoU"],
                 "checkpoint": "checkpoints/best_on_val.pt"}
        if self.best_is_final:
            entry["same_file_as"] = "checkpoints/final.pt"  # a hard link: one copy on disk
        return entry
