"""What flows between the data module and the model, and what the model hands back."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

IGNORE_INDEX = -100  # label of a position without a loss (torch's cross_entropy default ignore_index)


@dataclass
class GroundingBatch:
    """A collated batch of images, each with T_b referring sentences and one prompt.

    The prompt holds the image sentinel (-200) once; its assistant turns already contain [SEG]
    (teacher forcing, one forward, as the reference evaluations do).
    """

    clip_pixel_values: Tensor  # [B, 3, S, S] CLIP branch
    sam_pixel_values: Tensor  # [B, 3, 1024, 1024] SAM branch, padded
    sam_resized_sizes: Tensor  # [B, 2] (h, w) of the image inside the padded SAM input
    original_sizes: Tensor  # [B, 2] (H, W)
    input_ids: Tensor  # [B, L] right-padded, IMAGE_TOKEN_INDEX at the image
    attention_mask: Tensor  # [B, L] 1 for real tokens (the sentinel included)
    questions: list[list[str]]  # per sample, the question string of each round (CLIP text input)
    expressions: list[list[str]]  # per sample, the bare referring expressions
    gt_masks: list[Tensor]  # per sample, bool [T_b, H, W]
    sample_ids: Tensor  # [B] data-set index of each sample: stable across batches and ranks
    image_ids: list[str] = field(default_factory=list)
    sentence_ids: list[list[str]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # samples of this batch the data set skipped
    ignore_masks: list[Tensor | None] = field(default_factory=list)  # per sample, bool [T_b, H, W] or None
    is_sentence: list[list[bool] | None] = field(default_factory=list)  # per sample: long query? (ReasonSeg)
    query_llm_tokens: list[list[int]] = field(default_factory=list)  # per mask: the query's LLM tokens
    query_clip_tokens: list[list[int]] = field(default_factory=list)  # per mask: CLIP tokens with SOS/EOS, -1 unknown
    # [B, L] next-token targets aligned with input_ids, NOT shifted (the loss shifts): the token id at
    # each assistant answer token and its closing </s>, IGNORE_INDEX elsewhere (system, user turns,
    # image sentinel, padding). Training batches only; None in evaluation.
    labels: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class GroundingOutput:
    """The model's answer for one batch: mask logits and a record of what the LLM saw."""

    mask_logits: list[Tensor]  # per sample, float [T_b, H, W] at the original size; > 0 is foreground
    # [B, R] kept patch indices in the order fed to the LLM (pre-LLM index pruners; None when the tokens are merged)
    kept_indices: Tensor | None
    visual_tokens_per_layer: list[int]  # visual tokens each decoder layer ran on (per sample)
    sequence_length_per_layer: list[int]  # padded sequence length each decoder layer ran on
    seg_hidden_states: Tensor | None = None  # [M, h] final-norm states that prompt SAM, M = sum T_b
    # Which of the pruner's rules kept each token: [B, R] indices into `group_names`, aligned with
    # `kept_indices` (pre-LLM pruners) or `llm_kept_indices` (in-LLM pruners).
    kept_groups: Tensor | None = None
    group_names: tuple[str, ...] = ()
    # [B, R, N] bool, pre-LLM pruners: the patches each visual token stands for (a kept patch: itself; a
    # merged token: its members; [CLS]: none), in the order fed to the LLM.
    token_members: Tensor | None = None
    # In-LLM pruners: [B, V] the patch index of each visual token the LAST layer saw, in sequence
    # order (kept patches ascending, then -1 per merged token); `llm_visual_patches` [B, V, N] bool
    # gives the patches each of those tokens stands for, set only once a merge happened.
    llm_kept_indices: Tensor | None = None
    llm_visual_patches: Tensor | None = None
    # Training batches only (GroundingBatch.labels set): [B, L', V] LM logits over the sequence the LLM
    # finally ran on (L' = L - 1 + R, less what an in-LLM pruner dropped) and the labels aligned with it.
    lm_logits: Tensor | None = None
    labels: Tensor | None = None

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens in the LLM's last layer: what the pruned model finally reasons over."""
        return self.visual_tokens_per_layer[-1]
