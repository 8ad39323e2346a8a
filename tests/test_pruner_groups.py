"""Group labels of kept tokens: the rule that kept each token, worked out by hand, and carried by the model."""

import pytest
import torch

from litelvlm.pruners import (
    ContextOnly,
    FastV,
    LiteLVLM,
    NoPruning,
    PrunerError,
    RandomPruner,
    ReversedSimilarity,
    SimilarityOnly,
    TokenPruner,
    VisPruner,
    VisualSignals,
)

# Six patches in a 2-d CLIP embedding space; the texts are the unit axes, so patch i's similarity
# to text 0 is its x and to text 1 its y.
#            patch:   0         1         2         3         4         5
PATCHES = [(5.0, 5.0), (0.0, 1.0), (1.0, 0.0), (4.0, 4.0), (3.0, 0.5), (6.0, 3.5)]
TEXTS = [(1.0, 0.0), (0.0, 1.0)]
# Identical patch keys give uniform softmax weights, so the context score is ||v_i|| / 6:
# value norms 6, 5, 4, 3, 1, 2 rank the patches 0, 1, 2, 3, 5, 4 by context.
VALUE_NORMS = [6.0, 5.0, 4.0, 3.0, 1.0, 2.0]


def litelvlm_signals(texts=TEXTS) -> VisualSignals:
    q, k, v = torch.zeros(1, 7, 2), torch.zeros(1, 7, 2), torch.zeros(1, 7, 2)
    q[:, 0] = torch.tensor([1.0, 0.0])
    k[:, 1:] = torch.tensor([0.3, 0.4])
    v[:, 1:, 0] = torch.tensor(VALUE_NORMS)
    return VisualSignals(patch_embeds=torch.tensor([PATCHES]), text_embeds=torch.tensor([texts]), last_qkv=(q, k, v))


def as_sets(pruner, signals) -> dict[str, list[int]]:
    """Kept patch indices by group name, in kept order."""
    kept, groups = pruner.select_with_groups(signals)
    assert kept.shape == groups.shape and groups.dtype == torch.long
    return {name: kept[0][groups[0] == g].tolist() for g, name in enumerate(pruner.group_names)}


@pytest.mark.parametrize(
    "pruner, expected",
    [
        # R = 4, T = 2: 2 lowest per sentence. x: 5,0,1,4,3,6 -> {1, 2}; y: 5,1,0,4,0.5,3.5 -> {2, 4}.
        # S = {1, 2, 4}; C = the first 4 - 3 = 1 of the context ranking 0,1,2,3,5,4 outside S: [0].
        (LiteLVLM(num_tokens=4), {"similarity-aware": [1, 2, 4], "context-aware": [0]}),
        # Highest 2 per sentence: x -> {5, 0}; y -> {0, 3}. S = {0, 3, 5}; C: first of 1,2,... -> [1].
        (ReversedSimilarity(num_tokens=4), {"similarity-aware": [0, 3, 5], "context-aware": [1]}),
        # No S: the top 3 by context, all context-aware.
        (ContextOnly(num_tokens=3), {"similarity-aware": [], "context-aware": [0, 1, 2]}),
        # S = {1, 2, 4}; fill by the lowest min similarity (5, 0, 0, 4, 0.5, 3.5) outside S: [5].
        (SimilarityOnly(num_tokens=4), {"similarity-aware": [1, 2, 4], "minimum-similarity fill": [5]}),
        # R = 1 < T = 2: S is empty, the single token is the best context token.
        (LiteLVLM(num_tokens=1), {"similarity-aware": [], "context-aware": [0]}),
    ],
    ids=["litelvlm", "reversed-similarity", "context-only", "similarity-only", "budget-below-sentences"],
)
def test_litelvlm_groups_are_the_similarity_and_context_sets(pruner, expected):
    signals = litelvlm_signals()
    assert as_sets(pruner, signals) == expected
    kept, groups = pruner.select_with_groups(signals)
    assert torch.equal(pruner.select(signals), kept)
    assert kept.shape == (1, pruner.num_tokens)
    assert len(set(kept[0].tolist())) == pruner.num_tokens  # R distinct patches


def test_single_sentence_keeps_only_similarity_aware_tokens():
    # T = 1: R // 1 = R lowest x: 1 (0), 2 (1), 4 (3), 3 (4); no context token although patch 0 ranks first.
    assert as_sets(LiteLVLM(num_tokens=4), litelvlm_signals([TEXTS[0]])) == {
        "similarity-aware": [1, 2, 3, 4], "context-aware": []
    }


def test_groups_follow_each_sample_and_its_sentence_count():
    signals = litelvlm_signals()
    signals.patch_embeds = signals.patch_embeds.expand(2, -1, -1)
    signals.text_embeds = signals.text_embeds.expand(2, -1, -1)
    signals.last_qkv = tuple(x.expand(2, -1, -1) for x in signals.last_qkv)
    signals.text_mask = torch.tensor([[True, True], [True, False]])  # sample 1: one sentence
    kept, groups = LiteLVLM(num_tokens=4).select_with_groups(signals)
    assert kept.tolist() == [[0, 1, 2, 4], [1, 2, 3, 4]]
    assert groups.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]


def vispruner_signals() -> VisualSignals:
    # Head-mean CLS attention ranks the 8 patches 4, 1, 6, 3, 0, 2, 7, 5; head 0 alone would put 1 first.
    mean = torch.tensor([0.10, 0.20, 0.06, 0.12, 0.30, 0.03, 0.15, 0.04])
    delta = torch.tensor([0.0, 0.15, 0.0, 0.0, -0.05, 0.0, 0.0, 0.0])
    attention = torch.stack([mean + delta, mean - delta])[None]  # [1, 2, 8]
    features = torch.eye(8)
    features[2], features[5] = features[0], features[7]  # 2 duplicates 0, 5 duplicates 7
    return VisualSignals(cls_attention=attention, patch_features=features[None])


def test_vispruner_groups_are_the_important_and_diverse_sets():
    # R = 6, ratio 0.5 -> important = top 3 by head-mean attention: {4, 1, 6}. The others, by attention,
    # are [3, 0, 2, 7, 5] -> target 3, remove 2. A = [3, 2, 5], B = [0, 7]; redundancy (max cosine to B):
    # 3 -> 0, 2 -> 1, 5 -> 1, so 2 and 5 go: diverse = {3, 0, 7}. Kept in raster order.
    pruner = VisPruner(num_tokens=6)
    signals = vispruner_signals()
    kept, groups = pruner.select_with_groups(signals)
    assert kept.tolist() == [[0, 1, 3, 4, 6, 7]]
    assert groups.tolist() == [[1, 0, 1, 0, 0, 1]]
    assert as_sets(pruner, signals) == {"important": [1, 4, 6], "diverse": [0, 3, 7]}
    assert torch.equal(pruner.select(signals), kept)


def test_select_equals_the_first_element_of_select_with_groups_on_random_signals():
    g = torch.Generator().manual_seed(0)
    b, n, width = 2, 40, 8
    signals = VisualSignals(
        patch_features=torch.randn(b, n, width, generator=g),
        patch_embeds=torch.randn(b, n, width, generator=g),
        text_embeds=torch.randn(b, 3, width, generator=g),
        cls_attention=torch.rand(b, 2, n, generator=g),
        last_qkv=tuple(torch.randn(b, n + 1, width, generator=g) for _ in range(3)),
        text_mask=torch.tensor([[True, True, True], [True, False, False]]),
        num_patches=n,
        batch_size=b,
        sample_ids=torch.tensor([3, 4]),
    )
    pruners = [LiteLVLM(13), SimilarityOnly(13), ContextOnly(13), ReversedSimilarity(13), VisPruner(13), VisPruner(7),
               NoPruning(), RandomPruner(13)]
    for pruner in pruners:
        kept, groups = pruner.select_with_groups(signals)
        assert torch.equal(pruner.select(signals), kept), pruner.name
        assert groups.shape == kept.shape and groups.dtype == torch.long
        counts = torch.stack([(groups == g).sum(1) for g in range(len(pruner.group_names))], 1)
        assert counts.sum(1).tolist() == [kept.shape[1]] * b, pruner.name
    assert NoPruning.group_names == RandomPruner.group_names == ("kept",)


def test_fastv_names_its_single_group_after_its_layer():
    assert FastV(num_tokens=8, layer=3).group_names == ("kept at layer 3",)
    assert FastV(num_tokens=8).group_names == ("kept at layer 2",)


def test_a_subclass_that_redefines_select_is_what_runs_and_reports_one_group():
    class Reversed(LiteLVLM):
        def select(self, signals):
            return super().select(signals).flip(-1)

    signals = litelvlm_signals()
    kept, groups = Reversed(num_tokens=4).select_with_groups(signals)
    assert kept.tolist() == [[4, 2, 1, 0]]
    assert groups.tolist() == [[0, 0, 0, 0]] and Reversed.group_names == ("kept",)
    assert LiteLVLM.group_names == ("similarity-aware", "context-aware")  # the parent is untouched


# ------------------------------------------------------------------ through the model
def ground(model, batch, pruner):
    with torch.no_grad():
        return model.ground(batch, model.encode(batch, [pruner]), pruner)


def test_model_reports_groups_aligned_with_kept_indices_and_raster_keeps_the_pairs(tiny_model, demo_batch):
    for cls in (LiteLVLM, VisPruner):
        seen = {}

        class Recording(cls):
            def select_with_groups(self, signals):
                seen["signals"] = signals
                return super().select_with_groups(signals)

        reference = ground(tiny_model, demo_batch, Recording(num_tokens=64))
        kept, groups = reference.kept_indices, reference.kept_groups
        assert reference.group_names == cls.group_names and groups.shape == kept.shape == (2, 64)
        expected_kept, expected_groups = cls(num_tokens=64).select_with_groups(seen["signals"])
        assert torch.equal(kept, expected_kept) and torch.equal(groups, expected_groups), cls
        assert reference.llm_kept_indices is None
        # Both rules contribute on the demo (for LiteLVLM: its three sentences' low sets overlap).
        assert set(groups.flatten().tolist()) == {0, 1}, cls

        raster = ground(tiny_model, demo_batch, cls(num_tokens=64, kept_order="raster"))
        assert all(row == sorted(row) for row in raster.kept_indices.tolist())
        for b in range(2):
            pairs = dict(zip(kept[b].tolist(), groups[b].tolist()))
            assert dict(zip(raster.kept_indices[b].tolist(), raster.kept_groups[b].tolist())) == pairs, cls


def test_model_records_the_tokens_fastv_keeps_at_layer_k(tiny_model, demo_batch):
    chosen = {}

    class RecordingFastV(FastV):
        def select_in_llm(self, attention):
            chosen["kept"] = super().select_in_llm(attention)
            return chosen["kept"]

    output = ground(tiny_model, demo_batch, RecordingFastV(num_tokens=48, layer=1))
    assert output.kept_indices is None
    assert torch.equal(output.llm_kept_indices, chosen["kept"])  # all N reach the LLM: position = patch index
    assert output.llm_kept_indices.shape == (2, 48)
    assert torch.equal(output.kept_groups, torch.zeros(2, 48, dtype=torch.long))
    assert output.group_names == ("kept at layer 1",)
    assert output.visual_tokens_per_layer[0] == 576 and output.visual_tokens_per_layer[1:] == [48] * (
        len(output.visual_tokens_per_layer) - 1
    )


class BadGroups(TokenPruner):
    group_names = ("a", "b")

    def __init__(self, groups: list[int]) -> None:
        super().__init__(num_tokens=len(groups))
        self.groups = groups

    def select(self, signals):
        return self.select_with_groups(signals)[0]

    def select_with_groups(self, signals):
        kept = torch.arange(len(self.groups)).expand(signals.batch_size, -1)
        return kept, torch.tensor(self.groups).expand(signals.batch_size, -1)


def test_model_rejects_group_labels_without_a_name(tiny_model, demo_batch):
    with pytest.raises(PrunerError, match="group labels outside"):
        ground(tiny_model, demo_batch, BadGroups([0, 1, 2]))
