"""The similarity reversal study: coverage geometry, AUROC, referent recall, and the config end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from litelvlm.analysis import SimilarityReversalStudy, bootstrap_mean
from litelvlm.analysis.reversal import StudyError, low_similarity_auroc, measure_sample, patch_coverage, referent_recall
from litelvlm.pruners.base import VisualSignals

REPO = Path(__file__).resolve().parents[1]
GRID, PATCH, SIZE = 24, 14, 336


def test_coverage_of_a_non_square_mask_follows_resize_and_centre_crop():
    # 168 x 336 -> shortest side to 336 (x2) -> 336 x 672, centre crop drops 168 resized columns on the left.
    mask = torch.zeros(168, 336, dtype=torch.bool)
    mask[21:42, 154:182] = True  # resized rows 42..84, cropped cols 140..196: patch rows 3-5, cols 10-13
    mask[21:42, 182:185] = True  # cropped cols 196..202: 6 of the 14 columns of patch col 14
    mask[100:160, 0:80] = True  # resized cols 0..160, all cropped away
    expected = torch.zeros(GRID, GRID)
    expected[3:6, 10:14] = 1.0
    expected[3:6, 14] = 6 / 14
    coverage = patch_coverage(mask, SIZE, PATCH)
    assert coverage.shape == (GRID * GRID,)
    torch.testing.assert_close(coverage.view(GRID, GRID), expected, atol=1e-6, rtol=0)


def mann_whitney_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def one_sample_signals(patch_embeds: torch.Tensor, text_embeds: torch.Tensor, seed: int = 0) -> VisualSignals:
    """Hand-built signals of one sample: the given embeddings, random vision internals for the other rules."""
    g = torch.Generator().manual_seed(seed)
    n, width, heads = patch_embeds.shape[0], 32, 4
    qkv = tuple(torch.randn(1, n + 1, width, generator=g) for _ in range(3))
    return VisualSignals(
        patch_features=torch.randn(1, n, width, generator=g),
        patch_embeds=patch_embeds[None],
        text_embeds=text_embeds[None],
        cls_attention=torch.rand(1, heads, n, generator=g).softmax(-1),
        last_qkv=qkv,
        text_mask=torch.ones(1, len(text_embeds), dtype=torch.bool),
        grid=(GRID, GRID),
        num_patches=n,
        batch_size=1,
        sample_ids=torch.tensor([7]),
    )


def test_auroc_is_the_mann_whitney_statistic_and_ignores_partly_covered_patches():
    g = torch.Generator().manual_seed(1)
    patch_embeds, text_embeds = torch.randn(GRID * GRID, 16, generator=g), torch.randn(1, 16, generator=g)
    coverage = torch.zeros(1, GRID * GRID)
    coverage[0, 100:160] = 1.0
    coverage[0, 160:200] = 0.7  # inside (>= 0.5)
    coverage[0, 200:260] = 0.3  # neither inside nor outside: left out of the AUROC
    study = SimilarityReversalStudy(budgets=[16], rules=["random"], k=8)
    rows, _ = measure_sample(one_sample_signals(patch_embeds, text_embeds), coverage, study.selectors)
    s = (patch_embeds @ text_embeds[0]).numpy()
    labelled = np.r_[0:200, 260:GRID * GRID]
    inside = np.zeros(GRID * GRID, dtype=bool)
    inside[100:200] = True
    assert rows[0]["num_inside"] == 100 and rows[0]["num_outside"] == 576 - 160
    assert rows[0]["auroc"] == pytest.approx(mann_whitney_auroc(-s[labelled], inside[labelled]), abs=1e-9)
    assert rows[0]["mean_inside"] == pytest.approx(float(s[inside].mean()), abs=1e-5)


def test_auroc_by_hand_with_ties_at_hundreds():
    # -s: inside 50, 50, -50, -500 vs outside 500, 50, 0, -60. Pairs won by inside: each 50 beats 0 and
    # -60 and ties 50 (2.5 each), -50 beats -60 (1), -500 none: 6 of 16.
    s = torch.tensor([-50.0, -50.0, 50.0, 500.0, -500.0, -50.0, 0.0, 60.0])
    inside = torch.tensor([True] * 4 + [False] * 4)
    assert low_similarity_auroc(s, inside) == 6 / 16


def test_auroc_does_not_saturate_for_raw_similarities_of_tens():
    # s = -20 + 25 z; the insides sit at ranks 2, 4, 6, 7 of the 8 values of -s: U = 19 - 10 = 9 of 16.
    # 72 exact copies (576 patches, ties across copies) keep every pair's outcome: 0.5625 exactly. Four
    # of the values are below -16.6, where float32 sigmoid(-s) is 1.0: a sigmoid-based AUROC ties them.
    z = torch.tensor([3.0, 2.0, 1.0, 0.5, -0.5, -1.0, -2.0, -3.0])  # -s ascending
    inside = torch.tensor([False, True, False, True, False, True, True, False])
    s, labels = (-20 + 25 * z).repeat(72), inside.repeat(72)
    assert low_similarity_auroc(s, labels) == 0.5625
    assert torch.sigmoid(-s[z.repeat(72) <= -0.5]).eq(1.0).all()  # the saturation this avoids


@pytest.mark.parametrize("scale", [50.0, 500.0])
def test_auroc_equals_a_written_out_mann_whitney_at_large_magnitudes_with_ties(scale):
    rng = np.random.default_rng(int(scale))
    s = (scale * rng.integers(-4, 5, size=576) + rng.choice([0.0, 0.25], size=576)).astype(np.float32)
    inside = rng.random(576) < 0.2
    inside[:2], inside[2:4] = True, False
    assert len(np.unique(s)) < 20  # heavy ties
    expected = mann_whitney_auroc(-s.astype(np.float64), inside)
    got = low_similarity_auroc(torch.from_numpy(s), torch.from_numpy(inside))
    assert got == pytest.approx(expected, abs=1e-12)
    flipped = low_similarity_auroc(torch.from_numpy(-s), torch.from_numpy(inside))
    assert got + flipped == pytest.approx(1.0, abs=1e-12)  # ranking by s instead of -s: the complement


def test_auroc_refuses_a_single_class():
    with pytest.raises(StudyError, match="inside and outside"):
        low_similarity_auroc(torch.randn(5), torch.ones(5, dtype=torch.bool))


def test_planted_reversal_is_found_and_lowest_similarity_recalls_the_object_best():
    g = torch.Generator().manual_seed(2)
    n = GRID * GRID
    text = torch.randn(2, 16, generator=g)
    patch_embeds = torch.randn(n, 16, generator=g)
    block = (torch.arange(n) // GRID).ge(8) & (torch.arange(n) // GRID).lt(10) & (torch.arange(n) % GRID).lt(20)
    patch_embeds[block] -= 4.0 * text[0] / text[0].norm()  # 40 inside patches, lower similarity to sentence 0
    coverage = torch.zeros(2, n)
    coverage[0, block] = 1.0  # sentence 1 refers to nothing on the patch grid: skipped
    study = SimilarityReversalStudy(budgets=[16, 32, 64], k=32)
    rows, z_values = measure_sample(one_sample_signals(patch_embeds, text), coverage, study.selectors)

    assert [row["skipped"] for row in rows] == [None, "no inside patch"]
    assert len(z_values) == 1 and len(z_values[0][0]) == 40
    row = rows[0]
    assert row["auroc"] > 0.9
    assert row["standardized_difference"] < -1.0
    assert row["inside_share_lowest_k"] > row["inside_share_highest_k"]
    for budget in ("16", "32", "64"):
        lowest = row["recall"]["lowest-similarity"][budget]
        others = {rule: r[budget] for rule, r in row["recall"].items() if rule not in ("lowest-similarity", "litelvlm")}
        assert all(lowest > value for value in others.values()), (budget, lowest, others)
        # With one sentence LiteLVLM's similarity set fills the whole budget: it equals lowest-similarity.
        assert row["recall"]["litelvlm"][budget] == lowest
    assert row["recall"]["lowest-similarity"]["64"] >= 0.9


def test_referent_recall_counts_the_kept_inside_patches():
    inside = torch.zeros(20, dtype=torch.bool)
    inside[[0, 1, 2, 5, 11]] = True
    assert referent_recall(torch.tensor([1, 5, 7, 9]), inside) == pytest.approx(2 / 5)
    assert referent_recall(torch.tensor([0, 1, 2, 5, 11, 3]), inside) == 1.0
    assert referent_recall(torch.tensor([3, 4]), inside) == 0.0


def test_bootstrap_resamples_whole_images_with_a_seed():
    values, images = [1.0, 1.0, 1.0, 5.0, 3.0, float("nan")], ["a", "a", "a", "b", "c", "c"]
    first = bootstrap_mean(values, images, num_resamples=500, seed=3)
    assert first == bootstrap_mean(values, images, num_resamples=500, seed=3)
    assert first["mean"] == pytest.approx(11 / 5) and first["n"] == 5 and first["groups"] == 3
    assert 1.0 <= first["low"] < first["mean"] < first["high"] <= 5.0
    single = bootstrap_mean([2.0, 4.0], ["x", "x"])
    assert single["low"] == single["high"] == 3.0


def test_reversal_config_runs_end_to_end(tmp_path):
    from litelvlm.cli import main

    main(["validate", "--config", str(REPO / "configs/studies/reversal.yaml"), "--trainer.limit_val_batches", "2",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    [path] = tmp_path.rglob("reversal.json")
    report = json.loads(path.read_text())
    rows = report["rows"]
    keys = [(row["sample_id"], row["sentence"]) for row in rows]
    assert keys == sorted(set(keys)) and len({row["sample_id"] for row in rows}) == 4  # 2 batches of 2
    assert report["num_measured"] + report["num_skipped"] == len(rows) > 0
    recall = report["aggregates"]["referent_recall"]
    assert set(recall) == {"lowest-similarity", "highest-similarity", "context-only", "litelvlm", "vispruner", "random"}
    assert set(recall["random"]) == {"64", "128", "192"}
    stats = report["aggregates"]["auroc"]
    assert stats["low"] <= stats["mean"] <= stats["high"] and 0.0 <= stats["mean"] <= 1.0
    for name in ("reversal_similarity_histograms.png", "reversal_referent_recall.png"):
        with Image.open(path.parent / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    assert list(path.parent.glob("events.out.tfevents.*"))
