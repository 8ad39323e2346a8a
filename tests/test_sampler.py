"""UnpaddedDistributedSampler: evaluation sharding that neither repeats nor drops a sample."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from litelvlm.data.sampler import UnpaddedDistributedSampler

LENGTHS = range(0, 8)
WORLD_SIZES = (1, 2, 3)


class _Sized:
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return index


def _shards(length: int, world_size: int) -> list[list[int]]:
    dataset = _Sized(length)
    return [list(UnpaddedDistributedSampler(dataset, world_size, rank)) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("length", LENGTHS)
def test_ranks_together_see_every_index_exactly_once(length, world_size):
    shards = _shards(length, world_size)
    counts = Counter(index for shard in shards for index in shard)
    assert sorted(counts) == list(range(length)), f"missing or foreign indices: {shards}"
    assert all(count == 1 for count in counts.values()), f"an index is repeated: {shards}"
    # Shards differ in size by at most one: no rank is starved while another does the work.
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("length", LENGTHS)
def test_len_matches_iteration_and_order_is_strided(length, world_size):
    dataset = _Sized(length)
    for rank in range(world_size):
        sampler = UnpaddedDistributedSampler(dataset, world_size, rank)
        indices = list(sampler)
        assert len(sampler) == len(indices)
        # The documented layout: rank r gets r, r + W, r + 2W, ... (no shuffling in evaluation).
        assert indices == list(range(rank, length, world_size))
        # Iterating twice (a second validate call, or after set_epoch) gives the same shard.
        sampler.set_epoch(3)
        assert list(sampler) == indices
        # A DataLoader over it yields exactly the shard, in batches.
        loader = DataLoader(dataset, batch_size=2, sampler=sampler)
        assert [int(i) for batch in loader for i in batch] == indices
        assert len(loader) == -(-len(indices) // 2)


def test_odd_split_would_be_padded_by_torchs_sampler_but_not_here():
    """The case the DDP test relies on: 5 items on 2 ranks. torch pads rank 1 with item 0."""
    dataset = _Sized(5)
    padded = [index for rank in range(2) for index in DistributedSampler(dataset, 2, rank, shuffle=False)]
    assert len(padded) == 6  # the double count this sampler exists to avoid
    unpadded = [index for rank in range(2) for index in UnpaddedDistributedSampler(dataset, 2, rank)]
    assert sorted(unpadded) == [0, 1, 2, 3, 4]


def test_lightning_keeps_the_sampler_in_a_distributed_run():
    """Lightning swaps in its own (padding) DistributedSampler unless the loader already has one."""
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector

    sampler = UnpaddedDistributedSampler(_Sized(5), 2, 1)
    assert isinstance(sampler, DistributedSampler)
    fake_trainer = SimpleNamespace(
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=True, is_distributed=True)
    )
    connector = _DataConnector(fake_trainer)
    assert not connector._requires_distributed_sampler(DataLoader(_Sized(5), sampler=sampler))
    # Control: a plain loader in the same (distributed) situation WOULD get Lightning's sampler.
    assert connector._requires_distributed_sampler(DataLoader(_Sized(5)))
