"""LiteLVLM and its ablations: one selection routine, configured by which tokens each variant keeps.

Every variant keeps `R` patches as `fill + S`:
- `S`, the similarity-aware set: for each of the sample's `T` sentences, the `R // T` patches
  with the lowest (reversed ablation: highest) CLIP image-text similarity; their sorted union.
- `fill`, the first `R - |S|` patches of a fill ranking that are not in `S`: the context score
  (descending) for LiteLVLM, or the minimum similarity over the sentences (ascending) for the
  similarity-only ablation.
With `R < T` the per-sentence budget `R // T` is 0, so `S` is empty and the fill ranking picks all
`R` (the reference's top-k with k = 0 behaves the same).
Group labels: 0 for `S` ("similarity-aware"), 1 for the fill (the context-aware set `C`; the
similarity-only ablation names its fill for what it is). The rules, with the reference
(sejong-rcv/LiteLVLM `model/llava/model/multimodal_encoder/clip_encoder.py`), are in docs/pruners.md.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from litelvlm.pruners.base import KeptOrder, PositionIds, PrunerError, ScoreDtype, Signal, TokenPruner, VisualSignals
from litelvlm.pruners.base import TextOverflow, check_text_overflow, top_k_indices
from litelvlm.pruners.registry import register_pruner

TextSource = Literal["question", "expression"]
TextPooling = Literal["eos", "mean"]
SimilarityPick = Literal["lowest", "highest"]
FillBy = Literal["context", "min_similarity"]


def text_similarity(patch_embeds: Tensor, text_embeds: Tensor, score_dtype: str = "float32") -> Tensor:
    """s[b, t, i] = <patch i, text t> on unnormalised projected CLIP vectors: [B, T, N].

    `float32`: both upcast. `model`: in the patch embeddings' dtype, as the reference's one matmul.
    """
    if score_dtype == "float32":
        return torch.einsum("bnp,btp->btn", patch_embeds.float(), text_embeds.float())
    text = text_embeds.to(patch_embeds.dtype)
    return torch.matmul(patch_embeds.unsqueeze(1), text.unsqueeze(-1)).squeeze(-1)


def context_scores(q: Tensor, k: Tensor, v: Tensor, score_dtype: str = "float32") -> Tensor:
    """Context score c_i = ||w_i v_i|| of every patch, from the last CLIP layer's q/k/v: [B, N].

    q, k, v are [B, N+1, D] with the CLS token first; w = softmax over patches of the cosine of the
    CLS query with each patch key, divided by sqrt(D). `float32`: upcast first. `model`: every op in
    q/k/v's dtype, in the reference's order (normalise, matmul, divide, softmax, weight, norm).
    """
    width = q.shape[-1]
    if score_dtype == "model":
        cls_query = F.normalize(q[:, :1], dim=-1)  # [B, 1, D]
        patch_keys = F.normalize(k[:, 1:], dim=-1)  # [B, N, D]
        weights = F.softmax(torch.matmul(cls_query, patch_keys.transpose(-2, -1)) / width**0.5, dim=-1)  # [B, 1, N]
        return (weights.transpose(1, 2) * v[:, 1:]).norm(dim=-1)
    cls_query = F.normalize(q[:, 0].float(), dim=-1)  # [B, D]
    patch_keys = F.normalize(k[:, 1:].float(), dim=-1)  # [B, N, D]
    logits = torch.einsum("bd,bnd->bn", cls_query, patch_keys) / math.sqrt(width)
    weights = logits.softmax(dim=-1)
    return (weights.unsqueeze(-1) * v[:, 1:].float()).norm(dim=-1)


@register_pruner("litelvlm")
class LiteLVLM(TokenPruner):
    """Full LiteLVLM: the lowest-similarity tokens of every sentence, topped up by context tokens.

    Args:
        num_tokens: R, visual tokens kept per image.
        text_source: which text the model sends through the CLIP text tower: `question` (the full
            question of the user turn, as the reference) or `expression` (the bare referring
            expression). Read by the model; the pruner only sees the resulting embeddings.
        text_pooling: `eos` (the projected [EOS] state, as the reference) or `mean` (the mean of
            the content tokens' final states through the same final norm and projection: tests
            whether the [EOS] attention sink matters). Read by the model.
        text_overflow: a text longer than CLIP's 77-token window is `truncate`d to its first 77
            tokens, [EOS] kept (the reference's `truncation=True`), or cut into 77-token `chunk`s,
            each chunk a sentence of its own for the per-sentence budget `R // T`. Read by the model.
        kept_order, position_ids: see `TokenPruner`; applied by the model.
        score_dtype: see `TokenPruner`. `model`: the similarities and context scores in the towers'
            dtype, as the reference (bf16 in its evaluation).
    """

    # None: no similarity-aware set (context-only).
    similarity_pick: ClassVar[SimilarityPick | None] = "lowest"
    fill_by: ClassVar[FillBy] = "context"
    group_names = ("similarity-aware", "context-aware")  # S, then the fill

    def __init__(
        self,
        num_tokens: int = 192,
        text_source: TextSource = "question",
        text_pooling: TextPooling = "eos",
        text_overflow: TextOverflow = "truncate",
        kept_order: KeptOrder = "reference",
        position_ids: PositionIds = "contiguous",
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order=kept_order, position_ids=position_ids, score_dtype=score_dtype)
        if text_source not in ("question", "expression"):
            raise PrunerError(f"text_source must be 'question' or 'expression', got {text_source!r}")
        self.text_source = text_source
        if text_pooling not in ("eos", "mean"):
            raise PrunerError(f"text_pooling must be 'eos' or 'mean', got {text_pooling!r}")
        self.text_pooling = text_pooling
        self.text_overflow = check_text_overflow(text_overflow)

    @property
    def uses_text(self) -> bool:
        return self.similarity_pick is not None or self.fill_by == "min_similarity"

    @property
    def required_signals(self) -> frozenset[Signal]:
        signals = set()
        if self.uses_text:
            signals |= {Signal.PATCH_EMBEDS, Signal.TEXT_EMBEDS}
        if self.fill_by == "context":
            signals.add(Signal.LAST_QKV)
        return frozenset(signals)

    def select(self, signals: VisualSignals) -> Tensor:
        """Kept patch indices [B, R]: fill tokens in ranking order, then `S` in ascending order."""
        return self._select_and_label(signals)[0]

    def select_with_groups(self, signals: VisualSignals) -> tuple[Tensor, Tensor]:
        """`select`'s kept indices and their groups: 1 (fill: `C`) for the fill tokens, 0 for `S`."""
        return self._select_and_label(signals)

    def _select_and_label(self, signals: VisualSignals) -> tuple[Tensor, Tensor]:
        similarity = context = None
        if self.uses_text:
            similarity = text_similarity(
                signals.require(Signal.PATCH_EMBEDS), signals.require(Signal.TEXT_EMBEDS), self.score_dtype
            )
            sentence_mask = signals.text_mask
            if sentence_mask is None:
                sentence_mask = torch.ones(similarity.shape[:2], dtype=torch.bool, device=similarity.device)
            sentence_mask = sentence_mask.to(similarity.device)
        if self.fill_by == "context":
            context = context_scores(*signals.require(Signal.LAST_QKV), score_dtype=self.score_dtype)
        scores = context if context is not None else similarity
        batch_size, num_patches = scores.shape[0], scores.shape[-1]
        budget = self.budget(num_patches)

        kept, groups = [], []
        for b in range(batch_size):
            sample_similarity = None
            if similarity is not None:
                sample_similarity = similarity[b][sentence_mask[b]]  # [T_b, N]: real sentences only
                if len(sample_similarity) == 0:
                    raise PrunerError(f"{self.name}: sample {b} has no sentence (its text_mask row is all False)")
            fill, similarity_set = self._select_one(budget, sample_similarity, None if context is None else context[b])
            kept.append(torch.cat([fill, similarity_set]))
            groups.append(torch.cat([torch.ones_like(fill), torch.zeros_like(similarity_set)]))
        return torch.stack(kept), torch.stack(groups)

    def _select_one(self, budget: int, similarity: Tensor | None, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """One sample's (fill, `S`): `similarity` [T, N] over its real sentences, `context` [N]."""
        if self.similarity_pick is None:
            similarity_set = torch.empty(0, dtype=torch.long, device=context.device)
        else:
            per_sentence = budget // len(similarity)
            picks = top_k_indices(similarity, per_sentence, largest=self.similarity_pick == "highest")
            similarity_set = torch.unique(picks.flatten(), sorted=True)
        if self.fill_by == "context":
            fill_ranking = top_k_indices(context, len(context), largest=True)
        else:
            min_similarity = similarity.min(dim=0).values
            fill_ranking = top_k_indices(min_similarity, len(min_similarity), largest=False)
        fill = fill_ranking[~torch.isin(fill_ranking, similarity_set)][: budget - len(similarity_set)]
        return fill, similarity_set

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, text_source={self.text_source}, text_pooling={self.text_pooling}, "
                f"text_overflow={self.text_overflow}")

    def hparams(self) -> dict:
        return {**super().hparams(), "text_source": self.text_source, "text_pooling": self.text_pooling,
                "text_overflow": self.text_overflow}


@register_pruner("similarity-only")
class SimilarityOnly(LiteLVLM):
    """Ablation: only similarity; a short `S` is filled by the lowest per-patch minimum similarity."""

    fill_by = "min_similarity"
    group_names = ("similarity-aware", "minimum-similarity fill")


@register_pruner("context-only")
class ContextOnly(LiteLVLM):
    """Ablation: the top-R patches by context score, in descending score order; no text needed."""

    similarity_pick = None


@register_pruner("reversed-similarity")
class ReversedSimilarity(LiteLVLM):
    """Ablation: LiteLVLM with the intuitive ranking, the HIGHEST similarity per sentence."""

    similarity_pick = "highest"

