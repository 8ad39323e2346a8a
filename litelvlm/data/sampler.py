"""Samplers: evaluation sharding that neither repeats nor drops a sample, and the training order.

Lightning's default `DistributedSampler` pads the data set by repeating samples so every rank gets
the same count; for evaluation that counts some masks twice. `UnpaddedDistributedSampler` hands
rank r the indices r, r + W, r + 2W, ...: every sample exactly once over all ranks. Training wants
the padding (equal batch counts per rank) and a new order every epoch: `EpochShuffledSampler`.
Both are `DistributedSampler` subclasses, so Lightning leaves them in place instead of wrapping them.
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


class EpochShuffledSampler(DistributedSampler):
    """Training order: torch's `DistributedSampler` (shuffled with seed + epoch; the data set padded
    by repeating indices so every rank gets the same number, hence the same number of batches,
    which DDP needs to not hang), yielding `(index, epoch)` pairs.

    The pair carries the epoch to the data set, so what an item draws per epoch (sentences,
    templates) is right even in persistent loader workers, which never see `set_epoch`. Lightning
    calls `set_epoch` before every epoch, and leaves a `DistributedSampler` in place instead of
    swapping in its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())
