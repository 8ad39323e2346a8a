"""FastV (ECCV 2024): drop visual tokens inside the LLM by the last token's attention at layer K-1."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from litelvlm.pruners.base import LLMSelection, PrunerError, ScoreDtype, Signal, TokenPruner, top_k_indices
from litelvlm.pruners.registry import register_pruner

FastVMode = Literal["inplace", "mask"]


@register_pruner("fastv")
class FastV(TokenPruner):
    """FastV: layers 0..K-1 see every visual token; layers K.. see the top-R by attention.

    On the in-LLM schedule (one layer, K): the last real token's head-averaged attention over the
    visual positions is computed at layer K-1 (the context's `previous`), `select_in_llm` ranks it,
    and the decoder loop removes (`inplace`) or masks (`mask`) the rest.
    In both modes kept tokens stay in their original order with their original position ids, as
    the reference does, so `kept_order`/`position_ids` are fixed to `raster`/`original`.

    Args:
        num_tokens: R, visual tokens kept from layer K on.
        layer: K >= 1, the first decoder layer that runs on the kept tokens (reference default 2).
        mode: `inplace` drops tokens (the real speed-up); `mask` only masks them out of attention.
        score_dtype: see `TokenPruner`; the model computes the attention row with it. `model`: q.k
            and the head mean in the LLM's dtype, the softmax in float32 cast back, as the reference.
    """

    needs_previous_layer = True  # the attention row is layer K-1's

    def __init__(
        self, num_tokens: int = 192, layer: int = 2, mode: FastVMode = "inplace", score_dtype: ScoreDtype = "model"
    ) -> None:
        super().__init__(num_tokens=num_tokens, kept_order="raster", position_ids="original", score_dtype=score_dtype)
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 1:
            raise PrunerError(f"layer must be an integer >= 1 (FastV needs one full layer's attention), got {layer!r}")
        if mode not in ("inplace", "mask"):
            raise PrunerError(f"mode must be 'inplace' or 'mask', got {mode!r}")
        self.prune_layer = layer
        self.mode = mode

    @property
    def required_signals(self) -> frozenset[Signal]:
        return frozenset({Signal.LLM_ATTENTION})

    @property
    def group_names(self) -> tuple[str, ...]:  # type: ignore[override]  # names the instance's K
        """One group: the visual tokens layers K.. still see."""
        return (f"kept at layer {self.prune_layer}",)

    def select_in_llm(self, attention: Tensor) -> Tensor:
        """Top-R visual positions by `attention` [B, N], returned ascending as [B, R].

        The upcast is exact, so the ranking is the one of `attention`'s own dtype.
        """
        if attention.dim() != 2:
            raise PrunerError(f"FastV expects attention of shape [B, N], got {tuple(attention.shape)}")
        budget = self.budget(attention.shape[-1])
        return top_k_indices(attention.float(), budget, largest=True).sort(dim=-1).values

    def prune_in_llm(self, context) -> LLMSelection:
        """Layer K-1's last-token attention row, ranked by `select_in_llm`; original positions."""
        row = context.previous.last_token_attention(self.score_dtype)
        return LLMSelection(self.select_in_llm(row), positions="original", mode=self.mode)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, layer={self.prune_layer}, mode={self.mode}, score_dtype={self.score_dtype}"

    def hparams(self) -> dict:
        return {**super().hparams(), "layer": self.prune_layer, "mode": self.mode}
