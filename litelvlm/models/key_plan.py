"""What a released checkpoint's keys mean: the key plan, and the architecture the files imply.

The key plan maps every released key to the project's module names (one or more), or marks it
deliberately unused or dropped; it tells GLaMM from LISA by the SAM key prefix, the projector's
form by its keys. The architecture is read from the files: the LLM from config.json, SAM from its
tensors' shapes, CLIP from its own checkpoint's config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import Tensor, nn
from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig

from litelvlm.errors import LitelvlmError
from litelvlm.models.config import CLIPTextSpec, CLIPVisionSpec, LLMSpec, LVLMConfig, SAMSpec
from litelvlm.models.lvlm import sam_config
from litelvlm.models.sam_conversion import (
    ORIGINAL_BUFFERS,
    infer_sam_config,
    sam_hf_key_to_original,
    sam_original_key_to_hf,
)
from litelvlm.models.weight_files import CheckpointError, listing

SAM_PREFIXES = {"glamm": "model.grounding_encoder.", "lisa": "model.visual_model."}
UNUSED_PREFIXES = ("model.region_encoder.",)  # GLaMM's region encoder: box prompts only, unused here
DROPPED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # recomputed by transformers
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
ENCODER_PARTS = ("vision_tower.", "text_tower.")  # what an encoders-only build holds
VISION_TOWER_KEY = re.compile(r"model\.vision_tower\.(?:vision_tower\.|0\.)?(vision_model\..+)")


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


def check_plan(model: nn.Module, plan: KeyPlan, shapes: dict[str, Tensor], folder: Path) -> None:
    """Before any data is read: every model tensor has a source, every source a place, shapes agree."""
    model_state = model.state_dict()  # meta tensors: names and shapes only
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
    missing = [released_name(k, plan) for k in model_state if k not in covered and not k.startswith(ENCODER_PARTS)]
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(sorted(set(missing)))}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not fit the {plan.kind} model; " + "; ".join(problems))



# ---------------------------------------------------------------- architecture
def llm_spec(config: dict, folder: Path) -> LLMSpec:
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


def sam_spec(shapes: dict[str, Tensor], prefix: str) -> SAMSpec:
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


def clip_configs(clip_folder: Path):
    """The CLIP vision and text configs (text None for a vision-only checkpoint), projection dims set."""
    config = AutoConfig.from_pretrained(str(clip_folder))
    if isinstance(config, CLIPConfig):
        vision, text = config.vision_config, config.text_config
        vision.projection_dim = text.projection_dim = config.projection_dim
        return vision, text
    if isinstance(config, CLIPVisionConfig):
        return config, None
    raise CheckpointError(f"{clip_folder} is not a CLIP checkpoint (config type {type(config).__name__})")


def vision_spec(vision) -> CLIPVisionSpec:
    return CLIPVisionSpec(
        hidden_size=vision.hidden_size,
        num_layers=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        intermediate_size=vision.intermediate_size,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projection_dim=vision.projection_dim,
    )


def text_spec(text) -> CLIPTextSpec:
    return CLIPTextSpec(
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        intermediate_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        max_length=text.max_position_embeddings,
    )
