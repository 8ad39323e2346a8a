"""PyramidDrop and DART on the in-LLM schedule: token counts per layer, and kept indices (and final
states) equal to written-out batch-size-1 reference implementations, on a padded batch of two."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import sam_image_cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from litelvlm.pruners.dart import reference_pivot_order
from litelvlm.pruners import DART, PrunerError, PyramidDrop, build_pruner
from litelvlm.pruners.pdrop import average_tokens, solve_ratio, stage_counts

N = 576


@pytest.fixture(scope="module")
def decoder_inputs(deep_tiny_model, demo_batch):
    """The spliced decoder inputs of the demo batch (all N visual tokens), and each sample's real length."""
    model = deep_tiny_model
    with torch.no_grad():
        features = model.vision_tower(pixel_values=demo_batch.clip_pixel_values, output_hidden_states=True)
        projected = model.mm_projector(features.hidden_states[-2][:, 1:])
        full = torch.arange(N).expand(2, N)
        inputs = model.splice_visual_tokens(demo_batch, projected, full, "contiguous")
    lengths = inputs["key_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]  # a padded batch
    return inputs, lengths


def batched(model, inputs, pruner):
    with torch.no_grad():
        return model.run_decoder(inputs, pruner)


# ---------------------------------------------------------------------------- references (batch size 1)
def run_layer(layer, hidden, positions, rotary):
    """One decoder layer on an unpadded single sample (causal SDPA, as transformers without a mask)."""
    return layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary(hidden, positions))


def pdrop_reference(model, embeds, image_start, layers, counts):
    """`pdrop_rank_drop` for one unpadded sample: at each stage layer b, layer b's q/k with RoPE, the
    last token's causal softmax (float32, cast back), head mean, top-k of the image span, sorted;
    positions renumbered 0..L'-1. Returns the kept patch ids and the final normed states."""
    decoder = model.llm.model
    hidden, ids, n_image = embeds[None], torch.arange(N), N
    for index, layer in enumerate(decoder.layers):
        positions = torch.arange(hidden.shape[1])[None]
        if index in layers:
            keep = counts[layers.index(index)]
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            heads, head_dim = attn.config.num_attention_heads, attn.head_dim
            q = attn.q_proj(x).view(1, -1, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, -1, heads, head_dim).transpose(1, 2)
            cos, sin = decoder.rotary_emb(hidden, positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            weights = torch.matmul(q[:, :, -1:], k.transpose(2, 3)) / math.sqrt(head_dim)  # last row: sees all
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
            scores = weights.mean(1)[0, 0, image_start : image_start + n_image]
            top = scores.topk(keep).indices.sort().values
            hidden = torch.cat(
                [hidden[:, :image_start], hidden[:, image_start + top], hidden[:, image_start + n_image :]], 1
            )
            ids, n_image = ids[top], keep
            positions = torch.arange(hidden.shape[1])[None]
        hidden = run_layer(layer, hidden, positions, decoder.rotary_emb)
    return ids, decoder.norm(hidden)[0]


def dart_reference(model, embeds, image_start, layer_k, max_num, exact=False, order="reference"):
    """`get_retained_image_token` for one unpadded sample: pivots iterated as the reference does,
    `list(set(image pivot positions + text pivot positions))` (order="reference"), or image pivots
    then text pivots, each by descending key L1 norm (order="score"). Keys of layer K-1 are read from
    its own k_proj call (hooked) and rotated; states = final norm of layer K-1's output."""
    decoder = model.llm.model
    hidden = embeds[None]
    positions = torch.arange(hidden.shape[1])[None]
    ids = torch.arange(N)
    for index, layer in enumerate(decoder.layers):
        if index == layer_k - 1:
            seen = {}
            handle = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))
            output = run_layer(layer, hidden, positions, decoder.rotary_emb)
            handle.remove()
            head_dim = layer.self_attn.head_dim
            k = seen["k"].view(1, hidden.shape[1], -1, head_dim).transpose(1, 2)
            cos, sin = decoder.rotary_emb(hidden, positions)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            k = k.permute(0, 2, 1, 3).reshape(1, hidden.shape[1], -1)[0]
            state = decoder.norm(output)[0]
            image_norms = torch.norm(k[image_start : image_start + N], p=1, dim=-1)
            text_norms = torch.norm(k[image_start + N :], p=1, dim=-1)
            image_pivots = image_norms.topk(4).indices.tolist()
            text_pivots = (text_norms.topk(4).indices + image_start + N).tolist()
            per_pivot = math.ceil((max_num - 4) / 8) if exact else max_num // 8
            retained = list(image_pivots)
            valid = [v for v in range(N) if v not in image_pivots]
            pivots = [image_start + p for p in image_pivots] + text_pivots
            for pivot in list(set(pivots)) if order == "reference" else pivots:
                take = min(per_pivot, max_num - len(retained)) if exact else per_pivot
                if take <= 0:
                    break
                vectors = state[[image_start + v for v in valid]]
                similarity = -F.cosine_similarity(state[pivot], vectors, dim=-1)
                picks = [valid[i] for i in similarity.topk(take).indices.tolist()]
                retained += picks
                valid = [v for v in valid if v not in picks]
            kept = torch.tensor(sorted(retained[:max_num] if exact else retained))
            keep = torch.cat([torch.arange(image_start), image_start + kept, torch.arange(image_start + N, hidden.shape[1])])
            hidden, positions, ids = output[:, keep], keep[None], kept
            continue
        hidden = run_layer(layer, hidden, positions, decoder.rotary_emb)
    return ids, decoder.norm(hidden)[0]


def compare_with_reference(model, inputs, lengths, pruner, reference):
    """Each sample of the padded batch against the reference on that sample alone."""
    hidden, trace = batched(model, inputs, pruner)
    for b, length in enumerate(lengths):
        image_start = int(inputs["visual_positions"][b, 0])
        with torch.no_grad():
            ids, states = reference(inputs["embeds"][b, :length], image_start)
        assert trace["llm_kept"][b].tolist() == ids.tolist()
        # Right padding: the sample's real tokens come first; positions and masks right means equal states.
        torch.testing.assert_close(hidden[b, : states.shape[0]], states, atol=2e-5, rtol=1e-4)
    return trace


# ---------------------------------------------------------------------------- PyramidDrop
def test_pdrop_official_preset_runs_576_288_144_72_on_32_layers(deep_tiny_model, demo_batch):
    pruner = build_pruner("pdrop", layers=[8, 16, 24], ratio=0.5)
    with torch.no_grad(), sam_image_cache(deep_tiny_model):
        output = deep_tiny_model(demo_batch, pruner)
    assert output.visual_tokens_per_layer == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert output.llm_kept_indices.shape == (2, 72) and output.kept_indices is None
    assert all(row == sorted(set(row)) for row in output.llm_kept_indices.tolist())
    assert PyramidDrop().layers == (8, 16, 24) and PyramidDrop().ratio == 0.5  # the preset is the default


@pytest.mark.parametrize("form", ["preset", 192, 64])
def test_pdrop_kept_indices_equal_the_reference_on_a_padded_batch(deep_tiny_model, decoder_inputs, form):
    inputs, lengths = decoder_inputs
    pruner = build_pruner("pdrop", layers=[8, 16, 24], ratio=0.5) if form == "preset" else build_pruner("pdrop", num_tokens=form)
    counts = pruner.counts(N, 32)
    layers = list(pruner.layers)

    def reference(embeds, image_start):
        return pdrop_reference(deep_tiny_model, embeds, image_start, layers, counts)

    trace = compare_with_reference(deep_tiny_model, inputs, lengths, pruner, reference)
    bounds = [0, *layers, 32]
    expected = [[N, *counts][k] for k in range(len(bounds) - 1) for _ in range(bounds[k + 1] - bounds[k])]
    assert trace["visual_counts"] == expected
    if form != "preset":  # the budget is the average over the layers, up to the stages' truncation
        assert abs(sum(expected) / 32 - form) < 1


def test_short_names_build_the_in_llm_pruners():
    assert type(build_pruner("pdrop", num_tokens=64)) is PyramidDrop and type(build_pruner("dart")) is DART
    assert build_pruner("pdrop").prune_layers == (8, 16, 24) and build_pruner("dart").prune_layers == (2,)
    assert build_pruner("pdrop").acts_in_llm and build_pruner("dart").acts_in_llm


def test_pdrop_budget_rule_is_the_maintainers_formula():
    # avg = 18 (2 + 6 l + 8 l^2 + 16 l^3) for N = 576, 32 layers, stages at 2/8/16.
    for lam in (0.1, 0.19, 0.5):
        assert average_tokens(N, (2, 8, 16), lam, 32) == pytest.approx(18 * (2 + 6 * lam + 8 * lam**2 + 16 * lam**3))
    assert solve_ratio(64, N, (2, 8, 16), 32) == pytest.approx(0.19, abs=0.005)  # the maintainer's 0.19 for 64
    lam = solve_ratio(192, N, (2, 8, 16), 32)
    assert average_tokens(N, (2, 8, 16), lam, 32) == pytest.approx(192)
    assert stage_counts(N, 0.5, 3) == [288, 144, 72]
    assert build_pruner("pdrop", num_tokens=192).layers == (2, 8, 16)


def test_pdrop_rejects_bad_settings_with_one_line_errors(tiny_model, demo_batch):
    with pytest.raises(PrunerError, match="either num_tokens"):
        build_pruner("pdrop", num_tokens=192, ratio=0.5)
    with pytest.raises(PrunerError, match="increasing"):
        build_pruner("pdrop", layers=[16, 8])
    with pytest.raises(PrunerError, match="ratio"):
        build_pruner("pdrop", ratio=1.5)
    with pytest.raises(PrunerError, match="larger than"):
        build_pruner("pdrop", num_tokens=577).counts(N, 32)
    with pytest.raises(PrunerError, match="too small"):
        build_pruner("pdrop", num_tokens=40).counts(N, 32)
    with pytest.raises(PrunerError, match=r"must be in \[1, 3\]"):  # the 4-layer tiny LLM has no layer 8
        with torch.no_grad(), sam_image_cache(tiny_model):
            tiny_model(demo_batch, build_pruner("pdrop"))


# ---------------------------------------------------------------------------- DART
def test_dart_at_192_runs_576_then_196_with_original_positions(deep_tiny_model, demo_batch):
    pruner = build_pruner("dart", num_tokens=192)
    seen = []
    handle = deep_tiny_model.llm.model.layers[2].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        with torch.no_grad(), sam_image_cache(deep_tiny_model):
            output = deep_tiny_model(demo_batch, pruner)
    finally:
        handle.remove()
    assert output.visual_tokens_per_layer == [576] * 2 + [196] * 30
    kept = output.llm_kept_indices
    image_start = (demo_batch.input_ids == -200).int().argmax(1)
    for b in range(2):  # kept visual tokens keep their unpruned positions (gaps), text after the image too
        positions = seen[0][b].tolist()
        start = int(image_start[b])
        assert positions[start : start + 196] == (start + kept[b]).tolist()
        assert positions[start + 196] == start + N


@pytest.mark.parametrize(
    "budget, exact, order", [(192, False, "reference"), (64, False, "reference"), (100, True, "reference"), (3, True, "reference"),
                             (192, False, "score"), (100, True, "score")],
)  # fmt: skip
def test_dart_kept_indices_equal_the_reference_on_a_padded_batch(deep_tiny_model, decoder_inputs, budget, exact, order):
    inputs, lengths = decoder_inputs
    pruner = build_pruner("dart", num_tokens=budget, exact_budget=exact, pivot_order=order)

    def reference(embeds, image_start):
        return dart_reference(deep_tiny_model, embeds, image_start, 2, budget, exact, order)

    trace = compare_with_reference(deep_tiny_model, inputs, lengths, pruner, reference)
    expected = budget if exact else 4 + 8 * (budget // 8)
    assert trace["visual_counts"] == [N, N] + [expected] * 30


def test_the_reference_pivot_order_is_cpythons_set_order_and_it_changes_the_picks(deep_tiny_model, decoder_inputs):
    # CPython, worked by hand: the set starts with 8 slots (value & 7; a collision near the end jumps by
    # i = 5 i + 1 + (hash >> 5)): 600@0, 37@5, 70@6, 38 -> 6 taken -> 0 taken -> 1, 650@2; the 5th
    # entry grows it to 32 slots, re-inserted in slot order (value & 31, then the next free slots):
    # 600@24, 38@6, 650@10, 37@5, 70@7; then 651@11, 700@28, 613 -> 5, 6, 7 taken -> 8.
    pivots = [600, 37, 70, 38, 650, 651, 700, 613]
    assert [pivots[i] for i in reference_pivot_order(pivots)] == [37, 38, 70, 613, 650, 651, 600, 700]
    # Collisions go by insertion: 0 and 32 share slot 0 of 8, the later one moves on.
    assert reference_pivot_order([0, 32]) == [0, 1] and reference_pivot_order([32, 0]) == [0, 1]
    inputs, _ = decoder_inputs
    _, by_set = batched(deep_tiny_model, inputs, build_pruner("dart", num_tokens=64))
    _, by_score = batched(deep_tiny_model, inputs, build_pruner("dart", num_tokens=64, pivot_order="score"))
    assert not torch.equal(by_set["llm_kept"], by_score["llm_kept"])  # on this model the order matters
    with pytest.raises(PrunerError, match="pivot_order must be 'reference' or 'score'"):
        DART(pivot_order="sorted")


def test_dart_budget_rules_and_errors():
    assert [DART(num_tokens=r).retained_count(N) for r in (192, 128, 64, 7)] == [196, 132, 68, 4]
    assert DART(num_tokens=192, exact_budget=True).retained_count(N) == 192
    assert DART(num_tokens=N, exact_budget=True).retained_count(N) == N
    with pytest.raises(PrunerError, match="exact_budget"):
        DART(num_tokens=N).retained_count(N)  # 4 + 8 * 72 = 580 > 576
    with pytest.raises(PrunerError, match="layer"):
        DART(layer=0)
    with pytest.raises(PrunerError, match="larger than"):
        DART(num_tokens=N + 1, exact_budget=True).retained_count(N)


# ---------------------------------------------------------------------------- checks before any data
@pytest.mark.parametrize(
    ("pruner", "num_layers", "message"),
    [
        (build_pruner("pdrop"), 4, r"pdrop: layer K=8 \(of the layers it acts before, \[8, 16, 24\]\) must be in \[1, 3\] for this 4-layer LLM"),
        (build_pruner("pdrop", num_tokens=40), 32, r"num_tokens=40 is too small .* smallest average budget: 52"),
        (build_pruner("pdrop", layers=[1, 2, 3], ratio=0.1), 4, r"keeps int\(576 \* 0.1\^3\) = 0 .* stage counts \[57, 5, 0\]"),
        (build_pruner("sparsevlm", num_tokens=64), 16, r"layer K=16 \(of the layers it acts before, \[3, 7, 16\]\) must be in \[1, 15\]"),
        (build_pruner("dart", num_tokens=N), 32, r"4 \+ 8 \* \(576 // 8\) = 580 of 576"),
        (build_pruner("fastv", num_tokens=N + 1), 32, "larger than the 576 visual tokens"),
        (build_pruner("litelvlm", num_tokens=N + 1), None, "larger than the 576 visual tokens"),
    ],
    ids=["pdrop-layers", "pdrop-average", "pdrop-ratio", "sparsevlm-layers", "dart-retained", "fastv-budget", "encoders-only"],
)
def test_check_model_names_what_this_model_cannot_run(pruner, num_layers, message):
    with pytest.raises(PrunerError, match=message):
        pruner.check_model(N, num_layers)


@pytest.mark.parametrize(
    ("pruner", "num_layers"),
    [(build_pruner("pdrop"), 32), (build_pruner("pdrop", num_tokens=52), 32), (build_pruner("pdrop", num_tokens=32), 32 * 8),
     (build_pruner("sparsevlm", num_tokens=64), 17), (build_pruner("dart", num_tokens=568), 3), (build_pruner("fastv", layer=31), 32),
     (build_pruner("litelvlm", num_tokens=N), None)],
)  # fmt: skip
def test_check_model_passes_what_the_model_can_run(pruner, num_layers):
    pruner.check_model(N, num_layers)  # the boundary cases: the smallest LLM each schedule fits, the largest budgets
