"""Released GLaMM and LISA checkpoints as a PixelGroundingLVLM, with their tokenizers.

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
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from litelvlm.errors import LitelvlmError
from litelvlm.models.config import CLIPTextSpec, CLIPVisionSpec, LLMSpec, LVLMConfig, SAMSpec
from litelvlm.models.lvlm import PixelGroundingLVLM, sam_config
from litelvlm.models.sam_conversion import (
    ORIGINAL_BUFFERS,
    infer_sam_config,
    sam_hf_key_to_original,
    sam_original_key_to_hf,
    tie_positional_embedding,
)

logger = logging.getLogger(__name__)

SAM_PREFIXES = {"glamm": "model.grounding_encoder.", "lisa": "model.visual_model."}
UNUSED_PREFIXES = ("model.region_encoder.",)  # GLaMM's region encoder: box prompts only, unused here
DROPPED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # recomputed by transformers
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
ENCODER_PARTS = ("vision_tower.", "text_tower.")  # what an encoders-only build holds
VISION_TOWER_KEY = re.compile(r"model\.vision_tower\.(?:vision_tower\.|0\.)?(vision_model\..+)")
CLIP_TOWER_CONFIG_KEYS = ("mm_vision_tower", "vision_tower", "mm_vision_module", "vision_module")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
CHECKPOINT_METADATA = ["*.json", "*.model", "*.txt"]
MAX_LISTED_KEYS = 40


class CheckpointError(LitelvlmError):
    """A checkpoint whose files do not fit what the loader expects; the message names what."""


class LoadedLVLM(NamedTuple):
    """What `from_pretrained` returns; unpacks as `model, llm_tokenizer, clip_tokenizer`."""

    model: PixelGroundingLVLM
    llm_tokenizer: object
    clip_tokenizer: object | None


# ---------------------------------------------------------------- folders and hub ids
def _snapshot(repo_id: str, patterns: list[str], what: str, cache_dir, local_files_only) -> Path:
    import huggingface_hub
    from huggingface_hub import snapshot_download

    offline = huggingface_hub.constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=offline)
        )
    except Exception as error:  # offline cache miss, unknown repo, no network, gated repo
        cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{what} '{repo_id}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Where the hub is "
            f"reachable, `hf download {repo_id} --local-dir DIR` fetches it; then pass DIR instead of the id, "
            f"or keep the hub id and let the files sit in the hub cache ({cache})."
        ) from None


def resolve_folder(
    name_or_path: str | Path, what: str, patterns: list[str], cache_dir=None, local_files_only=None
) -> Path:
    """A local folder as is; otherwise a hub id, fetched (or, offline, found in the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{what} {path} is a file; give the folder that holds it")
    name = str(name_or_path)
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{what} '{name}' not found: it is neither a folder nor a hub id (owner/name)")
    return _snapshot(name, patterns, what, cache_dir, local_files_only)


# ---------------------------------------------------------------- weight files
@dataclass
class WeightFiles:
    """The weight files of a checkpoint, in one format, and which key lives in which file."""

    format: str  # "safetensors" or "bin"
    files: list[Path]

    def shapes(self) -> dict[str, Tensor]:
        """Every key with a meta tensor of its shape and dtype: the file headers only, no data."""
        shapes: dict[str, Tensor] = {}
        for path in self.files:
            for key, tensor in self._meta(path).items():
                if key in shapes:
                    raise CheckpointError(f"key '{key}' is stored twice (again in {path.name})")
                shapes[key] = tensor
        return shapes

    def _meta(self, path: Path) -> dict[str, Tensor]:
        if self.format == "safetensors":
            from safetensors import safe_open

            dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
            with safe_open(str(path), framework="pt") as handle:
                metas = {}
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    metas[key] = torch.empty(piece.get_shape(), dtype=dtypes.get(piece.get_dtype()), device="meta")
                return metas
        return torch.load(path, map_location="meta", weights_only=True)

    def read(self, path: Path) -> Iterator[tuple[str, Tensor]]:
        """The tensors of one file, one at a time (safetensors lazily, `.bin` memory-mapped when possible)."""
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        yield from state.items()


def _weight_map(index: Path) -> dict[str, str]:
    """key -> shard file name, from a shard index."""
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map")
    return weight_map


# (format, shard index, single file), in order of preference: safetensors first when both are there.
WEIGHT_LAYOUTS = (
    ("safetensors", "model.safetensors.index.json", "model.safetensors"),
    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def _shard_files(folder: Path, names, index: Path) -> list[Path]:
    """The shards an index names, checked to be there."""
    files = [folder / name for name in sorted(set(names))]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shards listed in {index.name} are missing: {', '.join(missing)}")
    return files


def _check_keys_agree(listed: set[str], found: set[str], index: Path) -> None:
    if listed != found:
        raise CheckpointError(f"{index.name} and the shards disagree on the keys: {_listing(sorted(listed ^ found))}")


def find_weight_files(folder: Path) -> WeightFiles:
    """Sharded (with an index) or single-file weights; safetensors preferred when both are there."""
    found = _weight_layout(folder)
    if found is None:
        raise CheckpointError(
            f"{folder} holds no weights: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
        )
    fmt, index, single = found
    if index is not None:
        return WeightFiles(fmt, _shard_files(folder, _weight_map(index).values(), index))
    return WeightFiles(fmt, [single])


def _weight_layout(folder: Path) -> tuple[str, Path | None, Path | None] | None:
    """(format, shard index or None, single file or None) of the weights in `folder`; None if none."""
    for fmt, index_name, single in WEIGHT_LAYOUTS:
        if (folder / index_name).is_file():
            return fmt, folder / index_name, None
        if (folder / single).is_file():
            return fmt, None, folder / single
    return None


def _encoder_weights(name_or_path, folder: Path, is_local: bool, hub: dict):
    """Encoders-only: the CLIP part of the key plan, and only the weight files holding its tensors.

    With a shard index the keys are the index's and only the shards holding CLIP tensors are opened
    (and, for a hub id, fetched); a single weight file is opened for its keys, its data read only
    when it holds CLIP tensors. Returns (weights, shapes of the opened files, plan, every key).
    """
    layout = _weight_layout(folder)
    if layout is None or layout[1] is None:  # a single weight file (or, for a hub id, not fetched yet)
        weights = find_weight_files(folder) if is_local else _fetch_weights(str(name_or_path), folder, **hub)
        shapes = weights.shapes()
        plan = restrict_to_encoders(plan_keys(shapes))
        return WeightFiles(weights.format, weights.files if plan.targets else []), shapes, plan, set(shapes)
    fmt, index_path, _ = layout
    weight_map = _weight_map(index_path)
    plan = restrict_to_encoders(plan_keys(weight_map))
    names = sorted({weight_map[key] for key in plan.targets})
    if names and not is_local:
        folder = _snapshot(str(name_or_path), CHECKPOINT_METADATA + names, "model checkpoint", **hub)
    weights = WeightFiles(fmt, _shard_files(folder, names, index_path))
    shapes = weights.shapes()
    _check_keys_agree({key for key, name in weight_map.items() if name in names}, set(shapes), index_path)
    return weights, shapes, plan, set(weight_map)


def _check_index(weights: WeightFiles, keys: set[str], folder: Path) -> None:
    index = folder / next(index_name for fmt, index_name, _ in WEIGHT_LAYOUTS if fmt == weights.format)
    if not index.is_file():
        return
    _check_keys_agree(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]), keys, index)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else "")


# ---------------------------------------------------------------- the key plan
@dataclass
class KeyPlan:
    """Where each released key goes: project names (one or more), deliberately unused, or dropped."""

    kind: str  # "glamm" or "lisa"
    sam_prefix: str
    iou_head_depth: int
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # keys of parts an encoders-only build leaves out


def restrict_to_encoders(plan: KeyPlan) -> KeyPlan:
    """The plan of an encoders-only build: CLIP targets only; the other parts' keys (SAM keys the
    mapping does not know included) are skipped, not unexpected."""
    targets, skipped = {}, []
    for key, names in plan.targets.items():
        if all(name.startswith(ENCODER_PARTS) for name in names):
            targets[key] = names
        else:
            skipped.append(key)
    unknown = [key for key in plan.unknown if not key.startswith(plan.sam_prefix)]
    skipped += [key for key in plan.unknown if key.startswith(plan.sam_prefix)]
    return replace(plan, targets=targets, unknown=unknown, skipped=sorted(skipped))


def detect_kind(keys) -> str:
    """GLaMM or LISA, from the SAM key prefix present (never from the checkpoint's name)."""
    found = [kind for kind, prefix in SAM_PREFIXES.items() if any(key.startswith(prefix) for key in keys)]
    if len(found) != 1:
        prefixes = " or ".join(f"'{prefix}'" for prefix in SAM_PREFIXES.values())
        detail = "none" if not found else "both"
        raise CheckpointError(f"cannot tell GLaMM from LISA: keys under {prefixes}: {detail}")
    return found[0]


def plan_keys(keys) -> KeyPlan:
    """Map every released key to the project's modules (see the module docstring for the rules)."""
    keys = sorted(keys)
    kind = detect_kind(keys)
    sam_prefix = SAM_PREFIXES[kind]
    iou_head = re.compile(re.escape(sam_prefix) + r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\..+")
    iou_layers = {int(m[1]) for key in keys if (m := iou_head.fullmatch(key))}
    plan = KeyPlan(kind, sam_prefix, max(iou_layers) + 1 if iou_layers else 3)
    for key in keys:
        if DROPPED_KEY.fullmatch(key):
            plan.dropped.append(key)
        elif key.startswith(UNUSED_PREFIXES):
            plan.unused.append(key)
        elif key.startswith(LLM_PREFIXES):
            plan.targets[key] = (f"llm.{key}",)
        elif key.startswith("model.mm_projector."):
            plan.targets[key] = ("mm_projector." + key[len("model.mm_projector.") :],)
        elif key.startswith("model.text_hidden_fcs.0."):
            plan.targets[key] = ("text_hidden_fcs." + key[len("model.text_hidden_fcs.0.") :],)
        elif key.startswith(sam_prefix):
            name = key[len(sam_prefix) :]
            if name in ORIGINAL_BUFFERS:
                plan.dropped.append(key)
                continue
            try:
                plan.targets[key] = tuple(f"sam.{t}" for t in sam_original_key_to_hf(name, plan.iou_head_depth))
            except LitelvlmError:
                plan.unknown.append(key)
        elif match := VISION_TOWER_KEY.fullmatch(key):
            plan.targets[key] = (f"vision_tower.{match[1]}",)
        else:
            plan.unknown.append(key)
    return plan


def released_name(project_key: str, plan: KeyPlan) -> str:
    """The released key a project key is read from (for messages about missing keys)."""
    if project_key.startswith("llm."):
        return project_key[len("llm.") :]
    if project_key.startswith("mm_projector."):
        return "model." + project_key
    if project_key.startswith("text_hidden_fcs."):
        return "model.text_hidden_fcs.0." + project_key[len("text_hidden_fcs.") :]
    if project_key.startswith("sam."):
        return plan.sam_prefix + sam_hf_key_to_original(project_key[len("sam.") :], plan.iou_head_depth)
    return project_key


def projector_form(keys) -> str:
    """`linear` (model.mm_projector.weight) or `mlp2x_gelu` (model.mm_projector.0/.2), from the keys present."""
    names = sorted(key[len("model.mm_projector.") :] for key in keys if key.startswith("model.mm_projector."))
    if set(names) == {"weight", "bias"}:
        return "linear"
    if set(names) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        return "mlp2x_gelu"
    raise CheckpointError(
        "unsupported projector: expected model.mm_projector.{weight,bias} (Linear) or "
        f"model.mm_projector.{{0,2}}.{{weight,bias}} (Linear-GELU-Linear), found {names or 'no projector keys'}"
    )


# ---------------------------------------------------------------- architecture
def _llm_spec(config: dict, folder: Path) -> LLMSpec:
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{folder / 'config.json'} lacks {', '.join(missing)}")
    if config.get("rope_scaling"):
        raise CheckpointError(f"{folder / 'config.json'}: rope_scaling {config['rope_scaling']} is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{folder / 'config.json'}: hidden_act {config['hidden_act']!r}, LLaMA uses 'silu'")
    return LLMSpec(
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads"),
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        max_position_embeddings=config.get("max_position_embeddings") or config.get("max_sequence_length") or 2048,
        rope_theta=config.get("rope_theta", 10000.0),
    )


def _sam_spec(shapes: dict[str, Tensor], prefix: str) -> SAMSpec:
    """SAMSpec from the SAM tensors' shapes, checked to rebuild the very same SamConfig."""
    inferred = infer_sam_config({key[len(prefix) :]: value for key, value in shapes.items() if key.startswith(prefix)})
    vision, prompt, decoder = inferred.vision_config, inferred.prompt_encoder_config, inferred.mask_decoder_config
    spec = SAMSpec(
        hidden_size=vision.hidden_size,
        num_layers=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        global_attn_indexes=tuple(vision.global_attn_indexes),
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        window_size=vision.window_size,
        mlp_dim=vision.mlp_dim,
        prompt_dim=prompt.hidden_size,
        mask_decoder_mlp_dim=decoder.mlp_dim,
        mask_decoder_layers=decoder.num_hidden_layers,
        mask_decoder_heads=decoder.num_attention_heads,
        iou_head_hidden_dim=decoder.iou_head_hidden_dim,
    )
    built = sam_config(LVLMConfig(name="check", sam=spec))
    checks = {
        "vision_config": ("output_channels", "num_pos_feats", "qkv_bias"),
        "prompt_encoder_config": ("mask_input_channels", "num_point_embeddings"),
        "mask_decoder_config": ("attention_downsample_rate", "num_multimask_outputs", "iou_head_depth"),
    }
    differ = []
    for part, names in checks.items():
        for name in names:
            found, buildable = getattr(getattr(inferred, part), name), getattr(getattr(built, part), name)
            if found != buildable:
                differ.append(f"{part}.{name}: checkpoint {found}, model {buildable}")
    if differ:
        raise CheckpointError("this SAM variant is not one the model builds: " + "; ".join(differ))
    return spec


def _clip_configs(clip_folder: Path):
    """The CLIP vision and text configs (text None for a vision-only checkpoint), projection dims set."""
    from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig

    config = AutoConfig.from_pretrained(str(clip_folder))
    if isinstance(config, CLIPConfig):
        vision, text = config.vision_config, config.text_config
        vision.projection_dim = text.projection_dim = config.projection_dim
        return vision, text
    if isinstance(config, CLIPVisionConfig):
        return config, None
    raise CheckpointError(f"{clip_folder} is not a CLIP checkpoint (config type {type(config).__name__})")


def _vision_spec(vision) -> CLIPVisionSpec:
    return CLIPVisionSpec(
        hidden_size=vision.hidden_size,
        num_layers=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        intermediate_size=vision.intermediate_size,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projection_dim=vision.projection_dim,
    )


def _text_spec(text) -> CLIPTextSpec:
    return CLIPTextSpec(
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        max_length=text.max_position_embeddings,
    )


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
    from litelvlm.models.tokenizer import load_clip_tokenizer, load_llm_tokenizer

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
        weights = find_weight_files(folder) if is_local else _fetch_weights(str(name_or_path), folder, **hub)
        shapes = weights.shapes()
        _check_index(weights, set(shapes), folder)
        plan, keys = plan_keys(shapes), set(shapes)
    clip_checkpoint, clip_folder = _resolve_clip(config_json, config_path, clip_checkpoint, **hub)
    vision, text = _clip_configs(clip_folder)

    select_feature = config_json.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise CheckpointError(f"{config_path}: mm_vision_select_feature {select_feature!r}; only 'patch' is supported")
    config = LVLMConfig(
        name=folder.name if is_local else str(name_or_path),
        vision=_vision_spec(vision),
        text=_text_spec(text) if text is not None else CLIPTextSpec(),
        llm=_llm_spec(config_json, folder),
        sam=SAMSpec() if encoders_only else _sam_spec(shapes, plan.sam_prefix),
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


def _fetch_weights(repo_id: str, folder: Path, cache_dir, local_files_only) -> WeightFiles:
    """For a hub id: fetch only the weight format the index files (already fetched) announce."""
    if (folder / "model.safetensors.index.json").is_file():
        patterns = ["*.safetensors"]
    elif (folder / "pytorch_model.bin.index.json").is_file():
        patterns = ["*.bin"]
    else:
        patterns = ["model.safetensors", "pytorch_model.bin"]
    folder = _snapshot(repo_id, CHECKPOINT_METADATA + patterns, "model checkpoint", cache_dir, local_files_only)
    return find_weight_files(folder)


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
        folder = _snapshot(str(clip_checkpoint), ["pytorch_model.bin"], what, cache_dir, local_files_only)
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
    from litelvlm.models.loading import resolve_dtype
    from litelvlm.models.tokenizer import special_token_ids

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
    check_plan(model, assets)
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


def check_plan(model: PixelGroundingLVLM, assets: CheckpointAssets) -> None:
    """Before any data is read: every model tensor has a source, every source a place, shapes agree."""
    plan, shapes = assets.plan, assets.shapes
    model_state = model.state_dict()  # meta tensors: names and shapes only
    from_clip = ("vision_tower.", "text_tower.")
    covered = {target for targets in plan.targets.values() for target in targets}
    unexpected = list(plan.unknown)
    mismatched = []
    for key, targets in plan.targets.items():
        if any(target not in model_state for target in targets):
            unexpected.append(key)
            continue
        for target in targets:
            if tuple(shapes[key].shape) != tuple(model_state[target].shape):
                mismatched.append(f"{key} {tuple(shapes[key].shape)} (model {tuple(model_state[target].shape)})")
    missing = [released_name(k, plan) for k in model_state if k not in covered and not k.startswith(from_clip)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(sorted(set(missing)))}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {assets.folder} does not fit the {plan.kind} model; " + "; ".join(problems))


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
            raise CheckpointError(f"{path.name}: no place for {_listing(result.unexpected_keys)}")
        del batch


def _load_clip_towers(model, assets: CheckpointAssets, dtype, device, with_text_tower: bool) -> None:
    """The CLIP towers from their own checkpoint; any weight that checkpoint lacks is an error."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

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
                f"CLIP checkpoint {assets.clip_folder} lacks {attribute} weights: {_listing(sorted(bad))}"
            )
        setattr(model, attribute, tower.to(device).eval())
    if not with_text_tower:
        model.text_tower = None


class _quiet_transformers:
    """Silence transformers' loading report while loading a CLIP tower out of a full CLIPModel file
    (the other tower's keys are listed as unexpected there); missing keys are checked by the caller."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

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
        raise CheckpointError(f"not loaded (still on the meta device): {_listing(left)}")
