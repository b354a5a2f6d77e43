"""A run stopped at a step that an uninterrupted run validates (after its periodic checkpoint) resumes
exactly, with a network that draws from torch's global generator in training (channel dropout).

A validation iterates a DataLoader, which draws its workers' seed from the global generator; the
uninterrupted run validates at that step, the stopped one saved its checkpoint first and never does.
Unless the validation leaves the global generator as it found it, every later dropout mask of the
resumed run differs."""

from __future__ import annotations

import logging

import pytest
import torch

from dataset_writers import write_folder
from plca.config import build_config
from plca.data.build import build_run_datasets
from plca.engine.build import build_training_method
from plca.engine.checkpoint import load_checkpoint
from plca.engine.distributed import DistInfo
from plca.engine.logger import TensorBoard
from plca.engine.state import TrainState
from plca.engine.trainer import train
from plca.engine.validation import Validation
from tiny_runs import CLASSES, TINY_BACKBONE


def config(data, out, run_name):
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "num_workers": 0,
                 "source": {"format": "folder", "root": str(data), "split": "train"},
                 "val": {"format": "folder", "root": str(data), "split": "val"}},
        # the DAFormer head's Dropout2d(0.1) draws from the global generator at every training forward
        "model": {"backbone": TINY_BACKBONE, "head": "daformer", "head_width": 8},
        "train": {"iters": 4, "batch_size": 2, "crop_size": [32, 32], "lr": 0.01, "eval_every": 2,
                  "checkpoint_every": 2, "log_every": 1, "image_every": 0, "seed": 0},
        "output_dir": str(out), "run_name": run_name, "device": "cpu",
    })


@pytest.mark.slow
def test_a_run_stopped_at_a_validation_step_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 4, "val": 2}, size=(40, 56), seed=0)
    full = train(config(data, tmp_path, "full"), progress=False)
    part = train(config(data, tmp_path, "part"), max_steps=2, progress=False)
    resumed = train(config(data, tmp_path, "part"), resume=part.run_dir, progress=False)
    assert resumed.step == full.step == 4
    a = load_checkpoint(full.run_dir / "checkpoints" / "last.pt")["method"]
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last.pt")["method"]
    assert a.keys() == b.keys()
    assert [key for key in a if not torch.equal(a[key], b[key])] == []


def test_a_validation_leaves_the_global_generator_as_it_found_it(tmp_path):
    data = tmp_path / "data"
    write_folder(data, classes_count=3, splits={"train": 4, "val": 2}, size=(40, 56), seed=0)
    cfg = config(data, tmp_path, "run")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    method = build_training_method(cfg, info.device)
    val = build_run_datasets(cfg.data, cfg.train, cfg.eval.size, method.uses_target, 1).val
    board = TensorBoard(None)
    validation = Validation(cfg, val, method, TrainState(step=1), None, {}, board, info, tmp_path,
                            logging.getLogger("plca.test.validation"), False)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert validation.run(final=True)["step"] == 1
    assert torch.equal(torch.rand(3), expected)
