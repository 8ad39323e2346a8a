"""SparseVLM (ICML 2025, v1.5): visual tokens rated by the text tokens that look at the image, pruned
in three stages inside the LLM, the pruned ones recycled into merged tokens.

Reference: Gumpest/SparseVLMs, tag v1.5 @b9619e6 (the ICML release), `llava/model/language_model/`:
`modelling_sparse_llama.py:197-204` (raters), `:223-323` (the stages), `score.py:5-42` (kept counts,
top-k), `utils.py:247-311` (`cluster_and_merge`, DPC-kNN). The budget-96 counts are in the current
`main` @26a5f48 `score.py:13` (`USE_VERSION=1_0`, the v1 counts). docs/pruners.md says what differs.

The functions here are the method's rules on tensors, batched (the reference runs one sample): every
stage's counts depend only on the visual count and the budget, so all samples of a padded batch keep,
recycle and merge the same numbers of tokens and the tensors keep fixed shapes.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from litelvlm.pruners.base import LLMSelection, PrunerError, ScoreDtype, Signal, TokenPruner, top_k_indices
from litelvlm.pruners.registry import register_pruner

if TYPE_CHECKING:
    from litelvlm.models.decoder_loop import LayerContext


def ascending_indices_where(mask: Tensor, count: int) -> Tensor:
    """`decoder_loop.ascending_indices_where`, imported when called (the loop imports the pruners)."""
    from litelvlm.models.decoder_loop import ascending_indices_where as where

    return where(mask, count)


# The decoder layers whose attention rates the visual tokens; each stage prunes that layer's output.
REFERENCE_LAYERS: tuple[int, ...] = (2, 6, 15)
REFERENCE_PATCHES = 576
# Visual tokens each stage keeps (before recycling), per "equivalent token" budget, for 576 patches.
REFERENCE_KEEPS: dict[int, tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
RECYCLE_FRACTION = 0.3  # of the pruned tokens, the top 30% (+1) by score are clustered
TOKENS_PER_CLUSTER = 10  # one merged token per 10 recycled (+1)


def _anchors() -> list[tuple[Fraction, tuple[Fraction, ...]]]:
    """The table as fractions of the patches (budget/576 -> keeps/576), with 0 -> 0 and 1 -> 1 added."""
    points = [(Fraction(0), (Fraction(0),) * 3)]
    for budget, keeps in sorted(REFERENCE_KEEPS.items()):
        points.append((Fraction(budget, REFERENCE_PATCHES), tuple(Fraction(k, REFERENCE_PATCHES) for k in keeps)))
    points.append((Fraction(1), (Fraction(1),) * 3))
    return points


def stage_keeps(num_tokens: int, num_patches: int = REFERENCE_PATCHES) -> tuple[int, int, int]:
    """Visual tokens each of the three stages keeps by score, for budget R of N patches.

    The reference's table for 576 patches at 64 / 96 / 128 / 192; any other (R, N): the table read as
    fractions of N (R/N -> keeps/N), linearly interpolated between its budgets and 0 -> 0, 1 -> 1,
    times N, rounded half up, at least 1. At N = 576 and a table budget this is the table.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= num_patches:
        raise PrunerError(f"sparsevlm: num_tokens must be an integer in [1, {num_patches}], got {num_tokens!r}")
    if num_patches == REFERENCE_PATCHES and num_tokens in REFERENCE_KEEPS:
        return REFERENCE_KEEPS[num_tokens]
    fraction = Fraction(num_tokens, num_patches)
    points = _anchors()
    for (low, low_keeps), (high, high_keeps) in zip(points, points[1:]):
        if low <= fraction <= high:
            t = (fraction - low) / (high - low)
            keeps = [(a + (b - a) * t) * num_patches for a, b in zip(low_keeps, high_keeps)]
            return tuple(max(1, math.floor(k + Fraction(1, 2))) for k in keeps)  # type: ignore[return-value]
    raise AssertionError("unreachable: the anchors cover [0, 1]")


def kept_count(keep: int, num_visual: int) -> int:
    """Visual tokens kept by score at a stage: the budget, but at least one is always pruned."""
    return min(keep, num_visual - 1)


def recycled_count(num_pruned: int) -> int:
    """Pruned tokens that are clustered: `int(0.3 n) + 1` (the reference's float arithmetic)."""
    return int(num_pruned * RECYCLE_FRACTION) + 1


def cluster_count(num_recycled: int) -> int:
    """Merged tokens made of the recycled ones: `int(n / 10) + 1`."""
    return int(num_recycled / TOKENS_PER_CLUSTER) + 1


def stage_visual_counts(num_visual: int, keeps: tuple[int, ...]) -> list[int]:
    """Visual tokens after each stage (kept + merged; 309 / 204 / 113 at 192 of 576)."""
    counts = []
    for keep in keeps:
        if num_visual == 0:
            counts.append(0)
            continue
        kept = kept_count(keep, num_visual)
        num_visual = kept + cluster_count(recycled_count(num_visual - kept))
        counts.append(num_visual)
    return counts


def select_raters(visual: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
    """Which text tokens rate the image: [B, U] bool, from the layer-0 input embeddings.

    `visual` [B, N, h] the image span, `text` [B, U, h] every token after it, `text_mask` [B, U] the
    real ones (padding is in neither the softmax nor the mean). m_u = mean over the visual tokens of
    softmax over the text of V U^T; raters: m_u > mean of m. Computed in the inputs' dtype (the
    reference: the model's). A sample where no token is above the mean (all equal) rates with all.
    """
    real = text_mask.bool()
    logits = (visual @ text.transpose(1, 2)).masked_fill(~real[:, None, :], float("-inf"))  # [B, N, U]
    m = logits.softmax(-1).mean(1)  # [B, U]; padded slots are exactly 0
    mean = m.sum(1, keepdim=True) / real.sum(1, keepdim=True).to(m.dtype)
    raters = (m > mean) & real
    none = ~raters.any(1, keepdim=True)
    return torch.where(none, real, raters)


def dpc_knn(x: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of each sample's tokens `x` [B, n, C]: (assignment [B, n] in 0..c-1, centres [B, c]).

    Distances `||x_i - x_j|| / sqrt(C)`; density `exp(-mean of the squared distances to the c nearest
    tokens, itself included)`; delta = distance to the nearest denser token (the largest distance of
    the sample for the densest); centres = top-c of delta * density; every token joins its nearest
    centre, each centre its own cluster. Ties, all by index order: among equal densities the lower
    index counts as denser (the reference adds 1e-6 * rand instead, which fp16 rounds away), equal
    centre scores go to the lower index, equally near centres to the earlier centre. In float64, so
    that only exact duplicates tie (in fp16, the reference's dtype, near-equal densities collapse).
    """
    b, n, c_dim = x.shape
    if not 1 <= num_clusters <= n:
        raise PrunerError(f"sparsevlm: cannot make {num_clusters} clusters of {n} tokens")
    x = x.double()
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(c_dim)  # [B, n, n]
    nearest = torch.topk(distance, num_clusters, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))  # [B, n]
    index = torch.arange(n, device=x.device)
    # denser[b, i, j]: token j is denser than token i (ties: the lower index is denser)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, None, :] < index[None, :, None])
    )
    farthest = distance.flatten(1).max(1).values[:, None, None]
    delta = torch.where(denser, distance, farthest).min(-1).values  # [B, n]
    centres = top_k_indices(delta * density, num_clusters)  # [B, c], best first
    to_centres = torch.gather(distance, 1, centres[..., None].expand(-1, -1, n))  # [B, c, n]
    assignment = to_centres.argmin(1)  # [B, n]; argmin returns the first of equal minima
    own = torch.arange(num_clusters, device=x.device).expand(b, -1)
    assignment = assignment.scatter(1, centres, own)
    return assignment, centres


def cluster_means(x: Tensor, assignment: Tensor, num_clusters: int) -> Tensor:
    """Mean of each cluster's tokens: [B, c, C], summed in float64, in `x`'s dtype.

    The reference divides by (count + 1e-6), an epsilon fp16 / bf16 round away: this is the exact mean.
    """
    b, n, c_dim = x.shape
    sums = torch.zeros(b, num_clusters, c_dim, dtype=torch.float64, device=x.device)
    sums.scatter_add_(1, assignment[..., None].expand(-1, -1, c_dim), x.double())
    counts = torch.zeros(b, num_clusters, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, assignment, torch.ones(b, n, dtype=torch.float64, device=x.device))
    return (sums / counts[..., None]).to(x.dtype)


def recycle(pruned_states: Tensor, pruned_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Merged tokens from the pruned ones: (merged [B, c, C], membership [B, c, n_pruned] bool).

    `pruned_states` [B, n, C] (the stage layer's output), `pruned_scores` [B, n] (their rater
    attention), in the current sequence order. The top `int(0.3 n) + 1` by score (ties: lower
    index), in score order, are clustered by `dpc_knn` into `int(m / 10) + 1`; merged token k is the
    mean of cluster k (centres in score order). `membership[b, k, i]`: pruned token i is in cluster k.
    """
    b, n, c_dim = pruned_states.shape
    recycled = top_k_indices(pruned_scores, recycled_count(n))  # [B, m], score order
    states = torch.gather(pruned_states, 1, recycled[..., None].expand(-1, -1, c_dim))
    num_clusters = cluster_count(recycled.shape[1])
    assignment, _ = dpc_knn(states, num_clusters)
    merged = cluster_means(states, assignment, num_clusters)
    in_cluster = assignment[:, None, :] == torch.arange(num_clusters, device=assignment.device)[None, :, None]  # [B, c, m]
    membership = torch.zeros(b, num_clusters, n, dtype=torch.bool, device=pruned_states.device)
    membership.scatter_(2, recycled[:, None, :].expand(-1, num_clusters, -1), in_cluster)
    return merged, membership


def _widest(counts: Tensor, bound: int) -> int:
    """The largest of `counts` [B]; on the meta device (FLOP counting: no values) the upper `bound`."""
    return bound if counts.is_meta else int(counts.max())


def _real_after_image(key_mask: Tensor, image_end: Tensor, num_visual: int) -> tuple[Tensor, Tensor]:
    """Sequence indices of the real tokens after the image, in order: ([B, U], valid [B, U] bool)."""
    seq = torch.arange(key_mask.shape[1], device=key_mask.device)
    after = (seq[None] >= image_end[:, None]) & key_mask.bool()
    counts = after.sum(1)
    width = _widest(counts, key_mask.shape[1] - num_visual)
    valid = torch.arange(width, device=key_mask.device)[None] < counts[:, None]
    return ascending_indices_where(after, width), valid


def _masked_mean(values: Tensor, weights: Tensor, dim: int) -> Tensor:
    """Mean of `values` over `dim` where `weights` is True, accumulated in float32 (as torch's mean of
    a half-precision tensor), in `values`' dtype."""
    w = weights.to(torch.float32)
    return ((values.float() * w).sum(dim) / w.sum(dim).clamp(min=1)).to(values.dtype)


def rater_scores(rated: LayerContext, score_dtype: str) -> Tensor:
    """Each current visual token's score at a stage: [B, V], the attention of layer `rated.index` from
    the raters to it, averaged over heads, then over raters (`score.py:21-26`; the probabilities:
    `modelling_sparse_llama.py:564-577`).

    The raters are chosen on the layer-0 input (`select_raters`); the text after the image is never
    pruned, so the k-th real token after the image then is the k-th now. Only the raters' rows of
    the attention are computed (`LayerContext.attention_rows`), never the full matrix.
    """
    dtype = torch.float32 if score_dtype == "float32" else rated.input_embeds.dtype
    text0, valid0 = _real_after_image(
        rated.input_key_mask, rated.input_visual_positions[:, -1] + 1, rated.input_visual_positions.shape[1]
    )
    batch = torch.arange(text0.shape[0], device=text0.device)[:, None]
    visual = rated.input_embeds[batch, rated.input_visual_positions].to(dtype)
    raters = select_raters(visual, rated.input_embeds[batch, text0].to(dtype), valid0)  # [B, U]
    text_now, _ = _real_after_image(rated.key_mask, rated.image_end, rated.visual_positions.shape[1])
    count = raters.sum(1)
    width = _widest(count, raters.shape[1])  # on meta: every text token a rater, an upper bound
    rows = torch.gather(text_now, 1, ascending_indices_where(raters, width))  # [B, Q] the raters' sequence indices
    row_valid = torch.arange(width, device=rows.device)[None] < count[:, None]
    probs = rated.attention_rows(rows, score_dtype).mean(1)  # [B, Q, L], mean over heads
    probs = torch.gather(probs, 2, rated.visual_positions[:, None, :].expand(-1, width, -1))  # [B, Q, V]
    return _masked_mean(probs, row_valid[..., None], 1)


@register_pruner("sparsevlm")
class SparseVLM(TokenPruner):
    """SparseVLM v1.5: three in-LLM stages rated by the text tokens' attention, pruned tokens recycled.

    After each rating layer p (reference 2, 6, 15): the raters' attention of layer p scores the
    current visual tokens; the top `min(k_s, V - 1)` stay (sequence order), the top `int(0.3 n) + 1`
    of the n pruned ones are clustered (DPC-kNN) into `int(m / 10) + 1` merged tokens, means of
    layer p's OUTPUT states, placed right after the kept visual tokens and visual from then on;
    positions are renumbered 0..L'-1 (the reference truncates its contiguous position ids).
    Counts per stage: `stage_keeps` (the reference's table, 309 / 204 / 113 visual tokens at 192).

    Args:
        num_tokens: R, the "equivalent" budget (the reference's 64 / 96 / 128 / 192; any 1..N by
            `stage_keeps`' rule). Not the final visual count.
        layers: the three rating layers; the decoder loop acts before p + 1 for each.
        score_dtype: see `TokenPruner`. `model`: raters, attention rows (softmax in float32 cast
            back) and the means in the LLM's dtype, as the reference (fp16); `float32`: all upcast.
            The clustering runs in float64 either way (see `dpc_knn`).
    """

    needs_previous_layer = True  # the rating attention is layer p's, the merged states its output

    def __init__(
        self, num_tokens: int = 192, layers: tuple[int, ...] | list[int] = REFERENCE_LAYERS, score_dtype: ScoreDtype = "model"
    ) -> None:
        if num_tokens is None:
            raise PrunerError("sparsevlm: num_tokens must be an integer budget, got None")
        super().__init__(num_tokens=num_tokens, kept_order="raster", position_ids="contiguous", score_dtype=score_dtype)
        layers = tuple(layers) if isinstance(layers, (list, tuple)) else layers
        if (
            not isinstance(layers, tuple)
            or len(layers) != len(REFERENCE_LAYERS)
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in layers)
            or list(layers) != sorted(set(layers))
        ):
            raise PrunerError(f"sparsevlm: layers must be three increasing layer indices >= 0 (one per stage), got {layers!r}")
        self.layers = layers

    @property
    def prune_layers(self) -> tuple[int, ...]:
        """The loop acts before p + 1: layer p ran on every token, its output is pruned."""
        return tuple(p + 1 for p in self.layers)

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.LLM_ATTENTION})

    def prune_in_llm(self, context: LayerContext) -> LLMSelection:
        """One stage: score, keep, recycle the rest into merged tokens (see the class docstring)."""
        rated = context.previous  # layer p: its input, its modules; `context.hidden` is its output
        keep = stage_keeps(self.num_tokens, context.num_patches)[self.prune_layers.index(context.index)]
        scores = rater_scores(rated, self.score_dtype)  # [B, V]
        b, num_visual = scores.shape
        kept = top_k_indices(scores, kept_count(keep, num_visual))
        is_kept = torch.zeros(b, num_visual, dtype=torch.bool, device=scores.device).scatter_(1, kept, True)
        pruned = ascending_indices_where(~is_kept, num_visual - kept.shape[1])  # [B, n], sequence order
        positions = torch.gather(context.visual_positions, 1, pruned)
        states = torch.gather(context.hidden, 1, positions[..., None].expand(-1, -1, context.hidden.shape[-1]))
        merged, membership = recycle(states, torch.gather(scores, 1, pruned))
        members = torch.zeros(b, merged.shape[1], num_visual, dtype=torch.bool, device=scores.device)
        members.scatter_(2, pruned[:, None, :].expand(-1, merged.shape[1], -1), membership)
        return LLMSelection(kept, positions="contiguous", merged=merged, merged_members=members)

    # The tokens the last layer sees: kept patches, and recycled (merged) tokens drawn over their members.
    group_names = ("kept", "recycled")

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, layers={list(self.layers)}, score_dtype={self.score_dtype}"

    def hparams(self) -> dict:
        return {**super().hparams(), "layers": list(self.layers)}
