"""The loop's own state: what a checkpoint must hold besides the weights, optimiser and RNG."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    """Counters of a run, kept across resumes.

    ``step``: optimiser updates done; ``best_miou`` / ``best_step``: the best validation mIoU so
    far and its step (-1 / None before the first validation); ``counters``: run totals
    (skipped steps, skipped samples, batches without a labelled pixel); ``nonfinite_in_row``:
    consecutive skipped updates (not saved: a resumed run starts afresh).
    """

    step: int = 0
    best_miou: float = -1.0
    best_step: int | None = None
    counters: dict[str, int] = field(default_factory=lambda: {
        "skipped_steps": 0, "skipped_samples": 0, "unlabelled_batches": 0})
    nonfinite_in_row: int = 0

    def state_dict(self) -> dict:
        state = asdict(self)
        del state["nonfinite_in_row"]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.best_miou = float(state.get("best_miou", -1.0))
        best_step = state.get("best_step")
        self.best_step = None if best_step is None else int(best_step)
        for key, value in state.get("counters", {}).items():
            if key in self.counters:
                self.counters[key] = int(value)
