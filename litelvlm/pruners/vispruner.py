"""VisPruner (ICCV 2025): important tokens by CLS attention, diverse tokens by duplicate removal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from litelvlm.pruners.base import KeptOrder, PositionIds, PrunerError, ScoreDtype, Signal, TokenPruner, VisualSignals
from litelvlm.pruners.base import top_k_indices
from litelvlm.pruners.fastervlm import head_mean_cls_attention
from litelvlm.pruners.registry import register_pruner

MAX_REMOVED_PER_ROUND = 8


def remove_duplicates(candidates: Tensor, features: Tensor, target: int) -> Tensor:
    """Shrink `candidates` [B, M] (patch indices) to `target` by dropping near-duplicates.

    Each round splits the current list into A (even positions) and B (odd positions), scores every
    A token by its highest cosine similarity to B, and drops the min(8, M - target) A tokens with the
    highest score (all of A if it holds fewer). The survivors form the next list as the reference
    builds it: the kept A tokens by descending score, then B. `features` [B, N, D] are L2-normalised,
    in the dtype the cosines are computed in. Works for odd M too (A then holds one token more than B).
    """
    if target == 0:
        return candidates[:, :0]
    rows = torch.arange(candidates.shape[0], device=candidates.device).unsqueeze(-1)
    while candidates.shape[1] > target:
        group_a, group_b = candidates[:, ::2], candidates[:, 1::2]
        cosine = features[rows, group_a] @ features[rows, group_b].transpose(-1, -2)  # [B, |A|, |B|]
        redundancy = cosine.max(dim=-1).values
        num_removed = min(MAX_REMOVED_PER_ROUND, candidates.shape[1] - target, group_a.shape[1])
        by_redundancy = top_k_indices(redundancy, group_a.shape[1], largest=True)
        survivors_a = torch.gather(group_a, 1, by_redundancy[:, num_removed:])
        candidates = torch.cat([survivors_a, group_b], dim=1)
    return candidates


@register_pruner("vispruner")
class VisPruner(TokenPruner):
    """VisPruner: floor(R * important_ratio) tokens by head-mean CLS attention of the select layer,
    the rest by iterative duplicate removal among the others; kept tokens in raster order.

    Args:
        num_tokens: R, visual tokens kept per image.
        important_ratio: share of R taken by attention (the reference default 0.5).
        kept_order, position_ids: see `TokenPruner` (the method's own order is raster).
        score_dtype: see `TokenPruner`. `model`: the CLS attention, its head mean, the feature
            normalisation and the cosines in the tower's dtype, as the reference (fp16 there).
    """

    def __init__(
        self,
        num_tokens: int = 192,
        important_ratio: float = 0.5,
        kept_order: KeptOrder = "reference",
        position_ids: PositionIds = "contiguous",
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order=kept_order, position_ids=position_ids, score_dtype=score_dtype)
        if not 0.0 <= important_ratio <= 1.0:
            raise PrunerError(f"important_ratio must be in [0, 1], got {important_ratio}")
        self.important_ratio = important_ratio

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.CLS_ATTENTION, Signal.PATCH_FEATURES})

    group_names = ("important", "diverse")

    def select(self, signals: VisualSignals) -> Tensor:
        """Kept patch indices [B, R], ascending."""
        return self._select_and_label(signals)[0]

    def select_with_groups(self, signals: VisualSignals) -> tuple[Tensor, Tensor]:
        """`select`'s kept indices (ascending) and their groups: 0 important, 1 diverse."""
        return self._select_and_label(signals)

    def _select_and_label(self, signals: VisualSignals) -> tuple[Tensor, Tensor]:
        attention, features = signals.require(Signal.CLS_ATTENTION), signals.require(Signal.PATCH_FEATURES)
        attention = head_mean_cls_attention(attention, self.score_dtype)  # [B, N]
        if self.score_dtype == "float32":
            features = F.normalize(features.float(), dim=-1)  # [B, N, D]
        else:  # the reference's op: x / ||x|| (no epsilon)
            features = features / features.norm(dim=-1, keepdim=True)
        budget = self.budget(attention.shape[-1])
        num_important = int(budget * self.important_ratio)  # round down, as the reference

        by_attention = top_k_indices(attention, attention.shape[-1], largest=True)
        important, others = by_attention[:, :num_important], by_attention[:, num_important:]
        diverse = remove_duplicates(others, features, budget - num_important)
        kept, order = torch.cat([important, diverse], dim=1).sort(dim=1)
        groups = torch.cat([torch.zeros_like(important), torch.ones_like(diverse)], dim=1)
        return kept, torch.gather(groups, 1, order)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, important_ratio={self.important_ratio}"

    def hparams(self) -> dict:
        return {**super().hparams(), "important_ratio": self.important_ratio}
