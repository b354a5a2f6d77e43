"""The end of a run: a run stopped after its last update but before its final validation and save is
finished by its resume (not called finished with no final model), and a signal in that stage stops it
with the resume line in train.log instead of a traceback."""

from __future__ import annotations

import json
import os
import signal

import pytest

from dataset_writers import write_folder
from tiny_runs import CLASSES, TINY_BACKBONE
from plca.config import build_config
from plca.engine.failure import TrainingInterrupted
from plca.engine.trainer import train
from plca.engine.validation import Validation


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_end_data")
    write_folder(root, classes_count=3, splits={"train": 4, "val": 2}, size=(32, 40), seed=2)
    return root


def config(data, out):
    folder = {"format": "folder", "root": str(data)}
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "num_workers": 0, "source": {**folder, "split": "train"},
                 "val": {**folder, "split": "val"}},
        "model": {"backbone": TINY_BACKBONE},
        "train": {"iters": 2, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "eval_every": 0,
                  "checkpoint_every": 1, "log_every": 1, "image_every": 0},
        "output_dir": str(out), "run_name": "run", "device": "cpu"})


def test_a_resume_finishes_a_run_stopped_before_its_final_save(data, tmp_path):
    finished = train(config(data, tmp_path), progress=False)
    run_dir = finished.run_dir
    expected = json.loads((run_dir / "metrics.json").read_text())
    # the state of a run stopped during its final validation: last.pt holds the last step, nothing else
    for name in ("checkpoints/final.pt", "checkpoints/best_on_val.pt", "metrics.json"):
        (run_dir / name).unlink(missing_ok=True)
    resumed = train(config(data, tmp_path), resume=run_dir, progress=False)
    assert resumed.step == 2 and resumed.metrics is not None
    assert (run_dir / "checkpoints" / "final.pt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(expected["mIoU"])  # the same model, evaluated again
    assert "stopped before its final validation and save: doing them now" in (run_dir / "train.log").read_text()
    # and a finished run stays finished
    again = train(config(data, tmp_path), resume=run_dir, progress=False)
    assert again.step == 2 and "already finished" in (run_dir / "train.log").read_text()


def test_a_signal_during_the_final_validation_stops_with_the_resume_line(data, tmp_path, monkeypatch):
    validate = Validation.run

    def interrupted(self, final=False):
        if final:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, in the middle of the final stage
        return validate(self, final)

    monkeypatch.setattr(Validation, "run", interrupted)
    with pytest.raises(TrainingInterrupted) as info:
        train(config(data, tmp_path), progress=False)
    assert info.value.exit_code == 143
    message = str(info.value)
    assert "stopped by SIGTERM after the last update (step 2)" in message and "plca train --resume" in message
    run_dir = tmp_path / "run"
    assert message in (run_dir / "train.log").read_text().splitlines()[-1]
    assert not (run_dir / "checkpoints" / "final.pt").exists()
    monkeypatch.setattr(Validation, "run", validate)
    resumed = train(config(data, tmp_path), resume=run_dir, progress=False)
    assert resumed.metrics is not None and (run_dir / "checkpoints" / "final.pt").is_file()


def test_max_steps_below_one_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        train(config(data, tmp_path), max_steps=0, progress=False)
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_number_of_processes_says_what_no_longer_continues_exactly(data, tmp_path):
    import torch

    from plca.engine.checkpointer import Checkpointer
    from plca.engine.distributed import DistInfo
    from plca.engine.optim import optimizer_from_config
    from plca.engine.state import TrainState
    from plca.engine.build import build_training_method

    run = train(config(data, tmp_path), max_steps=1, progress=False)  # saved by 1 process
    cfg = config(data, tmp_path)
    notes = {}
    for world_size in (1, 2):
        info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
        method = build_training_method(cfg, info.device)
        state = TrainState()
        notes[world_size] = Checkpointer(run.run_dir, info, "plca train --resume x").restore(
            run.run_dir / "checkpoints" / "last.pt", method, optimizer_from_config(method.trainable_module(),
                                                                                   cfg.train), state)
        assert state.step == 1
    assert notes[1] == []
    assert len(notes[2]) == 1 and "saved by 1 process(es), this run has 2" in notes[2][0]


def test_a_longer_run_on_resume_says_when_the_warmup_changes_length(data, tmp_path):
    from plca.engine.run_dir import check_resume_config
    from plca.config import to_dict

    stored = to_dict(config(data, tmp_path))
    stored["train"].update(iters=8, warmup_iters=4)  # the warmup is capped at 8 // 4 = 2 updates
    longer = build_config({**stored, "train": {**stored["train"], "iters": 40}})  # warmup 4
    notes = check_resume_config(longer, stored, tmp_path / "last.pt")
    assert len(notes) == 1 and "now lasts 4 updates instead of 2" in notes[0] and "poly LR" in notes[0]
    same_warmup = build_config({**stored, "train": {**stored["train"], "iters": 9, "warmup_iters": 1}})
    stored["train"]["warmup_iters"] = 1
    assert "warmup" not in check_resume_config(same_warmup, stored, tmp_path / "last.pt")[0]
