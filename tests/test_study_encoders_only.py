"""Encoders-only study runs: the studies' JSON equals a full run's, the LLM and SAM never run, CLIP vision once per batch."""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import litelvlm.engine.module as module_lib
from litelvlm.analysis import SimilarityReversalStudy, TextAttentionSinkStudy
from litelvlm.engine.module import EvaluatedBatch, ReadsEncodings
from litelvlm.errors import LitelvlmError

REPO = Path(__file__).resolve().parents[1]
REVERSAL = str(REPO / "configs/studies/reversal.yaml")
SINK = str(REPO / "configs/studies/attention_sink.yaml")
BATCHES = 2  # of 2 images each
WITH_SINK = "--trainer.callbacks+=litelvlm.analysis.TextAttentionSinkStudy"  # both studies in one run
GROUNDING_PARTS = ("llm", "mm_projector", "text_hidden_fcs", "sam")


@contextlib.contextmanager
def probed_model():
    """Count, on the model the CLI builds, CLIP vision passes, the grounding parts built and calls into them."""
    counts: Counter = Counter()
    load = module_lib.load_lvlm

    def load_probed(*args, **kwargs):
        lvlm = load(*args, **kwargs)
        lvlm.vision_tower.vision_model.embeddings.register_forward_pre_hook(lambda *_: counts.update(["clip_vision"]))
        for part in GROUNDING_PARTS:
            if getattr(lvlm, part) is None:  # an encoders-only build leaves them out
                continue
            counts.update([f"built {part}"])
            for module in getattr(lvlm, part).modules():
                module.register_forward_pre_hook(lambda *_, part=part: counts.update([part]))
        return lvlm

    with mock.patch.object(module_lib, "load_lvlm", load_probed):
        yield counts


def run_study(config: str, save_dir: Path, *extra: str) -> tuple[Path, Counter]:
    from litelvlm.cli import main

    with probed_model() as counts, mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", "--config", config, *extra, "--trainer.limit_val_batches", str(BATCHES),
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir)])
    (folder,) = {path.parent for path in save_dir.rglob("config.yaml")}
    return folder, counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Counter]]:
    """Both studies encoders-only (as the configs say) and in a full run; the sink's config alone."""
    return {
        "encoders_only": run_study(REVERSAL, tmp_path_factory.mktemp("encoders_only"), WITH_SINK),
        "full": run_study(REVERSAL, tmp_path_factory.mktemp("full"), WITH_SINK, "--model.encoders_only", "false"),
        "sink_config": run_study(SINK, tmp_path_factory.mktemp("sink_config")),
    }


def read_json(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_encoders_only_studies_write_the_json_of_a_full_run(runs):
    encoders_only, full = runs["encoders_only"][0], runs["full"][0]
    reversal = read_json(encoders_only, "reversal.json")
    assert reversal == read_json(full, "reversal.json")
    assert {row["sample_id"] for row in reversal["rows"]} == set(range(2 * BATCHES))
    assert reversal["num_measured"] > 0
    sink = read_json(encoders_only, "attention_sink.json")
    assert sink["num_questions"] > 0
    assert sink == read_json(full, "attention_sink.json") == read_json(runs["sink_config"][0], "attention_sink.json")


def test_encoders_only_builds_and_runs_no_llm_and_no_sam_and_clip_vision_once_per_batch(runs):
    full_counts = runs["full"][1]
    assert all(full_counts[part] > 0 for part in GROUNDING_PARTS), full_counts  # the probes do see a full run
    assert all(full_counts[f"built {part}"] == 1 for part in GROUNDING_PARTS), full_counts
    for name in ("encoders_only", "sink_config"):  # neither built nor run
        assert all(runs[name][1][part] == runs[name][1][f"built {part}"] == 0 for part in GROUNDING_PARTS), (
            name, runs[name][1])
    # The reversal study reads the module's encodings: one vision pass per batch, full run or not.
    assert runs["encoders_only"][1]["clip_vision"] == BATCHES
    assert full_counts["clip_vision"] == BATCHES
    assert runs["sink_config"][1]["clip_vision"] == 0  # the attention sink needs no vision signal


def test_encoders_only_run_writes_no_metrics_and_no_records(runs):
    encoders_only, full = runs["encoders_only"][0], runs["full"][0]
    assert not (encoders_only / "results.json").exists()
    assert not (encoders_only / "records").exists()
    # The full run scores one mask per sentence: as many as the study has rows.
    assert read_json(full, "results.json")["num_samples"] == len(read_json(full, "reversal.json")["rows"])
    assert list((full / "records").glob("part-*.parquet"))


def test_report_says_no_masks_were_predicted_and_the_profiler_refuses(tmp_path, capsys):
    from litelvlm.engine.callbacks import EfficiencyProfiler, EvaluationReport

    module = SimpleNamespace(encoders_only=True, last_results=None, lvlm=SimpleNamespace(stage_observer=None))
    EvaluationReport()._report(SimpleNamespace(sanity_checking=False), module, tmp_path)
    assert "encoders-only run: no masks were predicted" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    with pytest.raises(LitelvlmError, match="encoders_only"):
        EfficiencyProfiler().on_validation_start(None, module)


def test_studies_declare_what_they_read_from_the_module():
    reversal = SimilarityReversalStudy(budgets=[8], rules=["vispruner", "litelvlm"], text_source="expression")
    assert isinstance(reversal, ReadsEncodings) and isinstance(TextAttentionSinkStudy(), ReadsEncodings)
    assert reversal.required_text == {("expression", "eos", "truncate")}
    assert {signal.value for signal in reversal.required_signals} == {"patch_embeds", "cls_attention", "last_qkv",
                                                                      "patch_features"}
    assert not TextAttentionSinkStudy().required_signals and not TextAttentionSinkStudy().required_text


@contextlib.contextmanager
def vision_calls(model):
    counts: Counter = Counter()
    hook = model.vision_tower.vision_model.embeddings.register_forward_pre_hook(
        lambda *_: counts.update(["clip_vision"])
    )
    try:
        yield counts
    finally:
        hook.remove()


def test_reversal_reads_the_shared_encodings_and_its_own_pass_gives_the_same(tiny_model, demo_batch):
    study = SimilarityReversalStudy(budgets=[16], k=8)
    with torch.no_grad(), vision_calls(tiny_model) as calls:
        shared = tiny_model.encode(demo_batch, [], extra_signals=study.required_signals,
                                   extra_text_keys=study.required_text, for_grounding=False)
        assert calls["clip_vision"] == 1
        evaluated = EvaluatedBatch("val", [0, 1], ["a", "b"], [["x"], ["y"]], outputs={}, scores={}, shared=shared)
        from_shared = study.batch_signals(tiny_model, evaluated, demo_batch)
        assert calls["clip_vision"] == 1  # read, not recomputed
        own_pass = study.batch_signals(tiny_model, None, demo_batch)
        assert calls["clip_vision"] == 2
    assert shared.sam_image_embeddings is None
    assert shared.text_embeds[("question", "eos", "truncate")][0] is from_shared.text_embeds
    for field in fields(from_shared):
        mine, theirs = getattr(from_shared, field.name), getattr(own_pass, field.name)
        if isinstance(mine, tuple) and mine and isinstance(mine[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), field.name
        elif isinstance(mine, torch.Tensor):
            assert torch.equal(mine, theirs), field.name
        else:
            assert mine == theirs, field.name
    with pytest.raises(LitelvlmError, match="encoders-only"):
        evaluated.primary


def test_encoders_only_encode_skips_the_vision_tower_when_nothing_needs_it(tiny_model, demo_batch):
    with torch.no_grad(), vision_calls(tiny_model) as calls:
        shared = tiny_model.encode(demo_batch, [], extra_text_keys=[("expression", "mean", "truncate")], for_grounding=False)
    assert calls["clip_vision"] == 0
    assert shared.patch_features is None and shared.sam_image_embeddings is None
    assert list(shared.text_embeds) == [("expression", "mean", "truncate")]
    assert shared.signals.num_patches == tiny_model.num_patches and torch.equal(shared.signals.sample_ids,
                                                                                demo_batch.sample_ids)
