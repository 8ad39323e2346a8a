"""DART (2025): keep the visual tokens least duplicated by a few pivot tokens, once, inside the LLM.

Reference: ZichenWen1/DART (author's last commit 5a19452) `llava/model/language_model/modeling_llama_self.py:331-359`
(`get_retained_image_token`) and `:397-449` (the pruning step in `LlamaModel.forward`), settings
from `scripts/v1_5/eval/*.sh` (K = 2, 4 image + 4 text pivots). docs/pruners.md, "DART".
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from litelvlm.pruners.base import LLMSelection, PrunerError, ScoreDtype, Signal, TokenPruner, top_k_indices
from litelvlm.pruners.registry import register_pruner

IMAGE_PIVOTS = 4
TEXT_PIVOTS = 4
PivotOrder = Literal["reference", "score"]
PIVOT_ORDERS = ("reference", "score")


def reference_pivot_order(positions: list[int]) -> list[int]:
    """Where each pivot comes in the reference's loop: it iterates `set(image_pivots + text_pivots)`
    (sequence positions, image pivots then text pivots, each by descending norm), and CPython iterates a
    set of ints in a fixed order given the values and their insertion order. Returns indices into
    `positions` in that order."""
    where = {position: index for index, position in enumerate(positions)}
    return [where[position] for position in set(positions)]


@register_pruner("dart")
class DART(TokenPruner):
    """DART: before layer K, pivots by the L1 norm of layer K-1's keys; around each pivot the visual
    tokens least similar to it; original position ids.

    Before layer K (default 2):
    1. `H` = the decoder's final RMSNorm of layer K-1's output; `Ks` = layer K-1's keys after RoPE
       at the current positions, heads concatenated.
    2. Pivots: the 4 visual tokens and the 4 real text tokens after the image with the largest
       `||Ks||_1` (ties: lower index).
    3. `t = R // 8`. For each pivot in turn, add the `t` remaining visual tokens with the LOWEST
       cosine similarity of `H` to the pivot's `H` (ties: lower index), and remove them from the
       candidates. The order matters (picks leave the candidates): `pivot_order: reference` (default)
       iterates the pivots as the reference does, `list(set(image + text pivot positions))`, CPython's
       fixed order for a set of ints; `score`: the image pivots by descending norm, then the text
       pivots by descending norm (not the reference's; kept for runs made with it).
    4. Retained = image pivots + picks, `4 + 8t` tokens (196 / 132 / 68 at R = 192 / 128 / 64, as the
       reference: not exactly R), in sequence order; text pivots stay as text, not as picks.
    5. Every token keeps its position id (gaps where tokens left).
    `exact_budget=True` keeps exactly R: `t = ceil((R - 4) / 8)` and the retained tokens in the order
    they were chosen (pivots, then picks pivot by pivot) cut at R, i.e. the last pivots pick fewer
    (R < 4: the top-R image pivots). Not a setting of the paper.

    Args:
        num_tokens: R (`max_num_trunction` of the reference scripts).
        layer: K >= 1 (reference 2).
        exact_budget: keep exactly R (see above) instead of the reference's `4 + 8 * (R // 8)`.
        pivot_order: `reference` (the reference's set iteration) or `score` (see step 3).
        score_dtype: `model`: norms and cosines in the LLM's dtype, as the reference; `float32`: upcast.
    """

    needs_previous_layer = True  # layer K-1's keys and output

    def __init__(
        self,
        num_tokens: int = 192,
        layer: int = 2,
        exact_budget: bool = False,
        pivot_order: PivotOrder = "reference",
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order="raster", position_ids="original", score_dtype=score_dtype)
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 1:
            raise PrunerError(f"dart: layer must be an integer >= 1 (DART reads layer K-1), got {layer!r}")
        if not isinstance(exact_budget, bool):
            raise PrunerError(f"dart: exact_budget must be true or false, got {exact_budget!r}")
        if pivot_order not in PIVOT_ORDERS:
            raise PrunerError(f"dart: pivot_order must be 'reference' or 'score', got {pivot_order!r}")
        self.prune_layer = layer
        self.exact_budget = exact_budget
        self.pivot_order = pivot_order

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.LLM_ATTENTION})

    def retained_count(self, num_visual: int) -> int:
        """Visual tokens kept from layer K on, checked against the `num_visual` there are."""
        budget = self.budget(num_visual)
        if self.exact_budget:
            return budget
        count = IMAGE_PIVOTS + (IMAGE_PIVOTS + TEXT_PIVOTS) * (budget // (IMAGE_PIVOTS + TEXT_PIVOTS))
        if count > num_visual:
            raise PrunerError(
                f"dart: num_tokens={budget} retains 4 + 8 * ({budget} // 8) = {count} of {num_visual} visual tokens "
                "(the reference's rule); use exact_budget=true to keep exactly num_tokens"
            )
        return count

    def check_model(self, num_patches: int, num_llm_layers: int | None) -> None:
        """Also: the reference's retained count `4 + 8 * (R // 8)` fits the N patches."""
        super().check_model(num_patches, num_llm_layers)
        self.retained_count(num_patches)

    def prune_in_llm(self, context) -> LLMSelection:
        previous = context.previous
        keys = previous.keys()  # [B, H_kv, L, d] of layer K-1
        keys = keys.transpose(1, 2).flatten(2)  # heads concatenated: [B, L, H_kv * d]
        states = context.final_norm()  # [B, L, h]: final norm of layer K-1's output
        if self.score_dtype == "float32":
            keys, states = keys.float(), states.float()
        visual = context.visual_positions
        b, n_visual = visual.shape
        retained = self.retained_count(n_visual)
        norms = torch.linalg.vector_norm(keys, ord=1, dim=-1)  # ||Ks||_1 per token, [B, L], as torch.norm(p=1)
        image_norms = torch.gather(norms, 1, visual)
        text = context.text_after_image()
        if not text.is_meta and bool((text.sum(1) < TEXT_PIVOTS).any()):
            raise PrunerError(f"dart: every prompt needs at least {TEXT_PIVOTS} tokens after the image for its text pivots")
        text_norms = norms.float().masked_fill(~text, float("-inf"))
        image_pivots = top_k_indices(image_norms.float(), IMAGE_PIVOTS)  # [B, 4] visual indices, by norm
        text_pivots = top_k_indices(text_norms, TEXT_PIVOTS)  # [B, 4] sequence indices, by norm
        pivot_positions = torch.cat([torch.gather(visual, 1, image_pivots), text_pivots], 1)  # [B, 8], by score
        if self.pivot_order == "reference" and not pivot_positions.is_meta:  # (the order changes no shape)
            order = [reference_pivot_order(row) for row in pivot_positions.tolist()]
            pivot_positions = torch.gather(pivot_positions, 1, torch.tensor(order, device=pivot_positions.device))
        pivot_states, visual_states = (
            torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1])) for index in (pivot_positions, visual)
        )
        per_pivot = math.ceil(max(retained - IMAGE_PIVOTS, 0) / 8) if self.exact_budget else self.num_tokens // 8
        candidate = torch.ones(b, n_visual, dtype=torch.bool, device=visual.device).scatter_(1, image_pivots, False)
        chosen = [image_pivots]
        left = retained - IMAGE_PIVOTS
        for p in range(IMAGE_PIVOTS + TEXT_PIVOTS):
            take = min(per_pivot, max(left, 0))
            if take == 0:
                break
            similarity = F.cosine_similarity(pivot_states[:, p : p + 1], visual_states, dim=-1)  # [B, V]
            similarity = similarity.float().masked_fill(~candidate, float("inf"))
            picks = top_k_indices(similarity, take, largest=False)
            candidate = candidate.scatter(1, picks, False)
            chosen.append(picks)
            left -= take
        kept = torch.cat(chosen, 1)[:, :retained]
        return LLMSelection(kept.sort(dim=-1).values, positions="original")

    def extra_repr(self) -> str:
        return (
            f"num_tokens={self.num_tokens}, layer={self.prune_layer}, exact_budget={self.exact_budget}, "
            f"pivot_order={self.pivot_order}, score_dtype={self.score_dtype}"
        )

    def hparams(self) -> dict:
        return {
            **super().hparams(), "layer": self.prune_layer, "exact_budget": self.exact_budget, "pivot_order": self.pivot_order
        }
