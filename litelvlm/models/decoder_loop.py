"""The LLaMA decoder run one layer at a time, with the in-LLM pruning schedule between layers.

An in-LLM pruner lists the layers it acts before (`TokenPruner.prune_layers`). Before each, the
loop hands it a `LayerContext` (what that layer is about to see, and the tools to score it without
a full attention matrix) and gets back an `LLMSelection` (which visual tokens stay, optional merged
tokens, the position rule). The loop then rebuilds the padded batch's sequence, masks, positions
and bookkeeping (which original patch each visual token is, where the [SEG] prompts went) and runs
the remaining layers on it with their ordinary SDPA attention. docs/pruners.md, "The in-LLM schedule".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from litelvlm.models.batch import IGNORE_INDEX
from litelvlm.pruners.base import LLMSelection, PrunerError, TokenPruner, check_schedule


@dataclass
class LayerContext:
    """What an in-LLM pruner sees before decoder layer `index` (shapes: B samples, L current length,
    V current visual tokens, N patches of the unpruned image, h width).

    `previous` is the context of layer `index - 1` on the same sequence (its `hidden` = that layer's
    input; this context's `hidden` = its output), given when the pruner asked for it
    (`TokenPruner.needs_previous_layer`)."""

    index: int
    layer: nn.Module
    decoder: nn.Module  # the LlamaModel: `norm`, `rotary_emb`, `layers`
    hidden: Tensor  # [B, L, h] entering layer `index`
    position_ids: Tensor  # [B, L] current position ids
    position_embeddings: tuple[Tensor, Tensor]  # RoPE (cos, sin) at the current positions
    key_mask: Tensor  # [B, L] 1 = a real token (0: padding, or masked out)
    visual_positions: Tensor  # [B, V] sequence index of each current visual token, ascending
    visual_ids: Tensor  # [B, V] original patch index of each visual token; -1 for a merged token
    num_patches: int  # N
    input_embeds: Tensor  # [B, L0, h] layer 0's input (the unpruned spliced sequence)
    input_key_mask: Tensor  # [B, L0]
    input_visual_positions: Tensor  # [B, N] where the visual tokens sit in layer 0's input
    previous: LayerContext | None = None
    extras: dict = field(default_factory=dict)  # anything a method keeps between its own stages

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def image_start(self) -> Tensor:
        """[B] sequence index of the first token of the image span."""
        return self.visual_positions[:, 0]

    @property
    def image_end(self) -> Tensor:
        """[B] sequence index just after the image span."""
        return self.visual_positions[:, -1] + 1

    @property
    def last_token(self) -> Tensor:
        """[B] sequence index of each sample's last real token (right padding)."""
        return last_real_token(self.key_mask)

    def text_after_image(self) -> Tensor:
        """bool [B, L]: the real tokens after the image span (the prompt's text after `<image>`)."""
        seq = torch.arange(self.hidden.shape[1], device=self.hidden.device)
        return (seq[None] >= self.image_end[:, None]) & self.key_mask.bool()

    def final_norm(self, hidden: Tensor | None = None) -> Tensor:
        """The decoder's final RMSNorm of `hidden` (default: this layer's input = the previous output)."""
        return self.decoder.norm(self.hidden if hidden is None else hidden)

    def keys(self) -> Tensor:
        """This layer's keys at the current positions, after RoPE: [B, H_kv, L, d]."""
        attn = self.layer.self_attn
        normed = self.layer.input_layernorm(self.hidden)
        b, length = self.hidden.shape[:2]
        key = attn.k_proj(normed).view(b, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = self.position_embeddings
        _, key = apply_rotary_pos_emb(key, key, cos, sin)
        return key

    def queries(self, rows: Tensor) -> Tensor:
        """This layer's queries of the tokens at sequence indices `rows` [B, Q], after RoPE: [B, H, Q, d]."""
        attn = self.layer.self_attn
        batch = torch.arange(rows.shape[0], device=rows.device)[:, None]
        normed = self.layer.input_layernorm(self.hidden[batch, rows])
        query = attn.q_proj(normed).view(rows.shape[0], rows.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = (e[batch, rows] for e in self.position_embeddings)
        query, _ = apply_rotary_pos_emb(query, query, cos, sin)
        return query

    def attention_rows(self, rows: Tensor, score_dtype: str = "float32") -> Tensor:
        """Attention probabilities of this layer for the query tokens `rows` [B, Q]: [B, H, Q, L].

        Causal (a row sees keys up to itself) and padding-masked, as the layer's own attention.
        `model`: scores in the LLM's dtype, softmax in float32 cast back (the references' eager
        LLaMA attention); `float32`: everything upcast. Only these rows are computed.
        """
        query = self.queries(rows)
        key = repeat_kv(self.keys(), self.layer.self_attn.num_key_value_groups)
        seq = torch.arange(key.shape[2], device=key.device)
        allowed = self.key_mask.bool()[:, None, :] & (seq[None, None, :] <= rows[:, :, None])  # [B, Q, L]
        masked = ~allowed[:, None]
        if score_dtype == "model":
            scores = (query @ key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
            return scores.masked_fill(masked, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
        scores = (query.float() @ key.float().transpose(-1, -2)) * self.layer.self_attn.scaling
        return scores.masked_fill(masked, float("-inf")).softmax(-1)

    def last_token_attention(self, score_dtype: str = "float32") -> Tensor:
        """Head-averaged attention of each sample's last real token over the current visual tokens: [B, V]."""
        return last_token_attention(
            self.layer, self.hidden, self.position_embeddings, self.key_mask, self.visual_positions, score_dtype
        )


def last_real_token(key_mask: Tensor) -> Tensor:
    """[B] index of the last 1 of each row of `key_mask` [B, L]."""
    return (key_mask.long() * torch.arange(key_mask.shape[1], device=key_mask.device)).argmax(1)


def last_token_attention(
    layer: nn.Module,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    key_mask: Tensor,
    visual_positions: Tensor,
    score_dtype: str = "float32",
) -> Tensor:
    """Head-averaged attention of each sample's last real token over the visual positions, at `layer`.

    Computed from the layer's own q/k projections for one query row, so the LLM keeps its fast
    attention kernel and no full attention map is materialised. `model`: as FastV's reference
    eager LLaMA attention (q.k / sqrt(head_dim) in the LLM's dtype, softmax in float32 cast back,
    head mean in the LLM's dtype); `float32`: q and k upcast, everything in float32.
    """
    attn = layer.self_attn
    b = hidden.shape[0]
    normed = layer.input_layernorm(hidden)
    last = last_real_token(key_mask)  # [B]
    rows = torch.arange(b, device=hidden.device)
    head_dim = attn.head_dim
    query = attn.q_proj(normed[rows, last][:, None]).view(b, 1, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(b, hidden.shape[1], -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos[rows, last][:, None], sin[rows, last][:, None])
    _, key = apply_rotary_pos_emb(key, key, cos, sin)
    key = repeat_kv(key, attn.num_key_value_groups)
    masked = ~key_mask.bool()[:, None, None, :]
    if score_dtype == "model":
        scores = (query @ key.transpose(-1, -2)) / math.sqrt(head_dim)  # [B, H, 1, L]
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
    else:
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scaling
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
    return torch.gather(probs.mean(1)[:, 0], 1, visual_positions)  # [B, N]


def ascending_indices_where(mask: Tensor, count: int) -> Tensor:
    """Column indices of the True entries of each row of `mask` [B, L], ascending: [B, count].

    Every row must hold exactly `count` Trues. A stable sort rather than `nonzero`, so that the
    output shape does not depend on the values and the code also runs on the meta device.
    """
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :count].contiguous()


def causal_mask(config, hidden: Tensor, key_mask: Tensor):
    """The decoder's causal + padding mask. On meta (FLOP counting) the padding has no values, so
    the mask is the plain causal one: attention costs the same either way."""
    return create_causal_mask(config, hidden, None if hidden.is_meta else key_mask, cache=None)


# ---------------------------------------------------------------------------- applying a selection
def check_selection(selection: LLMSelection, num_visual: int, hidden: Tensor, pruner_name: str) -> None:
    """A selection must be distinct in-range indices, and merged tokens must fit the sequence."""
    if not isinstance(selection, LLMSelection):
        raise PrunerError(f"{pruner_name}: prune_in_llm must return an LLMSelection, got {type(selection).__name__}")
    keep = selection.keep
    if keep.dim() != 2 or keep.dtype not in (torch.int64, torch.int32) or keep.shape[0] != hidden.shape[0]:
        raise PrunerError(f"{pruner_name} must keep a LongTensor [B, R], got {tuple(keep.shape)} {keep.dtype}")
    if selection.positions not in ("contiguous", "original"):
        raise PrunerError(f"{pruner_name}: position rule must be 'contiguous' or 'original', got {selection.positions!r}")
    if selection.mode not in ("inplace", "mask"):
        raise PrunerError(f"unknown in-LLM pruning mode {selection.mode!r} (expected 'inplace' or 'mask')")
    if selection.merged is not None:
        merged = selection.merged
        if merged.dim() != 3 or merged.shape[0] != hidden.shape[0] or merged.shape[2] != hidden.shape[2]:
            raise PrunerError(f"{pruner_name}: merged tokens must be [B, M, {hidden.shape[2]}], got {tuple(merged.shape)}")
        if selection.positions != "contiguous" or selection.mode != "inplace":
            raise PrunerError(f"{pruner_name}: merged tokens need contiguous positions and the inplace mode")
        members = selection.merged_members
        if members is not None and tuple(members.shape) != (merged.shape[0], merged.shape[1], num_visual):
            raise PrunerError(f"{pruner_name}: merged_members must be [B, M, V={num_visual}], got {tuple(members.shape)}")
    if selection.mode == "mask" and selection.positions != "original":
        raise PrunerError(f"{pruner_name}: the mask mode keeps the sequence, so its positions are the original ones")
    if keep.is_meta or not keep.numel():
        return
    if int(keep.min()) < 0 or int(keep.max()) >= num_visual:
        raise PrunerError(f"{pruner_name} kept visual tokens outside [0, {num_visual})")
    ordered = torch.sort(keep, dim=1).values
    if keep.shape[1] > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise PrunerError(f"{pruner_name} kept a visual token twice")


def apply_selection(hidden: Tensor, state: dict, selection: LLMSelection) -> tuple[Tensor, dict]:
    """Rebuild the padded batch after a selection: sequence, masks, positions and bookkeeping.

    `state` holds per-token tensors [B, L] (`key_mask`, `position_ids`, `seg_mask`, `labels` when
    training) and `visual_positions` [B, V]; optionally `visual_ids` [B, V] and `visual_patches`
    [B, V, N] (the patches each visual token stands for, kept once a merge happened).
    `inplace` gathers every per-token tensor, so each kept token keeps its order, its [SEG] prompt
    flag and label; `mask` leaves the sequence as it is and masks the dropped tokens as keys.
    """
    visual_positions = state["visual_positions"]
    b, n_visual = visual_positions.shape
    kept = torch.sort(selection.keep.to(visual_positions.device), dim=1).values
    r = kept.shape[1]
    keep_visual = torch.zeros(b, n_visual, dtype=torch.bool, device=kept.device).scatter_(1, kept, True)
    dropped = ascending_indices_where(~keep_visual, n_visual - r)
    dropped_positions = torch.gather(visual_positions, 1, dropped)
    kept_positions = torch.gather(visual_positions, 1, kept)
    state = dict(state)
    m = 0 if selection.merged is None else selection.merged.shape[1]
    before_ids = state.get("visual_ids")
    if m and "visual_patches" not in state and before_ids is not None:  # first merge: one patch per real token
        n = state["num_patches"]
        one_hot = torch.zeros(b, n_visual, n, dtype=torch.bool, device=kept.device)
        state["visual_patches"] = one_hot.scatter_(2, before_ids.clamp(min=0)[..., None], True)
    before_patches = state.get("visual_patches")
    if before_ids is not None:
        state["visual_ids"] = torch.gather(before_ids, 1, kept)
    if before_patches is not None:
        state["visual_patches"] = torch.gather(before_patches, 1, kept[..., None].expand(-1, -1, before_patches.shape[2]))
    if selection.mode == "mask":
        state["key_mask"] = state["key_mask"].clone().scatter_(1, dropped_positions, 0)
        state["visual_positions"] = kept_positions
        return hidden, state
    keep = torch.ones_like(state["key_mask"], dtype=torch.bool).scatter_(1, dropped_positions, False)
    order = ascending_indices_where(keep, keep.shape[1] - dropped_positions.shape[1])  # [B, L - (V - R)]
    new_visual = torch.searchsorted(order, kept_positions)  # where the kept visual tokens now sit
    length = order.shape[1] + m
    device = hidden.device
    seq = torch.arange(length, device=device).expand(b, length)
    # Merged tokens go right after the last kept visual token (or where the image span began).
    insert_at = (new_visual[:, -1] + 1) if r else torch.searchsorted(order, visual_positions[:, :1].contiguous())[:, 0]
    offset = seq - insert_at[:, None]
    is_merged = (offset >= 0) & (offset < m)
    source = torch.where(offset < 0, seq, seq - m).clamp(0, order.shape[1] - 1)
    source = torch.gather(order, 1, source)  # old sequence index of every non-merged slot
    hidden = torch.gather(hidden, 1, source[..., None].expand(-1, -1, hidden.shape[-1]))
    for name in ("key_mask", "position_ids", "seg_mask", "labels"):  # labels: training only
        if name in state:
            state[name] = torch.gather(state[name], 1, source)
    if m:
        merged = torch.gather(selection.merged.to(hidden.dtype), 1, offset.clamp(0, m - 1)[..., None].expand_as(hidden))
        hidden = torch.where(is_merged[..., None], merged, hidden)
        state["key_mask"] = torch.where(is_merged, torch.ones_like(state["key_mask"]), state["key_mask"])
        state["seg_mask"] = state["seg_mask"] & ~is_merged
        if "labels" in state:
            state["labels"] = state["labels"].masked_fill(is_merged, IGNORE_INDEX)
        if before_ids is not None:
            state["visual_ids"] = torch.cat([state["visual_ids"], before_ids.new_full((b, m), -1)], 1)
        if before_patches is not None:
            members = selection.merged_members
            if members is None:
                new_patches = before_patches.new_zeros(b, m, before_patches.shape[2])
            else:  # a merged token stands for the patches of every token it summarises
                new_patches = (members.to(device).float() @ before_patches.float()) > 0
            state["visual_patches"] = torch.cat([state["visual_patches"], new_patches], 1)
        new_visual = torch.cat([new_visual, insert_at[:, None] + torch.arange(m, device=device)], 1)
    if selection.positions == "contiguous":
        state["position_ids"] = seq.clone()
    state["visual_positions"] = new_visual
    return hidden, state


# ---------------------------------------------------------------------------- the loop
def run_decoder(
    decoder: nn.Module, inputs: dict[str, Tensor], pruner: TokenPruner, num_patches: int, activation_checkpointing: bool = False
) -> tuple[Tensor, dict]:
    """The LLaMA decoder (`LlamaModel`), one layer at a time, with the pruner's in-LLM schedule.

    Returns the final-normed hidden states and a trace: `seg_mask` (where the [SEG] prompts are in
    the final sequence), `visual_counts` / `lengths` (visual tokens and padded length each layer ran
    on), `llm_kept` ([B, V] the original patch index of each visual token the last layer saw, in
    sequence order: the kept patches ascending, then -1 for each merged token; None without an
    in-LLM pruner), `llm_visual_patches` ([B, V, N] bool: the patches each of those tokens stands
    for, only once a merge happened, else None) and `labels` (training).
    """
    layers = decoder.layers
    schedule = sorted(set(pruner.prune_layers)) if pruner.acts_in_llm else []
    check_schedule(pruner, len(layers))
    state = dict(inputs)
    hidden = state.pop("embeds")
    b, n_visual = state["visual_positions"].shape
    state["visual_ids"] = torch.arange(n_visual, device=hidden.device).expand(b, n_visual)
    state["num_patches"] = num_patches
    input_embeds, input_key_mask, input_visual = hidden, state["key_mask"], state["visual_positions"]
    attention_mask = causal_mask(decoder.config, hidden, state["key_mask"])
    position_embeddings = decoder.rotary_emb(hidden, position_ids=state["position_ids"])
    keep_previous = getattr(pruner, "needs_previous_layer", False)
    previous = None
    visual_counts, lengths = [], []
    for index, layer in enumerate(layers):
        context = None
        if index in schedule or (keep_previous and index + 1 in schedule):
            context = LayerContext(
                index=index, layer=layer, decoder=decoder, hidden=hidden, position_ids=state["position_ids"],
                position_embeddings=position_embeddings, key_mask=state["key_mask"],
                visual_positions=state["visual_positions"], visual_ids=state["visual_ids"], num_patches=num_patches,
                input_embeds=input_embeds, input_key_mask=input_key_mask, input_visual_positions=input_visual,
                previous=previous if keep_previous else None,
            )
        if index in schedule:
            selection = pruner.prune_in_llm(context)
            check_selection(selection, state["visual_positions"].shape[1], hidden, pruner.name)
            hidden, state = apply_selection(hidden, state, selection)
            attention_mask = causal_mask(decoder.config, hidden, state["key_mask"])
            position_embeddings = decoder.rotary_emb(hidden, position_ids=state["position_ids"])
            if keep_previous and index + 1 in schedule:  # the next step reads this layer as it runs: rebuilt
                context = replace(
                    context, hidden=hidden, position_ids=state["position_ids"], position_embeddings=position_embeddings,
                    key_mask=state["key_mask"], visual_positions=state["visual_positions"], visual_ids=state["visual_ids"],
                )
        previous = context
        visual_counts.append(state["visual_positions"].shape[1])
        lengths.append(hidden.shape[1])
        run_layer = layer
        # By hand: transformers' gradient checkpointing acts only on layers in train mode; these stay in eval.
        if activation_checkpointing and torch.is_grad_enabled():  # fine-tuning: recompute in backward
            run_layer = functools.partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False)
        hidden = run_layer(
            hidden,
            attention_mask=attention_mask,
            position_ids=state["position_ids"],
            position_embeddings=position_embeddings,
        )
    hidden = decoder.norm(hidden)
    return hidden, {
        "seg_mask": state["seg_mask"], "visual_counts": visual_counts, "lengths": lengths,
        "llm_kept": state["visual_ids"] if schedule else None, "llm_visual_patches": state.get("visual_patches"),
        "labels": state.get("labels"),
    }
