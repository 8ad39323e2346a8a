"""The pre-LLM pruning hooks, in the order the forward meets them: the signals a pruner declared, its
reduction (kept patches, or new tokens merged before the projector), the projection of those tokens,
and their splice into the prompt in place of the image sentinel.

`PixelGroundingLVLM.ground` calls these in turn; the CLIP pass itself is `vision_signals.py` and the
decoder loop after the splice is not here. The interface is described in docs/pruners.md ("The
merged-token interface").
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from litelvlm.errors import LitelvlmError
from litelvlm.models.batch import IGNORE_INDEX, GroundingBatch
from litelvlm.models.vision_signals import (
    VisionPass,
    cls_attention,
    cls_attention_head_sum,
    head_mean_keys,
    project_patches,
    project_to_llm,
)
from litelvlm.pruners.base import PrunerError, Signal, TokenPruner, VisualReduction, VisualSignals, check_groups

IMAGE_TOKEN_INDEX = -200


def derive_signals(
    model, captured: VisionPass, patch_features: Tensor, wanted: frozenset[Signal], score_dtype: str
) -> VisualSignals:
    """The signals in `wanted` from one CLIP pass (`patch_features`: its select-layer patches, one tensor
    shared by every score dtype), those derived from it in `score_dtype`."""
    heads = model.config.vision.num_heads
    signals = VisualSignals(
        grid=model.config.grid, num_patches=model.num_patches, batch_size=patch_features.shape[0], score_dtype=score_dtype
    )
    if Signal.LAST_QKV in wanted:
        signals.last_qkv = captured.last_qkv
    if wanted & {Signal.CLS_ATTENTION, Signal.CLS_ATTENTION_SUM}:
        attention = cls_attention(*captured.select_qk, heads, score_dtype)
        if Signal.CLS_ATTENTION in wanted:
            signals.cls_attention = attention
        if Signal.CLS_ATTENTION_SUM in wanted:
            signals.cls_attention_sum = cls_attention_head_sum(attention)
    if Signal.SELECT_KEYS in wanted:
        signals.select_keys = head_mean_keys(captured.select_qk[1], heads, score_dtype)
    if Signal.CLS_FEATURES in wanted:
        signals.cls_features = captured.features_with_cls[:, 0]
    if Signal.PATCH_FEATURES in wanted:
        signals.patch_features = patch_features
    if Signal.PATCH_EMBEDS in wanted:
        signals.patch_embeds = project_patches(model.vision_tower, patch_features, score_dtype)
    if Signal.PROJECTED_FEATURES in wanted:
        model._require_grounding_parts("the projected_features signal")
        llm_dtype = model.llm.get_input_embeddings().weight.dtype
        signals.projected_features = project_to_llm(model.mm_projector, patch_features, llm_dtype, score_dtype)
    return signals


def text_key(pruner: TokenPruner) -> tuple[str, str, str]:
    """Which text embeddings a pruner reads: (text source, pooling, overflow); pruners without the knobs get the reference's."""
    return (
        getattr(pruner, "text_source", "question"),
        getattr(pruner, "text_pooling", "eos"),
        getattr(pruner, "text_overflow", "truncate"),
    )


def signals_for(shared, pruner: TokenPruner) -> VisualSignals:
    """The batch's shared signals in the pruner's score dtype, with the text embeddings it reads."""
    signals = shared.signals_by_score_dtype[pruner.score_dtype]
    key = text_key(pruner)
    if key in shared.text_embeds:
        signals = replace(signals)
        signals.text_embeds, signals.text_mask = shared.text_embeds[key]
    return signals


def reduce_visual_tokens(pruner: TokenPruner, signals: VisualSignals, device: torch.device) -> VisualReduction:
    """The pruner's reduction, checked, on `device`, in the order the LLM gets it (`kept_order`)."""
    reduction = pruner.reduce(signals)
    if not isinstance(reduction, VisualReduction):
        raise PrunerError(f"{pruner.name}.reduce must return a VisualReduction, got {type(reduction).__name__}")
    reduction = reduction.to(device)
    tokens = reduction.features if reduction.merged else reduction.kept
    if tokens is None:
        raise PrunerError(f"{pruner.name}.reduce returned neither kept indices nor merged features")
    check_groups(reduction.groups, tokens, pruner)
    b, r = tokens.shape[:2]
    if reduction.members.shape != (b, r, signals.num_patches) or reduction.members.dtype != torch.bool:
        raise PrunerError(
            f"{pruner.name} must say which patches each token stands for as a bool tensor "
            f"{(b, r, signals.num_patches)}, got {tuple(reduction.members.shape)} {reduction.members.dtype}"
        )
    if pruner.kept_order == "raster":
        if reduction.merged:
            raise PrunerError(f"{pruner.name} builds new tokens, which have no raster order: use kept_order='reference'")
        kept, order = torch.sort(reduction.kept, dim=1)
        reduction = VisualReduction(  # each token keeps its group and members
            groups=torch.gather(reduction.groups, 1, order),
            members=torch.gather(reduction.members, 1, order[..., None].expand_as(reduction.members)),
            kept=kept,
        )
    return reduction


def project_visual_tokens(projector: nn.Module, patch_features: Tensor, reduction: VisualReduction | None) -> Tensor:
    """The LLM-width embeddings of the visual tokens [B, R, h]: the projector on the kept patches' features,
    on the merged tokens, or (no reduction: an in-LLM pruner) on every patch in order."""
    if reduction is None:
        selected = patch_features
    elif reduction.merged:
        selected = reduction.features.to(patch_features.dtype)
    else:
        kept = reduction.kept
        selected = torch.gather(patch_features, 1, kept[..., None].expand(-1, -1, patch_features.shape[-1]))
    return projector(selected)


def splice_visual_tokens(
    model, batch: GroundingBatch, visual_embeds: Tensor, kept: Tensor | None, position_mode: str
) -> dict[str, Tensor]:
    """Replace each prompt's image sentinel with its R visual embeddings.

    Returns the decoder inputs: embeddings [B, L-1+R, h], key mask, position ids (contiguous,
    or `original`: the positions the tokens had in the unpruned sequence, which needs each token to
    be one patch, `kept`), the mask of the positions whose final state prompts SAM, and the sequence
    index of every visual token.
    """
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    b, length = input_ids.shape
    r = visual_embeds.shape[1]
    n = model.num_patches
    is_image = input_ids == IMAGE_TOKEN_INDEX
    # Meta tensors (FLOP counting of the full-size architecture) hold no values to check.
    if not input_ids.is_meta and not bool((is_image.sum(1) == 1).all()):
        raise LitelvlmError("every prompt must contain the image placeholder exactly once")
    if position_mode == "original" and kept is None:
        raise PrunerError("position_ids='original' gives each visual token its patch's position, but these tokens "
                          "are merged (no single patch each): use position_ids='contiguous'")
    image_pos = is_image.int().argmax(1)  # [B]
    text_embeds = model.llm.get_input_embeddings()(input_ids.clamp(min=0))
    prompt_positions = model._seg_prompt_positions(input_ids)

    device = input_ids.device
    new_len = length - 1 + r
    seq = torch.arange(new_len, device=device).expand(b, new_len)
    offset = seq - image_pos[:, None]  # position relative to the first visual token
    in_image = (offset >= 0) & (offset < r)
    # index of each new position's source token in the old sequence (visual slots point at the sentinel)
    source = torch.where(offset < 0, seq, torch.where(in_image, image_pos[:, None], seq - r + 1))
    embeds = torch.gather(text_embeds, 1, source[..., None].expand(-1, -1, text_embeds.shape[-1]))
    visual_index = offset.clamp(0, r - 1)
    visual_embeds = visual_embeds.to(embeds.dtype)
    spliced_visual = torch.gather(visual_embeds, 1, visual_index[..., None].expand(-1, -1, embeds.shape[-1]))
    # A select, not a boolean-mask assignment: same values, and shapes that do not depend on data (meta).
    embeds = torch.where(in_image[..., None], spliced_visual, embeds)
    key_mask = torch.gather(attention_mask, 1, source)
    seg_mask = torch.gather(prompt_positions, 1, source) & ~in_image
    if position_mode == "contiguous":
        position_ids = seq.clone()
    else:
        kept_patch = torch.gather(kept.to(device), 1, visual_index)
        position_ids = torch.where(
            offset < 0, seq, torch.where(in_image, image_pos[:, None] + kept_patch, seq - r + n)
        )
    visual_positions = image_pos[:, None] + torch.arange(r, device=device)
    inputs = {
        "embeds": embeds,
        "key_mask": key_mask,
        "position_ids": position_ids,
        "seg_mask": seg_mask,
        "visual_positions": visual_positions,
    }
    labels = getattr(batch, "labels", None)  # training batches only
    if labels is not None:  # the R visual slots take the sentinel's place, never predicted
        labels = torch.gather(labels.to(device), 1, source)
        inputs["labels"] = labels.masked_fill(in_image, IGNORE_INDEX)
    return inputs
