"""Evaluation sharding that neither repeats nor drops a sample.

Lightning's default `DistributedSampler` pads the data set by repeating samples so every rank gets
the same count; for evaluation that counts some masks twice. This sampler hands rank r the indices
r, r + W, r + 2W, ...: every sample exactly once over all ranks. Being a `DistributedSampler`
subclass, Lightning leaves it in place instead of wrapping it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
