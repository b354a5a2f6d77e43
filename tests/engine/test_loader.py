"""The resumable batch order: deterministic, sharded without overlap, and restartable at any batch."""

import itertools

import pytest

from plca.engine.loader import ResumableBatchSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_epochs_are_permutations_and_change_between_epochs():
    sampler = ResumableBatchSampler(num_samples=10, batch_size=3, seed=0)
    batches = take(sampler, 6)  # 3 batches per epoch (one sample dropped each epoch)
    epoch0 = [i for b in batches[:3] for (e, i) in b]
    epoch1 = [i for b in batches[3:] for (e, i) in b]
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9
    assert epoch0 != epoch1
    assert {e for b in batches[:3] for (e, _) in b} == {0} and {e for b in batches[3:] for (e, _) in b} == {1}


def test_start_position_continues_the_same_stream():
    full = take(ResumableBatchSampler(23, 4, seed=5), 20)
    for start in (0, 1, 5, 7, 13):
        assert take(ResumableBatchSampler(23, 4, seed=5, start=start), 20 - start) == full[start:]


def test_ranks_partition_each_epoch():
    per_rank = [take(ResumableBatchSampler(17, 2, seed=1, rank=r, world_size=2), 4) for r in range(2)]
    seen = [i for batches in per_rank for b in batches for (_, i) in b]
    assert len(seen) == len(set(seen)) == 16


def test_seed_changes_order():
    assert take(ResumableBatchSampler(50, 5, seed=0), 3) != take(ResumableBatchSampler(50, 5, seed=1), 3)


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableBatchSampler(3, 2, seed=0, world_size=2)
