"""GroupedBatchSampler over DistributedSampler: coverage, batch counts, bucket homogeneity, epochs."""
import collections
import math

import numpy as np
import pytest
from torch.utils.data import DistributedSampler, SequentialSampler

from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups


def _lengths(n, seed=0, max_len=64):
    rng = np.random.default_rng(seed)
    return rng.integers(12, max_len + 1, size=n)


def _samplers(n, world, batch_size, lengths, seed=0, shuffle=True):
    groups = create_lengths_groups(lengths, k=64)
    out = []
    for rank in range(world):
        index_sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        out.append(GroupedBatchSampler(index_sampler, group_ids=groups, batch_size=batch_size))
    return out, groups


def test_create_lengths_groups_buckets():
    # k <= 0: one boundary at 10 (bisect_right: 10 goes to the upper bucket)
    assert create_lengths_groups([1, 9, 10, 11, 500]).tolist() == [0, 0, 1, 1, 1]
    # k = 20: boundaries 3, 7, 11, 15, 19
    assert create_lengths_groups([2, 3, 6, 7, 12, 18, 19, 25], k=20).tolist() == [0, 1, 1, 2, 3, 4, 5, 5]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("n, batch_size", [(1000, 8), (101, 4), (7, 5), (3, 4), (1, 3), (64, 16)])
def test_every_index_once_and_equal_batch_counts(world, n, batch_size):
    lengths = _lengths(n)
    samplers, _ = _samplers(n, world, batch_size, lengths)
    per_rank = math.ceil(n / world)  # DistributedSampler pads to a multiple of the world size
    expected_batches = math.ceil(per_rank / batch_size)

    union = collections.Counter()
    for rank, sampler in enumerate(samplers):
        sampler.set_epoch(0)
        batches = list(sampler)
        assert len(batches) == len(sampler) == expected_batches, rank
        assert all(1 <= len(b) <= batch_size for b in batches)
        flat = [i for b in batches for i in b]
        # the batches hold exactly what the index sampler gave this rank, nothing lost or doubled
        assert sorted(flat) == sorted(sampler.sampler)
        assert len(flat) == per_rank
        union.update(flat)

    assert set(union) == set(range(n))  # every index seen by some rank
    padding = world * per_rank - n
    assert sum(union.values()) == n + padding
    assert sum(c - 1 for c in union.values()) == padding  # only the padding repeats, each at most once more
    assert max(union.values()) <= 2


def test_batches_are_homogeneous_in_length():
    n, batch_size = 2000, 16
    lengths = _lengths(n, seed=3)
    for world in (1, 2):
        samplers, groups = _samplers(n, world, batch_size, lengths)
        n_groups = len(set(groups.tolist()))
        assert n_groups >= 10
        for sampler in samplers:
            batches = list(sampler)
            bucket_sets = [set(groups[b].tolist()) for b in batches]
            mixed = [i for i, s in enumerate(bucket_sets) if len(s) > 1]
            # only the leftovers at the end can mix buckets, and only neighbouring ones, in bucket order
            assert len(mixed) <= n_groups - 1
            assert all(i >= len(batches) - n_groups for i in mixed)
            assert len(mixed) / len(batches) < 0.15
            for i in mixed:
                g = groups[batches[i]].tolist()
                assert g == sorted(g)
            # and a full single-bucket batch spans at most 4 consecutive lengths
            for b, s in zip(batches, bucket_sets):
                if len(s) == 1 and len(b) == batch_size:
                    assert np.ptp(lengths[b]) <= 3


def test_batches_without_grouping_would_be_mixed():
    # control for the test above: the same index sampler, plainly chunked, does mix buckets
    n, batch_size = 2000, 16
    lengths = _lengths(n, seed=3)
    groups = create_lengths_groups(lengths, k=64)
    order = list(DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=0))
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    assert sum(len(set(groups[c].tolist())) > 1 for c in chunks) / len(chunks) > 0.5


@pytest.mark.parametrize("world", [1, 2])
def test_set_epoch_reshuffles_deterministically(world):
    n, batch_size = 300, 6
    lengths = _lengths(n, seed=5)
    samplers, _ = _samplers(n, world, batch_size, lengths, seed=11)
    again, _ = _samplers(n, world, batch_size, lengths, seed=11)
    union = {0: set(), 1: set()}
    for sampler, twin in zip(samplers, again):
        sampler.set_epoch(0)
        epoch0 = list(sampler)
        assert list(sampler) == epoch0  # iterating again without set_epoch: same order
        sampler.set_epoch(1)
        epoch1 = list(sampler)
        assert epoch1 != epoch0
        assert len(epoch1) == len(epoch0) == len(sampler)
        union[0].update(i for b in epoch0 for i in b)
        union[1].update(i for b in epoch1 for i in b)
        sampler.set_epoch(0)
        assert list(sampler) == epoch0
        twin.set_epoch(1)
        assert list(twin) == epoch1  # another process with the same seed and epoch agrees
    assert union[0] == union[1] == set(range(n))


def test_ranks_get_disjoint_shares_when_no_padding():
    n = 400
    samplers, _ = _samplers(n, 2, 8, _lengths(n, seed=2))
    shares = [{i for b in s for i in b} for s in samplers]
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(n))


def test_bad_arguments():
    with pytest.raises(ValueError, match="Sampler"):
        GroupedBatchSampler(list(range(10)), group_ids=[0] * 10, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(SequentialSampler(range(10)), group_ids=[0] * 10, batch_size=0)
    sampler = GroupedBatchSampler(SequentialSampler(range(10)), group_ids=[0, 1] * 5, batch_size=3)
    sampler.set_epoch(3)  # no set_epoch on the index sampler: a no-op
    assert list(sampler) == [[0, 2, 4], [1, 3, 5], [6, 8, 7], [9]]
