"""experiments/gpu_check.sh, the efficiency table measured on a lent GPU, keeps working: its `--smoke`
run on CPU gives a measured row per registered method and budget, with the visual tokens each row's
budget says (counts, not timings: nothing here depends on the machine's speed)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script

from litelvlm.engine.strategies import Strategy
from litelvlm.pruners import list_pruners
from process_helpers import run_in_session

REPO = Path(__file__).resolve().parents[1]
LAYERS = 32  # the smoke model's LLM depth, as LLaMA-7B's
TEXT_TOKENS = 126  # the efficiency table's prompt without the image


def load(name: str):
    return load_script(REPO / "experiments" / f"{name}.py", name)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `bash experiments/gpu_check.sh --smoke` run, exactly as CI and docs/efficiency.md run it."""
    out = tmp_path_factory.mktemp("gpu_check") / "table.json"
    done = run_in_session(["bash", "experiments/gpu_check.sh", "--smoke", "--out", str(out)], REPO, timeout_s=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def test_smoke_measures_every_registered_method_at_every_budget(smoke):
    report, stdout = smoke
    rows = report["rows"]
    failed = [f"{row['label']}@{row['num_tokens']}: {row['error']}" for row in rows if row["status"] != "ok"]
    assert not failed, failed
    assert report["registered_pruners"] == list_pruners()
    expected = {("none", None, 576)} | {("fastv", mode, b) for mode in ("inplace", "mask") for b in (192, 64)}
    expected |= {(name, None, b) for name in list_pruners() if name not in ("none", "fastv") for b in (192, 64)}
    assert sorted((row["method"], row["mode"] or "", row["num_tokens"]) for row in rows) == sorted(
        (name, mode or "", budget) for name, mode, budget in expected
    )
    assert not report["stopped_early"] and report["smoke"] and report["dtype"] == "float32"
    for row in rows:
        assert row["repetitions"] == report["repeats"] == 1
        assert 0 < row["prefill_ms"] <= row["end_to_end_ms"]  # the prefill is one stage of the forward
        assert row["peak_activation_bytes"] is None  # CPU: no allocator peak to read
    assert f"{len(rows)} of {len(rows)} rows measured" in stdout


def test_smoke_rows_run_the_visual_tokens_their_budget_says(smoke):
    report, _ = smoke
    assert report["num_patches"] == 576 and report["text_tokens"] == TEXT_TOKENS
    by_key = {(row["label"], row["num_tokens"]): row for row in report["rows"]}
    none = by_key["none", 576]
    assert none["visual_tokens_per_layer"] == [576] * LAYERS
    assert none["sequence_length_per_layer"] == [576 + TEXT_TOKENS] * LAYERS
    for budget in (192, 64):  # FastV (K = 2): layers 0-1 see every patch, layers 2.. the budget
        assert by_key["fastv-inplace", budget]["visual_tokens_per_layer"] == [576, 576] + [budget] * (LAYERS - 2)
        assert by_key["fastv-inplace", budget]["sequence_length_per_layer"][-1] == budget + TEXT_TOKENS
        assert by_key["fastv-mask", budget]["sequence_length_per_layer"] == none["sequence_length_per_layer"]
    for row in report["rows"]:
        counts = row["visual_tokens_per_layer"]
        assert len(counts) == LAYERS and row["kept_visual_tokens"] == counts[-1]
        assert all(later <= earlier for earlier, later in zip(counts, counts[1:]))  # tokens are only ever dropped
        if row["acts_in_llm"] is False and row["label"] != "none":  # a pre-LLM pruner: R tokens in every layer
            assert counts == [row["num_tokens"]] * LAYERS, row["label"]
    for label in {label for label, budget in by_key if budget == 64}:
        # fewer tokens at the smaller budget, and either budget below no pruning
        mean_64, mean_192 = (by_key[label, budget]["mean_visual_tokens_per_layer"] for budget in (64, 192))
        assert mean_64 < mean_192 < 576, label


def test_time_limit_stops_measuring_and_still_writes_the_table(tmp_path):
    gpu_check = load("gpu_check")
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "table.json"
    gpu_check.main(["--smoke", "--budgets", "64", "--time-limit", "0.001", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["stopped_early"]
    assert [row["status"] for row in report["rows"]] == ["skipped"] * len(report["rows"])
    assert len(report["rows"]) == 1 + len(list_pruners())  # none, FastV twice, the others once
    assert (torch.get_num_threads(), signal.getsignal(signal.SIGTERM)) == (threads, handler)  # restored


def test_a_method_that_fails_gets_an_error_row_and_the_next_row_is_measured(tiny_model, demo_batch):
    gpu_check = load("gpu_check")
    args, cpu, no_limit = SimpleNamespace(warmup=0, repeats=1), torch.device("cpu"), float("inf")
    too_many = gpu_check.measure_or_error(tiny_model, demo_batch, Strategy("litelvlm", 1000), cpu, args, no_limit)
    assert (too_many["label"], too_many["num_tokens"], too_many["status"]) == ("litelvlm", 1000, "error")
    assert too_many["error"] == (
        "PrunerError: litelvlm: num_tokens=1000 is larger than the 576 visual tokens this model produces"
    )
    measured = gpu_check.measure_or_error(tiny_model, demo_batch, Strategy("litelvlm", 64), cpu, args, no_limit)
    assert measured["status"] == "ok" and measured["visual_tokens_per_layer"] == [64] * len(tiny_model.llm.model.layers)


def test_full_size_run_without_cuda_is_one_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        load("gpu_check").parse_args([])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_environment_check_names_a_package_outside_the_project_range(monkeypatch):
    check_env = load("check_env")
    assert check_env.problems(["torch", "transformers", "lightning"]) == []  # this environment is the tested one
    monkeypatch.setattr(check_env, "version", lambda name: "5.17.0" if name == "transformers" else "2.11.0+cu130")
    assert check_env.problems(["torch", "transformers"]) == [
        "transformers 5.17.0 is outside the project's tested range transformers<6,>=5.20"
    ]
    assert check_env.problems(["jax"]) == ["jax: not a dependency in pyproject.toml"]
