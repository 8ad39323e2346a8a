"""The similarity reversal study: coverage geometry, AUROC, referent recall, and the config end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from litelvlm.analysis import SimilarityReversalStudy, bootstrap_mean
from litelvlm.analysis.reversal import (
    SKIP_CROPPED,
    SKIP_SMALL,
    StudyError,
    low_similarity_auroc,
    measure_sample,
    patch_coverage,
    referent_recall,
    summary_lines,
)
from litelvlm.pruners import LiteLVLM
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
    # s = -20 + 25 z; the insides sit at ranks 1, 4, 6, 8 of the 8 values of -s: U = 19 - 10 = 9 of 16.
    # 72 exact copies (576 patches, ties across copies) keep every pair's outcome: 0.5625 exactly.
    z = torch.tensor([3.0, 2.0, 1.0, 0.5, -0.5, -1.0, -2.0, -3.0])  # -s ascending
    inside = torch.tensor([True, False, False, True, False, True, False, True])
    s, labels = (-20 + 25 * z).repeat(72), inside.repeat(72)
    assert low_similarity_auroc(s, labels) == 0.5625
    # The last four values lie below -16.6, where float32 sigmoid(-s) is 1.0: ranked after a sigmoid they
    # tie, and their 3-of-4 pairs won by the insides become 2 of 4: 0.5 instead of 0.5625.
    squashed = torch.sigmoid(-s)
    assert squashed[z.repeat(72) <= -0.5].eq(1.0).all()
    assert low_similarity_auroc(-squashed, labels) == 0.5


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

    assert [row["skipped"] for row in rows] == [None, SKIP_CROPPED]
    assert len(z_values) == 1 and len(z_values[0][0]) == 40
    row = rows[0]
    assert row["auroc"] > 0.9
    assert row["standardized_difference"] < -1.0
    assert row["inside_share_lowest_k"] > row["inside_share_highest_k"]
    for budget in ("16", "32", "64"):
        lowest = row["recall"]["lowest-similarity"][budget]
        others = {rule: r[budget] for rule, r in row["recall"].items() if rule not in ("lowest-similarity", "litelvlm")}
        assert all(lowest > value for value in others.values()), (budget, lowest, others)
        # LiteLVLM selects as evaluated, with both sentences (R // 2 lowest of each, then context).
        kept = LiteLVLM(num_tokens=int(budget)).select(one_sample_signals(patch_embeds, text))[0]
        assert row["recall"]["litelvlm"][budget] == referent_recall(kept, block)
    assert row["recall"]["lowest-similarity"]["64"] >= 0.9


def test_litelvlm_recall_is_measured_on_the_kept_set_of_all_the_images_sentences():
    # 16 patches, 2 sentences: each sentence's three lowest similarities sit on its own object.
    s = torch.arange(1.0, 17.0).repeat(2, 1)
    s[0, [0, 1, 2]] = torch.tensor([-3.0, -2.0, -1.0])
    s[1, [8, 9, 10]] = torch.tensor([-3.0, -2.0, -1.0])
    coverage = torch.zeros(2, 16)
    coverage[0, [0, 1, 2]] = coverage[1, [8, 9, 10]] = 1.0
    study = SimilarityReversalStudy(budgets=[4], rules=["lowest-similarity", "litelvlm"], k=2)
    rows, _ = measure_sample(one_sample_signals(s.T.contiguous(), torch.eye(2)), coverage, study.selectors)
    # R // T = 2 per sentence: S = {0, 1} | {8, 9} fills R = 4, so each object keeps 2 of its 3 patches;
    # one sentence alone (the lowest-similarity rule) keeps all 3 of its object's patches.
    assert [row["recall"]["litelvlm"]["4"] for row in rows] == pytest.approx([2 / 3, 2 / 3])
    assert [row["recall"]["lowest-similarity"]["4"] for row in rows] == [1.0, 1.0]


def synthetic_rows(study: SimilarityReversalStudy) -> list[dict]:
    """Rows of three images (16 patches, the object on patches 0-3 unless said otherwise), outcomes by hand:

    image a: sentence 0 inside [-10, 1, 1, 1] vs outside 0: mean below (-1.75 < 0), AUROC 12/48 = 0.25;
             sentence 1 inside [1, 1, 1, 1]: neither.
    image b: sentence 0 inside [-1] * 4: both (AUROC 1); sentence 1 inside [5, -1, -1, -1]: mean above
             (0.5 > 0), AUROC 36/48 = 0.75.
    image c: sentence 0 covers a third of patch 0 (small), sentence 1 nothing (outside the crop).
    """
    inside_values = {("a", 0): [-10, 1, 1, 1], ("a", 1): [1, 1, 1, 1],
                     ("b", 0): [-1, -1, -1, -1], ("b", 1): [5, -1, -1, -1]}
    rows = []
    for sample_id, image in enumerate("abc"):
        s = torch.zeros(2, 16)
        coverage = torch.zeros(2, 16)
        if image == "c":
            coverage[0, 0] = 1 / 3
        else:
            for t in range(2):
                s[t, :4] = torch.tensor(inside_values[image, t], dtype=torch.float32)
                coverage[t, :4] = 1.0
        measured, _ = measure_sample(one_sample_signals(s.T.contiguous(), torch.eye(2)), coverage, study.selectors,
                                     study.inside_threshold, study.k)
        rows += [{**row, "split": "val", "sample_id": sample_id, "image_id": image} for row in measured]
    return rows


def test_reversal_rates_and_skip_counts_match_hand_counts():
    study = SimilarityReversalStudy(budgets=[4], rules=["random"], k=4, bootstrap_resamples=2000)
    rows = synthetic_rows(study)
    assert [row.get("auroc") for row in rows[:4]] == [0.25, 0.0, 1.0, 0.75]
    assert [row["skipped"] for row in rows[4:]] == [SKIP_SMALL, SKIP_CROPPED]
    summary = study.summarise(rows, [])
    rates = summary["aggregates"]["rates"]
    below, above_half = rates["mean_inside_below_outside"], rates["auroc_above_half"]
    assert below["mean"] == 0.5 and above_half["mean"] == 0.5 and below["n"] == 4 and below["groups"] == 2
    # Resampling whole images: each image holds one of its two sentences below, so every draw is 0.5;
    # for the AUROC image a holds 0 of 2 and b 2 of 2, so a draw of (a, a) gives 0 and (b, b) 1.
    assert below["low"] == below["high"] == 0.5
    assert above_half["low"] == 0.0 and above_half["high"] == 1.0
    assert summary["num_skipped_by_reason"] == {SKIP_SMALL: 1, SKIP_CROPPED: 1, "no outside patch": 0}
    assert summary["referent_area"]["measured"]["mean"] == 4 / 16
    assert summary["referent_area"]["skipped"]["mean"] == pytest.approx((1 / 3 / 16 + 0) / 2)
    lines = summary_lines(summary)
    assert "50% (95% CI 50-50%)" in lines[1] and "50% (95% CI 0-100%)" in lines[2]
    assert "skipped 2: 1 small or thin (no patch covered >= 0.5), 1 outside the CLIP crop" in lines[3]


def test_a_lower_coverage_threshold_measures_the_small_referent():
    study = SimilarityReversalStudy(budgets=[4], rules=["random"], k=4, inside_threshold=0.25)
    rows = synthetic_rows(study)
    assert rows[4]["skipped"] is None and rows[4]["num_inside"] == 1 and rows[5]["skipped"] == SKIP_CROPPED


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


def test_reversal_config_runs_end_to_end(tmp_path, capsys):
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
    for name in ("mean_inside_below_outside", "auroc_above_half"):
        rate = report["aggregates"]["rates"][name]
        assert 0.0 <= rate["low"] <= rate["mean"] <= rate["high"] <= 1.0 and rate["n"] == report["num_measured"]
        measured = [row[name] for row in rows if row["skipped"] is None]
        assert rate["mean"] == pytest.approx(sum(measured) / len(measured))
    assert sum(report["num_skipped_by_reason"].values()) == report["num_skipped"]
    assert report["settings"]["rules_with_all_sentences"] == ["litelvlm"]
    console = capsys.readouterr().out
    assert "mean similarity inside < outside:" in console and "AUROC of low similarity > 0.5:" in console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path.parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"reversal/rate/mean_inside_below_outside", "reversal/rate/auroc_above_half"} <= tags
