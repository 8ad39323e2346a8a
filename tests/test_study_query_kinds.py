"""The reversal and attention-sink studies on ReasonSeg, split by query kind (short / long), and the
reversal's ignore regions; end to end with configs/studies/reasonseg_query_kinds.yaml on the fixture."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

from litelvlm.analysis import SimilarityReversalStudy
from litelvlm.analysis.query_kinds import by_query_kind, query_kind
from litelvlm.analysis.reversal import measure_sample
from litelvlm.cli import main
from litelvlm.data.synthetic import generate_synthetic_reasonseg
from litelvlm.pruners.base import VisualSignals

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "studies" / "reasonseg_query_kinds.yaml")


def test_query_kind_reads_is_sentence():
    batch = SimpleNamespace(is_sentence=[[True, True], None, [False]])
    assert [query_kind(batch, 0, 1), query_kind(batch, 1, 0), query_kind(batch, 2, 0)] == ["long", None, "short"]
    assert query_kind(SimpleNamespace(), 0, 0) is None  # data without kinds (RefCOCO's batches before ReasonSeg)


def test_by_query_kind_summarises_each_kind_without_its_rows():
    rows = [{"query_kind": "short", "v": 1.0}, {"query_kind": "long", "v": 3.0}, {"query_kind": "long", "v": 5.0}]
    summarise = lambda subset: {"n": len(subset), "mean": float(np.mean([r["v"] for r in subset])), "rows": subset}  # noqa: E731
    assert by_query_kind(rows, summarise) == {"short": {"n": 1, "mean": 1.0}, "long": {"n": 2, "mean": 4.0}}
    assert by_query_kind([{"query_kind": None, "v": 1.0}], summarise) is None


def test_a_patch_touching_an_ignore_region_is_neither_inside_nor_outside():
    n = 16
    g = torch.Generator().manual_seed(0)
    signals = VisualSignals(patch_embeds=torch.randn(1, n, 8, generator=g), text_embeds=torch.randn(1, 1, 8, generator=g),
                            text_mask=torch.ones(1, 1, dtype=torch.bool), grid=(4, 4), num_patches=n, batch_size=1)
    coverage, ignored = torch.zeros(1, n), torch.zeros(1, n)
    coverage[0, :4] = 1.0
    ignored[0, 4:7] = 0.25  # three uncovered patches partly ignored
    study = SimilarityReversalStudy(budgets=[4], rules=["lowest-similarity"], k=2)
    plain, _ = measure_sample(signals, coverage, study.selectors, k=2)
    rows, _ = measure_sample(signals, coverage, study.selectors, k=2, ignored=ignored)
    assert (plain[0]["num_outside"], rows[0]["num_outside"], rows[0]["num_inside"]) == (12, 9, 4)
    s = (signals.patch_embeds[0] @ signals.text_embeds[0, 0]).numpy()
    assert rows[0]["mean_outside"] == pytest.approx(float(s[7:].mean()), abs=1e-5)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """The config as given, on the synthetic ReasonSeg val split (6 images: even short, odd long) with the tiny model."""
    root = tmp_path_factory.mktemp("reasonseg_studies")
    folder = generate_synthetic_reasonseg(root / "data", {"val": 6})
    save_dir = root / "logs"
    stdout = io.StringIO()
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), contextlib.redirect_stdout(stdout):
        main(["validate", "--config", CONFIG, "--model.checkpoint", "tiny-glamm", "--data.data_dir", str(folder),
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir)])
    (reversal_path,) = save_dir.rglob("reversal.json")
    annotations = [json.loads(path.read_text()) for path in sorted((folder / "val").glob("*.json"))]
    reversal, sink = (json.loads((reversal_path.parent / name).read_text()) for name in ("reversal.json", "attention_sink.json"))
    return reversal, sink, annotations, stdout.getvalue()


def expected_kinds(annotations) -> list[str]:
    """Every query (protocol per-sentence), image by image: its image's kind."""
    return [("long" if a["is_sentence"] else "short") for a in annotations for _ in a["text"]]


def test_reversal_rows_and_summary_per_query_kind(study_run):
    reversal, _, annotations, printed = study_run
    rows = reversal["rows"]
    assert [row["query_kind"] for row in rows] == expected_kinds(annotations)
    kinds = reversal["by_query_kind"]
    assert set(kinds) == {"short", "long"} and "rows" not in kinds["long"]
    for kind, part in kinds.items():
        subset = [row for row in rows if row["query_kind"] == kind]
        measured = [row for row in subset if row["skipped"] is None]
        assert (part["num_sentences"], part["num_measured"]) == (len(subset), len(measured))
        assert measured, f"the fixture measures no {kind} referent"
        assert part["aggregates"]["auroc"]["mean"] == pytest.approx(float(np.mean([r["auroc"] for r in measured])))
        rate = np.mean([r["mean_inside_below_outside"] for r in measured])
        assert part["aggregates"]["rates"]["mean_inside_below_outside"]["mean"] == pytest.approx(float(rate))
    assert kinds["short"]["num_sentences"] + kinds["long"]["num_sentences"] == reversal["num_sentences"]
    for kind in ("short", "long"):
        assert f"  {kind} queries, {kinds[kind]['num_measured']} measured: mean inside < outside " in printed


def test_attention_sink_rows_and_summary_per_query_kind(study_run):
    _, sink, annotations, printed = study_run
    rows = sink["rows"]
    assert [row["query_kind"] for row in rows] == expected_kinds(annotations)
    assert all(row["clip_tokens"] == row["eos_position"] + 1 for row in rows)  # no fixture query overflows
    for kind, part in sink["by_query_kind"].items():
        subset = [row for row in rows if row["query_kind"] == kind]
        assert part["num_questions"] == len(subset) > 0
        expected = np.mean([row["shares"]["sos"] for row in subset], axis=0)
        np.testing.assert_allclose(np.asarray(part["mean"]["sos"]), expected, rtol=1e-12)
    assert sink["by_query_kind"]["long"]["mean"]["sos"] != sink["by_query_kind"]["short"]["mean"]["sos"]
    long_count = sink["by_query_kind"]["long"]["num_questions"]
    assert f"  long queries ({long_count}): last layer [EOS] share on [SOS] " in printed
