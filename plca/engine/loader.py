"""A deterministic, resumable stream of training batches.

The order of samples depends only on (seed, epoch, rank): epoch ``e`` is a
permutation drawn from ``seed`` and ``e``, split between processes. A stream
can start at any batch position, which is how a resumed run sees exactly the
batches an uninterrupted one would have. Augmentation randomness lives in
the dataset (seeded by seed, epoch and index), so worker processes change
nothing either.

A sample that fails to load in a worker process does not end in a worker's
traceback: under ``on_error="raise"`` the stream raises the dataset's own
:class:`~plca.data.io.DatasetError` (naming the file) in the training process;
under ``"skip"`` each batch carries, in ``batch["skipped"]``, one message per
sample skipped to make it, so the training process can count and log them.
Workers survive signals meant for the run (see :func:`_worker_init`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from plca.data.io import DatasetError


@dataclass(frozen=True)
class LoadFailure:
    """Stands in for a sample (and then its batch) that could not be loaded; carries the error message."""

    message: str


class EpochIndexedDataset(Dataset):
    """Wraps a SegmentationDataset so that items are addressed by ``(epoch, index)``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, list[str]] | LoadFailure:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        try:
            return self.dataset.fetch(index)
        except DatasetError as error:
            return LoadFailure(str(error))


def _worker_init(worker_id: int) -> None:  # noqa: ARG001
    """Signals meant for the training run do not kill its workers.

    Ctrl-C signals the terminal's whole process group, and a scheduler stopping a job (SLURM,
    systemd) sends SIGTERM to every process of it. A worker killed that way takes the run down
    before it can save its checkpoint, so workers ignore SIGINT, and ignore SIGTERM unless it comes
    from the training process itself (which is how it stops a worker that does not quit in time).
    The training process handles the signal, saves, and then stops its workers.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by every later thread
    threading.Thread(target=_sigterm_from_parent_only, args=(parent,), name="plca-sigterm", daemon=True).start()


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)  # as torch's own worker handler does for a SIGTERM from the parent


def collate(items: list) -> dict | LoadFailure:
    """Batch of ``(item, skipped)`` pairs: the items collated, plus ``"skipped"`` (all messages, a list).
    A batch with a failed sample becomes that sample's :class:`LoadFailure`."""
    for item in items:
        if isinstance(item, LoadFailure):
            return item
    batch = default_collate([item for item, _ in items])
    batch["skipped"] = [message for _, skipped in items for message in skipped]
    return batch


class BatchStream:
    """An endless iterator of batches over a DataLoader, raising a failed batch's :class:`DatasetError`;
    :meth:`close` stops the worker processes at once (also usable as a context manager)."""

    def __init__(self, loader: DataLoader) -> None:
        self._iterator = iter(loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            raise RuntimeError("the batch stream is closed")
        batch = next(self._iterator)
        if isinstance(batch, LoadFailure):
            raise DatasetError(batch.message)
        return batch

    def close(self) -> None:
        """Shut the worker processes down now, rather than when the iterator is garbage collected (an
        exception's traceback can keep it alive until the interpreter exits)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(epoch, index)`` keys, starting at batch number ``start``.

    Each epoch drops the last incomplete batch; every process gets the same number of batches.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.batches_per_epoch = num_samples // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one batch of {batch_size} for each of "
                f"{world_size} process(es)"
            )

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        used = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:used][self.rank::self.world_size]
        return [[(epoch, i) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
                for b in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


def batch_stream(dataset, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False) -> BatchStream:
    """Endless iterator of collated batches from batch number ``start`` on.

    Each batch is the dataset's items collated, plus ``"skipped"``: the messages of the samples
    skipped (``on_error="skip"``) to make it. A sample that fails to load raises its
    :class:`~plca.data.io.DatasetError` here, in the calling process, whatever ``num_workers``.
    """
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, start)
    # DataLoader draws its workers' base seed when an iterator starts, from torch's global generator unless
    # given its own. The global one drives dropout and drop path, and a resumed run restores it before the
    # stream restarts: a draw there would shift every later dropout mask against the uninterrupted run.
    # (Augmentations do not use the workers' seeds: they are seeded by (seed, epoch, index).)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    loader = DataLoader(
        EpochIndexedDataset(dataset), batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        generator=generator,
        worker_init_fn=_worker_init if num_workers > 0 else None, pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return BatchStream(loader)
