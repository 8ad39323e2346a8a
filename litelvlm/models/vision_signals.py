"""The pruning signals of the CLIP vision tower (and of the projector after it): one pass over its layers, each
signal read where the references read it.

LLaVA-style models (GLaMM, LISA and the pruning references) index transformers' CLIP outputs with
`select_layer`: the features are `hidden_states[select_layer]` (L+1 entries: the pre-layer-norm
embeddings, then each layer's output) and VisPruner's CLS attention is `attentions[select_layer]`
(L entries, one per layer). For a negative value both name the same layer (the features are its
output, the attention its map); for a value >= 0 the attention belongs to the layer AFTER the one
whose output the features are. The last layer's q/k/v (LiteLVLM's context score) are its projections
of its INPUT through its first layer norm, as hooks on `layers[-1].self_attn.{q,k,v}_proj` see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litelvlm.errors import LitelvlmError
from litelvlm.pruners.base import Signal

def hidden_state_index(select_layer: int, num_layers: int) -> int:
    """Index into CLIP's L+1 hidden states (embeddings first) of the features the LLM gets."""
    if not -(num_layers + 1) <= select_layer <= num_layers:
        raise LitelvlmError(
            f"select_layer={select_layer} is impossible for a {num_layers}-layer CLIP tower: its hidden states "
            f"are indexed {-(num_layers + 1)}..{num_layers}"
        )
    return select_layer % (num_layers + 1)


def attention_layer_index(select_layer: int, num_layers: int) -> int:
    """Index of the layer whose attention map `attentions[select_layer]` is (VisPruner's CLS attention)."""
    if not -num_layers <= select_layer < num_layers:
        raise LitelvlmError(
            f"select_layer={select_layer} has no CLS attention in a {num_layers}-layer CLIP tower: its "
            f"attentions are indexed {-num_layers}..{num_layers - 1}"
        )
    return select_layer % num_layers


@dataclass
class VisionPass:
    """What one pass over the CLIP vision layers captured (tensors in the tower's dtype)."""

    features_with_cls: Tensor  # [B, N+1, D] hidden_states[select_layer]
    # q (None when only the keys were asked for), k projections of the layer of attentions[select_layer]
    select_qk: tuple[Tensor | None, Tensor] | None
    last_qkv: tuple[Tensor, Tensor, Tensor] | None  # q, k, v projections of the last layer


def run_vision_layers(vision_model: nn.Module, pixel_values: Tensor, select_layer: int, needs: frozenset) -> VisionPass:
    """Run the CLIP vision layers as far as the features and the asked-for projections need, once each.

    A layer that runs anyway gives its projections through forward hooks; the deepest wanted layer,
    when nothing needs its output, only computes them from its input (layer norm, then projection).
    """
    layers = vision_model.encoder.layers
    num_layers = len(layers)
    feature_index = hidden_state_index(select_layer, num_layers)
    wanted: dict[int, set[str]] = {}
    attention_layer = attention_layer_index(select_layer, num_layers) if needs & _SELECT_LAYER_SIGNALS else None
    if needs & {Signal.CLS_ATTENTION, Signal.CLS_ATTENTION_SUM}:
        wanted.setdefault(attention_layer, set()).update(("q", "k"))
    if Signal.SELECT_KEYS in needs:
        wanted.setdefault(attention_layer, set()).add("k")
    if Signal.LAST_QKV in needs:
        wanted.setdefault(num_layers - 1, set()).update(("q", "k", "v"))
    num_run = max([feature_index, *wanted])

    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    features = hidden
    projections: dict[int, dict[str, Tensor]] = {}
    for index in range(num_run):
        layer = layers[index]
        if index in wanted:
            with _capture_outputs(_projection_modules(layer, wanted[index])) as captured:
                hidden = layer(hidden, None)
            projections[index] = dict(captured)
        else:
            hidden = layer(hidden, None)
        if index + 1 == feature_index:
            features = hidden
    if num_run in wanted:  # its output is not needed: project its input only
        normed = layers[num_run].layer_norm1(hidden)
        projections[num_run] = {name: module(normed) for name, module in _projection_modules(layers[num_run], wanted[num_run]).items()}

    select_qk = last_qkv = None
    if attention_layer is not None:
        found = projections[attention_layer]
        select_qk = (found.get("q"), found["k"])
    if Signal.LAST_QKV in needs:
        found = projections[num_layers - 1]
        last_qkv = (found["q"], found["k"], found["v"])
    return VisionPass(features, select_qk, last_qkv)


def cls_attention(query: Tensor, key: Tensor, num_heads: int, score_dtype: str = "float32") -> Tensor:
    """Attention probabilities of the CLS query over the patches, per head: [B, H, N].

    `model`: as the eager CLIPAttention of transformers 4.37 (VisPruner's pinned version), whose
    `attentions` VisPruner reads: `q_proj(x) * head_dim**-0.5`, matmul and softmax, all in the tower's
    dtype. `float32`: q and k upcast, the product divided by sqrt(head_dim), softmax in float32.
    """
    b, length, width = key.shape
    head_dim = width // num_heads
    q = query[:, :1].reshape(b, 1, num_heads, head_dim).transpose(1, 2)
    k = key.reshape(b, length, num_heads, head_dim).transpose(1, 2)
    if score_dtype == "model":
        probs = ((q * head_dim**-0.5) @ k.transpose(-1, -2)).softmax(-1)  # [B, H, 1, N+1]
    else:
        probs = ((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(head_dim)).softmax(-1)
    return probs[:, :, 0, 1:]


def project_patches(vision_tower: nn.Module, patch_features: Tensor, score_dtype: str = "float32") -> Tensor:
    """CLIP's post_layernorm + visual_projection of patch features: [B, N, P].

    `model`: the tower's own modules in its dtype, as LiteLVLM's `sim_aware_pruning` (autocast off).
    `float32`: features and weights upcast.
    """
    norm, projection = vision_tower.vision_model.post_layernorm, vision_tower.visual_projection
    if score_dtype == "model":
        return projection(norm(patch_features.to(norm.weight.dtype)))
    normed = F.layer_norm(patch_features.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return F.linear(normed, projection.weight.float())


def project_to_llm(projector: nn.Module, patch_features: Tensor, llm_dtype: torch.dtype, score_dtype: str = "float32") -> Tensor:
    """The LLM projector on every patch: [B, N, h], the image embeddings the LLM would get unpruned.

    `model`: the projector in its own dtype, cast to the LLM's embedding dtype as the splice does (what
    DivPrune and CDPruner read, fp16 / fp32 in their references). `float32`: features and weights upcast.
    """
    if score_dtype == "model":
        return projector(patch_features.to(next(projector.parameters()).dtype)).to(llm_dtype)
    upcast = {name: value.float() for name, value in projector.named_parameters()}
    return torch.func.functional_call(projector, upcast, (patch_features.float(),))


def head_mean_keys(key: Tensor, num_heads: int, score_dtype: str = "float32") -> Tensor:
    """The patches' keys of one layer averaged over heads: [B, N+1, D] (CLS first) -> [B, N, D/H].

    VisionZip's merge metric (dvlab-research/VisionZip @3151f6d, `visionzip/utils.py:23-24,89`: the
    `k_proj` output split into heads, `.mean(1)` over them). `model`: in the tower's dtype, as the
    reference; `float32`: upcast first.
    """
    b, length, width = key.shape
    per_head = key.reshape(b, length, num_heads, width // num_heads)[:, 1:]
    return per_head.mean(2) if score_dtype == "model" else per_head.float().mean(2)


def cls_attention_head_sum(attention: Tensor) -> Tensor:
    """[B, H, N] CLS attention -> [B, N] summed over heads, in its own dtype (VisionZip's dominant score,
    `visionzip/clip_encoder.py:51-52`; `cls_attention` already made it in the pruner's score dtype)."""
    return attention.sum(dim=1)


_SELECT_LAYER_SIGNALS = frozenset({Signal.CLS_ATTENTION, Signal.CLS_ATTENTION_SUM, Signal.SELECT_KEYS})


def _projection_modules(layer: nn.Module, names) -> dict[str, nn.Module]:
    return {name: getattr(layer.self_attn, f"{name}_proj") for name in sorted(names, key="qkv".index)}


class _capture_outputs:
    """Context manager: record the outputs of some modules during one forward, via hooks."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.outputs: dict[str, Tensor] = {}
        self.handles = []

    def __enter__(self) -> dict[str, Tensor]:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self.outputs

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

