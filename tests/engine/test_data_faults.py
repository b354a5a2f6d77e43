"""Bad data never kills a run silently or late.

Before training: every file of every dataset is checked, and a label of the wrong size, a label
with unknown ids, an unreadable file or an empty split stops the run at once with a message naming
the file. During training, with DataLoader worker processes: a sample that fails to load is a
clear error naming the file (``data.on_error: raise``; a checkpoint of the last step is written
first) or is skipped, logged and counted (``skip``), never a worker's traceback.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_writers import write_folder
from tiny_runs import TINY_BACKBONE  # registers the tiny backbone
from plca.cli import main
from plca.config import build_config
from plca.data.io import DatasetError
from plca.engine.checkpoint import load_checkpoint
from plca.engine.loader import ResumableBatchSampler
from plca.engine.trainer import train

CLASSES = ["road", "car", "sky"]
SEED = 0
BATCH = 2


def tiny_config(root, out, run_name="run", val=True, **options):
    data = {"num_workers": options.pop("num_workers", 0), "on_error": options.pop("on_error", "raise"),
            "val": {"format": "folder", "root": str(root), "split": "val"} if val else None}
    train_options = {"iters": 3, "batch_size": BATCH, "crop_size": [32, 32], "lr": 0.01, "eval_every": 0,
                     "checkpoint_every": 100, "log_every": 1, "image_every": 0, "seed": SEED, **options}
    return build_config({
        "method": "source_only",
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(root), "split": "train"}, **data},
        "model": {"backbone": TINY_BACKBONE},
        "train": train_options,
        "output_dir": str(out),
        "run_name": run_name,
        "device": "cpu",
    })


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_folder(root, classes_count=3, splits={"train": 8, "val": 2}, size=(40, 56), seed=1)
    return root


def truncate(path):
    path.write_bytes(path.read_bytes()[:120])


def first_batch_sample(position=0):
    """Index of a sample of the source's first batch (the order the trainer draws)."""
    return ResumableBatchSampler(8, BATCH, SEED).epoch_batches(0)[0][position][1]


def times_drawn(index, batches):
    """How often sample ``index`` is drawn in the first ``batches`` batches of the source stream."""
    sampler = ResumableBatchSampler(8, BATCH, SEED)
    drawn = [i for epoch in range(batches // sampler.batches_per_epoch + 1)
             for batch in sampler.epoch_batches(epoch) for (_, i) in batch][: batches * BATCH]
    return drawn.count(index)


def live_children():
    """Child processes of this one that are alive (not zombies)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.add(int(entry))
    return found


# ---------------------------------------------------------------------------------------------- before training


def test_label_of_the_wrong_size_stops_the_run_before_training(data, tmp_path):
    label = data / "labels" / "train_0005.png"
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(label)
    with pytest.raises(DatasetError) as info:
        train(tiny_config(data, tmp_path / "runs"), progress=False)
    message = str(info.value)
    assert "train_0005.png" in message and "image 56x40, label 28x20" in message
    assert "fix or remove" in message and "data.on_error=skip" in message
    assert not (tmp_path / "runs" / "run").exists()  # nothing was trained, and the run left nothing behind


def test_label_with_unknown_ids_stops_the_run_before_training(data, tmp_path):
    label = data / "labels" / "train_0002.png"
    ids = np.array(Image.open(label))
    ids[0, 0] = 7  # three classes: 0, 1, 2 and 255 are the only valid values
    Image.fromarray(ids).save(label)
    with pytest.raises(DatasetError, match=r"train_0002\.png \(ids 7\)") as info:
        train(tiny_config(data, tmp_path / "runs"), progress=False)
    assert "class indices 0..2" in str(info.value)
    assert not (tmp_path / "runs" / "run" / "scalars.jsonl").exists()


def test_bad_files_are_named_by_the_cli_without_traceback(data, tmp_path, capsys):
    (data / "images" / "val_0001.png").write_bytes(b"not an image at all")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(data), "split": "train"},
                 "val": {"format": "folder", "root": str(data), "split": "val"}, "num_workers": 0},
        "model": {"backbone": "resnet18"}, "device": "cpu", "output_dir": str(tmp_path / "runs"),
        "train": {"iters": 1, "batch_size": 2, "crop_size": [32, 32], "image_every": 0},
    }))
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "val_0001.png" in err and "cannot be opened as images" in err and "Traceback" not in err


def test_empty_split_file_is_named_before_training(data, tmp_path, capsys):
    (data / "train.txt").write_text("# no samples yet\n")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(data), "split": "train"}},
        "model": {"backbone": "resnet18"}, "device": "cpu", "output_dir": str(tmp_path / "runs"),
        "train": {"iters": 1, "batch_size": 2, "crop_size": [32, 32], "image_every": 0},
    }))
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.txt: the split file lists no samples; write one name per line" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_bad_files_under_on_error_skip_are_a_warning(data, tmp_path):
    Image.fromarray(np.zeros((20, 28), np.uint8)).save(data / "labels" / "train_0005.png")
    result = train(tiny_config(data, tmp_path / "runs", on_error="skip", iters=2), progress=False)
    assert result.step == 2
    log = (result.run_dir / "train.log").read_text()
    assert "train_0005.png" in log and "skipped and counted when loaded" in log


# ---------------------------------------------------------------------------------------------- during training


def test_unreadable_sample_in_a_worker_is_a_clear_error_and_the_unstarted_run_leaves_nothing(data, tmp_path,
                                                                                             capsys):
    bad = first_batch_sample()
    truncate(data / "images" / f"train_{bad:04d}.png")  # the header is intact: only loading finds it
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "data": {"classes": CLASSES, "source": {"format": "folder", "root": str(data), "split": "train"},
                 "num_workers": 2, "on_error": "raise"},
        "model": {"backbone": "resnet18", "style": "pytorch"}, "device": "cpu",
        "train": {"iters": 3, "batch_size": BATCH, "crop_size": [32, 32], "seed": SEED, "eval_every": 0},
        "output_dir": str(tmp_path / "runs"), "run_name": "run",
    }))
    before = live_children()
    assert main(["train", str(config), "--no-progress"]) == 2
    assert live_children() <= before  # the workers were stopped, not left to the garbage collector
    err = capsys.readouterr().err
    assert f"train_{bad:04d}.png: cannot decode the image" in err
    assert "data.on_error=skip" in err and "before its first update; nothing was saved" in err
    assert "--resume" not in err
    assert "Traceback" not in err and "DataLoader worker" not in err and "Caught" not in err
    assert not (tmp_path / "runs" / "run").exists()  # the first batch failed: nothing was trained


@pytest.mark.slow
def test_unreadable_sample_under_skip_is_counted_logged_and_kept_across_resume(data, tmp_path):
    bad = first_batch_sample(1)
    truncate(data / "images" / f"train_{bad:04d}.png")
    iters = 8  # two epochs of 4 batches: the sample is drawn once in each
    expected = times_drawn(bad, iters)
    assert expected == 2
    part = train(tiny_config(data, tmp_path, num_workers=2, on_error="skip", iters=iters, val=False), max_steps=2,
                 progress=False)
    assert load_checkpoint(part.run_dir / "checkpoints" / "last.pt")["counters"]["skipped_samples"] == 1
    result = train(tiny_config(data, tmp_path, num_workers=2, on_error="skip", iters=iters, val=False),
                   resume=part.run_dir, progress=False)
    assert result.step == iters
    assert load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["counters"]["skipped_samples"] == expected
    lines = [json.loads(line) for line in (result.run_dir / "scalars.jsonl").read_text().splitlines()]
    assert lines[-1]["data/skipped_samples"] == expected
    log = (result.run_dir / "train.log").read_text()
    assert log.count(f"skipping sample 'train_{bad:04d}'") == expected
    assert all(torch.isfinite(v.float()).all() for v in result.model.state_dict().values())
