"""One plain config for every pixel-grounding LVLM this project runs, with named presets (as litgpt).

The real GLaMM/LISA architectures and a tiny random-weight one differ only in numbers here; the
code in `lvlm.py` is the same for all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch

from litelvlm.errors import LitelvlmError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype given by name in a config (or already a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class CLIPVisionSpec:
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768


@dataclass(frozen=True)
class CLIPTextSpec:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 49408
    max_length: int = 77


@dataclass(frozen=True)
class LLMSpec:
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    intermediate_size: int = 11008
    vocab_size: int = 32007
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class SAMSpec:
    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_dim: int = 5120
    prompt_dim: int = 256  # prompt encoder / mask decoder width; the [SEG] projection's output
    mask_decoder_mlp_dim: int = 2048
    mask_decoder_layers: int = 2
    mask_decoder_heads: int = 8
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class LVLMConfig:
    """Architecture of a frozen pixel-grounding LVLM (LLaVA-style LLM + CLIP + SAM)."""

    name: str
    vision: CLIPVisionSpec = field(default_factory=CLIPVisionSpec)
    text: CLIPTextSpec = field(default_factory=CLIPTextSpec)
    llm: LLMSpec = field(default_factory=LLMSpec)
    sam: SAMSpec = field(default_factory=SAMSpec)
    select_layer: int = -2
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    protocol: Literal["glamm", "lisa"] = "glamm"
    clip_checkpoint: str = "openai/clip-vit-large-patch14-336"

    @property
    def grid(self) -> tuple[int, int]:
        side = self.vision.image_size // self.vision.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LVLMConfig":
        if name not in PRESETS:
            raise LitelvlmError(f"unknown model preset '{name}'; presets: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


_TINY_VISION = CLIPVisionSpec(
    hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128, image_size=336, patch_size=14, projection_dim=32
)
_TINY_TEXT = CLIPTextSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=0)
_TINY_LLM = LLMSpec(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, vocab_size=0)
_TINY_SAM = SAMSpec(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    global_attn_indexes=(1,),
    mlp_dim=64,
    prompt_dim=32,
    mask_decoder_mlp_dim=64,
    mask_decoder_heads=2,
    iou_head_hidden_dim=32,
)

PRESETS: dict[str, LVLMConfig] = {
    # GLaMM: Vicuna-7B, CLIP ViT-L/14-336 (576 patches), SAM ViT-H, 2-layer MLP projector.
    "glamm-7b": LVLMConfig(name="glamm-7b"),
    # LISA-7B-v1: LLaVA v1 lineage, CLIP ViT-L/14 at 224 px (256 patches), one Linear projector.
    "lisa-7b": LVLMConfig(
        name="lisa-7b",
        vision=replace(CLIPVisionSpec(), image_size=224),
        llm=replace(LLMSpec(), vocab_size=32004, max_position_embeddings=2048),
        projector="linear",
        protocol="lisa",
        clip_checkpoint="openai/clip-vit-large-patch14",
    ),
    "lisa-13b": LVLMConfig(
        name="lisa-13b",
        vision=replace(CLIPVisionSpec(), image_size=224),
        llm=LLMSpec(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824, vocab_size=32004),
        protocol="lisa",
        clip_checkpoint="openai/clip-vit-large-patch14",
    ),
    # Random weights, real geometry (336-px CLIP with 14-px patches, 1024-px SAM): for tests and the demo.
    # vocab_size 0 = taken from the tiny tokenizers when the model is built.
    "tiny-glamm": LVLMConfig(
        name="tiny-glamm", vision=_TINY_VISION, text=_TINY_TEXT, llm=_TINY_LLM, sam=_TINY_SAM, clip_checkpoint=""
    ),
}
