"""Tiny checkpoints in the released GLaMM and LISA file layouts, and a reference model with the same weights.

The reference is a PixelGroundingLVLM whose every parameter is random (norm weights too, so that
a swapped tensor shows), assigned directly. The released files are written from it with this
file's own renaming (transformers -> original SAM names below, written from docs/models.md and
independent of litelvlm.models.sam_conversion), so loading them back must give the reference.
Dtypes as released: the LLM, projector and [SEG] projection in bf16, SAM in float32.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPConfig, CLIPModel

from litelvlm.models.config import CLIPTextSpec, CLIPVisionSpec, LLMSpec, LVLMConfig, SAMSpec
from litelvlm.models.lvlm import PixelGroundingLVLM, clip_text_config, clip_vision_config
from litelvlm.models.tiny_assets import (
    CLIP_FILES,
    GLAMM_ADDED_TOKENS,
    LISA_ADDED_TOKENS,
    ensure_tiny_tokenizers,
    write_llm_tokenizer_folder,
)
from litelvlm.models.tokenizer import load_clip_tokenizer, load_llm_tokenizer, special_token_ids

SAM_PREFIX = {"glamm": "model.grounding_encoder.", "lisa": "model.visual_model."}
REGION_ENCODER_KEYS = {  # a few of GLaMM's region-encoder tensors (names as in groundingLMM model/layers.py)
    "model.region_encoder.mlvl_fuse.input_conv.0.weight": (8, 34, 1, 1),
    "model.region_encoder.mlvl_fuse.input_conv.0.bias": (8,),
    "model.region_encoder.roi_align.pconvs.0.weight": (8, 8, 3, 3),
    "model.region_encoder.roi_align.pos_embedd.0.weight": (16, 4),
    "model.region_encoder.roi_align.updims.weight": (32, 16),
    "model.region_encoder.roi_align.flatten_linear.weight": (16, 8),
}
TINY_SAM = SAMSpec(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    global_attn_indexes=(1,),
    image_size=256,  # SAM's 1024 shrunk for speed (tests resize the demo batch's SAM input to it)
    patch_size=16,
    window_size=7,
    mlp_dim=64,
    prompt_dim=32,
    mask_decoder_mlp_dim=64,
    mask_decoder_layers=2,
    mask_decoder_heads=8,  # SAM's fixed head count: not visible in shapes, so the loader assumes it
    iou_head_hidden_dim=24,
)


def tiny_config(kind: str, llm_vocab: int, clip_vocab: int, llm_layers: int = 2) -> LVLMConfig:
    """GLaMM: 336-px CLIP, MLP projector; LISA: 224-px CLIP, one Linear. Both a 256-px SAM. `llm_layers`:
    32 for the released 7B models' depth (in-LLM schedules at their real layers), tiny width either way."""
    glamm = kind == "glamm"
    return LVLMConfig(
        name=f"tiny-{kind}-released",
        vision=CLIPVisionSpec(
            hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
            image_size=336 if glamm else 224, patch_size=14, projection_dim=16,
        ),
        text=CLIPTextSpec(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=clip_vocab),
        llm=LLMSpec(
            hidden_size=32, num_layers=llm_layers, num_heads=4, num_kv_heads=4 if glamm else None, intermediate_size=64,
            vocab_size=llm_vocab, rms_norm_eps=1e-5 if glamm else 1e-6, max_position_embeddings=4096 if glamm else 2048,
        ),
        sam=TINY_SAM,
        projector="mlp2x_gelu" if glamm else "linear",
        protocol=kind,
        clip_checkpoint="",
    )


# ---------------------------------------------------------------- transformers -> original SAM names
_SAM_TO_ORIGINAL = [
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.pos_embed$", "image_encoder.pos_embed"),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^vision_encoder\.layers\.(\d+)\.(attn|mlp)\.", r"image_encoder.blocks.\1.\2."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    # MLP heads of depth 3: proj_in, layers.0, proj_out = original layers.0, 1, 2
    (r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.0\.", r"\1.layers.1."),
    (r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.proj_in\.", r"\1.layers.0."),
    (r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.proj_out\.", r"\1.layers.2."),
]


def original_sam_state_dict(sam_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers SamModel state dict under the original segment-anything names (tied copy dropped)."""
    original = {}
    for key, value in sam_state.items():
        if key == "prompt_encoder.shared_embedding.positional_embedding":
            continue  # transformers' tied copy of the Gaussian matrix
        name = key
        for pattern, target in _SAM_TO_ORIGINAL:
            name, count = re.subn(pattern, target, name)
            if count:
                break
        original[name] = value
    return original


# ---------------------------------------------------------------- the reference model
def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norm weights around 1: a misplaced tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_weight = re.search(r"norm\w*\.weight$", name) is not None
            param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.08 * noise)


def _round_to_bf16_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(param.bfloat16().float())


@dataclass
class ReleasedFixture:
    kind: str
    folder: Path  # the checkpoint folder (config.json, tokenizer, weights)
    clip_folder: Path
    config: LVLMConfig  # the architecture the loader must read from the files
    reference: PixelGroundingLVLM  # float32, the same weights assigned directly to the modules
    released: dict[str, Tensor]  # every tensor written, under its released name


def build_reference(
    kind: str, llm_tokenizer, clip_tokenizer, seed: int = 0, llm_layers: int = 2
) -> tuple[LVLMConfig, PixelGroundingLVLM]:
    config = tiny_config(kind, len(llm_tokenizer), len(clip_tokenizer), llm_layers)
    clip_ids = (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id)
    model = PixelGroundingLVLM(config, special_token_ids(llm_tokenizer).seg, clip_ids)
    randomise_(model, seed)
    for part in (model.llm, model.mm_projector, model.text_hidden_fcs):
        _round_to_bf16_(part)  # the released files store these in bf16
    model.clip_tokenizer = clip_tokenizer
    return config, model.eval()


def released_tensors(kind: str, model: PixelGroundingLVLM) -> dict[str, Tensor]:
    """The reference's weights under the released names, plus the extras released files carry."""
    released: dict[str, Tensor] = {}
    for key, value in model.llm.state_dict().items():
        released[key] = value.bfloat16()  # model.embed_tokens / model.layers / model.norm / lm_head
    head_dim = model.config.llm.hidden_size // model.config.llm.num_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(model.config.llm.num_layers):
        released[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    for key, value in model.mm_projector.state_dict().items():
        released[f"model.mm_projector.{key}"] = value.bfloat16()
    for key, value in model.text_hidden_fcs.state_dict().items():
        released[f"model.text_hidden_fcs.0.{key}"] = value.bfloat16()
    for key, value in original_sam_state_dict(model.sam.state_dict()).items():
        released[SAM_PREFIX[kind] + key] = value.float().clone()
    if kind == "glamm":
        generator = torch.Generator().manual_seed(7)
        for key, shape in REGION_ENCODER_KEYS.items():
            released[key] = torch.randn(shape, generator=generator).bfloat16()
    return released


# ---------------------------------------------------------------- files
def released_config_json(kind: str, config: LVLMConfig, clip_checkpoint: str) -> dict:
    """config.json as the released checkpoints write it (LlavaLlamaForCausalLM-style fields)."""
    llm = config.llm
    common = {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": llm.hidden_size, "initializer_range": 0.02, "intermediate_size": llm.intermediate_size,
        "mm_hidden_size": config.vision.hidden_size, "mm_use_im_start_end": True, "mm_use_im_patch_token": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": clip_checkpoint,
        "model_type": "llava", "num_attention_heads": llm.num_heads, "num_hidden_layers": llm.num_layers,
        "out_dim": config.sam.prompt_dim, "rms_norm_eps": llm.rms_norm_eps, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "train_mask_decoder": True, "use_cache": False, "use_mm_proj": True,
        "vision_tower": clip_checkpoint, "vocab_size": llm.vocab_size,
    }
    if kind == "glamm":
        return {
            **common, "_name_or_path": "GLaMM-RefSeg", "architectures": ["GLaMMForCausalLM"],
            "freeze_mlp_adapter": True, "image_aspect": "square",
            "max_position_embeddings": llm.max_position_embeddings,
            "mm_vision_module": clip_checkpoint, "num_key_value_heads": llm.num_heads, "pretraining_tp": 1,
            "rope_scaling": None, "select_feature_type": "patch", "transformers_version": "4.31.0", "with_region": True,
            "num_reg_features": 4, "bbox_token_idx": 1002,
        }
    return {
        **common, "_name_or_path": "LISA-7B-v1", "architectures": ["LISAForCausalLM"],
        "freeze_mm_mlp_adapter": True, "image_aspect_ratio": "square", "image_grid_pinpoints": None,
        "max_sequence_length": llm.max_position_embeddings, "transformers_version": "4.29.0",
        "tune_mm_mlp_adapter": False,
    }


def write_weights(folder: Path, tensors: dict[str, Tensor], fmt: str, shards: int) -> None:
    """`pytorch_model-0000i-of-0000n.bin` / `model-0000i-of-0000n.safetensors` + index, or one file."""
    keys = list(tensors)
    groups = [keys[i::shards] for i in range(shards)] if shards > 1 else [keys]
    stem, suffix = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        name = f"{stem}-{index:05d}-of-{len(groups):05d}.{suffix}" if shards > 1 else f"{stem}.{suffix}"
        part = {key: tensors[key].contiguous() for key in group}
        if fmt == "bin":
            torch.save(part, folder / name)
        else:
            save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in group})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_clip_folder(folder: Path, model: PixelGroundingLVLM, clip_tokenizer_folder: Path) -> Path:
    """The reference's CLIP towers as a full CLIPModel checkpoint (save_pretrained) + the CLIP tokenizer."""
    config = model.config
    clip_ids = (model.clip_tokenizer.bos_token_id, model.clip_tokenizer.eos_token_id, model.clip_tokenizer.pad_token_id)
    text_config = clip_text_config(config, *clip_ids).to_dict()
    vision_config = clip_vision_config(config).to_dict()
    clip = CLIPModel(
        CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=config.vision.projection_dim)
    )
    clip.vision_model.load_state_dict(model.vision_tower.vision_model.state_dict())
    clip.visual_projection.load_state_dict(model.vision_tower.visual_projection.state_dict())
    clip.text_model.load_state_dict(model.text_tower.text_model.state_dict())
    clip.text_projection.load_state_dict(model.text_tower.text_projection.state_dict())
    clip.save_pretrained(folder)
    for name in CLIP_FILES:
        shutil.copy(clip_tokenizer_folder / name, folder / name)
    return folder


def write_released_checkpoint(
    root: Path, kind: str, fmt: str = "bin", shards: int = 3, seed: int = 0, clip_checkpoint: str | None = None,
    llm_layers: int = 2,
) -> ReleasedFixture:
    """A tiny checkpoint folder in the released layout (`root/checkpoint`) and its CLIP folder (`root/clip`)."""
    root = Path(root)
    tiny = ensure_tiny_tokenizers()
    folder = root / "checkpoint"
    added = GLAMM_ADDED_TOKENS if kind == "glamm" else LISA_ADDED_TOKENS
    write_llm_tokenizer_folder(folder, (tiny / "llm" / "tokenizer.model").read_bytes(), added)
    llm_tokenizer = load_llm_tokenizer(folder)
    clip_tokenizer = load_clip_tokenizer(tiny / "clip")
    config, reference = build_reference(kind, llm_tokenizer, clip_tokenizer, seed, llm_layers)
    clip_folder = write_clip_folder(root / "clip", reference, tiny / "clip")
    released = released_tensors(kind, reference)
    write_weights(folder, released, fmt, shards)
    config_json = released_config_json(kind, config, clip_checkpoint or str(clip_folder))
    (folder / "config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
    return ReleasedFixture(kind, folder, clip_folder, config, reference, released)


def copy_without_weights(source: Path, target: Path) -> Path:
    """The config and tokenizer files of a checkpoint folder, for a variant with other weights."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix in (".json", ".model") and "index" not in path.name:
            shutil.copy(path, target / path.name)
    return target


def same_architecture(loaded: LVLMConfig, expected: LVLMConfig) -> bool:
    """Equal in everything that shapes the model (the name and CLIP source are labels)."""
    return replace(loaded, name="", clip_checkpoint="") == replace(expected, name="", clip_checkpoint="")
