"""Batches of sequences of similar length, so little of each batch is padding.

`create_lengths_groups` puts every sequence in a length bucket; `GroupedBatchSampler` walks an index
sampler (usually a `DistributedSampler`, also with one process) and emits a batch as soon as one bucket
holds `batch_size` indices. Leftovers are emitted at the end, sorted by bucket, so the number of batches
is always ceil(len(sampler) / batch_size): every rank sees the same count and no rank waits forever.
`training_batch_sampler` puts the three together the way the training loop uses them.
"""
import itertools

import numpy as np
from torch.utils.data import BatchSampler, Sampler
from torch.utils.data.distributed import DistributedSampler


def create_lengths_groups(lengths, k=0):
    """Bucket id of each length: buckets 4 tokens wide up to k (one bucket boundary at 10 if k <= 0)."""
    bins = np.arange(start=3, stop=k, step=4).tolist() if k > 0 else [10]
    groups = np.searchsorted(np.asarray(bins), np.asarray(lengths), side="right")  # bisect_right
    return groups


class GroupedBatchSampler(BatchSampler):
    """Wraps an index sampler; yields lists of indices whose group ids are equal (until the end).

    sampler: yields dataset indices; group_ids: group of each dataset index; batch_size: batch size.
    """

    def __init__(self, sampler, group_ids, batch_size):
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler should be a torch.utils.data.Sampler, got {type(sampler).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = np.asarray(group_ids)
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch):
        """Forward to the index sampler, so that each epoch is shuffled differently."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        buffers = {}
        for idx in self.sampler:
            group = int(self.group_ids[idx])
            buf = buffers.setdefault(group, [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield buf
                buffers[group] = []
        # Leftovers, neighbouring buckets together, so the last batches are still roughly homogeneous.
        rest = [idx for group in sorted(buffers) for idx in buffers[group]]
        for i in range(0, len(rest), self.batch_size):
            yield rest[i: i + self.batch_size]

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)


class SkippableBatchSampler:
    """Wraps a batch sampler so that the next pass starts `skip` batches in: resuming mid-epoch.

    The skipped batches are only enumerated (indices), never loaded, and the order is the one the epoch
    would have had anyway, since the index sampler is seeded by (seed, epoch).
    """

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.skip = 0

    @property
    def sampler(self):
        return self.batch_sampler.sampler

    def set_epoch(self, epoch):
        self.batch_sampler.sampler.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batch_sampler), skip, None)

    def __len__(self):
        return len(self.batch_sampler)


def training_batch_sampler(dataset, *, batch_size, group_by_size, max_len, world_size, rank, seed):
    """This rank's batches of dataset indices for training: a DistributedSampler shuffled by (seed, epoch)
    (one process is world size 1), grouped by length unless group_by_size is off, skippable for resuming."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if group_by_size:
        groups = create_lengths_groups(lengths=dataset.lengths, k=max_len)
        batch_sampler = GroupedBatchSampler(sampler, group_ids=groups, batch_size=batch_size)
    else:
        batch_sampler = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return SkippableBatchSampler(batch_sampler)
