"""PyramidDrop (CVPR 2025): drop visual tokens in stages inside the LLM, by the last prompt token's attention.

Reference: Cooperx521/PyramidDrop @6444f30 `llava/model/modeling_llama_pdrop.py:1220-1268`
(`LlamaModel.forward`: rank and drop before each layer of `layer_list`) and `:1291-1465`
(`pdrop_rank_drop`). docs/pruners.md, "PyramidDrop".
"""

from __future__ import annotations

from collections.abc import Sequence

from litelvlm.pruners.base import LLMSelection, PrunerError, ScoreDtype, Signal, TokenPruner, top_k_indices
from litelvlm.pruners.registry import register_pruner

OFFICIAL_LAYERS = (8, 16, 24)  # the only released LLaVA-1.5 setting (lambda = 0.5)
OFFICIAL_RATIO = 0.5
BUDGET_LAYERS = (2, 8, 16)  # the maintainer's suggestion for other budgets (PyramidDrop issue 29)


def stage_counts(num_patches: int, ratio: float, stages: int) -> list[int]:
    """Visual tokens kept at each stage: `int(N * ratio**k)`, k = 1..stages (the reference's truncation)."""
    return [int(num_patches * ratio**k) for k in range(1, stages + 1)]


def average_tokens(num_patches: int, layers: Sequence[int], ratio: float, num_layers: int) -> float:
    """Average visual tokens per decoder layer with keep ratios ratio**k from each stage layer on (real-valued)."""
    bounds = [0, *layers, num_layers]
    return sum(num_patches * ratio**k * (bounds[k + 1] - bounds[k]) for k in range(len(bounds) - 1)) / num_layers


def solve_ratio(num_tokens: float, num_patches: int, layers: Sequence[int], num_layers: int) -> float:
    """lambda in [0, 1] whose stages average `num_tokens` visual tokens per layer (bisection; the average
    grows with lambda). For LLaVA-1.5 (N = 576, 32 layers, layers 2/8/16) this is the maintainer's
    `avg = 18 (2 + 6 lambda + 8 lambda^2 + 16 lambda^3)`."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if average_tokens(num_patches, layers, middle, num_layers) < num_tokens:
            low = middle
        else:
            high = middle
    return (low + high) / 2


@register_pruner("pdrop")
class PyramidDrop(TokenPruner):
    """PyramidDrop: before each stage layer b, keep the top `int(N * lambda^k)` visual tokens by the
    attention of the last prompt token at layer b; positions renumbered 0..L'-1.

    At stage k (before layer b = layers[k-1]), as the reference: the hidden states entering layer b
    go through layer b's input norm, q/k projections and RoPE at the current positions; one query
    row (the last real token: the prompt's last token, as FastV here) attends causally over the
    sequence, softmax in float32 cast back, mean over heads; the current visual tokens' scores
    are ranked and the top `int(N * lambda^k)` kept in sequence order (ties: lower index). Only that
    row is computed, so every layer keeps SDPA.

    Two forms:
        `PyramidDrop(layers=[8, 16, 24], ratio=0.5)` (the default): the official LLaVA-1.5 setting,
            576 -> 288 -> 144 -> 72 visual tokens (270 on average over 32 layers).
        `PyramidDrop(num_tokens=R)`: R is the AVERAGE number of visual tokens per decoder layer, reached
            with the maintainer's rule (layers 2/8/16, lambda solved from the average for the model's
            number of layers and patches). Not an official setting of the paper.

    Args:
        num_tokens: the average visual tokens per layer (budgeted form), or None (explicit form).
        layers: the stage layers (explicit form; default the official 8/16/24).
        ratio: lambda (explicit form; default 0.5).
        score_dtype: `model` (the reference's precision) or `float32`.
    """

    def __init__(
        self,
        num_tokens: int | None = None,
        layers: Sequence[int] | None = None,
        ratio: float | None = None,
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order="raster", position_ids="contiguous", score_dtype=score_dtype)
        if num_tokens is not None and (layers is not None or ratio is not None):
            raise PrunerError("pdrop: give either num_tokens (the budgeted form) or layers and ratio, not both")
        layers = list(BUDGET_LAYERS if num_tokens is not None else (OFFICIAL_LAYERS if layers is None else layers))
        if not layers or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in layers):
            raise PrunerError(f"pdrop: layers must be a non-empty list of integers >= 1, got {layers!r}")
        if sorted(set(layers)) != layers:
            raise PrunerError(f"pdrop: layers must be strictly increasing, got {layers!r}")
        if ratio is None:
            ratio = OFFICIAL_RATIO
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise PrunerError(f"pdrop: ratio (lambda) must be in (0, 1], got {ratio!r}")
        self.layers = tuple(layers)
        self.ratio = float(ratio)

    @property
    def prune_layers(self) -> tuple[int, ...]:
        return self.layers

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.LLM_ATTENTION})

    def resolved_ratio(self, num_patches: int, num_layers: int) -> float:
        """lambda: the given one, or (budgeted form) the one whose stages average `num_tokens` per layer."""
        if self.num_tokens is None:
            return self.ratio
        budget = self.budget(num_patches)
        ratio = solve_ratio(budget, num_patches, self.layers, num_layers)
        counts = stage_counts(num_patches, ratio, len(self.layers))
        if counts[-1] < 1:
            lowest = next(r for r in range(1, num_patches + 1) if stage_counts(
                num_patches, solve_ratio(r, num_patches, self.layers, num_layers), len(self.layers))[-1] >= 1)
            raise PrunerError(
                f"pdrop: num_tokens={budget} is too small for stages at layers {list(self.layers)} of a "
                f"{num_layers}-layer LLM with {num_patches} patches (the last stage would keep no token; "
                f"smallest average budget: {lowest})"
            )
        return ratio

    def check_model(self, num_patches: int, num_llm_layers: int | None) -> None:
        """Also: every stage keeps at least one token (the budgeted form's smallest average, or a lambda
        so small that `int(N * lambda^k)` reaches 0)."""
        super().check_model(num_patches, num_llm_layers)
        if num_llm_layers is None:
            return
        counts = self.counts(num_patches, num_llm_layers)
        if counts[-1] < 1:
            raise PrunerError(
                f"pdrop: ratio={self.ratio} keeps int({num_patches} * {self.ratio}^{len(counts)}) = 0 visual tokens "
                f"at its last stage (layer {self.layers[-1]}); stage counts {counts}"
            )

    def counts(self, num_patches: int, num_layers: int) -> list[int]:
        """Visual tokens kept from each stage layer on."""
        return stage_counts(num_patches, self.resolved_ratio(num_patches, num_layers), len(self.layers))

    def prune_in_llm(self, context) -> LLMSelection:
        stage = self.layers.index(context.index)
        keep = self.counts(context.num_patches, context.num_layers)[stage]
        scores = context.last_token_attention(self.score_dtype)  # [B, V] at layer b itself
        if keep > scores.shape[1]:
            raise PrunerError(f"pdrop: stage {stage + 1} keeps {keep} visual tokens but only {scores.shape[1]} remain")
        kept = top_k_indices(scores.float(), keep).sort(dim=-1).values  # the upcast is exact: same ranking
        return LLMSelection(kept, positions="contiguous")

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, layers={list(self.layers)}, ratio={self.ratio}, score_dtype={self.score_dtype}"

    def hparams(self) -> dict:
        return {**super().hparams(), "layers": list(self.layers), "ratio": None if self.num_tokens else self.ratio}
