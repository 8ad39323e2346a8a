"""VisionZip: the [CLS] token, the patches it attends to most, and contextual tokens MERGED from the rest, all
before the projector.

Reference: dvlab-research/VisionZip @3151f6d, `visionzip/clip_encoder.py:42-85` (the rule),
`visionzip/utils.py:22-24,89` (the merge metric: the select layer's keys, mean over heads) and
`visionzip/main.py:5-7` (`dominant - 1` patches: the [CLS] token counts as a dominant token).
"""

from __future__ import annotations

import torch
from torch import Tensor

from litelvlm.pruners.base import (
    KeptOrder,
    PositionIds,
    PrunerError,
    ScoreDtype,
    Signal,
    TokenPruner,
    VisualReduction,
    VisualSignals,
    top_k_indices,
)
from litelvlm.pruners.registry import register_pruner

# The reference's budgets (README; LightCompress `visionzip.yml`): 192 = 162 + 30, 128 = 108 + 20,
# 64 = 54 + 10. One ratio fits all three: C = R * 30 / 192.
CONTEXTUAL_SHARE = (30, 192)


def split_budget(num_tokens: int) -> tuple[int, int]:
    """(dominant tokens, [CLS] included; contextual tokens) for R tokens: C = round(R * 30 / 192), half up."""
    contextual = (2 * num_tokens * CONTEXTUAL_SHARE[0] + CONTEXTUAL_SHARE[1]) // (2 * CONTEXTUAL_SHARE[1])
    return num_tokens - contextual, contextual


def contextual_assignment(keys: Tensor, num_contextual: int) -> tuple[Tensor, Tensor, Tensor]:
    """The merge plan of M non-dominant patches: (targets [C], the others [M-C], each other's target slot [M-C]).

    Targets are the positions 0, s, 2s, ... (s = max(1, M // C)), the first C of them; every other
    patch joins the target whose L2-normalised key is most similar (dot product, in the keys' dtype;
    ties to the first target). `clip_encoder.py:64-74`.
    """
    m = keys.shape[0]
    if not 0 <= num_contextual <= m:
        raise PrunerError(f"visionzip: cannot merge {m} patches into {num_contextual} contextual tokens (0 <= C <= {m})")
    device = keys.device
    step = max(1, m // num_contextual) if num_contextual else 1
    targets = torch.arange(0, m, step, device=device)[:num_contextual]
    is_target = torch.zeros(m, dtype=torch.bool, device=device)
    is_target[targets] = True
    others = torch.arange(m, device=device)[~is_target] if not keys.is_meta else _others_on_meta(m, targets)
    if num_contextual == 0:  # nothing to join: the reference divides by zero here
        return targets, others, torch.zeros_like(others)
    normed = keys / keys.norm(dim=-1, keepdim=True)
    similarity = normed[others] @ normed[targets].T  # [M-C, C]
    return targets, others, similarity.argmax(dim=1)


def _others_on_meta(m: int, targets: Tensor) -> Tensor:
    """The non-target positions' shape without values (meta tensors: FLOP counting)."""
    return torch.empty(m - targets.shape[0], dtype=torch.long, device=targets.device)


def merge_contextual(hidden: Tensor, keys: Tensor, num_contextual: int) -> Tensor:
    """C = `num_contextual` merged tokens [C, D] of the M non-dominant patches, in target order.

    `hidden` [M, D]: their select-layer states; `keys` [M, K]: that layer's keys, mean over heads; both in
    raster order. Token i = `hidden[target_i] + mean(hidden of the patches assigned to target_i)` (the
    target PLUS the mean of its other members, `clip_encoder.py:75-80`; a target nobody joins adds 0).
    The mean runs in `hidden`'s dtype. C = 0 gives no token (the reference divides by zero).
    """
    if hidden.shape[0] != keys.shape[0]:
        raise PrunerError(f"visionzip: {hidden.shape[0]} hidden states but {keys.shape[0]} keys")
    return _merge(hidden, *contextual_assignment(keys, num_contextual))


def _merge(hidden: Tensor, targets: Tensor, others: Tensor, assignment: Tensor) -> Tensor:
    """`merge_contextual` for a given plan: each target's state plus the mean of the others assigned to it."""
    if targets.shape[0] == 0:
        return hidden[:0]
    one_hot = torch.zeros(others.shape[0], targets.shape[0], dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(1, assignment[:, None], 1)
    counts = one_hot.sum(dim=0).clamp(min=1)[:, None]
    return hidden[targets] + (one_hot.T @ hidden[others]) / counts


@register_pruner("visionzip")
class VisionZip(TokenPruner):
    """VisionZip: [CLS] + dominant patches by [CLS] attention summed over heads + contextual merged tokens.

    R counts the [CLS] token, as the reference does (`visionzip(model, dominant=54, contextual=10)`
    feeds 64 tokens: [CLS], 53 patches, 10 merged): R = D + C with C = `split_budget(R)`; R = 1 is
    [CLS] alone. The LLM gets `[CLS, dominant patches in raster order, contextual 1..C]`, positions
    contiguous. Groups: `dominant` ([CLS] included: it stands for no patch) and `contextual`.

    Args:
        num_tokens: R, visual tokens the LLM gets (1..N).
        kept_order, position_ids: only `reference` and `contiguous` (merged tokens have no patch order
            or position of their own).
        score_dtype: see `TokenPruner`. `model`: the attention, its head sum, the keys' head mean and the
            key similarities in the tower's dtype, as the reference; `float32`: upcast. The merge itself
            (sums and means of hidden states) is in the tower's dtype either way.
    """

    group_names = ("dominant", "contextual")

    def __init__(
        self,
        num_tokens: int = 192,
        kept_order: KeptOrder = "reference",
        position_ids: PositionIds = "contiguous",
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order=kept_order, position_ids=position_ids, score_dtype=score_dtype)
        if num_tokens is None:
            raise PrunerError("visionzip needs a budget: num_tokens must be an integer >= 1")
        if kept_order != "reference" or position_ids != "contiguous":
            raise PrunerError(
                "visionzip builds new tokens ([CLS], dominant, merged contextual): kept_order must be 'reference' "
                f"and position_ids 'contiguous', got {kept_order!r} and {position_ids!r}"
            )

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.CLS_ATTENTION_SUM, Signal.SELECT_KEYS, Signal.PATCH_FEATURES, Signal.CLS_FEATURES})

    def select(self, signals: VisualSignals) -> Tensor:
        raise PrunerError("visionzip merges tokens, so it has no kept indices: the model calls its `reduce`")

    def reduce(self, signals: VisualSignals) -> VisualReduction:
        """[CLS, dominant, contextual] features [B, R, D] before the projector, with their members and groups."""
        attention = signals.require(Signal.CLS_ATTENTION_SUM)  # [B, N]
        keys = signals.require(Signal.SELECT_KEYS)  # [B, N, K]
        features = signals.require(Signal.PATCH_FEATURES)  # [B, N, D]
        cls_features = signals.require(Signal.CLS_FEATURES)  # [B, D]
        b, n, _ = features.shape
        budget = self.budget(n)
        num_dominant, num_contextual = split_budget(budget)
        dominant = top_k_indices(attention, num_dominant - 1).sort(dim=-1).values  # patches, raster order
        not_dominant = torch.ones(b, n, dtype=torch.bool, device=features.device).scatter_(1, dominant, False)
        rest = torch.sort((~not_dominant).to(torch.uint8), dim=1, stable=True).indices[:, : n - dominant.shape[1]]
        tokens, members = [], torch.zeros(b, budget, n, dtype=torch.bool, device=features.device)
        for i in range(b):
            hidden, sample_keys = features[i, rest[i]], keys[i, rest[i]]
            targets, others, assignment = contextual_assignment(sample_keys, num_contextual)
            merged = _merge(hidden, targets, others, assignment)
            tokens.append(torch.cat([cls_features[i, None], features[i, dominant[i]], merged.to(features.dtype)]))
            members[i, torch.arange(1, num_dominant, device=features.device), dominant[i]] = True
            if num_contextual:  # without contextual tokens (R < 4) the rest is dropped
                members[i, num_dominant + torch.arange(num_contextual, device=features.device), rest[i, targets]] = True
                members[i, num_dominant + assignment, rest[i, others]] = True
        groups = torch.cat([torch.zeros(b, num_dominant, dtype=torch.long), torch.ones(b, num_contextual, dtype=torch.long)], 1)
        return VisualReduction(groups=groups.to(features.device), members=members, features=torch.stack(tokens))
