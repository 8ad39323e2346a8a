"""From a name to a ready model and its tokenizers.

A preset name (`tiny-glamm`) builds the architecture with seeded random weights and the tiny
tokenizers the project builds itself. Released checkpoints (a folder or a hub id) go through the
checkpoint loader.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from litelvlm.models.config import PRESETS, LVLMConfig
from litelvlm.models.lvlm import PixelGroundingLVLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelAssets:
    """What both the model and the data pipeline need to agree on: architecture and tokenizers."""

    config: LVLMConfig
    llm_tokenizer: object
    clip_tokenizer: object | None
    random_weights: bool


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_assets(checkpoint: str) -> ModelAssets:
    """The architecture and tokenizers for a preset name (released checkpoints: see issue 9)."""
    if checkpoint in PRESETS and checkpoint.startswith("tiny"):
        from litelvlm.models.tiny_assets import ensure_tiny_tokenizers
        from litelvlm.models.tokenizer import load_clip_tokenizer, load_llm_tokenizer

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
    if checkpoint in PRESETS:
        raise ValueError(
            f"'{checkpoint}' is an architecture preset; give the checkpoint folder or hub id of the "
            "released weights instead"
        )
    raise FileNotFoundError(
        f"model checkpoint '{checkpoint}' not found: give a preset ({', '.join(sorted(PRESETS))}) or a "
        "released GLaMM/LISA checkpoint folder"
    )


def load_lvlm(
    checkpoint: str,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    seg_prompt_position: str = "before",
) -> PixelGroundingLVLM:
    """Build the frozen model; preset weights are drawn from `seed`, so every process gets the same."""
    from litelvlm.models.tokenizer import special_token_ids

    assets = load_assets(checkpoint)
    ids = special_token_ids(assets.llm_tokenizer)
    clip = assets.clip_tokenizer
    clip_ids = None
    if clip is not None:
        clip_ids = (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id if clip.pad_token_id is not None else clip.eos_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = PixelGroundingLVLM(assets.config, ids.seg, clip_ids, seg_prompt_position=seg_prompt_position)
    finally:
        torch.random.set_rng_state(state)
    model.clip_tokenizer = clip
    model.random_weights = assets.random_weights
    return model.to(resolve_dtype(dtype)).eval()
