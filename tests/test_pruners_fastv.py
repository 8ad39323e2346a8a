"""FastV's selection from a handmade last-token attention row."""

import pytest
import torch

from litelvlm.pruners import FastV, PrunerError, Signal

ATTENTION = torch.tensor([
    [0.10, 0.50, 0.05, 0.30, 0.20, 0.00],
    [0.30, 0.10, 0.30, 0.05, 0.40, 0.20],
])


def test_keeps_top_attention_in_original_order():
    # Sample 0: 0.5 (1), 0.3 (3), 0.2 (4). Sample 1: 0.4 (4), then 0.3 at both 0 and 2.
    assert FastV(num_tokens=3).select_in_llm(ATTENTION).tolist() == [[1, 3, 4], [0, 2, 4]]
    # R = 2: sample 1's tie between 0 and 2 goes to the lower index, so [0, 4].
    assert FastV(num_tokens=2).select_in_llm(ATTENTION).tolist() == [[1, 3], [0, 4]]


def test_exactly_r_distinct_indices_for_every_budget():
    torch.manual_seed(0)
    attention = torch.rand(3, 12).softmax(-1)
    for budget in range(1, 13):
        kept = FastV(num_tokens=budget).select_in_llm(attention)
        assert kept.shape == (3, budget)
        for row, scores in zip(kept.tolist(), attention):
            assert row == sorted(set(row))
            assert set(row) == set(scores.argsort(descending=True)[:budget].tolist())


def test_knobs_and_defaults():
    pruner = FastV()
    assert (pruner.num_tokens, pruner.prune_layer, pruner.mode) == (192, 2, "inplace")
    assert pruner.acts_in_llm and pruner.required_signals == {Signal.LLM_ATTENTION}
    assert (pruner.kept_order, pruner.position_ids) == ("raster", "original")
    assert FastV(layer=3, mode="mask").prune_layer == 3
    assert FastV(layer=3, mode="mask").mode == "mask"


def test_errors():
    with pytest.raises(PrunerError, match="layer"):
        FastV(layer=0)
    with pytest.raises(PrunerError, match="mode"):
        FastV(mode="drop")
    with pytest.raises(PrunerError, match=">= 1"):
        FastV(num_tokens=0)
    with pytest.raises(PrunerError, match="larger than the 6"):
        FastV(num_tokens=7).select_in_llm(ATTENTION)
