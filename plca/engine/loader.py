"""A deterministic, resumable stream of training batches.

The order of samples depends only on (seed, epoch, rank): epoch ``e`` is a
permutation drawn from ``seed`` and ``e``, split between processes. A stream
can start at any batch position, which is how a resumed run sees exactly the
batches an uninterrupted one would have. Augmentation randomness lives in
the dataset (seeded by seed, epoch and index), so worker processes change
nothing either.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochIndexedDataset(Dataset):
    """Wraps a SegmentationDataset so that items are addressed by ``(epoch, index)``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


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
                 num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Endless iterator of collated batches from batch number ``start`` on."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, start)
    loader = DataLoader(
        EpochIndexedDataset(dataset), batch_sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return iter(loader)
