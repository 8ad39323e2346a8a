"""FasterVLM: the R patches the [CLS] token attends to most at the select layer, before the projector.

Reference: Theia-4869/FasterVLM @f5d5f12, `llava/model/multimodal_encoder/clip_encoder.py:36-64`
(`attentions[select_layer][:, :, 0, 1:]`, cast to the model's dtype) and `llava/model/llava_arch.py:141-157`
(head mean, `torch.topk`, a boolean index mask) and `:242-246` (the mask keeps the tokens in raster order).
"""

from __future__ import annotations

from torch import Tensor

from litelvlm.pruners.base import KeptOrder, PositionIds, ScoreDtype, Signal, TokenPruner, VisualSignals, top_k_indices
from litelvlm.pruners.registry import register_pruner


def head_mean_cls_attention(attention: Tensor, score_dtype: str) -> Tensor:
    """[B, H, N] CLS attention -> [B, N] mean over heads: in the attention's dtype (`model`, as FasterVLM
    and VisPruner average their fp16 maps) or upcast first (`float32`)."""
    return attention.mean(dim=1) if score_dtype == "model" else attention.float().mean(dim=1)


@register_pruner("fastervlm")
class FasterVLM(TokenPruner):
    """FasterVLM: top R patches by the select layer's CLS attention averaged over heads; raster order.

    Args:
        num_tokens: R, visual tokens kept per image.
        kept_order, position_ids: see `TokenPruner` (the method's own order is raster).
        score_dtype: see `TokenPruner`. `model`: the CLS attention and its head mean in the tower's dtype.
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
        return frozenset({Signal.CLS_ATTENTION})

    def select(self, signals: VisualSignals) -> Tensor:
        """Kept patch indices [B, R], ascending; ties to the lower index."""
        attention = head_mean_cls_attention(signals.require(Signal.CLS_ATTENTION), self.score_dtype)
        return top_k_indices(attention, self.budget(attention.shape[-1])).sort(dim=-1).values
