"""The DataLoader worker processes of the training stream: a failed sample comes back as the dataset's
own error, skips are reported with each batch, signals meant for the run do not kill the workers,
and closing the stream stops them."""

import os
import signal
import subprocess
import time

import pytest

from dataset_writers import write_folder
from plca.data.datasets import build_dataset
from plca.data.io import DatasetError
from plca.data.transforms import TrainTransform
from plca.engine.loader import ResumableBatchSampler, batch_stream

CLASSES = ("a", "b", "c")


def children(exclude=()):
    """Live child processes of this process (DataLoader workers), but those in ``exclude``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z" and int(entry) not in exclude:
                found.append(int(entry))
    return sorted(found)


def wait_until(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def dataset(tmp_path):
    write_folder(tmp_path, classes_count=3, splits={"train": 8}, size=(24, 24), seed=0)
    return lambda **kw: build_dataset("folder", tmp_path, "train", CLASSES, TrainTransform((16, 16)), **kw)


def first_batch(size=2):
    return [i for _, i in ResumableBatchSampler(8, size, seed=0).epoch_batches(0)[0]]


def test_failed_sample_in_a_worker_raises_the_datasets_error(dataset, tmp_path):
    bad = first_batch()[1]
    path = tmp_path / "images" / f"train_{bad:04d}.png"
    path.write_bytes(path.read_bytes()[:100])
    with batch_stream(dataset(), 2, seed=0, num_workers=2) as stream:
        with pytest.raises(DatasetError) as info:
            next(stream)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot decode the image") and "DataLoader worker" not in message
    assert "Traceback" not in message


def test_skipped_samples_travel_with_their_batch(dataset, tmp_path):
    bad = first_batch()[0]
    path = tmp_path / "labels" / f"train_{bad:04d}.png"
    path.write_bytes(b"")
    with batch_stream(dataset(on_error="skip"), 2, seed=0, num_workers=2) as stream:
        batches = [next(stream) for _ in range(4)]  # one epoch
    skipped = [message for batch in batches for message in batch["skipped"]]
    assert len(skipped) == 1 and f"train_{bad:04d}" in skipped[0] and str(path) in skipped[0]
    assert batches[0]["image"].shape == (2, 3, 16, 16)


def test_workers_ignore_signals_from_others_but_not_from_the_training_process(dataset):
    others = set(children())
    stream = batch_stream(dataset(), 2, seed=0, num_workers=2)
    next(stream)
    next(stream)  # batches go to the workers in turn: both have run their set-up (a busy machine may delay one)
    workers = children(others)
    assert len(workers) == 2
    for sig in ("-INT", "-TERM"):  # sent by another process, as Ctrl-C or a scheduler does
        subprocess.run(["kill", sig, *map(str, workers)], check=True)
    time.sleep(0.5)
    assert children(others) == workers
    next(stream)  # still serving batches
    os.kill(workers[0], signal.SIGTERM)  # from the training process: the worker quits
    wait_until(lambda: workers[0] not in children(others))
    stream.close()
    wait_until(lambda: children(others) == [])
    with pytest.raises(RuntimeError, match="closed"):
        next(stream)
