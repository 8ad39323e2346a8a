"""The field's pre-LLM baselines (FasterVLM, DivPrune, CDPruner) end to end on the tiny model: what the LLM is fed at
every budget 1..N, the unpruned masks at R = N, and a CLI validate run by short name."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import sam_image_cache

from litelvlm.pruners import NoPruning, build_pruner

BASELINES = ["fastervlm", "divprune", "cdpruner"]  # index selection; VisionZip (merges): test_visionzip_model.py
BUDGETS = [1, 64, 192, 575, 576]


@pytest.fixture(scope="module", autouse=True)
def fast_sam(tiny_model):
    with sam_image_cache(tiny_model):
        yield


@pytest.fixture(scope="module")
def unpruned(tiny_model, demo_batch):
    with torch.no_grad():
        return tiny_model(demo_batch, NoPruning())


@pytest.mark.parametrize("name", BASELINES)
def test_every_budget_feeds_the_llm_what_select_returns(tiny_model, demo_batch, unpruned, name):
    pruners = [build_pruner(name, num_tokens=r) for r in BUDGETS]
    with torch.no_grad():
        shared = tiny_model.encode(demo_batch, pruners)
        for pruner, budget in zip(pruners, BUDGETS):
            signals = copy.copy(shared.signals_by_score_dtype[pruner.score_dtype])
            key = ("question", "eos", getattr(pruner, "text_overflow", "truncate"))
            if key in shared.text_embeds:  # what `ground` adds for a pruner that reads text
                signals.text_embeds, signals.text_mask = shared.text_embeds[key]
            expected = pruner.select(signals)
            output = tiny_model.ground(demo_batch, shared, pruner)
            assert output.kept_indices.tolist() == expected.tolist()
            assert output.visual_tokens_per_layer == [budget] * len(tiny_model.llm.model.layers)
            for row in output.kept_indices.tolist():
                assert row == sorted(set(row)) and len(row) == budget  # raster order, distinct
            if budget == tiny_model.num_patches:
                for got, want in zip(output.mask_logits, unpruned.mask_logits):
                    assert torch.equal(got, want)


@pytest.mark.parametrize("name", [*BASELINES, "visionzip"])
def test_validate_by_short_name(tmp_path, name):
    from test_cli import QUICK, run_cli

    results, _ = run_cli(tmp_path, "--model.pruner", name, "--model.pruner.num_tokens", "64", *QUICK)
    assert (results["pruner"], results["num_tokens"]) == (name, 64)
    assert 0.0 <= results["ciou"] <= 1.0


def test_a_sweep_with_the_existing_pruners_equals_separate_runs(tmp_path):
    """One pass shares the signals (projected features computed once for DivPrune and CDPruner, the select
    layer's q/k once for FasterVLM, VisionZip and VisPruner); each configuration's metrics and per-mask
    records equal its own run's."""
    from test_sweep import DEMO, SAME_DATA, _single_run_args, record_rows, run_cli

    results, sweep_dir, _ = run_cli(
        tmp_path / "sweep", "--config", DEMO, "--model.pruner", "null",
        "--model.sweep.strategies", f"[{', '.join(BASELINES)}, visionzip, vispruner]", "--model.sweep.budgets", "[64]",
        *SAME_DATA,
    )  # fmt: skip
    assert [row["configuration"] for row in results] == [f"{name}@64" for name in (*BASELINES, "visionzip", "vispruner")]
    for row in results:
        name = row["configuration"]
        single, single_dir, _ = run_cli(tmp_path / name, "--config", DEMO, *_single_run_args(name), *SAME_DATA)
        assert (single["ciou"], single["giou"], single["num_samples"]) == (row["ciou"], row["giou"], row["num_samples"]), name
        assert record_rows(single_dir, single["configuration"]) == record_rows(sweep_dir, name), name
