"""What the pruned model really feeds its LLM: token counts, order, position ids, and equivalences.

Token counts and sequence lengths are read from the decoder layers' actual inputs (pre-hooks), not
only from the model's own trace.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
from conftest import sam_image_cache
import torch
import torch.nn.functional as F

from litelvlm.models.lvlm import IMAGE_TOKEN_INDEX
from litelvlm.pruners import (
    FastV,
    LiteLVLM,
    NoPruning,
    PrunerError,
    RandomPruner,
    Signal,
    TokenPruner,
    build_pruner,
)

PRE_LLM_PRUNERS = ["litelvlm", "similarity-only", "context-only", "reversed-similarity", "vispruner", "random"]


@pytest.fixture(scope="module", autouse=True)
def fast_sam(tiny_model):
    with sam_image_cache(tiny_model):
        yield


class DecoderInputs:
    """Records the hidden-state length and the position ids every decoder layer is called with."""

    def __init__(self, model) -> None:
        self.lengths: list[int] = []
        self.position_ids: list[torch.Tensor] = []
        self.handles = [
            layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in model.llm.model.layers
        ]

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.lengths.append(hidden.shape[1])
        self.position_ids.append(kwargs["position_ids"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def relative_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest |difference| of mask logits relative to the largest |logit| of the same mask.

    The tiny model's random SAM gives logits of order 1e-5, so absolute tolerances mean nothing.
    """
    return max(
        float((a[i] - b[i]).abs().max() / b[i].abs().max()) for a, b in zip(got, expected) for i in range(len(b))
    )


@torch.no_grad()
def run(model, batch, pruner):
    with DecoderInputs(model) as seen:
        output = model(batch, pruner)
    return output, seen


@pytest.fixture(scope="module")
def baseline(tiny_model, demo_batch):
    return run(tiny_model, demo_batch, NoPruning())


@pytest.fixture(scope="module")
def sizes(tiny_model, demo_batch):
    """N visual tokens, L prompt length (sentinel included), number of decoder layers."""
    return SimpleNamespace(
        n=tiny_model.num_patches, length=demo_batch.input_ids.shape[1], layers=len(tiny_model.llm.model.layers)
    )


@pytest.fixture(scope="module")
def fastv_runs(tiny_model, demo_batch):
    return {mode: run(tiny_model, demo_batch, FastV(num_tokens=64, layer=2, mode=mode)) for mode in ("inplace", "mask")}


# ------------------------------------------------------------------ token counts


def test_no_pruning_llm_sees_all_576_visual_tokens_in_every_layer(baseline, sizes):
    output, seen = baseline
    assert sizes.n == 576
    assert output.visual_tokens_per_layer == [576] * sizes.layers
    assert seen.lengths == [sizes.length - 1 + 576] * sizes.layers
    assert output.sequence_length_per_layer == seen.lengths
    assert output.kept_indices.tolist() == [list(range(576))] * 2


def test_random_pruner_llm_sees_exactly_r_visual_tokens(tiny_model, demo_batch, sizes):
    output, seen = run(tiny_model, demo_batch, RandomPruner(num_tokens=64))
    assert output.visual_tokens_per_layer == [64] * sizes.layers
    assert seen.lengths == [sizes.length - 1 + 64] * sizes.layers  # shorter by N - R = 512
    assert output.sequence_length_per_layer == seen.lengths
    assert output.kept_indices.shape == (2, 64)
    assert all(len(set(row)) == 64 for row in output.kept_indices.tolist())


def test_fastv_inplace_keeps_all_tokens_before_layer_k_and_shortens_the_sequence_after(fastv_runs, sizes):
    output, seen = fastv_runs["inplace"]
    full, short = sizes.length - 1 + 576, sizes.length - 1 + 64
    assert output.visual_tokens_per_layer == [576, 576] + [64] * (sizes.layers - 2)
    assert seen.lengths == [full, full] + [short] * (sizes.layers - 2)
    assert output.sequence_length_per_layer == seen.lengths
    assert output.kept_indices is None


def test_fastv_mask_mode_keeps_the_sequence_length(fastv_runs, sizes):
    output, seen = fastv_runs["mask"]
    assert output.visual_tokens_per_layer == [576, 576] + [64] * (sizes.layers - 2)
    assert seen.lengths == [sizes.length - 1 + 576] * sizes.layers


# ------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("name", PRE_LLM_PRUNERS)
def test_pre_llm_pruner_keeping_all_tokens_in_raster_order_gives_the_unpruned_masks(
    tiny_model, demo_batch, baseline, sizes, name
):
    pruner = build_pruner(name, num_tokens=sizes.n, kept_order="raster")
    output, _ = run(tiny_model, demo_batch, pruner)
    assert output.kept_indices.tolist() == [list(range(sizes.n))] * 2
    torch.testing.assert_close(output.seg_hidden_states, baseline[0].seg_hidden_states)
    assert relative_difference(output.mask_logits, baseline[0].mask_logits) <= 1e-5


@pytest.mark.parametrize("mode", ["inplace", "mask"])
def test_fastv_keeping_all_tokens_gives_the_unpruned_masks(tiny_model, demo_batch, baseline, sizes, mode):
    output, _ = run(tiny_model, demo_batch, FastV(num_tokens=sizes.n, mode=mode))
    assert output.visual_tokens_per_layer == [sizes.n] * sizes.layers
    torch.testing.assert_close(output.seg_hidden_states, baseline[0].seg_hidden_states)
    assert relative_difference(output.mask_logits, baseline[0].mask_logits) <= 1e-5


def test_reference_order_reaches_the_llm_so_it_changes_the_masks(tiny_model, demo_batch, baseline, sizes):
    # The counterpart of the raster test above: all N tokens in LiteLVLM's reference order are a
    # permutation, and the LLM sees it (the raster equality is not vacuous).
    output, _ = run(tiny_model, demo_batch, LiteLVLM(num_tokens=sizes.n, kept_order="reference"))
    kept = output.kept_indices
    assert sorted(kept[0].tolist()) == list(range(sizes.n))
    assert kept[0].tolist() != list(range(sizes.n))
    assert not torch.allclose(output.seg_hidden_states, baseline[0].seg_hidden_states, atol=1e-3)
    assert relative_difference(output.mask_logits, baseline[0].mask_logits) > 1e-4


def test_fastv_mask_and_inplace_give_the_same_seg_hidden_states(fastv_runs, baseline):
    inplace, mask = fastv_runs["inplace"][0], fastv_runs["mask"][0]
    assert inplace.seg_hidden_states.shape == (6, inplace.seg_hidden_states.shape[1])
    torch.testing.assert_close(inplace.seg_hidden_states, mask.seg_hidden_states, atol=1e-5, rtol=1e-5)
    assert relative_difference(inplace.mask_logits, mask.mask_logits) <= 1e-4
    # Pruning did happen: the states and masks differ from the unpruned ones.
    assert not torch.allclose(inplace.seg_hidden_states, baseline[0].seg_hidden_states, atol=1e-3)
    assert relative_difference(inplace.mask_logits, baseline[0].mask_logits) > 1e-4


def _fastv_kept_from_position_ids(position_ids: torch.Tensor, image_pos: list[int], sizes, r: int) -> list[list[int]]:
    """Check layer K's position ids are the unpruned ones of the kept tokens; return the kept patches."""
    kept = []
    for b, row in enumerate(position_ids.tolist()):
        p = image_pos[b]
        assert len(row) == sizes.length - 1 + r
        assert row[:p] == list(range(p))  # text before the image
        assert row[p + r :] == list(range(p + sizes.n, sizes.n + sizes.length - 1))  # text after it
        visual = [position - p for position in row[p : p + r]]
        assert visual == sorted(set(visual)) and 0 <= visual[0] and visual[-1] < sizes.n  # original order
        kept.append(visual)
    return kept


def test_fastv_keeps_top_r_by_eager_last_token_attention_with_original_position_ids(
    tiny_model, demo_batch, fastv_runs, sizes
):
    _, seen = fastv_runs["inplace"]
    assert seen.position_ids[1].tolist() == [list(range(sizes.length - 1 + sizes.n))] * 2  # layer K-1: all
    image_pos = (demo_batch.input_ids == IMAGE_TOKEN_INDEX).int().argmax(1).tolist()
    kept = _fastv_kept_from_position_ids(seen.position_ids[2], image_pos, sizes, 64)

    # Reference: the plain transformers LLaMA with eager attention on the unpruned spliced sequence;
    # layer K-1 = 1's attention of each sample's last real token, head mean, over the visual tokens.
    with torch.no_grad():
        full = torch.arange(sizes.n).expand(2, -1)
        vision = tiny_model.vision_tower(pixel_values=demo_batch.clip_pixel_values, output_hidden_states=True)
        projected = tiny_model.mm_projector(vision.hidden_states[-2][:, 1:])
        inputs = tiny_model.splice_visual_tokens(demo_batch, projected, full, "contiguous")
        eager = copy.deepcopy(tiny_model.llm.model)
        eager.set_attn_implementation("eager")
        out = eager(
            inputs_embeds=inputs["embeds"],
            attention_mask=inputs["key_mask"],
            position_ids=inputs["position_ids"],
            output_attentions=True,
        )
    for b in range(2):
        last = int(inputs["key_mask"][b].nonzero().max())
        scores = out.attentions[1][b, :, last].mean(0)[inputs["visual_positions"][b]]
        assert kept[b] == sorted(scores.topk(64).indices.tolist())


# ------------------------------------------------------------------ kept order


class RecordingLiteLVLM(LiteLVLM):
    def select(self, signals):
        self.signals = signals
        return super().select(signals)


@pytest.fixture(scope="module")
def litelvlm_reference_run(tiny_model, demo_batch):
    pruner = RecordingLiteLVLM(num_tokens=64, kept_order="reference")
    captured = {}
    handle = tiny_model.mm_projector.register_forward_hook(lambda m, args, out: captured.__setitem__("in", args[0]))
    try:
        output, _ = run(tiny_model, demo_batch, pruner)
    finally:
        handle.remove()
    return output, pruner.signals, captured["in"]


def test_raster_order_sorts_the_kept_indices(tiny_model, demo_batch, litelvlm_reference_run):
    output, _ = run(tiny_model, demo_batch, LiteLVLM(num_tokens=64, kept_order="raster"))
    kept = output.kept_indices.tolist()
    assert all(row == sorted(row) for row in kept)
    reference = litelvlm_reference_run[0].kept_indices.tolist()
    assert [set(row) for row in kept] == [set(row) for row in reference]


def test_reference_order_is_context_tokens_then_similarity_tokens(tiny_model, demo_batch, litelvlm_reference_run):
    output, signals, projector_input = litelvlm_reference_run
    kept = output.kept_indices
    # The model feeds exactly what the pruner's select returns on these signals, in that order.
    assert torch.equal(kept, LiteLVLM(num_tokens=64).select(signals))
    # ... and the projector receives the select-layer features in that order.
    with torch.no_grad():
        features = tiny_model.vision_tower(pixel_values=demo_batch.clip_pixel_values, output_hidden_states=True)
    features = features.hidden_states[-2][:, 1:]
    torch.testing.assert_close(projector_input, torch.stack([features[b, kept[b]] for b in range(2)]))

    # Independent check of the order: S (lowest 64 // 3 per question, union) ascending at the end,
    # C before it by descending context score (docs/pruners.md, LiteLVLM).
    similarity = torch.einsum("bnp,btp->btn", signals.patch_embeds, signals.text_embeds)
    q, k, v = (x.float() for x in signals.last_qkv)
    cosine = torch.einsum("bd,bnd->bn", F.normalize(q[:, 0], dim=-1), F.normalize(k[:, 1:], dim=-1))
    logits = cosine / math.sqrt(q.shape[-1])
    context = (logits.softmax(-1)[..., None] * v[:, 1:]).norm(dim=-1)
    for b in range(2):
        lowest = {i for t in range(3) for i in similarity[b, t].argsort()[: 64 // 3].tolist()}
        s_part = kept[b, len(kept[b]) - len(lowest) :].tolist()
        c_part = kept[b, : len(kept[b]) - len(lowest)].tolist()
        assert s_part == sorted(lowest)
        assert not set(c_part) & lowest
        scores = context[b, c_part]
        assert bool((scores[:-1] >= scores[1:]).all())
        others = [i for i in range(576) if i not in lowest and i not in set(c_part)]
        if c_part:
            assert float(scores.min()) >= float(context[b, others].max())


# ------------------------------------------------------------------ position ids


@pytest.fixture(scope="module")
def spliced(tiny_model):
    """Two hand-made prompts: [BOS, a, <image>, b, [SEG], c] and [BOS, <image>, a, [SEG], b, pad]."""
    seg = tiny_model.seg_token_id
    bos, a, b, c, pad = 1, 10, 11, 12, 0
    input_ids = torch.tensor([[bos, a, IMAGE_TOKEN_INDEX, b, seg, c], [bos, IMAGE_TOKEN_INDEX, a, seg, b, pad]])
    batch = SimpleNamespace(input_ids=input_ids, attention_mask=torch.tensor([[1] * 6, [1] * 5 + [0]]))
    kept = torch.tensor([[5, 2, 9], [0, 575, 3]])
    visual = torch.randn(2, 3, tiny_model.config.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = {mode: tiny_model.splice_visual_tokens(batch, visual, kept, mode) for mode in ("contiguous", "original")}
    return SimpleNamespace(input_ids=input_ids, visual=visual, out=out)


def test_splice_contiguous_position_ids_renumber_the_spliced_sequence(spliced):
    assert spliced.out["contiguous"]["position_ids"].tolist() == [list(range(8))] * 2


def test_splice_original_position_ids_are_the_unpruned_positions(spliced, tiny_model):
    n = tiny_model.num_patches
    assert n == 576
    # Row 0: BOS 0, a 1 | image at 2: patches 5, 2, 9 -> 7, 4, 11 | b, [SEG], c at old 3, 4, 5 -> +575.
    # Row 1: BOS 0 | image at 1: patches 0, 575, 3 -> 1, 576, 4 | a, [SEG], b, pad at old 2..5 -> +575.
    assert spliced.out["original"]["position_ids"].tolist() == [
        [0, 1, 7, 4, 11, 578, 579, 580],
        [0, 1, 576, 4, 577, 578, 579, 580],
    ]


@pytest.mark.parametrize("mode", ["contiguous", "original"])
def test_splice_places_tokens_masks_and_seg_prompt_positions(spliced, tiny_model, mode):
    out = spliced.out[mode]
    embed = tiny_model.llm.get_input_embeddings().weight
    seg = tiny_model.seg_token_id
    assert out["visual_positions"].tolist() == [[2, 3, 4], [1, 2, 3]]
    assert out["key_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    # The state that prompts SAM is the one just before [SEG]: b (row 0) and a (row 1).
    assert out["seg_mask"].tolist() == [
        [False, False, False, False, False, True, False, False],
        [False, False, False, False, True, False, False, False],
    ]
    text = {0: [(0, 1), (1, 10), (5, 11), (6, seg), (7, 12)], 1: [(0, 1), (4, 10), (5, seg), (6, 11), (7, 0)]}
    for row, pairs in text.items():
        for position, token in pairs:
            torch.testing.assert_close(out["embeds"][row, position], embed[token])
        for slot, position in enumerate(out["visual_positions"][row].tolist()):
            torch.testing.assert_close(out["embeds"][row, position], spliced.visual[row, slot])


def test_original_position_ids_reach_the_decoder(tiny_model, demo_batch, sizes):
    output, seen = run(tiny_model, demo_batch, RandomPruner(num_tokens=64, position_ids="original"))
    image_pos = (demo_batch.input_ids == IMAGE_TOKEN_INDEX).int().argmax(1).tolist()
    for b in range(2):
        p = image_pos[b]
        after = sizes.length - 1 - p
        expected = list(range(p)) + [p + i for i in output.kept_indices[b].tolist()]
        expected += list(range(p + sizes.n, p + sizes.n + after))
        assert all(ids[b].tolist() == expected for ids in seen.position_ids)


# ------------------------------------------------------------------ errors


class FixedPruner(TokenPruner):
    """Returns the same (possibly invalid) indices for every sample."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(num_tokens=len(indices))
        self.indices = indices

    def select(self, signals):
        return torch.tensor([self.indices] * signals.batch_size)


@pytest.mark.parametrize(
    "indices, message",
    [([1, 1, 2], "repeated"), ([0, 1, 576], "outside"), ([-1, 0, 1], "outside")],
    ids=["repeated", "too-large", "negative"],
)
def test_invalid_pruner_indices_get_a_pruner_error(tiny_model, demo_batch, indices, message):
    with pytest.raises(PrunerError, match=message):
        run(tiny_model, demo_batch, FixedPruner(indices))


@pytest.mark.parametrize(
    "pruner",
    [RandomPruner(num_tokens=577), LiteLVLM(num_tokens=1000), FastV(num_tokens=600)],
    ids=["random", "litelvlm", "fastv"],
)
def test_budget_above_n_gets_a_pruner_error_naming_the_number(tiny_model, demo_batch, pruner):
    with pytest.raises(PrunerError, match=rf"\b{pruner.num_tokens}\b"):
        run(tiny_model, demo_batch, pruner)


def test_missing_signal_is_named(tiny_model, demo_batch):
    class Forgetful(LiteLVLM):
        @property
        def required_signals(self):
            return frozenset({Signal.LAST_QKV})

    with pytest.raises(PrunerError, match="patch_embeds"):
        run(tiny_model, demo_batch, Forgetful(num_tokens=64))
