"""DivPrune (CVPR 2025): the R projected image tokens that are most diverse, by greedy max-min distance.

Reference: vbdi/divprune @799e2d9, `LLaVA/llava/model/llava_arch.py:147-171` (`pairwise_cosine_similarity`,
`DivPrune`) applied at `:364-385` to the image span of the spliced embeddings (the projector's output in
the model's dtype; `:141-144`), kept in raster order (`keep_indexs.sort()`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from litelvlm.pruners.base import KeptOrder, PositionIds, PrunerError, ScoreDtype, Signal, TokenPruner, VisualSignals
from litelvlm.pruners.registry import register_pruner


def max_min_diversity(features: Tensor, k: int) -> Tensor:
    """k row indices of `features` [N, D] in PICK order (LongTensor [k]), computed in their dtype.

    Distance `1 - cos`. The first pick is the row farthest from its nearest neighbour (the second
    smallest entry of its column: the smallest is its own ~0 distance); every later pick is the row
    farthest from the picked set (the largest minimum distance to the picked rows). Ties go to the
    lower index (argmax). Picked rows are never picked again: the reference leaves them in, where
    their ~0 self-distance can still win in fp16 (or among exact duplicates) and repeat a token.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise PrunerError(f"divprune: cannot pick {k} of {n} tokens (1 <= k <= {n})")
    normed = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - normed @ normed.T  # [N, N]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    scores = torch.topk(distance, 2, dim=0, largest=False).values[1]  # each column's nearest neighbour
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    picked = torch.empty(k, dtype=torch.long, device=features.device)
    nearest_picked = None
    for step in range(k):
        if step > 0:
            row = distance[picked[step - 1]]
            nearest_picked = row if nearest_picked is None else torch.minimum(nearest_picked, row)
            scores = nearest_picked
        choice = torch.argmax(scores.masked_fill(taken, float("-inf")))
        picked[step] = choice
        taken[choice] = True
    return picked


@register_pruner("divprune")
class DivPrune(TokenPruner):
    """DivPrune: R tokens by greedy max-min cosine distance of the PROJECTED image features; raster order.

    Args:
        num_tokens: R, visual tokens kept per image (the reference sets a ratio r, R = round(r * N)).
        kept_order, position_ids: see `TokenPruner` (the method's own order is raster).
        score_dtype: see `TokenPruner`. `model`: the projector's output in the LLM's dtype and the
            distances in it, as the reference (fp16); `float32`: projector and distances in float32.
    """

    def __init__(
        self,
        num_tokens: int = 192,
        kept_order: KeptOrder = "reference",
        position_ids: PositionIds = "contiguous",
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order=kept_order, position_ids=position_ids, score_dtype=score_dtype)

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.PROJECTED_FEATURES})

    def select(self, signals: VisualSignals) -> Tensor:
        """Kept patch indices [B, R], ascending, one greedy run per sample."""
        features = signals.require(Signal.PROJECTED_FEATURES)  # [B, N, h]
        budget = self.budget(features.shape[1])
        return torch.stack([max_min_diversity(sample, budget) for sample in features]).sort(dim=-1).values
