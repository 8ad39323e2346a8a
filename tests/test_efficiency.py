"""Efficiency profiling: counted FLOPs against the analytic count, outputs untouched by observers,
KV-cache bytes, FastV's sequence per layer, the profiler callback through the CLI, the table tool."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import load_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from litelvlm.cli import main
from litelvlm.engine.callbacks import EfficiencyProfiler
from litelvlm.engine.callbacks.profiler import (
    StageFlopCounter,
    StageTimer,
    charge_spans,
    count_stage_flops,
    kv_cache_bytes,
    observing,
)
from litelvlm.pruners import FastV, build_pruner

REPO = Path(__file__).resolve().parents[1]
PROFILE_DEMO = str(REPO / "configs" / "profile_demo.yaml")
NUM_PATCHES = 576


def analytic_decoder_flops(llm, lengths: list[int], batch_size: int) -> int:
    """FLOPs (2 per multiply-accumulate) of LLaMA decoder layers run on sequences of `lengths`.

    Per token and layer: q and o (h x h), k and v (h x kv width), the MLP's gate, up and down
    (h x intermediate); per layer, attention scores and the weighted sum over every query-key
    pair (S^2 x h each). No LM head: the model reads hidden states, it never runs it.
    """
    h, inter = llm.hidden_size, llm.intermediate_size
    kv_width = (llm.num_kv_heads or llm.num_heads) * (h // llm.num_heads)
    per_token = 2 * h * h + 2 * h * kv_width + 3 * h * inter
    macs = sum(length * per_token + 2 * length * length * h for length in lengths)
    return 2 * macs * batch_size


def fastv_scoring_flops(llm, length: int, batch_size: int) -> int:
    """FastV's own cost at layer K-1: q of the last token, k of every token, one row of scores."""
    h = llm.hidden_size
    kv_width = (llm.num_kv_heads or llm.num_heads) * (h // llm.num_heads)
    return 2 * batch_size * (h * h + length * h * kv_width + length * h)


def counted_run(model, batch, pruner):
    return count_stage_flops(model, lambda: model(batch, pruner))


@pytest.fixture(scope="module")
def prompt_length(demo_batch):
    return demo_batch.input_ids.shape[1] - 1  # the image sentinel becomes the visual tokens


# --------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("pruner_name, kept", [("none", NUM_PATCHES), ("random", 64)])
def test_counted_llm_flops_equal_the_analytic_count_for_the_tokens_kept(
    tiny_model, demo_batch, prompt_length, pruner_name, kept
):
    pruner = build_pruner(pruner_name) if pruner_name == "none" else build_pruner(pruner_name, num_tokens=kept)
    output, flops = counted_run(tiny_model, demo_batch, pruner)
    llm = tiny_model.config.llm
    length = prompt_length + kept
    assert output.sequence_length_per_layer == [length] * llm.num_layers
    assert flops["llm_decoder"] == analytic_decoder_flops(llm, [length] * llm.num_layers, demo_batch.batch_size)
    # the projector runs on the kept tokens only: Linear(D->h) and Linear(h->h) per kept token
    vision_width = tiny_model.config.vision.hidden_size
    projector = 2 * demo_batch.batch_size * kept * (vision_width + llm.hidden_size) * llm.hidden_size
    assert flops["llm_prefill"] - flops["llm_decoder"] == projector


def test_fastv_inplace_shortens_the_sequence_after_layer_k_and_costs_its_scoring(tiny_model, demo_batch, prompt_length):
    llm = tiny_model.config.llm
    output, flops = counted_run(tiny_model, demo_batch, FastV(num_tokens=64, layer=2, mode="inplace"))
    full, short = prompt_length + NUM_PATCHES, prompt_length + 64
    lengths = [full, full] + [short] * (llm.num_layers - 2)
    assert output.sequence_length_per_layer == lengths
    assert output.visual_tokens_per_layer == [NUM_PATCHES, NUM_PATCHES] + [64] * (llm.num_layers - 2)
    expected = analytic_decoder_flops(llm, lengths, demo_batch.batch_size)
    assert flops["llm_decoder"] == expected + fastv_scoring_flops(llm, full, demo_batch.batch_size)


def test_fastv_mask_mode_runs_the_full_sequence_in_every_layer(tiny_model, demo_batch, prompt_length):
    llm = tiny_model.config.llm
    output, flops = counted_run(tiny_model, demo_batch, FastV(num_tokens=64, layer=2, mode="mask"))
    full = prompt_length + NUM_PATCHES
    assert output.sequence_length_per_layer == [full] * llm.num_layers
    assert output.visual_tokens_per_layer[-1] == 64
    no_pruning = analytic_decoder_flops(llm, [full] * llm.num_layers, demo_batch.batch_size)
    assert flops["llm_decoder"] == no_pruning + fastv_scoring_flops(llm, full, demo_batch.batch_size)


def test_nested_stage_is_counted_inside_its_enclosing_stage_but_not_twice_in_the_total(tiny_model, demo_batch):
    with observing(tiny_model, StageFlopCounter()) as counter, torch.no_grad():
        tiny_model(demo_batch, build_pruner("litelvlm", num_tokens=64))
    assert set(counter.flops) == {
        "clip_vision", "clip_text", "pruner_select", "llm_prefill", "llm_decoder", "sam_image_encoder", "sam_decoder"
    }
    assert 0 < counter.flops["llm_decoder"] < counter.flops["llm_prefill"]
    assert counter.total == sum(v for k, v in counter.flops.items() if k != "llm_decoder")


# --------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("pruner", [build_pruner("litelvlm", num_tokens=64), FastV(num_tokens=64, mode="inplace")])
def test_profiling_leaves_the_masks_unchanged(tiny_model, demo_batch, pruner):
    with torch.no_grad():
        plain = tiny_model(demo_batch, pruner).mask_logits
    for observer in (StageFlopCounter(), StageTimer("cpu")):
        with observing(tiny_model, observer), torch.no_grad():
            observed = tiny_model(demo_batch, pruner).mask_logits
        assert all(torch.equal(a, b) for a, b in zip(plain, observed))
    assert tiny_model.stage_observer is None


def test_stage_timer_times_every_stage_and_the_whole_forward(tiny_model, demo_batch):
    with observing(tiny_model, StageTimer("cpu")) as timer, torch.no_grad():
        tiny_model(demo_batch, build_pruner("vispruner", num_tokens=64))
    timing = timer.finish()
    stages = timing["time_ms"]
    assert set(stages) == {"clip_vision", "pruner_select", "llm_prefill", "llm_decoder", "sam_image_encoder", "sam_decoder"}
    assert all(ms > 0 for ms in stages.values())
    assert stages["llm_decoder"] <= stages["llm_prefill"]
    top_level = sum(ms for stage, ms in stages.items() if stage != "llm_decoder")
    assert top_level <= timing["end_to_end_ms"]
    assert timing["peak_memory_bytes"] is None  # GPU only


# --------------------------------------------------------------------------------------- KV cache
def test_kv_cache_bytes_sum_each_layer_as_run():
    # 2 (K, V) x (10 + 10 + 6 tokens) x 2 heads x 8 dims x 2 bytes (bf16) = 1664, per sample
    assert kv_cache_bytes([10, 10, 6], num_kv_heads=2, head_dim=8, dtype=torch.bfloat16) == 1664
    assert kv_cache_bytes([10, 10, 6], num_kv_heads=2, head_dim=8, dtype=torch.float32, batch_size=3) == 3 * 3328


# --------------------------------------------------------------------------------------- callback
def test_profiler_through_the_cli_writes_efficiency_json_and_tensorboard_scalars(tmp_path, tiny_model):
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        cli = main(["validate", "--config", PROFILE_DEMO, "--trainer.limit_val_batches", "2",
                    "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    assert cli.model.lvlm.stage_observer is None  # removed at the end: later forwards count nothing
    assert any(isinstance(callback, EfficiencyProfiler) for callback in cli.trainer.callbacks)
    [path] = sorted(tmp_path.rglob("efficiency.json"))
    assert (path.parent / "results.json").is_file()
    summary = json.loads(path.read_text())
    assert set(summary) >= {"stage", "model", "device", "dtype", "warmup_batches", "configurations", "records"}
    [(name, means)] = summary["configurations"].items()
    assert (means["pruner"], means["num_tokens"]) == ("litelvlm", 192)
    assert set(means) >= {
        "num_samples", "timed_batches", "flops_per_sample", "llm_macs_per_sample", "time_ms_per_batch",
        "peak_memory_bytes", "kv_cache_bytes_per_sample", "visual_tokens", "sequence_length_per_layer",
    }  # fmt: skip
    assert (means["num_batches"], means["num_samples"], means["timed_batches"]) == (2, 2, 1)
    records = summary["records"]
    assert [record["warmup"] for record in records] == [True, False]
    assert means["visual_tokens"] == 192 and means["peak_memory_bytes"] is None  # no GPU

    llm = tiny_model.config.llm
    head_dim = llm.hidden_size // llm.num_heads
    for record in records:
        lengths = record["sequence_length_per_layer"]
        assert record["flops"]["llm_decoder"] == analytic_decoder_flops(llm, lengths, 1)
        assert record["kv_cache_bytes"] == 2 * sum(lengths) * llm.num_heads * head_dim * 4  # float32
        assert set(record["time_ms"]) >= {"clip_vision", "clip_text", "pruner_select", "llm_prefill", "sam_decoder"}
    mean_decoder = sum(record["flops"]["llm_decoder"] for record in records) / 2
    assert means["llm_macs_per_sample"] == pytest.approx(mean_decoder / 2)
    assert means["time_ms_per_batch"]["end_to_end"] == pytest.approx(records[1]["end_to_end_ms"])  # warm-up left out

    accumulator = EventAccumulator(str(path.parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    for tag in ("efficiency/llm_tmacs", "efficiency/kv_cache_mib", "efficiency/visual_tokens",
                "efficiency/gflops/total", "efficiency/time_ms/end_to_end", "efficiency/time_ms/llm_prefill"):  # fmt: skip
        assert tag in tags, f"{tag} not logged; got {sorted(tags)}"
    [event] = accumulator.Scalars("efficiency/llm_tmacs")
    assert event.value == pytest.approx(means["llm_macs_per_sample"] / 1e12)


def test_a_sweeps_shared_encoders_are_charged_to_every_configuration_and_the_rest_in_order():
    def span(stage, ms):
        return {"stage": stage, "ms": ms, "peak_memory_bytes": None}

    spans = [span("clip_vision", 10.0), span("clip_text", 2.0), span("sam_image_encoder", 30.0)]
    for index in range(2):  # two configurations: select, LLM (decoder nested), mask decoding each
        spans += [span("pruner_select", 1.0 + index), span("llm_decoder", 4.0 + index), span("llm_prefill", 5.0 + index)]
        spans += [span("sam_decoder", 3.0)]
    first, second = charge_spans(spans, 2)
    assert first["time_ms"] == {
        "clip_vision": 10.0, "clip_text": 2.0, "sam_image_encoder": 30.0,
        "pruner_select": 1.0, "llm_decoder": 4.0, "llm_prefill": 5.0, "sam_decoder": 3.0,
    }  # fmt: skip
    assert second["time_ms"]["llm_prefill"] == 6.0 and second["time_ms"]["clip_vision"] == 10.0
    assert first["end_to_end_ms"] == 10 + 2 + 30 + 1 + 5 + 3  # the nested decoder is inside the prefill
    assert second["end_to_end_ms"] == 10 + 2 + 30 + 2 + 6 + 3
    [alone] = charge_spans(spans[:3] + spans[3:7], 1)
    assert alone["end_to_end_ms"] == first["end_to_end_ms"]


# --------------------------------------------------------------------------------------- tool
@pytest.fixture(scope="module")
def efficiency_table():
    return load_script(REPO / "tools" / "efficiency_table.py", "efficiency_table")


def test_table_tool_reproduces_the_published_llm_flops_of_the_baseline_and_litelvlm(efficiency_table):
    Strategy = efficiency_table.Strategy
    rows = efficiency_table.efficiency_rows(
        strategies=[Strategy("none"), Strategy("litelvlm", 192), Strategy("litelvlm", 64)]
    )
    published = {("none", 576): 4.66, ("litelvlm", 192): 2.11, ("litelvlm", 64): 1.27}
    assert [(row["pruner"], row["num_tokens"]) for row in rows] == list(published)
    for row in rows:
        assert row["llm_macs"] / 1e12 == pytest.approx(published[row["pruner"], row["num_tokens"]], rel=0.03)
        assert row["total_flops"] > 2 * row["llm_macs"]  # CLIP and SAM on top of the LLM
        assert row["sequence_length_per_layer"] == [126 + row["num_tokens"]] * 32
    # CLIP text tower and the last CLIP layer's q/k/v: LiteLVLM's own cost, absent without pruning
    assert rows[0]["flops_by_stage"].get("clip_text", 0) == 0 < rows[1]["flops_by_stage"]["clip_text"]
    assert rows[1]["flops_by_stage"]["clip_vision"] > rows[0]["flops_by_stage"]["clip_vision"]


def visionzip_merge_flops(num_tokens: int, num_patches: int, key_width: int, width: int) -> int:
    """VisionZip's own cost per image: the (M - C) x C key cosines and the C sums over M - C member states."""
    from litelvlm.pruners.visionzip import split_budget

    dominant, contextual = split_budget(num_tokens)
    others = num_patches - (dominant - 1) - contextual
    return 2 * (others * contextual * key_width + contextual * others * width)


def test_visionzips_merge_is_its_selection_cost_in_the_profiler(tiny_model, demo_batch):
    vision = tiny_model.config.vision
    _, flops = counted_run(tiny_model, demo_batch, build_pruner("visionzip", num_tokens=64))
    per_image = visionzip_merge_flops(64, NUM_PATCHES, vision.hidden_size // vision.num_heads, vision.hidden_size)
    assert flops["pruner_select"] == demo_batch.batch_size * per_image


def test_table_tool_lists_visionzip_with_the_llm_cost_of_its_budget_and_its_merge(efficiency_table):
    Strategy = efficiency_table.Strategy
    rows = efficiency_table.efficiency_rows(
        strategies=[Strategy("fastervlm", 192), Strategy("visionzip", 192), Strategy("visionzip", 64)]
    )
    fastervlm, visionzip_192, visionzip_64 = rows
    # R = 192 tokens ([CLS] among them) reach the LLM, as FasterVLM's 192 patches; CLIP runs as far as FasterVLM's.
    assert visionzip_192["llm_macs"] == fastervlm["llm_macs"]
    assert visionzip_192["flops_by_stage"]["clip_vision"] == fastervlm["flops_by_stage"]["clip_vision"]
    for row, budget in ((visionzip_192, 192), (visionzip_64, 64)):  # GLaMM-7B's CLIP: 1024 wide, 16 heads of 64
        assert row["flops_by_stage"]["pruner_select"] == visionzip_merge_flops(budget, NUM_PATCHES, 64, 1024)
        assert row["sequence_length_per_layer"] == [126 + budget] * 32
