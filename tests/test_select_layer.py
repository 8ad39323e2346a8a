"""Every select_layer a checkpoint's config can hold: the CLIP signals equal what transformers' own
CLIP forward gives at that index (`hidden_states[s]`, `attentions[s]`, hooks on the last layer's q/k/v).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from litelvlm.errors import LitelvlmError
from litelvlm.models.config import LVLMConfig
from litelvlm.models.lvlm import PixelGroundingLVLM
from litelvlm.pruners import Signal

NUM_LAYERS = 7
ALL_VISION = frozenset({Signal.PATCH_FEATURES, Signal.CLS_ATTENTION, Signal.LAST_QKV})


@pytest.fixture(scope="module")
def tower_and_pixels():
    """A 7-layer tiny CLIP vision tower (encoders only) and two random images at its size."""
    base = LVLMConfig.from_name("tiny-glamm")
    vision = replace(base.vision, num_layers=NUM_LAYERS, image_size=112, patch_size=14)
    torch.manual_seed(0)
    model = PixelGroundingLVLM(replace(base, vision=vision), seg_token_id=0, encoders_only=True).eval()
    pixels = torch.randn(2, 3, 112, 112)
    return model, pixels


@pytest.fixture(scope="module")
def reference(tower_and_pixels):
    """transformers' eager CLIP forward with every hidden state, every attention map and the last layer's q/k/v."""
    model, pixels = tower_and_pixels
    tower = model.vision_tower
    tower.set_attn_implementation("eager")
    last = tower.vision_model.encoder.layers[-1].self_attn
    captured = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out))
        for name, module in (("q", last.q_proj), ("k", last.k_proj), ("v", last.v_proj))
    ]
    try:
        with torch.no_grad():
            out = tower(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
        tower.set_attn_implementation("sdpa")
    assert len(out.hidden_states) == NUM_LAYERS + 1 and len(out.attentions) == NUM_LAYERS
    return out, captured


def _signals(model, pixels, select_layer, needs=ALL_VISION):
    model.config = replace(model.config, select_layer=select_layer)
    with torch.no_grad():
        return model.encode_image(pixels, needs)


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 5, NUM_LAYERS - 1, -NUM_LAYERS])
def test_signals_equal_transformers_clip_at_every_select_layer(tower_and_pixels, reference, select_layer):
    model, pixels = tower_and_pixels
    out, last_qkv = reference
    patch_features, signals = _signals(model, pixels, select_layer)
    torch.testing.assert_close(patch_features, out.hidden_states[select_layer][:, 1:])
    torch.testing.assert_close(signals.patch_features, out.hidden_states[select_layer][:, 1:])
    torch.testing.assert_close(signals.cls_attention, out.attentions[select_layer][:, :, 0, 1:])
    for name, got in zip("qkv", signals.last_qkv):
        torch.testing.assert_close(got, last_qkv[name], msg=lambda m, name=name: f"{name}: {m}")


def test_the_checks_can_tell_neighbouring_layers_apart(reference):
    """The comparisons above would catch an off-by-one layer: neighbours differ well beyond tolerance."""
    out, last_qkv = reference
    for index in range(NUM_LAYERS):
        assert not torch.allclose(out.hidden_states[index], out.hidden_states[index + 1], atol=1e-3)
    for index in range(NUM_LAYERS - 1):
        assert not torch.allclose(out.attentions[index][:, :, 0], out.attentions[index + 1][:, :, 0], atol=1e-4)


def test_last_qkv_come_from_the_last_layers_input_when_the_features_are_its_output(tower_and_pixels, reference):
    model, pixels = tower_and_pixels
    out, last_qkv = reference
    tower_layers = model.vision_tower.vision_model.encoder.layers
    _, signals = _signals(model, pixels, -1, frozenset({Signal.LAST_QKV}))
    with torch.no_grad():
        from_input = tower_layers[-1].self_attn.q_proj(tower_layers[-1].layer_norm1(out.hidden_states[-2]))
        from_output = tower_layers[-1].self_attn.q_proj(tower_layers[-1].layer_norm1(out.hidden_states[-1]))
    torch.testing.assert_close(signals.last_qkv[0], from_input)
    torch.testing.assert_close(from_input, last_qkv["q"])
    assert not torch.allclose(signals.last_qkv[0], from_output, atol=1e-2)


@pytest.mark.parametrize("select_layer", [NUM_LAYERS, -(NUM_LAYERS + 1)])
def test_the_outermost_hidden_states_serve_features_but_have_no_attention_map(tower_and_pixels, reference, select_layer):
    model, pixels = tower_and_pixels
    out, _ = reference
    features, signals = _signals(model, pixels, select_layer, frozenset({Signal.PATCH_FEATURES, Signal.LAST_QKV}))
    torch.testing.assert_close(features, out.hidden_states[select_layer][:, 1:])
    with pytest.raises(LitelvlmError, match=rf"select_layer={select_layer} has no CLS attention in a 7-layer CLIP tower"):
        _signals(model, pixels, select_layer)


@pytest.mark.parametrize("select_layer", [NUM_LAYERS + 1, -(NUM_LAYERS + 2), 40])
def test_an_impossible_select_layer_is_one_clear_error(tower_and_pixels, select_layer):
    model, pixels = tower_and_pixels
    with pytest.raises(LitelvlmError, match=rf"select_layer={select_layer} is impossible for a 7-layer CLIP tower") as err:
        _signals(model, pixels, select_layer, frozenset())
    assert "\n" not in str(err.value)
