"""From a name to a ready model and its tokenizers.

A preset name (`tiny-glamm`) builds the architecture with seeded random weights and the tiny
tokenizers the project builds itself. Released checkpoints (a folder or a hub id) go through the
checkpoint loader (`checkpoint.py`), which this module sits on top of.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from litelvlm.models.checkpoint import from_pretrained, read_checkpoint
from litelvlm.models.config import DTYPES, PRESETS, LVLMConfig, resolve_dtype  # noqa: F401  (DTYPES public here too)
from litelvlm.models.lvlm import PixelGroundingLVLM
from litelvlm.models.tiny_assets import ensure_tiny_tokenizers
from litelvlm.models.tokenizer import load_clip_tokenizer, load_llm_tokenizer, special_token_ids
from litelvlm.models.weight_files import HUB_ID


@dataclass
class ModelAssets:
    """What both the model and the data pipeline need to agree on: architecture and tokenizers."""

    config: LVLMConfig
    llm_tokenizer: object
    clip_tokenizer: object | None
    random_weights: bool


def _is_tiny_preset(checkpoint: str) -> bool:
    return checkpoint in PRESETS and checkpoint.startswith("tiny")


def _require_checkpoint_name(checkpoint: str) -> None:
    """A released checkpoint is a folder here or a hub id (owner/name); anything else is a typo."""
    if checkpoint in PRESETS:
        raise ValueError(
            f"'{checkpoint}' is an architecture preset; give the checkpoint folder or hub id of the "
            "released weights instead"
        )
    if not Path(checkpoint).expanduser().is_dir() and not HUB_ID.fullmatch(str(checkpoint)):
        raise FileNotFoundError(
            f"model checkpoint '{checkpoint}' not found: give a preset ({', '.join(sorted(PRESETS))}), a "
            "released GLaMM/LISA checkpoint folder, or a hub id (owner/name)"
        )


def load_assets(checkpoint: str, clip_checkpoint: str | None = None, *, encoders_only: bool = False) -> ModelAssets:
    """The architecture and tokenizers: of a tiny preset, or read from a released checkpoint's files.

    `encoders_only`: read only what the CLIP towers need (see `read_checkpoint`); `config.sam` is
    then the preset default, not read from the weights.
    """
    if _is_tiny_preset(checkpoint):
        folder = Path(ensure_tiny_tokenizers())
        llm_tokenizer = load_llm_tokenizer(folder / "llm")
        clip_tokenizer = load_clip_tokenizer(folder / "clip")
        config = PRESETS[checkpoint]
        config = replace(
            config,
            llm=replace(config.llm, vocab_size=len(llm_tokenizer)),
            text=replace(config.text, vocab_size=len(clip_tokenizer)),
        )
        return ModelAssets(config, llm_tokenizer, clip_tokenizer, random_weights=True)
    _require_checkpoint_name(checkpoint)
    assets = read_checkpoint(checkpoint, clip_checkpoint, encoders_only=encoders_only)
    return ModelAssets(assets.config, assets.llm_tokenizer, assets.clip_tokenizer, random_weights=False)


def load_lvlm(
    checkpoint: str,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    seg_prompt_position: str = "before",
    *,
    clip_checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    encoders_only: bool = False,
) -> PixelGroundingLVLM:
    """The frozen model: a tiny preset with weights drawn from `seed` (so every process gets the
    same), or a released checkpoint (folder or hub id) through `from_pretrained`.

    `encoders_only`: build and load the CLIP towers alone (no projector, LLM, [SEG] projection or
    SAM); a preset's towers get the same weights as in a full build with the same seed.
    """
    if _is_tiny_preset(checkpoint):
        return _build_tiny(checkpoint, dtype, seed, seg_prompt_position, device, encoders_only)
    _require_checkpoint_name(checkpoint)
    loaded = from_pretrained(
        checkpoint,
        dtype=dtype,
        device=device,
        clip_checkpoint=clip_checkpoint,
        seg_prompt_position=seg_prompt_position,
        encoders_only=encoders_only,
    )
    return loaded.model


def _build_tiny(
    checkpoint: str, dtype, seed: int, seg_prompt_position: str, device, encoders_only: bool = False
) -> PixelGroundingLVLM:
    assets = load_assets(checkpoint)
    ids = special_token_ids(assets.llm_tokenizer)
    clip = assets.clip_tokenizer
    clip_ids = None
    if clip is not None:
        pad = clip.pad_token_id if clip.pad_token_id is not None else clip.eos_token_id
        clip_ids = (clip.bos_token_id, clip.eos_token_id, pad)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = PixelGroundingLVLM(
            assets.config, ids.seg, clip_ids, seg_prompt_position=seg_prompt_position, encoders_only=encoders_only
        )
    finally:
        torch.random.set_rng_state(state)
    model.clip_tokenizer = clip
    model.random_weights = assets.random_weights
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval()
