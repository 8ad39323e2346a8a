"""VisionZip on the tiny model: its CLIP signals against transformers' own outputs, and what the projector and
the LLM are fed at every budget 1..N."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import sam_image_cache

from litelvlm.models.visual_reduction import signals_for
from litelvlm.pruners import VisionZip
from litelvlm.pruners.visionzip import split_budget

BUDGETS = [1, 64, 192, 575, 576]


@pytest.fixture(scope="module", autouse=True)
def fast_sam(tiny_model):
    with sam_image_cache(tiny_model):
        yield


@pytest.fixture(scope="module")
def eager_clip(tiny_model, demo_batch):
    """transformers' CLIP with every hidden state and attention map (what the reference asks for)."""
    eager = copy.deepcopy(tiny_model.vision_tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return eager(pixel_values=demo_batch.clip_pixel_values, output_attentions=True, output_hidden_states=True)


def test_signals_are_the_select_layer_attention_sum_keys_and_cls_state(tiny_model, demo_batch, eager_clip):
    pruner = VisionZip(num_tokens=64, score_dtype="float32")
    with torch.no_grad():
        signals = tiny_model.encode(demo_batch, [pruner], for_grounding=False).signals_by_score_dtype["float32"]
        layer = tiny_model.vision_tower.vision_model.encoder.layers[-2]  # attentions[-2]'s layer
        keys = layer.self_attn.k_proj(layer.layer_norm1(eager_clip.hidden_states[-3]))
    heads = tiny_model.config.vision.num_heads
    b, length, width = keys.shape
    expected_keys = keys.view(b, length, heads, width // heads).mean(2)[:, 1:]
    torch.testing.assert_close(signals.cls_attention_sum, eager_clip.attentions[-2][:, :, 0, 1:].sum(1))
    torch.testing.assert_close(signals.select_keys, expected_keys)
    torch.testing.assert_close(signals.cls_features, eager_clip.hidden_states[-2][:, 0])
    # Only what VisionZip declared: no per-head map, no patch embeds, no last-layer q/k/v.
    assert signals.cls_attention is None and signals.patch_embeds is None and signals.last_qkv is None


def test_every_budget_feeds_the_projector_cls_dominants_and_merges(tiny_model, demo_batch, eager_clip):
    pruners = [VisionZip(num_tokens=r) for r in BUDGETS]
    fed = []
    handle = tiny_model.mm_projector.register_forward_hook(lambda module, args, out: fed.append(args[0]))
    try:
        with torch.no_grad():
            shared = tiny_model.encode(demo_batch, pruners)
            before = shared.patch_features.clone()
            for pruner, budget in zip(pruners, BUDGETS):
                expected = pruner.reduce(signals_for(shared, pruner))
                fed.clear()
                output = tiny_model.ground(demo_batch, shared, pruner)
                assert torch.equal(fed[-1], expected.features)
                assert output.kept_indices is None and torch.equal(output.token_members, expected.members)
                dominant, contextual = split_budget(budget)
                assert output.kept_groups.tolist() == [[0] * dominant + [1] * contextual] * 2
                assert output.group_names == ("dominant", "contextual")
                assert output.visual_tokens_per_layer == [budget] * len(tiny_model.llm.model.layers)
                # [CLS] first, then the dominant patches' own select-layer states, raster order.
                torch.testing.assert_close(fed[-1][:, 0], eager_clip.hidden_states[-2][:, 0])
                patches = [row.nonzero().flatten().tolist() for row in output.token_members[0, 1:dominant]]
                assert all(len(p) == 1 for p in patches) and [p[0] for p in patches] == sorted(p[0] for p in patches)
    finally:
        handle.remove()
    # The CLIP states the pruners read were never modified in place.
    assert torch.equal(shared.patch_features, before)
    torch.testing.assert_close(before, eager_clip.hidden_states[-2][:, 1:])
