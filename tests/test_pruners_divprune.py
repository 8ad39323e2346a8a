"""DivPrune's greedy max-min diversity: a hand-worked example, the reference rule written out, duplicates."""

import copy

import pytest
import torch

from litelvlm.pruners import DivPrune, MissingSignalError, PrunerError, Signal, VisualSignals, build_pruner
from litelvlm.pruners.divprune import max_min_diversity


def reference_picks(features: torch.Tensor, k: int, mask_picked: bool) -> list[int]:
    """vbdi/divprune `DivPrune` as written: `1 - mm(x/|x|, (x/|x|)^T)`; step 0 scores each column by
    its second-smallest entry (topk 2, smallest), later steps by the min over the picked ROWS; argmax.
    `mask_picked` adds the framework's one change: picked rows cannot win again."""
    normed = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - torch.mm(normed, normed.t())
    picks: list[int] = []
    for step in range(k):
        if step == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(distance, 0, torch.tensor(picks)), dim=0).values
        if mask_picked:
            scores = scores.clone()
            scores[picks] = float("-inf")
        picks.append(int(torch.argmax(scores)))
    return picks


def test_hand_worked_pick_order():
    # v0 = (1, 0), v1 = (1, 0.1) (almost v0), v2 = (0, 1), v3 = (-1, 0), v4 = (0, -1).
    # Nearest-neighbour distances: v0, v1 ~0.005; v2 0.9005 (to v1); v3 1; v4 1 -> tie, pick 3.
    # From v3: v0 2, v1 1.995, v2 1, v4 1 -> pick 0. Min to {3, 0}: v1 0.005, v2 1, v4 1 -> pick 2.
    # Min to {3, 0, 2}: v1 0.005, v4 1 -> pick 4; then 1.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert max_min_diversity(features, 5).tolist() == [3, 0, 2, 4, 1]
    assert max_min_diversity(features, 1).tolist() == [3]
    signals = VisualSignals(projected_features=features.unsqueeze(0))
    assert DivPrune(num_tokens=3).select(signals).tolist() == [[0, 2, 3]]  # raster order


def test_identical_tokens_are_never_picked_twice():
    # All distances are equal: the reference's argmax returns row 0 at every step (a repeated token);
    # here the picked rows are out of the race and the next index wins.
    features = torch.ones(4, 3)
    assert reference_picks(features, 3, mask_picked=False) == [0, 0, 0]
    assert max_min_diversity(features, 3).tolist() == [0, 1, 2]
    assert DivPrune(num_tokens=4).select(VisualSignals(projected_features=features[None])).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("seed", range(4))
def test_equals_the_reference_rule_on_random_and_tied_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.randn(40, 8, generator=generator)
    tied = torch.randint(-1, 2, (40, 3), generator=generator).float()  # few directions: many ties, duplicates
    tied[tied.abs().sum(1) == 0] = 1.0  # no zero vector
    for k in (1, 7, 39, 40):
        assert max_min_diversity(smooth, k).tolist() == reference_picks(smooth, k, mask_picked=True)
        # Without duplicates the masking changes nothing: the reference's own picks.
        assert max_min_diversity(smooth, k).tolist() == reference_picks(smooth, k, mask_picked=False)
        picks = max_min_diversity(tied, k).tolist()
        assert picks == reference_picks(tied, k, mask_picked=True) and len(set(picks)) == k


def test_budgets_signals_and_registry():
    features = torch.randn(2, 6, 4)
    signals = VisualSignals(projected_features=features)
    assert DivPrune(num_tokens=6).select(signals).tolist() == [list(range(6))] * 2
    assert DivPrune(num_tokens=1).select(VisualSignals(projected_features=features[:, :1])).tolist() == [[0], [0]]
    with pytest.raises(PrunerError, match="larger than the 6"):
        DivPrune(num_tokens=7).select(signals)
    with pytest.raises(PrunerError, match="num_tokens must be >= 1"):
        DivPrune(num_tokens=0)
    with pytest.raises(PrunerError, match="cannot pick 0 of 6"):
        max_min_diversity(features[0], 0)
    with pytest.raises(MissingSignalError, match="projected_features"):
        DivPrune(num_tokens=2).select(VisualSignals(patch_features=features))
    pruner = build_pruner("divprune", num_tokens=8)
    assert type(pruner) is DivPrune and pruner.required_signals == {Signal.PROJECTED_FEATURES}


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


@pytest.mark.parametrize("score_dtype", ["model", "float32"])
def test_on_a_bf16_model_the_projector_output_and_the_rule_in_each_score_dtype(bf16_model, demo_batch, score_dtype):
    """`model`: the bf16 projector on every patch (the LLM's input embeddings unpruned, as the
    reference's spliced fp16 span) and the distances in bf16; `float32`: all upcast."""
    model = bf16_model
    pruner = DivPrune(num_tokens=48, score_dtype=score_dtype)
    with torch.no_grad():
        shared = model.encode(demo_batch, [pruner], for_grounding=False)
        signals = shared.signals_by_score_dtype[score_dtype]
        projector = model.mm_projector if score_dtype == "model" else copy.deepcopy(model.mm_projector).float()
        features = shared.patch_features if score_dtype == "model" else shared.patch_features.float()
        expected_features = projector(features)
    assert signals.projected_features.dtype == (torch.bfloat16 if score_dtype == "model" else torch.float32)
    assert torch.equal(signals.projected_features, expected_features)
    expected = [sorted(reference_picks(sample, 48, mask_picked=True)) for sample in expected_features]
    assert pruner.select(signals).tolist() == expected


def test_an_encoders_only_model_says_it_has_no_projector(demo_batch):
    from litelvlm.errors import LitelvlmError
    from litelvlm.models.loading import load_lvlm

    model = load_lvlm("tiny-glamm", seed=0, encoders_only=True)
    with pytest.raises(LitelvlmError, match="projected_features signal needs the projector"):
        model.encode(demo_batch, [DivPrune(num_tokens=8)], for_grounding=False)
