"""The pruning interface: what a pruner may ask the model for, and the two places it can act.

A pruner declares the signals it needs (`required_signals`); the model computes exactly those and
nothing else. Pre-LLM pruners implement `select(signals)` and return kept patch indices. In-LLM
pruners list the decoder layers they act before (`prune_layers`; a one-layer method may set
`prune_layer = K`) and implement `prune_in_llm(context)`: before each of those layers the decoder
loop (`litelvlm/models/decoder_loop.py`) hands them a `LayerContext` and applies the
`LLMSelection` they return (dropping, masking or merging tokens, and renumbering positions).

Scores are computed in the precision `score_dtype` names: `model` (default) in the dtype the model
runs in, op for op as each method's reference does; `float32` upcasts first (docs/pruners.md).

Every kept token also carries a group label, an index into the pruner's `group_names` (LiteLVLM's
similarity-aware vs context-aware tokens, VisPruner's important vs diverse), so a visualiser can
show which rule kept which patch. A pruner with groups overrides `select_with_groups`.

What the model actually calls is `reduce(signals) -> VisualReduction`: index selection (the default,
from `select_with_groups`) or NEW tokens built before the projector (a merge, e.g. VisionZip), each
token naming the patches it stands for (docs/pruners.md, "The merged-token interface").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from litelvlm.errors import LitelvlmError


class Signal(str, enum.Enum):
    """The inputs a pruner can ask for; each is computed only when some pruner declares it."""

    PATCH_FEATURES = "patch_features"
    PATCH_EMBEDS = "patch_embeds"
    PROJECTED_FEATURES = "projected_features"
    TEXT_EMBEDS = "text_embeds"
    CLS_ATTENTION = "cls_attention"
    CLS_ATTENTION_SUM = "cls_attention_sum"
    SELECT_KEYS = "select_keys"
    CLS_FEATURES = "cls_features"
    LAST_QKV = "last_qkv"
    LLM_ATTENTION = "llm_attention"


class PrunerError(LitelvlmError):
    """A pruner was configured or called with something it cannot work with."""


class MissingSignalError(PrunerError):
    """A pruner needed a signal that the model did not compute."""


@dataclass
class VisualSignals:
    """What the model hands a pre-LLM pruner. Every tensor field is None unless a pruner asked for it.

    Shapes: B samples, N patches, D CLIP width, P CLIP projection width, T question slots, H heads.
    """

    patch_features: Tensor | None = None  # [B, N, D] select-layer patch features, before the projector
    patch_embeds: Tensor | None = None  # [B, N, P] post_layernorm + visual_projection, in `score_dtype`
    projected_features: Tensor | None = None  # [B, N, h] the LLM projector on every patch, in `score_dtype`
    text_embeds: Tensor | None = None  # [B, T, P] projected CLIP text embeddings of the questions
    cls_attention: Tensor | None = None  # [B, H, N] select-layer CLS attention over the patches, in `score_dtype`
    cls_attention_sum: Tensor | None = None  # [B, N] that attention summed over heads, in `score_dtype`
    select_keys: Tensor | None = None  # [B, N, D/H] the same layer's patch keys, mean over heads, in `score_dtype`
    cls_features: Tensor | None = None  # [B, D] select-layer [CLS] state, before the projector
    last_qkv: tuple[Tensor, Tensor, Tensor] | None = None  # each [B, N+1, D], CLS first
    text_mask: Tensor | None = None  # [B, T] bool: which text slots hold a real question
    grid: tuple[int, int] | None = None  # patch grid (h, w)
    num_patches: int | None = None  # N, known even when no tensor was asked for
    batch_size: int | None = None
    sample_ids: Tensor | None = None  # [B] stable id of each sample (its data-set index)
    # The precision the model derived `patch_embeds`, `projected_features`, `cls_attention(_sum)` and `select_keys` in
    # (the pruner's `score_dtype`);
    # the other tensors are as the towers computed them (text embeddings upcast to float32, exactly).
    score_dtype: str = "float32"

    def require(self, signal: Signal | str):
        """Return a signal's tensor, or raise an error that names the missing signal."""
        signal = Signal(signal)
        value = getattr(self, signal.value)
        if value is None:
            raise MissingSignalError(
                f"signal '{signal.value}' was not computed; the pruner must list "
                f"Signal.{signal.name} in its required_signals"
            )
        return value


@dataclass
class VisualReduction:
    """A pre-LLM pruner's answer: the R visual tokens the projector gets, and what each stands for.

    Index selection (`features` None) feeds the projector the select-layer features of the `kept`
    patches. A merging reduction hands over NEW tokens `features` [B, R, D] built before the
    projector (`kept` None). Either way `members` says which patches each token stands for (a kept
    patch: itself; a merged token: its members; a token of no patch, e.g. [CLS]: none) and `groups`
    which of the pruner's rules made it (indices into `group_names`).
    """

    groups: Tensor  # [B, R] long
    members: Tensor  # [B, R, N] bool
    kept: Tensor | None = None  # [B, R] patch indices, in the order fed to the LLM (index selection)
    features: Tensor | None = None  # [B, R, D] new tokens before the projector (a merge)

    @classmethod
    def of_indices(cls, kept: Tensor, groups: Tensor, num_patches: int) -> VisualReduction:
        """Index selection as a reduction: each token stands for its own patch."""
        members = torch.zeros(*kept.shape, num_patches, dtype=torch.bool, device=kept.device)
        return cls(groups=groups, members=members.scatter_(2, kept[..., None], True), kept=kept)

    @property
    def merged(self) -> bool:
        return self.features is not None

    def to(self, device) -> VisualReduction:
        return VisualReduction(**{name: None if value is None else value.to(device) for name, value in vars(self).items()})


PositionRule = Literal["contiguous", "original"]  # an in-LLM selection's position rule
SelectionMode = Literal["inplace", "mask"]


@dataclass
class LLMSelection:
    """A pruner's answer at one schedule layer.

    keep: LongTensor [B, R], indices into the CURRENT visual tokens (0..V-1, `LayerContext.visual_ids`
        order), any order; the kept tokens stay in sequence order.
    positions: `contiguous` renumbers the rebuilt sequence 0..L'-1; `original` keeps every token's
        current position id (gaps where tokens left).
    merged: optional [B, M, h] new visual tokens, placed right after the kept visual tokens
        (contiguous positions only); counted as visual tokens from then on.
    merged_members: optional bool [B, M, V]: the current visual tokens each merged token stands for
        (records and the visualiser draw it over those patches).
    mode: `inplace` removes the other visual tokens; `mask` keeps them in the sequence and masks
        them as keys (FastV's mask variant; `original` positions, no merged tokens).
    """

    keep: Tensor
    positions: PositionRule = "contiguous"
    merged: Tensor | None = None
    merged_members: Tensor | None = None
    mode: SelectionMode = "inplace"


KeptOrder = Literal["reference", "raster"]
PositionIds = Literal["contiguous", "original"]
ScoreDtype = Literal["model", "float32"]
SCORE_DTYPES: tuple[str, ...] = ("model", "float32")
TextOverflow = Literal["truncate", "chunk"]


def check_text_overflow(value: str) -> str:
    """`text_overflow` of a text-guided pruner: how a query longer than CLIP's window reaches it (docs/pruners.md)."""
    if value not in ("truncate", "chunk"):
        raise PrunerError(f"text_overflow must be 'truncate' or 'chunk', got {value!r}")
    return value


class TokenPruner(nn.Module):
    """Base class of every pruning strategy.

    Args:
        num_tokens: R, the number of visual tokens the LLM keeps (None: keep all).
        kept_order: `reference` keeps the order the method's reference implementation feeds the
            LLM; `raster` sorts the kept tokens by patch index. Applied by the model.
        position_ids: `contiguous` renumbers the spliced sequence 0..L-1 (LLaVA's behaviour);
            `original` gives each kept visual token the position it had in the unpruned sequence
            (and the text after the image keeps its unpruned positions). Applied by the model.
        score_dtype: `model` computes the selection scores in the dtype the model runs in, as the
            method's reference does (bf16 or fp16 runs score in bf16 or fp16, where rounding makes
            ties); `float32` upcasts the inputs first. The model reads it for the signals it derives.
    """

    short_name: ClassVar[str] = ""
    # The labels `select_with_groups` indexes into; one group unless a method tells its rules apart.
    group_names: ClassVar[tuple[str, ...]] = ("kept",)
    # Pre-LLM pruners leave this None; a one-layer in-LLM pruner sets the layer index K it acts before.
    prune_layer: int | None = None
    # An in-LLM pruner that reads layer K-1 (its input, keys or output) before layer K sets this:
    # its context's `previous` is then layer K-1's context.
    needs_previous_layer: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that redefines `select` alone has replaced (or wrapped) the selection: the model
        # must go through it, and the parent's group labels no longer describe what it keeps.
        if "select" in cls.__dict__ and "select_with_groups" not in cls.__dict__:
            cls.select_with_groups = TokenPruner.select_with_groups
            if "group_names" not in cls.__dict__:
                cls.group_names = TokenPruner.group_names

    def __init__(
        self,
        num_tokens: int | None = None,
        kept_order: KeptOrder = "reference",
        position_ids: PositionIds = "contiguous",
        score_dtype: ScoreDtype = "model",
    ) -> None:
        super().__init__()
        if num_tokens is not None and (not isinstance(num_tokens, int) or isinstance(num_tokens, bool)):
            raise PrunerError(f"num_tokens must be an integer or None, got {num_tokens!r}")
        if num_tokens is not None and num_tokens < 1:
            raise PrunerError(f"num_tokens must be >= 1, got {num_tokens}")
        if kept_order not in ("reference", "raster"):
            raise PrunerError(f"kept_order must be 'reference' or 'raster', got {kept_order!r}")
        if position_ids not in ("contiguous", "original"):
            raise PrunerError(f"position_ids must be 'contiguous' or 'original', got {position_ids!r}")
        if score_dtype not in SCORE_DTYPES:
            raise PrunerError(f"score_dtype must be 'model' or 'float32', got {score_dtype!r}")
        self.num_tokens = num_tokens
        self.score_dtype = score_dtype
        self.kept_order = kept_order
        self.position_ids = position_ids

    @property
    def required_signals(self) -> frozenset[Signal]:
        """The signals `select` reads. Subclasses override; instance-level so knobs can change it."""
        return frozenset()

    @property
    def name(self) -> str:
        return self.short_name or type(self).__name__

    @property
    def prune_layers(self) -> tuple[int, ...]:
        """The decoder layers this pruner acts before (empty: it acts before the LLM)."""
        return () if self.prune_layer is None else (self.prune_layer,)

    @property
    def acts_in_llm(self) -> bool:
        return bool(self.prune_layers)

    def budget(self, num_patches: int) -> int:
        """R for N patches, checked: 1 <= R <= N (None keeps all N)."""
        if self.num_tokens is None:
            return num_patches
        if self.num_tokens > num_patches:
            raise PrunerError(
                f"{self.name}: num_tokens={self.num_tokens} is larger than the {num_patches} visual "
                "tokens this model produces"
            )
        return self.num_tokens

    def check_model(self, num_patches: int, num_llm_layers: int | None) -> None:
        """Fail before any data is read if this pruner cannot run on the model: its budget against the
        N patches, its schedule against the LLM's depth (None: no LLM is built). A method with further
        limits (PyramidDrop's smallest average budget, DART's retained count) extends it."""
        self.budget(num_patches)
        if num_llm_layers is not None:
            check_schedule(self, num_llm_layers)

    def select(self, signals: VisualSignals) -> Tensor:
        """Pre-LLM selection: kept patch indices LongTensor[B, R], in the method's reference order."""
        raise NotImplementedError(f"{type(self).__name__} does not select before the LLM")

    def select_with_groups(self, signals: VisualSignals) -> tuple[Tensor, Tensor]:
        """`select`'s kept indices [B, R] and, aligned with them, each token's group: LongTensor [B, R]
        of indices into `group_names`. What the model calls. One group by default; a method with
        several overrides this and `select` (both from one private routine, so they cannot disagree)."""
        kept = self.select(signals)
        return kept, torch.zeros_like(kept)

    def reduce(self, signals: VisualSignals) -> VisualReduction:
        """What the model calls before the projector: `select_with_groups` as an index reduction.
        A pruner that builds new tokens (a merge) overrides this instead."""
        if signals.num_patches is None:
            raise PrunerError(f"{self.name}: the signals do not say how many patches there are (num_patches)")
        kept, groups = self.select_with_groups(signals)
        check_kept(kept, signals.num_patches, self)
        check_groups(groups, kept, self)
        return VisualReduction.of_indices(kept, groups.to(kept.device), signals.num_patches)

    def select_in_llm(self, attention: Tensor) -> Tensor:
        """In-LLM selection between layers K-1 and K.

        `attention` is [B, N]: layer K-1's head-averaged attention of the last token over the visual
        positions. Returns kept visual-token indices LongTensor[B, R].
        """
        raise NotImplementedError(f"{type(self).__name__} does not act inside the LLM")

    def prune_in_llm(self, context):
        """In-LLM step before layer `context.index` (one of `prune_layers`): an `LLMSelection` of the
        current visual tokens (`litelvlm/models/decoder_loop.py`)."""
        raise NotImplementedError(f"{type(self).__name__} does not act inside the LLM")

    def extra_repr(self) -> str:
        return (
            f"num_tokens={self.num_tokens}, kept_order={self.kept_order}, position_ids={self.position_ids}, "
            f"score_dtype={self.score_dtype}"
        )

    def hparams(self) -> dict:
        """Flat description for logs and results files."""
        return {"pruner": self.name, "num_tokens": self.num_tokens, "score_dtype": self.score_dtype}


def check_schedule(pruner: TokenPruner, num_layers: int) -> None:
    """Every layer an in-LLM pruner acts before exists and has a layer before it: 1 <= K < num_layers."""
    schedule = sorted(set(pruner.prune_layers))
    for index in schedule:
        if not isinstance(index, int) or not 1 <= index < num_layers:
            raise PrunerError(
                f"{pruner.name}: layer K={index} (of the layers it acts before, {schedule}) must be in "
                f"[1, {num_layers - 1}] for this {num_layers}-layer LLM"
            )


def check_kept(kept: Tensor, n: int, pruner: TokenPruner) -> None:
    """A pruner's answer must be R distinct in-range indices per sample; anything else is a bug."""
    if kept.dim() != 2 or kept.dtype not in (torch.int64, torch.int32):
        raise PrunerError(f"{pruner.name} must return a LongTensor [B, R], got {tuple(kept.shape)} {kept.dtype}")
    if kept.is_meta:  # shape-only run (FLOP counting): there are no values to check
        return
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n):
        raise PrunerError(f"{pruner.name} returned indices outside [0, {n})")
    sorted_kept = torch.sort(kept, dim=1).values
    if kept.shape[1] > 1 and bool((sorted_kept[:, 1:] == sorted_kept[:, :-1]).any()):
        raise PrunerError(f"{pruner.name} returned a repeated index")


def check_groups(groups: Tensor, kept: Tensor, pruner: TokenPruner) -> None:
    """Group labels must align with the kept tokens [B, R] and index into the pruner's `group_names`."""
    if groups.shape != kept.shape[:2] or groups.dtype not in (torch.int64, torch.int32):
        raise PrunerError(
            f"{pruner.name} must return group labels as a LongTensor shaped like its kept tokens "
            f"{tuple(kept.shape[:2])}, got {tuple(groups.shape)} {groups.dtype}"
        )
    if groups.is_meta or not groups.numel():
        return
    if int(groups.min()) < 0 or int(groups.max()) >= len(pruner.group_names):
        raise PrunerError(f"{pruner.name} returned group labels outside [0, {len(pruner.group_names)}) (its group_names)")


def top_k_indices(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices of the k largest (or smallest) scores along the last dim, best first, ties by index.

    `torch.topk` and a plain sort (the references' `topk` / `argsort` / `sort`) promise no order
    among equal scores, and on a GPU it varies; a stable sort does, which keeps selections
    reproducible across devices. Ties are common in bf16 / fp16 scores.
    """
    order = torch.sort(scores, dim=-1, descending=largest, stable=True).indices
    return order[..., :k]
