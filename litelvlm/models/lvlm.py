"""The frozen pixel-grounding LVLM (GLaMM / LISA architecture), composed from transformers parts.

Read top to bottom, `forward` is the whole model:
CLIP vision (+ only the signals the pruner declared) -> pruner.reduce (kept patches or merged
tokens) -> projector -> splice into the prompt -> decoder loop (an in-LLM pruner may shorten the
sequence) -> final norm -> states just before each [SEG] -> [SEG] projection -> SAM prompt encoder
+ mask decoder -> masks at image size.
The pre-LLM hooks (signals, reduction, projection, splice) are in `models/visual_reduction.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    SamConfig,
    SamMaskDecoderConfig,
    SamModel,
    SamPromptEncoderConfig,
    SamVisionConfig,
)

from litelvlm.errors import LitelvlmError
from litelvlm.models import decoder_loop, visual_reduction
from litelvlm.models.batch import GroundingBatch, GroundingOutput
from litelvlm.models.config import LVLMConfig
from litelvlm.models.tokenizer import TEXT_OVERFLOWS, tokenize_questions
from litelvlm.models.vision_signals import run_vision_layers
from litelvlm.models.visual_reduction import IMAGE_TOKEN_INDEX, text_key  # noqa: F401 (IMAGE_TOKEN_INDEX: imported from here)
from litelvlm.pruners.base import PrunerError, Signal, TokenPruner, VisualSignals


def clip_vision_config(config: LVLMConfig) -> CLIPVisionConfig:
    v = config.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        projection_dim=v.projection_dim,
        hidden_act="quick_gelu",
    )


def clip_text_config(config: LVLMConfig, bos_id: int, eos_id: int, pad_id: int) -> CLIPTextConfig:
    t = config.text
    return CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_length,
        projection_dim=config.vision.projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def llama_config(config: LVLMConfig) -> LlamaConfig:
    m = config.llm
    llama = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads,
        rms_norm_eps=m.rms_norm_eps,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta,
        tie_word_embeddings=False,
    )
    llama._attn_implementation = "sdpa"
    return llama


def sam_config(config: LVLMConfig) -> SamConfig:
    s = config.sam
    vision = SamVisionConfig(
        hidden_size=s.hidden_size,
        output_channels=s.prompt_dim,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        window_size=s.window_size,
        global_attn_indexes=list(s.global_attn_indexes),
        mlp_dim=s.mlp_dim,
        num_pos_feats=s.prompt_dim // 2,
        # transformers' SamVisionConfig default (1e-10) leaves random-weight presets with an image
        # encoder whose output is ~0: masks that ignore the image. Released weights overwrite it.
        initializer_range=0.02,
    )
    prompt = SamPromptEncoderConfig(hidden_size=s.prompt_dim, image_size=s.image_size, patch_size=s.patch_size)
    decoder = SamMaskDecoderConfig(
        hidden_size=s.prompt_dim,
        mlp_dim=s.mask_decoder_mlp_dim,
        num_hidden_layers=s.mask_decoder_layers,
        num_attention_heads=s.mask_decoder_heads,
        iou_head_hidden_dim=s.iou_head_hidden_dim,
        layer_norm_eps=1e-5,  # segment-anything's two-way transformer uses nn.LayerNorm's default
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise LitelvlmError(f"unknown projector '{kind}' (expected 'linear' or 'mlp2x_gelu')")


class PixelGroundingLVLM(nn.Module):
    """CLIP + MLP projector + LLaMA + [SEG] projection + SAM, frozen, with pruning hooks.

    Args:
        config: the architecture.
        seg_token_id: id of [SEG] in the LLM tokenizer (read from the tokenizer files, never fixed).
        clip_text_ids: (bos, eos, pad) of the CLIP text tokenizer; None builds no text tower.
        seg_prompt_position: `before` (the references: the state of the token just before each
            [SEG] prompts SAM) or `at` (research option: the [SEG] token's own state).
        encoders_only: build the CLIP towers alone (studies that read only CLIP): `mm_projector`,
            `llm`, `text_hidden_fcs` and `sam` are None, and grounding raises. The towers are
            built first either way, so a seeded build gives them the same weights.
    """

    def __init__(
        self,
        config: LVLMConfig,
        seg_token_id: int,
        clip_text_ids: tuple[int, int, int] | None = None,
        seg_prompt_position: str = "before",
        encoders_only: bool = False,
    ) -> None:
        super().__init__()
        if seg_prompt_position not in ("before", "at"):
            raise LitelvlmError(f"seg_prompt_position must be 'before' or 'at', got {seg_prompt_position!r}")
        self.config = config
        self.seg_token_id = seg_token_id
        self.seg_prompt_position = seg_prompt_position
        self.encoders_only = encoders_only
        # CLIP first: the rest draws from the random stream after it, so leaving it out changes no CLIP weight.
        self.vision_tower = CLIPVisionModelWithProjection(clip_vision_config(config))
        self.text_tower = (
            CLIPTextModelWithProjection(clip_text_config(config, *clip_text_ids)) if clip_text_ids else None
        )
        self.mm_projector = self.llm = self.text_hidden_fcs = self.sam = None
        if not encoders_only:
            self.mm_projector = build_projector(config.projector, config.vision.hidden_size, config.llm.hidden_size)
            self.llm = LlamaForCausalLM(llama_config(config))
            h = config.llm.hidden_size
            self.text_hidden_fcs = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, config.sam.prompt_dim))
            self.sam = SamModel(sam_config(config))
        self.clip_tokenizer = None  # set by the loader; tokenises questions for the text tower
        self.stage_observer = None  # callable(stage name) -> context manager; see `stage`
        # Recompute each decoder layer in backward instead of keeping its activations (fine-tuning only).
        self.activation_checkpointing = False

    # ------------------------------------------------------------------ vision
    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def _require_grounding_parts(self, what: str) -> None:
        """An encoders-only build has no LLM, projector, [SEG] projection or SAM: say so, not AttributeError."""
        if self.encoders_only:
            raise LitelvlmError(
                f"built encoders-only: {what} needs the projector, LLM, [SEG] projection and SAM, which are not "
                "available (build the model without encoders_only)"
            )

    def encode_image(
        self, pixel_values: Tensor, needs: frozenset[Signal], score_dtype: str = "float32"
    ) -> tuple[Tensor, VisualSignals]:
        """Run the CLIP vision tower as far as needed; return patch features and the asked-for signals,
        `patch_embeds` and `cls_attention` derived in `score_dtype` (`model` or `float32`).

        Where each signal comes from, for every `select_layer`: `litelvlm/models/vision_signals.py`.
        """
        patch_features, views = self.encode_image_views(pixel_values, {score_dtype: frozenset(needs)})
        return patch_features, views[score_dtype]

    def encode_image_views(
        self, pixel_values: Tensor, needs_by_score_dtype: dict[str, frozenset[Signal]]
    ) -> tuple[Tensor, dict[str, VisualSignals]]:
        """One CLIP pass for pruners of several score dtypes: per score dtype, the signals its pruners
        declared, the derived ones in that precision (the CLIP tensors themselves are shared)."""
        needs = frozenset().union(*needs_by_score_dtype.values())
        vision = self.vision_tower.vision_model
        captured = run_vision_layers(vision, pixel_values.to(self.vision_tower.dtype), self.config.select_layer, needs)
        patch_features = captured.features_with_cls[:, 1:]
        views = {
            score_dtype: visual_reduction.derive_signals(self, captured, patch_features, wanted, score_dtype)
            for score_dtype, wanted in needs_by_score_dtype.items()
        }
        return patch_features, views

    def encode_text(self, texts: list[list[str]], pooling: str = "eos", overflow: str = "truncate") -> tuple[Tensor, Tensor]:
        """Projected CLIP text embeddings [B, T, P] (float32) and the real-slot mask [B, T].

        `pooling`: `eos` (the reference: the text tower's pooled, projected state; the [EOS] state)
        or `mean` (the mean of the content tokens' final states, [SOS] and [EOS] left out, through
        the same final layer norm and projection: the text attention-sink ablation, docs/pruners.md).
        `overflow`: a text longer than CLIP's window is `truncate`d or cut into `chunk`s, each chunk
        a slot of its own (`tokenize_questions`); a chunk without [EOS] gets the tower's own
        pooling, as the reference feeds it (docs/pruners.md, "Queries longer than CLIP's window").
        """
        if pooling not in ("eos", "mean"):
            raise PrunerError(f"text_pooling must be 'eos' or 'mean', got {pooling!r}")
        if overflow not in TEXT_OVERFLOWS:
            raise PrunerError(f"text_overflow must be 'truncate' or 'chunk', got {overflow!r}")
        if self.text_tower is None or self.clip_tokenizer is None:
            raise PrunerError("this pruner needs CLIP text embeddings, but the model has no CLIP text tower")
        device = self.text_tower.device
        input_ids, attention_mask, text_mask = tokenize_questions(
            self.clip_tokenizer, texts, max_length=self.config.text.max_length, overflow=overflow
        )
        b, t, length = input_ids.shape
        # On meta (FLOP counting) a padding mask has no values to read; attention costs the same without it.
        key_mask = None if device.type == "meta" else attention_mask.view(b * t, length).to(device)
        out = self.text_tower(
            input_ids=input_ids.view(b * t, length).to(device),
            attention_mask=key_mask,
            output_hidden_states=pooling == "mean",
        )
        if pooling == "eos":
            return out.text_embeds.float().view(b, t, -1), text_mask.to(device)
        ids = input_ids.view(b * t, length).to(device)
        real = attention_mask.view(b * t, length).to(device).bool()
        special = (ids == self.clip_tokenizer.bos_token_id) | (ids == self.clip_tokenizer.eos_token_id)
        content = real & ~special
        last_real = real.long().sum(1) - 1
        empty = ~content.any(1)  # no content token (empty text, a chunk of [EOS] alone): its last real token
        content[empty, last_real[empty]] = True
        final_states = out.hidden_states[-1]  # the encoder's output, before the final layer norm
        weights = content.to(final_states.dtype)[..., None]
        mean_state = (final_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        text_model = self.text_tower.text_model
        pooled = self.text_tower.text_projection(text_model.final_layer_norm(mean_state))
        return pooled.float().view(b, t, -1), text_mask.to(device)

    # ------------------------------------------------------------------ prompt
    def splice_visual_tokens(
        self, batch: GroundingBatch, visual_embeds: Tensor, kept: Tensor | None, position_mode: str
    ) -> dict[str, Tensor]:
        """Replace each prompt's image sentinel with its R visual embeddings: `visual_reduction.splice_visual_tokens`."""
        self._require_grounding_parts("splice_visual_tokens")
        return visual_reduction.splice_visual_tokens(self, batch, visual_embeds, kept, position_mode)

    def _seg_prompt_positions(self, input_ids: Tensor) -> Tensor:
        """Positions whose final hidden state prompts SAM: just before each [SEG] (the references)."""
        is_seg = input_ids == self.seg_token_id
        if self.seg_prompt_position == "at":
            return is_seg
        before = torch.zeros_like(is_seg)
        before[:, :-1] = is_seg[:, 1:]
        return before

    # ------------------------------------------------------------------ decoder
    def run_decoder(self, inputs: dict[str, Tensor], pruner: TokenPruner) -> tuple[Tensor, dict]:
        """The LLaMA decoder with the pruner's in-LLM schedule: `litelvlm/models/decoder_loop.py`."""
        self._require_grounding_parts("run_decoder")
        return decoder_loop.run_decoder(
            self.llm.model, inputs, pruner, self.num_patches, activation_checkpointing=self.activation_checkpointing
        )

    @staticmethod
    def _drop_visual_tokens(hidden: Tensor, state: dict, kept: Tensor, mode: str) -> tuple[Tensor, dict]:
        """FastV's selection applied by the schedule: `inplace` removes, `mask` hides; original positions."""
        return decoder_loop.apply_selection(hidden, state, decoder_loop.LLMSelection(kept, "original", mode=mode))

    _last_token_attention = staticmethod(decoder_loop.last_token_attention)

    # ------------------------------------------------------------------ SAM
    def encode_sam_image(self, sam_pixel_values: Tensor) -> Tensor:
        """SAM's image embeddings [B, C, h, w]: once per image, whatever the prompts."""
        self._require_grounding_parts("encode_sam_image")
        return self.sam.vision_encoder(sam_pixel_values.to(self.sam.dtype))[0]

    def decode_masks(self, batch: GroundingBatch, image_embeddings: Tensor, seg_embeddings: list[Tensor]) -> list[Tensor]:
        """SAM prompted by each [SEG] embedding (sparse) and no-mask (dense), one mask per prompt."""
        self._require_grounding_parts("decode_masks")
        sam = self.sam
        positional = sam.get_image_wide_positional_embeddings()
        _, channels, height, width = image_embeddings.shape
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)
        size = self.config.sam.image_size
        masks = []
        for index, prompts in enumerate(seg_embeddings):
            low_res, _ = sam.mask_decoder(
                image_embeddings=image_embeddings[index : index + 1],
                image_positional_embeddings=positional,
                sparse_prompt_embeddings=prompts.to(sam.dtype)[None, :, None, :],
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            resized_h, resized_w = (int(v) for v in batch.sam_resized_sizes[index])
            original_h, original_w = (int(v) for v in batch.original_sizes[index])
            logits = F.interpolate(low_res[0].float(), (size, size), mode="bilinear", align_corners=False)
            logits = logits[..., :resized_h, :resized_w]
            logits = F.interpolate(logits, (original_h, original_w), mode="bilinear", align_corners=False)
            masks.append(logits[:, 0])
        return masks

    # ------------------------------------------------------------------ forward
    def stage(self, name: str):
        """Context around one stage of the forward, for an observer such as the efficiency profiler.

        Stages: clip_vision, clip_text, pruner_select, llm_prefill, sam_image_encoder, sam_decoder;
        `llm_decoder` (the decoder layers alone) is nested inside llm_prefill. Without an observer
        this is a no-op.
        """
        return self.stage_observer(name) if self.stage_observer is not None else contextlib.nullcontext()

    def encode(
        self,
        batch: GroundingBatch,
        pruners: Sequence[TokenPruner],
        *,
        extra_signals: frozenset[Signal] = frozenset(),
        extra_text_keys: Sequence[tuple[str, str, str]] = (),
        for_grounding: bool = True,
    ) -> SharedEncodings:
        """The pruner-independent part of the forward, computed once for any number of pruners.

        Only the signals some pruner declared are computed (text embeddings once per (source,
        pooling, overflow)). `extra_signals` / `extra_text_keys` add what other readers of the
        encodings (the studies) need, in the same passes. `for_grounding=False` (an encoders-only
        run, no `ground` to follow) runs only the CLIP passes asked for: no SAM image encoder, and
        no vision tower when no vision signal is asked for.
        """
        if for_grounding:
            self._require_grounding_parts("encode(for_grounding=True)")
        # Per score dtype, what its readers need: the pruners' own, and the studies' in float32.
        needs_by_score_dtype: dict[str, set[Signal]] = {"float32": set(extra_signals)} if extra_signals or not pruners else {}
        for pruner in pruners:
            needs_by_score_dtype.setdefault(pruner.score_dtype, set()).update(pruner.required_signals)
        needs = frozenset().union(*needs_by_score_dtype.values())
        pruner_text_keys = [text_key(p) for p in pruners if Signal.TEXT_EMBEDS in p.required_signals]
        text_keys = dict.fromkeys(pruner_text_keys + [tuple(key) for key in extra_text_keys])  # each once, in order
        batch_size = batch.clip_pixel_values.shape[0]
        patch_features = None
        views = {
            score_dtype: VisualSignals(
                grid=self.config.grid, num_patches=self.num_patches, batch_size=batch_size, score_dtype=score_dtype
            )
            for score_dtype in needs_by_score_dtype
        }
        if for_grounding or needs - {Signal.TEXT_EMBEDS}:
            with self.stage("clip_vision"):
                patch_features, views = self.encode_image_views(
                    batch.clip_pixel_values, {key: frozenset(value) for key, value in needs_by_score_dtype.items()}
                )
        for signals in views.values():
            signals.sample_ids = batch.sample_ids
        text_embeds = {}
        for source, pooling, overflow in text_keys:
            if source not in ("question", "expression"):
                raise PrunerError(f"text source must be 'question' or 'expression', got {source!r}")
            texts = batch.expressions if source == "expression" else batch.questions
            with self.stage("clip_text"):
                text_embeds[(source, pooling, overflow)] = self.encode_text(texts, pooling, overflow)
        sam_image_embeddings = None
        if for_grounding:
            with self.stage("sam_image_encoder"):
                sam_image_embeddings = self.encode_sam_image(batch.sam_pixel_values)
        return SharedEncodings(patch_features, views, text_embeds, sam_image_embeddings)

    def ground(self, batch: GroundingBatch, shared: SharedEncodings, pruner: TokenPruner) -> GroundingOutput:
        """The pruner-dependent part: select, project, splice, decode, prompt SAM."""
        self._require_grounding_parts("ground")
        patch_features = shared.patch_features
        reduction = None  # an in-LLM pruner: the LLM gets every patch, in order, and selects inside
        with self.stage("pruner_select"):
            if not pruner.acts_in_llm:
                signals = visual_reduction.signals_for(shared, pruner)
                reduction = visual_reduction.reduce_visual_tokens(pruner, signals, patch_features.device)
        with self.stage("llm_prefill"):
            visual_embeds = visual_reduction.project_visual_tokens(self.mm_projector, patch_features, reduction)
            kept = _all_patches(patch_features) if reduction is None else reduction.kept
            inputs = self.splice_visual_tokens(batch, visual_embeds, kept, pruner.position_ids)
            with self.stage("llm_decoder"):  # nested: the decoder layers alone, without the projector
                hidden, trace = self.run_decoder(inputs, pruner)
        with self.stage("sam_decoder"):
            seg_mask = trace["seg_mask"]
            expected = [m.shape[0] for m in batch.gt_masks]
            if seg_mask.is_meta:  # shape-only run (FLOP counting): one [SEG] state per mask, values unknown
                counts = expected
                seg_states = hidden.new_empty(sum(counts), hidden.shape[-1])
            else:
                seg_states = hidden[seg_mask]  # row-major: sample by sample, in prompt order
                counts = seg_mask.sum(1).tolist()
            if counts != expected:
                raise LitelvlmError(f"prompts hold {counts} [SEG] tokens per sample but the batch has {expected} masks")
            seg_embeddings = self.text_hidden_fcs(seg_states).split(counts)
            mask_logits = self.decode_masks(batch, shared.sam_image_embeddings, list(seg_embeddings))
        llm_kept_indices = groups = None  # an in-LLM pruner's groups are set once the LLM has selected
        if trace["llm_kept"] is not None:  # an in-LLM pruner was fed all N patches in order: positions = indices
            llm_kept_indices = trace["llm_kept"]
            # One group, or for a pruner that names two (SparseVLM: kept, recycled) the merged tokens (id -1) in the second.
            merged = llm_kept_indices < 0
            groups = merged.long() if len(pruner.group_names) > 1 else torch.zeros_like(llm_kept_indices)
        return GroundingOutput(
            mask_logits=mask_logits,
            kept_indices=None if reduction is None else reduction.kept,  # None for merged tokens too
            token_members=None if reduction is None else reduction.members,
            kept_groups=groups if reduction is None else reduction.groups,
            group_names=tuple(pruner.group_names),
            llm_kept_indices=llm_kept_indices,
            llm_visual_patches=trace["llm_visual_patches"],
            visual_tokens_per_layer=trace["visual_counts"],
            sequence_length_per_layer=trace["lengths"],
            seg_hidden_states=seg_states,
            # Training batches carry labels: the LM logits and the labels of the sequence the LLM ran on.
            lm_logits=None if trace["labels"] is None else self.llm.lm_head(hidden),
            labels=trace["labels"],
        )

    def forward(self, batch: GroundingBatch, pruner: TokenPruner) -> GroundingOutput:
        return self.ground(batch, self.encode(batch, [pruner]), pruner)


@dataclass
class SharedEncodings:
    """What every pruner of a batch shares: CLIP features and signals, text embeddings, SAM image embeddings.

    An encoders-only `encode` (for_grounding=False) leaves out SAM's embeddings, and the patch
    features when no vision signal was asked for.
    """

    patch_features: Tensor | None  # [B, N, D]
    # Per score dtype in use ("float32" for the studies' extra signals), the signals derived in it;
    # without text embeddings: those are per text source.
    signals_by_score_dtype: dict[str, VisualSignals]
    # (source, pooling, overflow) -> ([B, T, P], text_mask [B, T]); with `chunk`, T counts chunks
    text_embeds: dict[tuple[str, str, str], tuple[Tensor, Tensor]]
    sam_image_embeddings: Tensor | None  # [B, C, h, w]

    @property
    def signals(self) -> VisualSignals:
        """The float32 signals (what the studies read), or the model-dtype ones when no reader asked for float32."""
        return self.signals_by_score_dtype.get("float32") or self.signals_by_score_dtype["model"]


def _all_patches(patch_features: Tensor) -> Tensor:
    """[B, N] indices 0..N-1: what an in-LLM pruner's LLM is fed (every patch, in raster order)."""
    b, n = patch_features.shape[:2]
    return torch.arange(n, device=patch_features.device).expand(b, n)
