"""Original segment-anything checkpoints in transformers' `SamModel`.

GLaMM and LISA ship SAM under the original segment-anything names (GLaMM below
`model.grounding_encoder.`, LISA below `model.visual_model.`); the project runs transformers'
`SamModel`, which holds the same tensors under other names. The renaming here is exact and
complete: every original tensor has one place (the Gaussian matrix of the positional encoding has
two, which transformers ties), every `SamModel` parameter gets one tensor, and a key that fits no
rule is an error that names it. The architecture is read from the tensor shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from litelvlm.errors import LitelvlmError

ORIGINAL_BUFFERS = ("pixel_mean", "pixel_std")  # normalisation constants of the standalone file, not weights
SAM_DECODER_HEADS = 8  # all released SAMs; head counts of the mask decoder do not show in tensor shapes
ORIGINAL_DECODER_NORM_EPS = 1e-5  # the original two-way transformer uses nn.LayerNorm's default eps
HYPERNETWORK_DEPTH = 3  # fixed in both implementations
TIED_KEY = "prompt_encoder.shared_embedding.positional_embedding"  # transformers ties it to the next one
SHARED_KEY = "shared_image_embedding.positional_embedding"


class SamConversionError(LitelvlmError):
    """An original SAM state dict that cannot be placed into transformers' SamModel."""


_PLACEHOLDERS = {
    "i": r"\d+",
    "wb": "weight|bias",
    "n": "[1-4]",
    "attn": "self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "proj": "q_proj|k_proj|v_proj|out_proj",
    "lin": "lin1|lin2",
    "block_attn": "qkv\\.weight|qkv\\.bias|proj\\.weight|proj\\.bias|rel_pos_h|rel_pos_w",
}

# (original name, transformers name(s)); {placeholders} match the same text on both sides.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("image_encoder.patch_embed.proj.{wb}", ("vision_encoder.patch_embed.projection.{wb}",)),
    ("image_encoder.pos_embed", ("vision_encoder.pos_embed",)),
    ("image_encoder.blocks.{i}.norm1.{wb}", ("vision_encoder.layers.{i}.layer_norm1.{wb}",)),
    ("image_encoder.blocks.{i}.attn.{block_attn}", ("vision_encoder.layers.{i}.attn.{block_attn}",)),
    ("image_encoder.blocks.{i}.norm2.{wb}", ("vision_encoder.layers.{i}.layer_norm2.{wb}",)),
    ("image_encoder.blocks.{i}.mlp.{lin}.{wb}", ("vision_encoder.layers.{i}.mlp.{lin}.{wb}",)),
    ("image_encoder.neck.0.weight", ("vision_encoder.neck.conv1.weight",)),
    ("image_encoder.neck.1.{wb}", ("vision_encoder.neck.layer_norm1.{wb}",)),
    ("image_encoder.neck.2.weight", ("vision_encoder.neck.conv2.weight",)),
    ("image_encoder.neck.3.{wb}", ("vision_encoder.neck.layer_norm2.{wb}",)),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", (SHARED_KEY, TIED_KEY)),
    ("prompt_encoder.point_embeddings.{i}.weight", ("prompt_encoder.point_embed.{i}.weight",)),
    ("prompt_encoder.not_a_point_embed.weight", ("prompt_encoder.not_a_point_embed.weight",)),
    ("prompt_encoder.no_mask_embed.weight", ("prompt_encoder.no_mask_embed.weight",)),
    ("prompt_encoder.mask_downscaling.0.{wb}", ("prompt_encoder.mask_embed.conv1.{wb}",)),
    ("prompt_encoder.mask_downscaling.1.{wb}", ("prompt_encoder.mask_embed.layer_norm1.{wb}",)),
    ("prompt_encoder.mask_downscaling.3.{wb}", ("prompt_encoder.mask_embed.conv2.{wb}",)),
    ("prompt_encoder.mask_downscaling.4.{wb}", ("prompt_encoder.mask_embed.layer_norm2.{wb}",)),
    ("prompt_encoder.mask_downscaling.6.{wb}", ("prompt_encoder.mask_embed.conv3.{wb}",)),
    ("mask_decoder.iou_token.weight", ("mask_decoder.iou_token.weight",)),
    ("mask_decoder.mask_tokens.weight", ("mask_decoder.mask_tokens.weight",)),
    (
        "mask_decoder.transformer.layers.{i}.{attn}.{proj}.{wb}",
        ("mask_decoder.transformer.layers.{i}.{attn}.{proj}.{wb}",),
    ),
    ("mask_decoder.transformer.layers.{i}.norm{n}.{wb}", ("mask_decoder.transformer.layers.{i}.layer_norm{n}.{wb}",)),
    ("mask_decoder.transformer.layers.{i}.mlp.{lin}.{wb}", ("mask_decoder.transformer.layers.{i}.mlp.{lin}.{wb}",)),
    (
        "mask_decoder.transformer.final_attn_token_to_image.{proj}.{wb}",
        ("mask_decoder.transformer.final_attn_token_to_image.{proj}.{wb}",),
    ),
    ("mask_decoder.transformer.norm_final_attn.{wb}", ("mask_decoder.transformer.layer_norm_final_attn.{wb}",)),
    ("mask_decoder.output_upscaling.0.{wb}", ("mask_decoder.upscale_conv1.{wb}",)),
    ("mask_decoder.output_upscaling.1.{wb}", ("mask_decoder.upscale_layer_norm.{wb}",)),
    ("mask_decoder.output_upscaling.3.{wb}", ("mask_decoder.upscale_conv2.{wb}",)),
)

# MLP heads: original `layers.0 .. layers.{d-1}`; transformers `proj_in`, `layers.0 .. layers.{d-3}`, `proj_out`.
_MLP_HEAD = r"(?P<head>mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))"
_ORIGINAL_MLP = re.compile(_MLP_HEAD + r"\.layers\.(?P<k>\d+)\.(?P<wb>weight|bias)")
_HF_MLP = re.compile(_MLP_HEAD + r"\.(?:(?P<end>proj_in|proj_out)|layers\.(?P<m>\d+))\.(?P<wb>weight|bias)")


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})" for index, part in enumerate(parts)
    )
    return re.compile(pattern)


_FORWARD = [(_compile(original), targets) for original, targets in _RULES]
_REVERSE = [(_compile(target), original) for original, targets in _RULES for target in targets]


def _head_depth(head: str, iou_head_depth: int) -> int:
    return iou_head_depth if head.endswith("iou_prediction_head") else HYPERNETWORK_DEPTH


def sam_original_key_to_hf(key: str, iou_head_depth: int = 3) -> tuple[str, ...]:
    """The transformers name(s) of one original SAM key; unknown keys raise, naming the key."""
    match = _ORIGINAL_MLP.fullmatch(key)
    if match:
        depth, k = _head_depth(match["head"], iou_head_depth), int(match["k"])
        if k >= depth:
            raise SamConversionError(f"SAM key '{key}': layer {k} of an MLP head of depth {depth}")
        place = "proj_in" if k == 0 else "proj_out" if k == depth - 1 else f"layers.{k - 1}"
        return (f"{match['head']}.{place}.{match['wb']}",)
    for pattern, targets in _FORWARD:
        match = pattern.fullmatch(key)
        if match:
            return tuple(target.format(**match.groupdict()) for target in targets)
    raise SamConversionError(f"'{key}' is not a key of an original segment-anything SAM checkpoint")


def sam_hf_key_to_original(key: str, iou_head_depth: int = 3) -> str:
    """The original name of one transformers SamModel key (for messages about missing tensors)."""
    match = _HF_MLP.fullmatch(key)
    if match:
        depth = _head_depth(match["head"], iou_head_depth)
        k = 0 if match["end"] == "proj_in" else depth - 1 if match["end"] == "proj_out" else int(match["m"]) + 1
        return f"{match['head']}.layers.{k}.{match['wb']}"
    for pattern, original in _REVERSE:
        match = pattern.fullmatch(key)
        if match:
            return original.format(**match.groupdict())
    raise SamConversionError(f"'{key}' is not a key of transformers' SamModel")


def _iou_head_depth(keys) -> int:
    layers = {int(m["k"]) for key in keys if (m := _ORIGINAL_MLP.fullmatch(key)) and "iou" in m["head"]}
    return max(layers) + 1 if layers else 3


def sam_original_to_hf(state_dict: Mapping[str, Tensor], iou_head_depth: int | None = None) -> dict[str, Tensor]:
    """Rename a (prefix-free) original SAM state dict to SamModel's names; same tensors, no copies.

    `pixel_mean`/`pixel_std` are dropped. `iou_head_depth` is read from the keys when not given
    (give it when mapping part of a checkpoint, e.g. one shard).
    """
    depth = _iou_head_depth(state_dict) if iou_head_depth is None else iou_head_depth
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key in ORIGINAL_BUFFERS:
            continue
        try:
            targets = sam_original_key_to_hf(key, depth)
        except SamConversionError:
            unknown.append(key)
            continue
        for target in targets:
            converted[target] = tensor
    if unknown:
        raise SamConversionError(f"keys that are not original SAM keys: {', '.join(sorted(unknown))}")
    return converted


# ---------------------------------------------------------------- architecture from shapes
def _shape(state_dict: Mapping, key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise SamConversionError(f"cannot infer the SAM architecture: the state dict has no '{key}'")
    return tuple(state_dict[key].shape)


def _indices(state_dict: Mapping, pattern: str, what: str) -> list[int]:
    found = sorted({int(m[1]) for key in state_dict if (m := re.match(pattern, key))})
    if not found or found != list(range(len(found))):
        raise SamConversionError(f"cannot infer the SAM architecture: {what} indices are {found}, expected 0..n-1")
    return found


def infer_sam_config(state_dict: Mapping[str, Tensor]) -> SamConfig:
    """The SamConfig of an original (prefix-free) SAM state dict, read from its tensor shapes.

    Works on meta tensors, so a checkpoint's architecture is known before its data is read. The
    mask decoder's head count is not visible in shapes; it is SAM's fixed 8.
    """
    hidden, channels, patch, patch_w = _shape(state_dict, "image_encoder.patch_embed.proj.weight")
    if channels != 3 or patch != patch_w:
        raise SamConversionError(f"unexpected SAM patch embedding shape {(hidden, channels, patch, patch_w)}")
    _, grid, grid_w, pos_hidden = _shape(state_dict, "image_encoder.pos_embed")
    if grid != grid_w or pos_hidden != hidden:
        raise SamConversionError(f"unexpected SAM pos_embed shape {(1, grid, grid_w, pos_hidden)}")
    blocks = _indices(state_dict, r"image_encoder\.blocks\.(\d+)\.", "image encoder block")
    rel_lengths = [_shape(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] for i in blocks]
    head_dim = _shape(state_dict, "image_encoder.blocks.0.attn.rel_pos_h")[1]
    global_indexes = [i for i, length in zip(blocks, rel_lengths) if length == 2 * grid - 1]
    windows = {(length + 1) // 2 for length in rel_lengths if length != 2 * grid - 1}
    if len(windows) > 1:
        raise SamConversionError(f"SAM image encoder blocks use several window sizes {sorted(windows)}")
    vision = SamVisionConfig(
        hidden_size=hidden,
        output_channels=_shape(state_dict, "image_encoder.neck.0.weight")[0],
        num_hidden_layers=len(blocks),
        num_attention_heads=hidden // head_dim,
        image_size=grid * patch,
        patch_size=patch,
        window_size=windows.pop() if windows else 14,
        global_attn_indexes=global_indexes,
        mlp_dim=_shape(state_dict, "image_encoder.blocks.0.mlp.lin1.weight")[0],
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state_dict,
        num_pos_feats=_shape(state_dict, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")[1],
    )
    prompt_dim = _shape(state_dict, "prompt_encoder.no_mask_embed.weight")[1]
    prompt = SamPromptEncoderConfig(
        hidden_size=prompt_dim,
        image_size=grid * patch,
        patch_size=patch,
        mask_input_channels=_shape(state_dict, "prompt_encoder.mask_downscaling.3.weight")[0],
        num_point_embeddings=len(_indices(state_dict, r"prompt_encoder\.point_embeddings\.(\d+)\.", "point embedding")),
    )
    decoder_dim = _shape(state_dict, "mask_decoder.iou_token.weight")[1]
    internal_dim = _shape(state_dict, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0]
    decoder = SamMaskDecoderConfig(
        hidden_size=decoder_dim,
        mlp_dim=_shape(state_dict, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_hidden_layers=len(_indices(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\.", "decoder layer")),
        num_attention_heads=SAM_DECODER_HEADS,
        attention_downsample_rate=decoder_dim // internal_dim,
        num_multimask_outputs=_shape(state_dict, "mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_iou_head_depth(state_dict),
        iou_head_hidden_dim=_shape(state_dict, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
        layer_norm_eps=ORIGINAL_DECODER_NORM_EPS,
    )
    _check_consistent(vision, prompt, decoder, internal_dim)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def _check_consistent(vision, prompt, decoder, internal_dim: int) -> None:
    problems = []
    if vision.hidden_size % vision.num_attention_heads:
        problems.append(f"image encoder width {vision.hidden_size} is not a multiple of its head size")
    if not vision.output_channels == prompt.hidden_size == decoder.hidden_size == 2 * vision.num_pos_feats:
        problems.append(
            f"neck channels {vision.output_channels}, prompt width {prompt.hidden_size}, decoder width "
            f"{decoder.hidden_size} and 2 x positional features {2 * vision.num_pos_feats} differ"
        )
    if decoder.hidden_size % internal_dim or internal_dim % decoder.num_attention_heads:
        problems.append(
            f"decoder attention width {internal_dim} does not fit width {decoder.hidden_size} with "
            f"{decoder.num_attention_heads} heads"
        )
    if problems:
        raise SamConversionError("inconsistent SAM tensor shapes: " + "; ".join(problems))


# ---------------------------------------------------------------- loading
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.pth`/`.bin` (torch.load, weights only, memory-mapped when possible) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):  # some training scripts nest the weights
        if isinstance(loaded, dict) and set(loaded) == {wrapper} and isinstance(loaded[wrapper], dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise SamConversionError(f"{path} does not hold a state dict")
    return loaded


def tie_positional_embedding(sam: SamModel) -> None:
    """Make the prompt encoder's Gaussian matrix the model's again (one Parameter, as transformers ties them)."""
    shared = sam.shared_image_embedding.positional_embedding
    tied = sam.prompt_encoder.shared_embedding.positional_embedding
    if tied is not shared:
        if tied.device.type != "meta" and not torch.equal(tied, shared):
            raise SamConversionError(f"'{TIED_KEY}' and '{SHARED_KEY}' hold different tensors")
        sam.prompt_encoder.shared_embedding.positional_embedding = shared


def load_sam_from_original(
    state_dict_or_path: Mapping[str, Tensor] | str | Path,
    config: SamConfig | None = None,
    *,
    prefix: str | None = None,
    dtype: torch.dtype | None = None,
) -> SamModel:
    """A transformers SamModel holding an original segment-anything checkpoint's weights.

    Args:
        state_dict_or_path: the state dict, or a `.pth`/`.bin`/`.safetensors` file (e.g. `sam_vit_h_4b8939.pth`).
        config: the architecture; None reads it from the tensor shapes.
        prefix: keep only keys under this prefix, stripped (`model.grounding_encoder.` for GLaMM,
            `model.visual_model.` for LISA).
        dtype: convert the weights to this dtype (default: keep the file's).
    """
    source = state_dict_or_path
    state_dict = dict(read_state_dict(source) if isinstance(source, (str, Path)) else source)
    if prefix:
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not state_dict:
            raise SamConversionError(f"no SAM keys under the prefix '{prefix}'")
    state_dict = {key: value for key, value in state_dict.items() if key not in ORIGINAL_BUFFERS}
    config = config if config is not None else infer_sam_config(state_dict)
    converted = sam_original_to_hf(state_dict, iou_head_depth=config.mask_decoder_config.iou_head_depth)
    if dtype is not None:
        converted = {key: value.to(dtype) for key, value in converted.items()}
    with torch.device("meta"):
        model = SamModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        depth = config.mask_decoder_config.iou_head_depth
        detail = []
        if missing:
            detail.append("missing original keys: " + ", ".join(sam_hf_key_to_original(k, depth) for k in missing))
        if unexpected:
            detail.append("keys this architecture has no place for: " + ", ".join(unexpected))
        raise SamConversionError("SAM checkpoint does not fit the architecture; " + "; ".join(detail))
    wrong_shapes = [
        f"{key}: checkpoint {tuple(converted[key].shape)}, model {tuple(value.shape)}"
        for key, value in model.state_dict().items()
        if tuple(converted[key].shape) != tuple(value.shape)
    ]
    if wrong_shapes:
        raise SamConversionError("SAM tensor shapes do not fit the architecture: " + "; ".join(wrong_shapes))
    model.load_state_dict(converted, strict=True, assign=True)
    tie_positional_embedding(model)
    return model.eval()
