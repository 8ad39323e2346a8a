"""The FLOPs table for in-LLM methods: every decoder layer counted on the sequence it actually ran."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
H, FFN, TEXT, N = 4096, 11008, 126, 576  # LLaMA-7B width and MLP, the table's prompt, CLIP-336 patches


@pytest.fixture(scope="module")
def table():
    return load_script(REPO / "tools" / "efficiency_table.py", "efficiency_table")


def layer_macs(length: int) -> int:
    """One LLaMA-7B layer on `length` tokens: q/k/v/o and the gated MLP, plus attention charged in
    full (scores and weighted sum over every query-key pair), as the counter does."""
    return length * (4 * H * H + 3 * H * FFN) + 2 * length * length * H


def test_the_table_lists_pdrop_and_dart_at_192_and_64(table):
    labels = {(s.pruner, s.num_tokens) for s in table.default_strategies()}
    assert {("pdrop", 192), ("pdrop", 64), ("dart", 192), ("dart", 64)} <= labels


def test_in_llm_rows_count_each_layer_on_the_sequence_it_ran(table):
    Strategy = table.Strategy
    rows = table.efficiency_rows(strategies=[Strategy("pdrop", 64), Strategy("dart", 192)])
    pdrop, dart = rows
    # PyramidDrop at an average of 64: 576 on layers 0-1, then its three stages (2, 8, 16).
    visual = pdrop["visual_tokens_per_layer"]
    assert visual[:2] == [N, N] and len(set(visual[2:8])) == len(set(visual[8:16])) == len(set(visual[16:])) == 1
    assert abs(sum(visual) / 32 - 64) < 1
    assert dart["visual_tokens_per_layer"] == [N, N] + [196] * 30
    for row in rows:
        lengths = [TEXT + v for v in row["visual_tokens_per_layer"]]
        assert row["sequence_length_per_layer"] == lengths
        assert row["llm_macs_per_layer"] == [layer_macs(length) for length in lengths]
        # The decoder stage = the layers + the pruner's own scoring between them (small, not zero).
        assert 0 < row["llm_selection_macs"] < 0.02 * row["llm_macs"]
        assert row["llm_macs"] == sum(row["llm_macs_per_layer"]) + row["llm_selection_macs"]
    assert pdrop["llm_macs"] / 1e12 == pytest.approx(1.26, abs=0.01)
    assert dart["llm_macs"] / 1e12 == pytest.approx(2.28, abs=0.01)


def test_sparsevlm_rows_at_192_and_64_count_its_stages_and_its_own_selection(table):
    Strategy = table.Strategy
    assert {("sparsevlm", 192), ("sparsevlm", 64)} <= {(s.pruner, s.num_tokens) for s in table.default_strategies()}
    rows = table.efficiency_rows(strategies=[Strategy("sparsevlm", 192), Strategy("sparsevlm", 64)])
    for row, stages in zip(rows, ([(300, 9), (200, 4), (110, 3)], [(66, 16), (30, 2), (17, 1)])):
        visual = [N] + [kept + merged for kept, merged in stages]  # 309 / 204 / 113 at 192; 82 / 32 / 18 at 64
        assert row["visual_tokens_per_layer"] == [visual[0]] * 3 + [visual[1]] * 4 + [visual[2]] * 9 + [visual[3]] * 16
        lengths = [TEXT + v for v in row["visual_tokens_per_layer"]]
        assert row["sequence_length_per_layer"] == lengths
        assert row["llm_macs_per_layer"] == [layer_macs(length) for length in lengths]
        # Its own cost at each stage (shape-only run: every one of the 126 text tokens counts as a
        # rater): V U^T on the layer-0 embeddings, the rating layer's keys of all L tokens, the raters'
        # queries and their rows of scores, and the loop's member bookkeeping (merged x V x N).
        selection = 0
        for (kept, merged), before in zip(stages, visual):
            length = TEXT + before
            selection += N * TEXT * H + length * H * H + TEXT * H * H + TEXT * length * H + merged * before * N
        assert row["llm_selection_macs"] == selection
        assert row["llm_macs"] == sum(row["llm_macs_per_layer"]) + selection
    assert [round(row["llm_macs"] / 1e12, 2) for row in rows] == [2.22, 1.39]
