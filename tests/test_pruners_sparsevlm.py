"""SparseVLM's rules on tensors, each against a written-out per-sample version of the reference
(Gumpest/SparseVLMs v1.5, modelling_sparse_llama.py / utils.py cluster_and_merge), ties included."""

import copy
import math

import pytest
import torch

from litelvlm.pruners import PrunerError, build_pruner
from litelvlm.pruners.sparsevlm import (
    SparseVLM,
    cluster_means,
    dpc_knn,
    recycle,
    select_raters,
    stage_keeps,
    stage_visual_counts,
)


# ---------------------------------------------------------------- written-out reference, one sample
def reference_raters(visual, text):
    """m = mean over visual of softmax over text of V U^T; raters: m > mean(m) (all if none is)."""
    m = (visual @ text.T).softmax(-1).mean(0)
    raters = [bool(value > m.mean()) for value in m]
    return raters if any(raters) else [True] * len(raters)


def reference_cluster(x, c):
    """DPC-kNN as cluster_and_merge, the random density jitter replaced by index order (float64)."""
    dtype, x = x.dtype, x.double()
    n, width = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1) / math.sqrt(width)
    density = [math.exp(-float((row.sort().values[:c] ** 2).mean())) for row in dist]
    # denser-than order: higher density first, equal densities by lower index
    rank = {i: place for place, i in enumerate(sorted(range(n), key=lambda i: (-density[i], i)))}
    farthest = float(dist.max())
    delta = [min([float(dist[i, j]) for j in range(n) if rank[j] < rank[i]], default=farthest) for i in range(n)]
    score = [d * p for d, p in zip(delta, density)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    assignment = []
    for i in range(n):
        if i in centres:
            assignment.append(centres.index(i))
        else:
            to_centres = [float(dist[k, i]) for k in centres]
            assignment.append(to_centres.index(min(to_centres)))
    means = torch.stack([x[[i for i in range(n) if assignment[i] == k]].mean(0) for k in range(c)])
    return assignment, centres, means.to(dtype)


def reference_recycle(states, scores):
    """Top int(0.3 n) + 1 pruned tokens by score, int(m / 10) + 1 clusters, their means."""
    n = states.shape[0]
    m = int(n * 0.3) + 1
    recycled = sorted(range(n), key=lambda i: (-float(scores[i]), i))[:m]
    assignment, _, means = reference_cluster(states[recycled], int(m / 10) + 1)
    members = [sorted(recycled[j] for j in range(m) if assignment[j] == k) for k in range(len(means))]
    return means, members


def with_duplicates(x):
    """Exact ties: repeated rows have equal densities and zero distance to each other."""
    x = x.clone()
    x[:, 5] = x[:, 2]
    x[:, 9] = x[:, 2]
    x[:, 7] = x[:, 3]
    return x


# ---------------------------------------------------------------- kept counts
def test_reference_table_and_visual_counts_per_stage():
    assert stage_keeps(192) == (300, 200, 110)
    assert stage_keeps(128) == (303, 110, 36)
    assert stage_keeps(96) == (238, 48, 26)
    assert stage_keeps(64) == (66, 30, 17)
    # kept + int(int(0.3 pruned) + 1) / 10) + 1 merged: 300 + 9, 200 + 4, 110 + 3 at 192
    assert stage_visual_counts(576, stage_keeps(192)) == [309, 204, 113]
    assert stage_visual_counts(576, stage_keeps(128)) == [312, 117, 39]
    assert stage_visual_counts(576, stage_keeps(64)) == [82, 32, 18]
    assert stage_visual_counts(576, stage_keeps(96)) == [249, 55, 27]


def test_other_budgets_interpolate_the_table_as_fractions():
    # 160 is halfway between 128 and 192: (303+300)/2 = 301.5 -> 302, (110+200)/2, (36+110)/2
    assert stage_keeps(160) == (302, 155, 73)
    # below 64: proportional to the 64 row (0 -> 0): 33, 15, 8.5 -> 9; never below 1
    assert stage_keeps(32) == (33, 15, 9)
    assert stage_keeps(1) == (1, 1, 1)
    assert stage_keeps(576) == (576, 576, 576)
    # 256 patches (LISA-7B): 192/256 = 0.75 lies 5/8 of the way from 1/3 (the 192 row) to 1 -> 576 * ...
    expected = tuple(math.floor((k + (576 - k) * 5 / 8) * 256 / 576 + 0.5) for k in (300, 200, 110))
    assert stage_keeps(192, num_patches=256) == expected == (210, 193, 178)
    for budget in range(1, 577):
        keeps = stage_keeps(budget)
        assert all(1 <= k <= 576 for k in keeps)


@pytest.mark.parametrize("bad", [0, 577, -3, 1.5, True, "192"])
def test_budget_outside_one_to_n_is_a_clear_error(bad):
    with pytest.raises(PrunerError, match=r"num_tokens must be an integer in \[1, 576\]"):
        stage_keeps(bad)


# ---------------------------------------------------------------- raters
def test_raters_equal_the_reference_per_sample_with_padding():
    torch.manual_seed(0)
    visual, text = torch.randn(2, 30, 16), torch.randn(2, 9, 16)
    text_mask = torch.ones(2, 9, dtype=torch.bool)
    text_mask[1, 6:] = False  # sample 1 has 6 real tokens after the image
    raters = select_raters(visual, text, text_mask)
    assert raters[0].tolist() == reference_raters(visual[0], text[0])
    assert raters[1, :6].tolist() == reference_raters(visual[1], text[1, :6])
    assert not raters[1, 6:].any()


def test_equal_text_tokens_all_rate():
    # every text token identical: all m equal, none above the mean -> all real tokens rate
    visual, text = torch.randn(1, 5, 4), torch.ones(1, 3, 4)
    assert select_raters(visual, text, torch.tensor([[True, True, False]])).tolist() == [[True, True, False]]


# ---------------------------------------------------------------- DPC-kNN and recycling
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n, c", [(12, 2), (20, 3), (7, 7), (9, 1)])
def test_dpc_knn_equals_the_reference(n, c, ties):
    torch.manual_seed(n * 10 + c)
    x = torch.randn(2, n, 8)
    if ties and n >= 10:
        x = with_duplicates(x)
    assignment, centres = dpc_knn(x, c)
    means = cluster_means(x, assignment, c)
    for b in range(2):
        ref_assignment, ref_centres, ref_means = reference_cluster(x[b], c)
        assert centres[b].tolist() == ref_centres
        assert assignment[b].tolist() == ref_assignment
        torch.testing.assert_close(means[b], ref_means)


def test_dpc_knn_all_equal_tokens_go_by_index():
    # equal densities: index 0 is densest (delta = largest distance = 0); all scores 0 -> centres 0, 1;
    # every other token is at distance 0 from both and joins the first centre
    assignment, centres = dpc_knn(torch.ones(1, 5, 4), 2)
    assert centres.tolist() == [[0, 1]]
    assert assignment.tolist() == [[0, 1, 0, 0, 0]]


@pytest.mark.parametrize("n", [1, 9, 40, 276])
def test_recycle_equals_the_reference(n):
    torch.manual_seed(n)
    states = with_duplicates(torch.randn(2, n, 16)) if n >= 10 else torch.randn(2, n, 16)
    scores = torch.rand(2, n).round(decimals=1)  # many equal scores: ties go to the lower index
    merged, membership = recycle(states, scores)
    for b in range(2):
        ref_means, ref_members = reference_recycle(states[b], scores[b])
        torch.testing.assert_close(merged[b], ref_means)
        assert [torch.nonzero(row).flatten().tolist() for row in membership[b]] == ref_members
    assert merged.shape == (2, int((int(n * 0.3) + 1) / 10) + 1, 16)


def test_cluster_means_keep_the_dtype():
    x = torch.randn(1, 6, 4, dtype=torch.bfloat16)
    means = cluster_means(x, torch.tensor([[0, 1, 0, 1, 1, 0]]), 2)
    assert means.dtype == torch.bfloat16
    torch.testing.assert_close(means[0, 0], x[0, [0, 2, 5]].float().mean(0).to(torch.bfloat16))


def test_dpc_knn_cluster_count_out_of_range():
    with pytest.raises(PrunerError, match="cannot make 4 clusters of 3 tokens"):
        dpc_knn(torch.randn(1, 3, 4), 4)


# ---------------------------------------------------------------- on the model: 32 layers of the tiny width
def spliced_inputs(model, batch):
    """The spliced, unpruned decoder inputs of a batch."""
    with torch.no_grad():
        patch_features, _ = model.encode_image(batch.clip_pixel_values, frozenset())
        n = model.num_patches
        projected = model.mm_projector(patch_features)
        return model.splice_visual_tokens(batch, projected, torch.arange(n).expand(len(projected), n), "contiguous")


@pytest.fixture(scope="module")
def models_and_inputs(tiny_model, deep_tiny_model, demo_batch):
    """By name, each model (4 and 32 LLM layers) and the demo batch's decoder inputs for it (two
    prompts, right-padded)."""
    models = (("tiny", tiny_model), ("deep", deep_tiny_model))
    return {name: (model, spliced_inputs(model, demo_batch)) for name, model in models}


@pytest.fixture(scope="module")
def decoder_inputs(models_and_inputs):
    return models_and_inputs["deep"][1]


def reference_sparsevlm(llm, embeds, image_start, num_patches, keeps, layers=(2, 6, 15)):
    """SparseVLM on ONE unpadded prompt, as modelling_sparse_llama.py runs it: the full eager attention
    matrix of each rating layer, the layer's output pruned, merged tokens after the kept ones,
    position ids truncated. Returns (patch id per final visual token, -1 if merged), their member
    patches, the visual tokens each layer ran on, and the final-normed hidden states."""
    eager = copy.deepcopy(llm.model)
    eager.set_attn_implementation("eager")
    hidden = embeds[None]
    v_start, v_num = image_start, num_patches
    text_start = v_start + v_num
    ids = list(range(num_patches))
    members = [{i} for i in range(num_patches)]
    text = hidden[0, text_start:]
    raters = reference_raters(hidden[0, v_start:text_start], text)
    rater_rows = [i for i, r in enumerate(raters) if r]
    counts = []
    for index, layer in enumerate(eager.layers):
        length = hidden.shape[1]
        positions = torch.arange(length)[None]
        embeddings = eager.rotary_emb(hidden, positions)
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        counts.append(v_num)
        if index in layers:
            _, attention = layer.self_attn(layer.input_layernorm(hidden), embeddings, causal)
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=embeddings)
        if index not in layers:
            continue
        relation = attention.mean(1)[0][[text_start + r for r in rater_rows], v_start : v_start + v_num].mean(0)
        k = min(keeps[layers.index(index)], v_num - 1)
        kept = sorted(sorted(range(v_num), key=lambda i: (-float(relation[i]), i))[:k])
        pruned = [i for i in range(v_num) if i not in kept]
        means, groups = reference_recycle(hidden[0, [v_start + i for i in pruned]], relation[pruned])
        groups = [[pruned[j] for j in group] for group in groups]
        visual = hidden[0, [v_start + i for i in kept]]
        hidden = torch.cat([hidden[:, :v_start], visual[None], means[None], hidden[:, v_start + v_num :]], 1)
        ids = [ids[i] for i in kept] + [-1] * len(means)
        members = [members[i] for i in kept] + [set().union(*(members[i] for i in group)) for group in groups]
        v_num = len(ids)
        text_start = v_start + v_num
    return ids, members, counts, eager.norm(hidden)[0]


@pytest.mark.parametrize(
    "model_name, layers, budget",
    [("tiny", (0, 1, 2), 192), ("tiny", (0, 1, 2), 64), ("tiny", (0, 1, 2), 100), ("deep", (2, 6, 15), 192)],
)
def test_padded_batch_equals_the_reference_per_prompt(models_and_inputs, model_name, layers, budget):
    # the 4-layer tiny LLM rates at layers 0, 1, 2 (stages back to back); the 32-layer one as the reference
    model, inputs = models_and_inputs[model_name]
    with torch.no_grad():
        hidden, trace = model.run_decoder(inputs, SparseVLM(num_tokens=budget, layers=layers))
    key_mask = inputs["key_mask"]
    assert not bool(key_mask.all())  # the two prompts differ in length: one is padded
    keeps = stage_keeps(budget)
    counts = [576] + stage_visual_counts(576, keeps)
    assert trace["visual_counts"] == [counts[sum(index > p for p in layers)] for index in range(len(trace["lengths"]))]
    for b in range(2):
        length = int(key_mask[b].sum())
        with torch.no_grad():
            ids, members, ref_counts, ref_hidden = reference_sparsevlm(
                model.llm, inputs["embeds"][b, :length], int(inputs["visual_positions"][b, 0]), 576, keeps, layers
            )
        assert ref_counts == trace["visual_counts"]
        assert trace["llm_kept"][b].tolist() == ids
        patches = trace["llm_visual_patches"][b]
        assert [set(torch.nonzero(row).flatten().tolist()) for row in patches] == members
        # the same sequence to the end (merged tokens right after the kept ones, positions 0..L'-1):
        # the padded sample's real tokens come first, its padding after
        torch.testing.assert_close(hidden[b, : ref_hidden.shape[0]], ref_hidden, atol=1e-4, rtol=1e-4)


def test_visual_tokens_per_layer_at_192_and_the_sequence_each_layer_ran(deep_tiny_model, decoder_inputs):
    seen = []  # (length, position ids) each decoder layer is called with

    def record(module, args, kwargs):
        seen.append((args[0].shape[1], kwargs["position_ids"]))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in deep_tiny_model.llm.model.layers]
    try:
        with torch.no_grad():
            _, trace = deep_tiny_model.run_decoder(decoder_inputs, SparseVLM(num_tokens=192))
    finally:
        for handle in handles:
            handle.remove()
    assert trace["visual_counts"] == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    padded = decoder_inputs["embeds"].shape[1]
    assert trace["lengths"] == [length for length, _ in seen] == [padded - 576 + n for n in trace["visual_counts"]]
    for length, positions in seen:  # renumbered 0..L'-1 after every stage
        assert positions.tolist() == [list(range(length))] * 2


def test_knobs_and_one_line_errors(tiny_model, demo_batch):
    pruner = SparseVLM()
    assert (pruner.num_tokens, pruner.layers, pruner.prune_layers) == (192, (2, 6, 15), (3, 7, 16))
    assert pruner.acts_in_llm and pruner.needs_previous_layer
    assert build_pruner("sparsevlm", num_tokens=64, layers=[1, 3, 5]).prune_layers == (2, 4, 6)
    with pytest.raises(PrunerError, match="three increasing layer indices"):
        SparseVLM(layers=[2, 6])
    with pytest.raises(PrunerError, match="three increasing layer indices"):
        SparseVLM(layers=[6, 2, 15])
    with pytest.raises(PrunerError, match="integer budget"):
        SparseVLM(num_tokens=None)
    with pytest.raises(PrunerError, match=">= 1"):
        SparseVLM(num_tokens=0)
    with pytest.raises(PrunerError, match=r"num_tokens must be an integer in \[1, 576\], got 577"):
        with torch.no_grad():
            tiny_model.run_decoder(spliced_inputs(tiny_model, demo_batch), SparseVLM(num_tokens=577, layers=[0, 1, 2]))
    with pytest.raises(PrunerError, match="must be in \\[1, 3\\]"):  # rating layer 15 of a 4-layer LLM
        with torch.no_grad():
            tiny_model.run_decoder(spliced_inputs(tiny_model, demo_batch), SparseVLM(num_tokens=64))
