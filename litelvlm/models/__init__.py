"""The pixel-grounding LVLMs: architecture, released-checkpoint loading, tokenizers and pre-processing."""

from litelvlm.models.checkpoint import LoadedLVLM, from_pretrained
from litelvlm.models.config import LVLMConfig
from litelvlm.models.loading import load_assets, load_lvlm
from litelvlm.models.lvlm import PixelGroundingLVLM
from litelvlm.models.sam_conversion import load_sam_from_original, sam_original_to_hf

__all__ = [
    "LVLMConfig",
    "LoadedLVLM",
    "PixelGroundingLVLM",
    "from_pretrained",
    "load_assets",
    "load_lvlm",
    "load_sam_from_original",
    "sam_original_to_hf",
]
