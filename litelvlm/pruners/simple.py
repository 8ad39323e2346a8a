"""The two pruners that need no signal: keep everything, or keep a seeded random subset."""

from __future__ import annotations

import torch
from torch import Tensor

from litelvlm.pruners.base import TokenPruner, VisualSignals
from litelvlm.pruners.registry import register_pruner


@register_pruner("none")
class NoPruning(TokenPruner):
    """The unpruned baseline: all N visual tokens in raster order."""

    def __init__(self) -> None:
        super().__init__(num_tokens=None)

    def select(self, signals: VisualSignals) -> Tensor:
        n, b = signals.num_patches, signals.batch_size
        return torch.arange(n).expand(b, n).clone()


@register_pruner("random")
class RandomPruner(TokenPruner):
    """R patches drawn uniformly without replacement, seeded per sample.

    The generator of a sample is seeded with (seed, sample id), so a sample keeps the same draw
    whatever batch, batch position or DDP rank it lands in.
    """

    def __init__(self, num_tokens: int = 192, seed: int = 0, kept_order="reference", position_ids="contiguous") -> None:
        super().__init__(num_tokens=num_tokens, kept_order=kept_order, position_ids=position_ids)
        self.seed = seed

    def select(self, signals: VisualSignals) -> Tensor:
        n, b = signals.num_patches, signals.batch_size
        r = self.budget(n)
        sample_ids = signals.sample_ids if signals.sample_ids is not None else torch.arange(b)
        kept = []
        for sample_id in sample_ids.tolist():
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(sample_id))
            kept.append(torch.randperm(n, generator=generator)[:r])
        return torch.stack(kept)
