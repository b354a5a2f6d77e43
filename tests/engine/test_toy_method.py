"""A new method is a new file: a toy method with a teacher and a counter, defined here alone, trains,
is killed, and resumes through the public engine with its teacher and counter exact."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plca.methods import Method, StepOutput, register_method, method_names
from plca.methods.base import cross_entropy, upsample


class ToyTeacher(Method):
    """Source cross-entropy; an EMA teacher (alpha 0.5) and a count of updates, both only in ``after_update``."""

    name = "toy_teacher"

    def __init__(self, segmentor, context) -> None:
        super().__init__(segmentor, context)
        self.teacher = copy.deepcopy(segmentor).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def training_step(self, source, target, step) -> StepOutput:
        logits = upsample(self.segment(source["image"])["logits"], source["label"].shape[-2:])
        loss, _ = cross_entropy(logits.float(), source["label"])
        return StepOutput(loss=loss, logs={"loss/total": loss.detach()})

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        self.updates += 1
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(0.5).add_(s, alpha=0.5)


if "toy_teacher" not in method_names():
    register_method(ToyTeacher)


#: updates of a run: the tiny test backbone and its small checkpoints make them fast, so enough of them that a
#: run is still going (seconds) when the test, polling its checkpoint, sees step 2
ITERS = 40


def toy_config(data_root: Path, out: Path, run_name: str):
    from tiny_runs import tiny_in_process_config

    config = tiny_in_process_config(data_root, out, run_name, iters=ITERS)
    return type(config)(**{**config.__dict__, "method": "toy_teacher"})


def worker(data_root: str, out: str, run_name: str, resume: bool = False) -> None:
    """Run in a subprocess (one thread, as every run of the test): train the toy method, or resume it."""
    from plca.engine.trainer import train

    torch.set_num_threads(1)
    train(toy_config(Path(data_root), Path(out), run_name), resume=Path(out) / run_name if resume else None,
          progress=False)


def start_worker(data_root: Path, out: Path, run_name: str, resume: bool = False) -> subprocess.Popen:
    here = Path(__file__).parent
    code = (f"import sys; sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]; import test_toy_method as t; "
            f"t.worker({str(data_root)!r}, {str(out)!r}, {run_name!r}, {resume})")
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def method_state(run_dir: Path) -> dict:
    from plca.engine.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["method"]


@pytest.mark.slow
def test_toy_method_with_a_teacher_resumes_exactly_after_sigkill(tmp_path):
    from dataset_writers import write_folder
    from plca.engine.checkpoint import load_checkpoint

    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 8}, size=(40, 56), seed=0)
    full = start_worker(data, tmp_path / "runs", "full")
    assert full.wait(timeout=300) == 0, full.communicate()
    expected = method_state(tmp_path / "runs" / "full")
    assert int(expected["updates"]) == ITERS
    assert any(k.startswith("teacher.") for k in expected) and any(k.startswith("student.") for k in expected)
    assert any(not torch.equal(expected[k], expected["student." + k[len("teacher."):]])
               for k in expected if k.startswith("teacher.") and expected[k].is_floating_point())

    proc = start_worker(data, tmp_path / "runs", "killed")
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 240
    while True:
        try:
            if load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] >= 2:
                break
        except Exception:  # noqa: BLE001 - not written yet, or being replaced
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 2 <= killed_at <= ITERS
    assert int(method_state(run_dir)["updates"]) == killed_at

    resumed = start_worker(data, tmp_path / "runs", "killed", resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.communicate()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == ITERS
    state = method_state(run_dir)
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key
