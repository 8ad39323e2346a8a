"""CDPruner: the R projected image tokens of the conditional DPP's greedy MAP, conditioned on the question.

Reference: Theia-4869/CDPruner @9541616, `llava/model/llava_arch.py:141-187` (`encode_images`: similarity
of the projected features, relevance, kernel, fast greedy MAP, indices sorted) with its inputs from
`llava/model/multimodal_encoder/clip_encoder.py:60-98` (CLIP patch embeddings `visual_projection(
post_layernorm(.))`, text embeddings of the question).
"""

from __future__ import annotations

import torch
from torch import Tensor

from litelvlm.pruners.base import KeptOrder, PositionIds, PrunerError, ScoreDtype, Signal, TextOverflow, TokenPruner
from litelvlm.pruners.base import VisualSignals, check_text_overflow
from litelvlm.pruners.registry import register_pruner


def relevance(patch_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """[N] relevance of each patch to the text: the mean over the M texts of MINUS the cosine of the
    CLIP patch and text embeddings (the reference's sign), min-max normalised as the reference does:
    `(r - min + 1e-6) / (max - min)`. All patches equally relevant (max = min): ones, not 0 / 0."""
    patches = patch_embeds / patch_embeds.norm(dim=-1, keepdim=True)
    texts = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    scores = (-(patches @ texts.T)).mean(dim=-1)  # [N]
    spread = scores.max() - scores.min()
    if spread == 0:
        return torch.ones_like(scores)
    return (scores - scores.min() + 1e-6) / spread


def dpp_greedy_map(kernel: Tensor, k: int) -> Tensor:
    """k indices of the DPP kernel [N, N] in PICK order: fast greedy MAP inference (incremental Cholesky).

    `d2 = diag(L)`; each step picks `j = argmax d2` (ties to the lower index), `e = (L[j] - sum_t c_t[j]
    c_t) / sqrt(d2_j)`, `d2 -= e^2`, and takes j out (`d2_j = -inf`). Once the best remaining `d2 <= 0`
    (the picked rows span the rest: the kernel's rank is used up) the reference divides by sqrt(<= 0)
    and fills with NaN; here the step picks that j and leaves the others' d2 unchanged (e = 0), so the
    remaining picks follow their residual gains, best first.
    """
    n = kernel.shape[0]
    if not 1 <= k <= n:
        raise PrunerError(f"cdpruner: cannot pick {k} of {n} tokens (1 <= k <= {n})")
    gains = torch.diagonal(kernel).clone()
    rows = kernel.new_zeros(k, n)  # the c_t
    picked = torch.empty(k, dtype=torch.long, device=kernel.device)
    for step in range(k):
        j = torch.argmax(gains)
        picked[step] = j
        if gains[j] > 0:
            update = (kernel[j] - rows[:step, j] @ rows[:step]) / torch.sqrt(gains[j])
            rows[step] = update
            gains -= update.square()
        gains[j] = float("-inf")
    return picked


@register_pruner("cdpruner")
class CDPruner(TokenPruner):
    """CDPruner: greedy MAP of the DPP with kernel `diag(rel) S diag(rel)`; kept in raster order.

    `S` = cosine similarity of the projected image features; `rel` = `relevance` of the CLIP patch
    embeddings to the CLIP text embeddings of EVERY question of the sample (the mean runs over all
    text slots: with `chunk`, over every chunk of every question).

    Args:
        num_tokens: R, visual tokens kept per image.
        text_overflow: `chunk` (the reference, clip_encoder.py:81-89): a question longer than CLIP's
            77 tokens is cut into 77-token chunks, each embedded alone, and the relevance averages
            over the chunks; `truncate`: its first 77 tokens, [EOS] kept. Read by the model.
        kept_order, position_ids: see `TokenPruner` (the method's own order is raster).
        score_dtype: see `TokenPruner`. `model`: the projected features and their normalisation in the
            LLM's dtype and the patch embeddings in the tower's, then float32 from the cosines on (the
            reference's kernel and DPP are float32); `float32`: float32 throughout.
    """

    def __init__(
        self,
        num_tokens: int = 192,
        text_overflow: TextOverflow = "chunk",
        kept_order: KeptOrder = "reference",
        position_ids: PositionIds = "contiguous",
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order=kept_order, position_ids=position_ids, score_dtype=score_dtype)
        self.text_overflow = check_text_overflow(text_overflow)

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.PROJECTED_FEATURES, Signal.PATCH_EMBEDS, Signal.TEXT_EMBEDS})

    def select(self, signals: VisualSignals) -> Tensor:
        """Kept patch indices [B, R], ascending, one DPP per sample."""
        features = signals.require(Signal.PROJECTED_FEATURES)  # [B, N, h]
        patch_embeds = signals.require(Signal.PATCH_EMBEDS)  # [B, N, P]
        text_embeds = signals.require(Signal.TEXT_EMBEDS)  # [B, T, P]
        text_mask = signals.text_mask if signals.text_mask is not None else torch.ones(text_embeds.shape[:2], dtype=torch.bool)
        budget = self.budget(features.shape[1])
        kept = []
        for b in range(features.shape[0]):
            texts = text_embeds[b][text_mask[b].to(text_embeds.device)]
            if texts.shape[0] == 0:
                raise PrunerError(f"cdpruner: sample {b} of the batch has no question to condition on")
            normed = (features[b] / features[b].norm(dim=-1, keepdim=True)).float()
            similarity = normed @ normed.T  # [N, N]
            rel = relevance(patch_embeds[b].float(), texts.float())
            kernel = rel[:, None] * similarity * rel[None, :]
            kept.append(dpp_greedy_map(kernel, budget))
        return torch.stack(kept).sort(dim=-1).values

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, text_overflow={self.text_overflow}"

    def hparams(self) -> dict:
        return {**super().hparams(), "text_overflow": self.text_overflow}
