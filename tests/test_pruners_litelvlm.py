"""LiteLVLM and its ablations on handmade signals whose kept sets are worked out by hand."""

import math

import pytest
import torch

from litelvlm.pruners import (
    ContextOnly,
    LiteLVLM,
    MissingSignalError,
    PrunerError,
    ReversedSimilarity,
    Signal,
    SimilarityOnly,
    VisualSignals,
)
from litelvlm.pruners.litelvlm import context_scores

# Six patches in a 2-d CLIP embedding space; the two texts are the unit axes, so the similarity of
# patch i to text 0 is its x and to text 1 its y.
#            patch:   0         1         2         3         4         5
PATCHES = [(5.0, 5.0), (0.0, 1.0), (1.0, 0.0), (4.0, 4.0), (3.0, 6.0), (6.0, 3.5)]
TEXT_X, TEXT_Y = (1.0, 0.0), (0.0, 1.0)
# Context: every patch key points the same way, so the softmax weights are uniform (1/6) and the
# context score is ||v_i|| / 6. Value norms 6, 5, 4, 3, 1, 2 give the context ranking 0, 1, 2, 3, 5, 4.
VALUE_NORMS = [6.0, 5.0, 4.0, 3.0, 1.0, 2.0]


def handmade_qkv(batch_size: int = 1):
    q = torch.zeros(batch_size, 7, 2)
    q[:, 0] = torch.tensor([1.0, 0.0])  # CLS query
    k = torch.zeros(batch_size, 7, 2)
    k[:, 1:] = torch.tensor([0.3, 0.4])  # identical patch keys -> uniform weights
    v = torch.zeros(batch_size, 7, 2)
    v[:, 0] = torch.tensor([100.0, 0.0])  # CLS value: must be ignored
    v[:, 1:, 0] = torch.tensor(VALUE_NORMS)
    return q, k, v


def handmade_signals(texts, text_mask=None) -> VisualSignals:
    """`texts`: one list of text vectors per sample (all samples have the same number of slots)."""
    batch_size = len(texts)
    return VisualSignals(
        patch_embeds=torch.tensor(PATCHES).expand(batch_size, -1, -1),
        text_embeds=torch.tensor(texts),
        last_qkv=handmade_qkv(batch_size),
        text_mask=None if text_mask is None else torch.tensor(text_mask),
    )


def test_overlapping_sentences_are_topped_up_with_context_tokens():
    # R = 4, T = 2 -> 2 lowest per sentence. x: 5,0,1,4,3,6 -> {1, 2}; y: 5,1,0,4,6,3.5 -> {2, 1}.
    # S = {1, 2} overlaps fully, so 2 context tokens: ranking 0,1,2,3,5,4 minus S -> C = [0, 3].
    # Reference order: C by descending context score, then S ascending.
    kept = LiteLVLM(num_tokens=4).select(handmade_signals([[TEXT_X, TEXT_Y]]))
    assert kept.tolist() == [[0, 3, 1, 2]]


def test_single_sentence_keeps_only_similarity_tokens():
    # R = 4, T = 1 -> the 4 lowest x: 1 (0), 2 (1), 4 (3), 3 (4); S = {1,2,3,4}, no context token,
    # although patch 0 has the best context score.
    kept = LiteLVLM(num_tokens=4).select(handmade_signals([[TEXT_X]]))
    assert kept.tolist() == [[1, 2, 3, 4]]


def test_text_mask_gives_each_sample_its_own_sentence_count():
    # Sample 0 has two real sentences (the overlap case above: [0, 3, 1, 2]). Sample 1 has one real
    # sentence and a padded slot holding TEXT_Y; counting the padding would give T = 2 and the
    # overlap answer again, while T = 1 gives the single-sentence answer [1, 2, 3, 4].
    signals = handmade_signals([[TEXT_X, TEXT_Y], [TEXT_X, TEXT_Y]], text_mask=[[True, True], [True, False]])
    kept = LiteLVLM(num_tokens=4).select(signals)
    assert kept.tolist() == [[0, 3, 1, 2], [1, 2, 3, 4]]


def test_budget_below_sentence_count_takes_only_context_tokens():
    # R = 1 < T = 2: R // T = 0 similarity tokens per sentence, so S is empty and the single kept
    # token is the best context token, patch 0.
    kept = LiteLVLM(num_tokens=1).select(handmade_signals([[TEXT_X, TEXT_Y]]))
    assert kept.tolist() == [[0]]


def test_similarity_only_fills_with_lowest_minimum_similarity():
    # S = {1, 2} as in the overlap case. Minimum similarity over the two sentences:
    # 5, 0, 0, 4, 3, 3.5 -> outside S the lowest are patch 4 (3) then patch 5 (3.5): fill [4, 5].
    kept = SimilarityOnly(num_tokens=4).select(handmade_signals([[TEXT_X, TEXT_Y]]))
    assert kept.tolist() == [[4, 5, 1, 2]]


def test_reversed_similarity_takes_the_highest_per_sentence():
    # Highest 2 by x: 5 (6), 0 (5); by y: 4 (6), 0 (5). S = {0, 4, 5}; 1 context token: ranking
    # 0,1,2,3,5,4 minus S -> patch 1. Kept: [1, 0, 4, 5].
    kept = ReversedSimilarity(num_tokens=4).select(handmade_signals([[TEXT_X, TEXT_Y]]))
    assert kept.tolist() == [[1, 0, 4, 5]]


def test_context_only_keeps_top_context_in_descending_order():
    # Context ranking 0, 1, 2, 3, 5, 4 (value norms 6, 5, 4, 3, 1, 2 under uniform weights).
    signals = VisualSignals(last_qkv=handmade_qkv(batch_size=2))
    assert ContextOnly(num_tokens=5).select(signals).tolist() == [[0, 1, 2, 3, 5]] * 2


def test_context_score_weights_by_normalised_query_key_softmax():
    # Three patches, width D = 2. CLS query (2, 0) and keys (3, 0), (0, 5), (-1, 0) normalise to
    # cosines 1, 0, -1, so w = softmax([1, 0, -1] / sqrt(2)). Values have norms 1, 3, 2, so
    # c = (w0 * 1, w1 * 3, w2 * 2) = (0.576, 0.852, 0.280): ranking 1, 0, 2. Without the
    # softmax weights the ranking would be 1, 2, 0; without normalising, 0 would come first.
    q = torch.tensor([[[2.0, 0.0], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0]]])
    k = torch.tensor([[[7.0, 7.0], [3.0, 0.0], [0.0, 5.0], [-1.0, 0.0]]])
    v = torch.tensor([[[50.0, 0.0], [1.0, 0.0], [0.0, 3.0], [2.0, 0.0]]])
    exps = [math.exp(a / math.sqrt(2)) for a in (1.0, 0.0, -1.0)]
    weights = [e / sum(exps) for e in exps]
    expected = [weights[0] * 1.0, weights[1] * 3.0, weights[2] * 2.0]
    assert context_scores(q, k, v)[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.576, 0.852, 0.280], abs=1e-3)
    assert ContextOnly(num_tokens=2).select(VisualSignals(last_qkv=(q, k, v))).tolist() == [[1, 0]]


def test_context_score_matches_the_formula_on_random_inputs():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 10, 8).unbind(0)  # B = 2, N = 9 patches + CLS, D = 8
    scores = context_scores(q, k, v)
    for b in range(2):
        q0 = q[b, 0] / q[b, 0].norm()
        logits = torch.stack([q0 @ (k[b, i] / k[b, i].norm()) / math.sqrt(8) for i in range(1, 10)])
        weights = torch.exp(logits) / torch.exp(logits).sum()
        expected = torch.stack([(weights[i - 1] * v[b, i]).norm() for i in range(1, 10)])
        torch.testing.assert_close(scores[b], expected)


def test_required_signals_are_what_each_variant_reads():
    text = {Signal.PATCH_EMBEDS, Signal.TEXT_EMBEDS}
    assert LiteLVLM().required_signals == text | {Signal.LAST_QKV}
    assert ReversedSimilarity().required_signals == text | {Signal.LAST_QKV}
    assert SimilarityOnly().required_signals == text
    assert ContextOnly().required_signals == {Signal.LAST_QKV}


@pytest.mark.parametrize("cls", [LiteLVLM, SimilarityOnly, ContextOnly, ReversedSimilarity])
def test_exactly_r_distinct_indices_for_every_budget(cls):
    torch.manual_seed(1)
    batch, patches, slots = 3, 12, 3
    signals = VisualSignals(
        patch_embeds=torch.randn(batch, patches, 4),
        text_embeds=torch.randn(batch, slots, 4),
        last_qkv=tuple(torch.randn(3, batch, patches + 1, 6).unbind(0)),
        text_mask=torch.tensor([[True, True, True], [True, False, False], [True, True, False]]),
    )
    for budget in range(1, patches + 1):
        kept = cls(num_tokens=budget).select(signals)
        assert kept.shape == (batch, budget) and kept.dtype == torch.long
        for row in kept.tolist():
            assert len(set(row)) == budget and all(0 <= i < patches for i in row)


def test_budget_larger_than_patches_is_an_error():
    with pytest.raises(PrunerError, match="larger than the 6"):
        LiteLVLM(num_tokens=7).select(handmade_signals([[TEXT_X]]))


def test_budget_below_one_is_an_error():
    with pytest.raises(PrunerError, match=">= 1"):
        LiteLVLM(num_tokens=0)


def test_missing_signal_is_named():
    signals = handmade_signals([[TEXT_X]])
    signals.last_qkv = None
    with pytest.raises(MissingSignalError, match="last_qkv"):
        LiteLVLM(num_tokens=2).select(signals)
    signals = VisualSignals(last_qkv=handmade_qkv())
    with pytest.raises(MissingSignalError, match="patch_embeds"):
        SimilarityOnly(num_tokens=2).select(signals)


def test_sample_without_sentences_is_an_error():
    signals = handmade_signals([[TEXT_X, TEXT_Y]], text_mask=[[False, False]])
    with pytest.raises(PrunerError, match="no sentence"):
        LiteLVLM(num_tokens=2).select(signals)


def test_text_source_is_stored_and_checked():
    assert LiteLVLM(text_source="expression").text_source == "expression"
    assert LiteLVLM().text_source == "question"
    with pytest.raises(PrunerError, match="text_source"):
        LiteLVLM(text_source="caption")


def test_ordering_knobs_reach_the_base_class():
    pruner = SimilarityOnly(num_tokens=8, kept_order="raster", position_ids="original")
    assert (pruner.num_tokens, pruner.kept_order, pruner.position_ids) == (8, "raster", "original")
    assert LiteLVLM().num_tokens == 192
