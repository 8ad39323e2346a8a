"""Released GLaMM and LISA checkpoints as a PixelGroundingLVLM, with their tokenizers: the assembly.

The files and their layouts are `weight_files.py`'s, what the keys mean and the architecture they
imply `key_plan.py`'s; this module reads a checkpoint up to its weights and then loads them.

The checkpoint folder (or hub id) holds config.json, the LLaMA tokenizer and the weights
(sharded or single `pytorch_model*.bin` / `model*.safetensors`). The CLIP towers come from their
own checkpoint, named by config.json (`mm_vision_tower` / `vision_tower`). Everything about the
architecture is read from the files: GLaMM or LISA from the SAM key prefix, the projector's form
from its keys, the SAM size from its shapes, the LLM from config.json.

Memory: the model is built on the `meta` device, the key plan and every shape are checked before
any weight is read (file headers only), then the files are read one at a time (`.bin`
memory-mapped, `.safetensors` tensor by tensor), each tensor converted to the target dtype and
device and assigned in place of its meta tensor. The host holds about one copy of the weights at
the target dtype; a tensor already in that dtype on the CPU stays backed by the mapped file.

Encoders-only (`encoders_only=True`, for studies that read only CLIP): only the CLIP towers are
built and loaded. The keys come from the shard index, and only the shards holding tensors of the
built parts (`model.vision_tower.*`, which released GLaMM/LISA files lack) are opened; the other
parts' keys are expected and skipped, not reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from litelvlm.models.config import CLIPTextSpec, LVLMConfig, SAMSpec, resolve_dtype
from litelvlm.models.key_plan import (
    KeyPlan,
    check_plan,
    clip_configs,
    llm_spec,
    plan_keys,
    projector_form,
    restrict_to_encoders,
    sam_spec,
    text_spec,
    vision_spec,
)
from litelvlm.models.lvlm import PixelGroundingLVLM
from litelvlm.models.sam_conversion import tie_positional_embedding
from litelvlm.models.tokenizer import load_clip_tokenizer, load_llm_tokenizer, special_token_ids
from litelvlm.models.weight_files import (
    CHECKPOINT_METADATA,
    CheckpointError,
    WeightFiles,
    check_index,
    check_keys_agree,
    fetch_weights,
    find_weight_files,
    listing,
    read_weight_map,
    resolve_folder,
    shard_files,
    snapshot,
    weight_layout,
)

__all__ = ["CheckpointAssets", "CheckpointError", "LoadedLVLM", "from_pretrained", "read_checkpoint"]

logger = logging.getLogger(__name__)

CLIP_TOWER_CONFIG_KEYS = ("mm_vision_tower", "vision_tower", "mm_vision_module", "vision_module")


class LoadedLVLM(NamedTuple):
    """What `from_pretrained` returns; unpacks as `model, llm_tokenizer, clip_tokenizer`."""

    model: PixelGroundingLVLM
    llm_tokenizer: object
    clip_tokenizer: object | None


# ---------------------------------------------------------------- reading a checkpoint
@dataclass
class CheckpointAssets:
    """A checkpoint read up to its weights: architecture, tokenizers, files and the key plan."""

    folder: Path
    clip_folder: Path
    config: LVLMConfig
    llm_tokenizer: object
    clip_tokenizer: object | None
    weights: WeightFiles
    shapes: dict[str, Tensor]
    plan: KeyPlan
    clip_configs: tuple


def read_checkpoint(
    name_or_path: str | Path,
    clip_checkpoint: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    encoders_only: bool = False,
) -> CheckpointAssets:
    """Everything but the weights' data: config, tokenizers, CLIP configs, weight files and key plan.

    `encoders_only`: the plan and files of the CLIP towers alone (see the module docstring);
    `config.sam` is then the preset default (SAM's shapes are not read).
    """
    hub = dict(cache_dir=cache_dir, local_files_only=local_files_only)
    is_local = Path(name_or_path).expanduser().is_dir()
    folder = resolve_folder(name_or_path, "model checkpoint", CHECKPOINT_METADATA, **hub)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    config_json = json.loads(config_path.read_text(encoding="utf-8"))
    if encoders_only:
        weights, shapes, plan, keys = _encoder_weights(name_or_path, folder, is_local, hub)
    else:
        weights = find_weight_files(folder) if is_local else fetch_weights(str(name_or_path), folder, **hub)
        shapes = weights.shapes()
        check_index(weights, set(shapes), folder)
        plan, keys = plan_keys(shapes), set(shapes)
    clip_checkpoint, clip_folder = _resolve_clip(config_json, config_path, clip_checkpoint, **hub)
    vision, text = clip_configs(clip_folder)

    select_feature = config_json.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise CheckpointError(f"{config_path}: mm_vision_select_feature {select_feature!r}; only 'patch' is supported")
    config = LVLMConfig(
        name=folder.name if is_local else str(name_or_path),
        vision=vision_spec(vision),
        text=text_spec(text) if text is not None else CLIPTextSpec(),
        llm=llm_spec(config_json, folder),
        sam=SAMSpec() if encoders_only else sam_spec(shapes, plan.sam_prefix),
        select_layer=config_json.get("mm_vision_select_layer", -2),
        projector=projector_form(keys),
        protocol=plan.kind,
        clip_checkpoint=str(clip_checkpoint),
    )
    llm_tokenizer = load_llm_tokenizer(folder)
    if len(llm_tokenizer) > config.llm.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(llm_tokenizer)} tokens but the LLM only "
            f"{config.llm.vocab_size} embeddings"
        )
    has_clip_vocab = (clip_folder / "tokenizer.json").is_file() or (clip_folder / "vocab.json").is_file()
    clip_tokenizer = load_clip_tokenizer(clip_folder) if has_clip_vocab else None
    return CheckpointAssets(
        folder, clip_folder, config, llm_tokenizer, clip_tokenizer, weights, shapes, plan, (vision, text)
    )


def _encoder_weights(name_or_path, folder: Path, is_local: bool, hub: dict):
    """Encoders-only: the CLIP part of the key plan, and only the weight files holding its tensors.

    With a shard index the keys are the index's and only the shards holding CLIP tensors are opened
    (and, for a hub id, fetched); a single weight file is opened for its keys, its data read only
    when it holds CLIP tensors. Returns (weights, shapes of the opened files, plan, every key).
    """
    layout = weight_layout(folder)
    if layout is None or layout[1] is None:  # a single weight file (or, for a hub id, not fetched yet)
        weights = find_weight_files(folder) if is_local else fetch_weights(str(name_or_path), folder, **hub)
        shapes = weights.shapes()
        plan = restrict_to_encoders(plan_keys(shapes))
        return WeightFiles(weights.format, weights.files if plan.targets else []), shapes, plan, set(shapes)
    fmt, index_path, _ = layout
    weight_map = read_weight_map(index_path)
    plan = restrict_to_encoders(plan_keys(weight_map))
    names = sorted({weight_map[key] for key in plan.targets})
    if names and not is_local:
        folder = snapshot(str(name_or_path), CHECKPOINT_METADATA + names, "model checkpoint", **hub)
    weights = WeightFiles(fmt, shard_files(folder, names, index_path))
    shapes = weights.shapes()
    check_keys_agree({key for key, name in weight_map.items() if name in names}, set(shapes), index_path)
    return weights, shapes, plan, set(weight_map)


def _resolve_clip(config_json: dict, config_path: Path, clip_checkpoint, cache_dir, local_files_only):
    """The CLIP checkpoint (given, or named by config.json) and its folder, fetched for a hub id."""
    what = "CLIP checkpoint"
    if clip_checkpoint is None:
        tower_key = next((key for key in CLIP_TOWER_CONFIG_KEYS if config_json.get(key)), None)
        if tower_key is None:
            raise CheckpointError(
                f"{config_path} names no CLIP tower ({' / '.join(CLIP_TOWER_CONFIG_KEYS)}); pass clip_checkpoint"
            )
        clip_checkpoint = config_json[tower_key]
        what = f"CLIP checkpoint (config.json's {tower_key}; pass clip_checkpoint to use another)"
    if Path(clip_checkpoint).expanduser().is_dir():
        return clip_checkpoint, Path(clip_checkpoint).expanduser()
    folder = resolve_folder(clip_checkpoint, what, ["*.json", "*.txt", "*.safetensors"], cache_dir, local_files_only)
    if not any(folder.glob("*.safetensors")):  # older CLIP repos: pytorch_model.bin only
        folder = snapshot(str(clip_checkpoint), ["pytorch_model.bin"], what, cache_dir, local_files_only)
    return clip_checkpoint, folder


# ---------------------------------------------------------------- loading the weights
def from_pretrained(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    device_map: str | None = None,
    clip_checkpoint: str | Path | None = None,
    seg_prompt_position: str = "before",
    with_text_tower: bool = True,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    encoders_only: bool = False,
) -> LoadedLVLM:
    """A released GLaMM or LISA checkpoint (folder or hub id) as a frozen PixelGroundingLVLM.

    Args:
        name_or_path: the checkpoint folder, or a hub id (fetched, or found in the hub cache offline).
        dtype: the weights' dtype (bf16 by default, as the references ran).
        device: where the weights go, tensor by tensor; `device_map` "auto" picks cuda when present.
        clip_checkpoint: the CLIP folder or hub id; default the one config.json names.
        seg_prompt_position: `before` (the references) or `at`; see PixelGroundingLVLM.
        with_text_tower: also load CLIP's text tower (LiteLVLM's text-guided pruning needs it).
        cache_dir, local_files_only: passed to huggingface_hub for hub ids.
        encoders_only: build and load the CLIP towers alone (studies that read only CLIP): no
            projector, LLM, [SEG] projection or SAM, and only the weight files holding CLIP tensors read.

    Returns:
        (model, llm_tokenizer, clip_tokenizer); the model in eval mode, `model.clip_tokenizer` set.
    """
    dtype, device = resolve_dtype(dtype), _resolve_device(device, device_map)
    hub = dict(cache_dir=cache_dir, local_files_only=local_files_only)
    assets = read_checkpoint(name_or_path, clip_checkpoint, **hub, encoders_only=encoders_only)
    text_config = assets.clip_configs[1]
    if with_text_tower and (text_config is None or assets.clip_tokenizer is None):
        raise CheckpointError(
            f"CLIP checkpoint {assets.clip_folder} has no text tower or tokenizer; pass with_text_tower=False"
        )
    clip_ids = None
    if with_text_tower:
        clip_ids = (text_config.bos_token_id or 0, text_config.eos_token_id or 0, text_config.pad_token_id or 0)
    with torch.device("meta"):
        seg_id = special_token_ids(assets.llm_tokenizer).seg
        model = PixelGroundingLVLM(
            assets.config, seg_id, clip_ids, seg_prompt_position=seg_prompt_position, encoders_only=encoders_only
        )
    check_plan(model, assets.plan, assets.shapes, assets.folder)
    if assets.plan.skipped:
        logger.info("%s: encoders-only: %d tensors of the LLM, projector, [SEG] projection and SAM not read",
                    assets.folder, len(assets.plan.skipped))
    if assets.plan.unused:
        logger.info(
            "%s: %d tensors deliberately not loaded (GLaMM's region encoder, for box prompts only): %s",
            assets.folder, len(assets.plan.unused), ", ".join(assets.plan.unused),
        )
    _load_clip_towers(model, assets, dtype, device, with_text_tower)
    _load_checkpoint_tensors(model, assets, dtype, device)
    _finish(model, device)
    model.clip_tokenizer = assets.clip_tokenizer
    model.random_weights = False
    return LoadedLVLM(model.eval(), assets.llm_tokenizer, assets.clip_tokenizer)


def _resolve_device(device, device_map) -> torch.device:
    if device_map is None:
        return torch.device(device)
    if not isinstance(device_map, str):
        raise CheckpointError("the model runs on one device: give device_map as one device ('auto', 'cuda:0', ...)")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def _convert(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


def _load_checkpoint_tensors(model, assets: CheckpointAssets, dtype, device) -> None:
    """File by file: convert each tensor to dtype/device and assign it in place of the meta tensor."""
    targets = assets.plan.targets
    for path in assets.weights.files:
        batch: dict[str, Tensor] = {}
        for key, tensor in assets.weights.read(path):
            if key in targets:
                converted = _convert(tensor, dtype, device)
                batch.update((target, converted) for target in targets[key])
            del tensor
        result = model.load_state_dict(batch, strict=False, assign=True)
        if result.unexpected_keys:
            raise CheckpointError(f"{path.name}: no place for {listing(result.unexpected_keys)}")
        del batch


def _load_clip_towers(model, assets: CheckpointAssets, dtype, device, with_text_tower: bool) -> None:
    """The CLIP towers from their own checkpoint; any weight that checkpoint lacks is an error."""
    vision_config, text_config = assets.clip_configs
    towers = {"vision_tower": (CLIPVisionModelWithProjection, vision_config)}
    if with_text_tower:
        towers["text_tower"] = (CLIPTextModelWithProjection, text_config)
    for attribute, (cls, config) in towers.items():
        with _quiet_transformers():
            tower, info = cls.from_pretrained(
                str(assets.clip_folder), config=config, dtype=dtype, output_loading_info=True
            )
        bad = list(info.get("missing_keys", ())) + [str(k) for k in info.get("mismatched_keys", ())]
        if bad:
            raise CheckpointError(
                f"CLIP checkpoint {assets.clip_folder} lacks {attribute} weights: {listing(sorted(bad))}"
            )
        setattr(model, attribute, tower.to(device).eval())
    if not with_text_tower:
        model.text_tower = None


class _quiet_transformers:
    """Silence transformers' loading report while loading a CLIP tower out of a full CLIPModel file
    (the other tower's keys are listed as unexpected there); missing keys are checked by the caller."""

    def __enter__(self):
        self.logging = hf_logging
        self.verbosity = hf_logging.get_verbosity()
        self.progress = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.verbosity)
        if self.progress:
            self.logging.enable_progress_bar()


def _finish(model: PixelGroundingLVLM, device: torch.device) -> None:
    """Re-tie SAM's shared matrix, compute the rotary frequencies (not stored), check nothing is left on meta."""
    if model.sam is not None:  # an encoders-only build has neither SAM nor the LLM
        tie_positional_embedding(model.sam)
    if model.llm is not None:
        rotary = model.llm.model.rotary_emb
        model.llm.model.rotary_emb = type(rotary)(config=model.llm.config).to(device)
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise CheckpointError(f"not loaded (still on the meta device): {listing(left)}")
