"""One pass, many configurations: a sweep gives each configuration exactly the numbers of its own run.

The sweep of configs/sweep_demo.yaml (none, PyramidDrop's explicit stages, then random, FastV,
VisPruner, LiteLVLM and its three ablations, FasterVLM, DivPrune, CDPruner, VisionZip, DART and
SparseVLM at 192 and 64 tokens) runs once on two demo images; each of its 28 configurations then
runs alone through configs/demo.yaml on the same images. Metrics and per-mask records must be
equal, not close: the encoders' outputs do not depend on which pruners share them.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from litelvlm.cli import main
from litelvlm.engine.records import metrics_from_records, read_records
from litelvlm.engine.sweep import SweepError, SweepGrid, collect_pruners, configuration_names
from litelvlm.pruners import build_pruner

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
SWEEP_DEMO = str(REPO / "configs" / "sweep_demo.yaml")
SAME_DATA = ("--trainer.limit_val_batches", "1", "--data.batch_size", "2", "--data.max_sentences", "2")
QUIET = ("--trainer.enable_progress_bar", "false")
EXPECTED_NAMES = ["none", "pdrop"] + [
    f"{strategy}@{budget}"
    for budget in (192, 64)
    for strategy in ("random", "fastv", "vispruner", "litelvlm", "context-only", "similarity-only", "reversed-similarity",
                     "fastervlm", "divprune", "cdpruner", "visionzip", "dart", "sparsevlm")
]
# The demo's in-LLM schedules, fitted to its 4-layer LLM (configs/sweep_demo.yaml), for the single runs.
SCHEDULE_ARGS = {"pdrop": ["--model.pruner.num_tokens", "null", "--model.pruner.layers", "[1, 2, 3]", "--model.pruner.ratio", "0.5"],
                 "sparsevlm": ["--model.pruner.layers", "[0, 1, 2]"]}  # fmt: skip


def last_layer_tokens(configuration: str) -> int:
    """Visual tokens the demo's last LLM layer sees: 576 unpruned, the budget before the LLM and for
    FastV, each in-LLM method's own last count (hand-checked ones in tests/test_in_llm_everywhere.py)."""
    name, _, budget = configuration.partition("@")
    if name == "none":
        return 576
    if name == "pdrop":
        return 72  # 576 * 0.5^3
    if name == "dart":
        return 4 + 8 * (int(budget) // 8)
    if name == "sparsevlm":
        return {"192": 113, "64": 18}[budget]  # 576 -> 309 -> 204 -> 113 (the counts); 576 -> 82 -> 32 -> 18
    return int(budget)


def run_cli(save_dir: Path, *args: str) -> tuple[dict | list, Path, str]:
    """Run the CLI in-process; return results.json, the run folder and stdout."""
    stdout = io.StringIO()
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), contextlib.redirect_stdout(stdout):
        main(["validate", *args, *QUIET, "--trainer.logger.init_args.save_dir", str(save_dir)])
    (found,) = save_dir.rglob("results.json")
    return json.loads(found.read_text()), found.parent, stdout.getvalue()


def record_rows(run_dir: Path, configuration: str) -> list[tuple]:
    table = read_records(run_dir).to_pylist()
    keys = ("split", "sample_id", "image_id", "sentence_id", "mask_index", "intersection", "union", "retained_tokens")
    return sorted(tuple(row[key] for key in keys) for row in table if row["configuration"] == configuration)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("sweep"), "--config", SWEEP_DEMO, *SAME_DATA)


# ------------------------------------------------------------------------------ the sweep itself
def test_sweep_demo_results_are_one_object_per_configuration(sweep_run):
    results, _, _ = sweep_run
    assert isinstance(results, list)
    assert [row["configuration"] for row in results] == EXPECTED_NAMES
    for row in results:
        assert row["num_samples"] == 4  # 2 images x 2 sentences
        assert row["visual_tokens"] == last_layer_tokens(row["configuration"])
        assert {"pruner", "num_tokens", "ciou", "giou", "num_samples"} <= set(row)
    fastv = next(row for row in results if row["configuration"] == "fastv@64")
    assert (fastv["pruner"], fastv["num_tokens"], fastv["layer"], fastv["mode"]) == ("fastv", 64, 2, "inplace")


def test_sweep_prints_one_table_line_per_configuration(sweep_run):
    results, _, stdout = sweep_run
    assert re.search(r"^configuration\s+budget\s+cIoU\s+gIoU\s+samples\s*$", stdout, re.MULTILINE), stdout
    for row in results:
        budget = {"none": "all", "pdrop": "-"}.get(row["configuration"], str(row["num_tokens"]))  # pdrop: the preset, no budget
        line = rf"^{re.escape(row['configuration'])}\s+{budget}\s+{100 * row['ciou']:.2f}\s+{100 * row['giou']:.2f}\s+4\s*$"
        assert re.search(line, stdout, re.MULTILINE), (line, stdout)


def test_sweep_logs_each_configuration_under_its_own_name(sweep_run):
    results, run_dir, _ = sweep_run
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    logged = {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    for row in results:
        name = row["configuration"]
        assert logged[f"val/{name}/ciou"] == [pytest.approx(row["ciou"], abs=1e-7)]
        assert logged[f"val/{name}/giou"] == [pytest.approx(row["giou"], abs=1e-7)]
        assert logged[f"val/{name}/visual_tokens"] == [row["visual_tokens"]]
    assert "val/ciou" not in logged


def test_metrics_recomputed_from_the_records_equal_the_logged_ones_exactly(sweep_run):
    results, run_dir, _ = sweep_run
    recomputed = {row["configuration"]: row for row in metrics_from_records(run_dir)}
    assert len(read_records(run_dir)) == len(EXPECTED_NAMES) * 4 == 28 * 4  # every mask under every configuration, once
    for row in results:
        again = recomputed[row["configuration"]]
        assert (again["ciou"], again["giou"], again["num_masks"]) == (row["ciou"], row["giou"], row["num_samples"])
        # cIoU is the ratio of the integer sums, as plain Python computes it.
        rows = [r for r in read_records(run_dir).to_pylist() if r["configuration"] == row["configuration"]]
        assert row["ciou"] == sum(r["intersection"] for r in rows) / sum(r["union"] for r in rows)
        assert row["giou"] == pytest.approx(sum(r["intersection"] / r["union"] if r["union"] else 1.0 for r in rows) / 4, abs=1e-9)


def _single_run_args(configuration: str) -> list[str]:
    name, _, budget = configuration.partition("@")
    return ["--model.pruner", name] + (["--model.pruner.num_tokens", budget] if budget else []) + SCHEDULE_ARGS.get(name, [])


def test_sweep_equals_separate_single_pruner_runs_of_the_demo(sweep_run, tmp_path):
    results, sweep_dir, _ = sweep_run
    for row in results:
        name = row["configuration"]
        single, single_dir, _ = run_cli(tmp_path / name, "--config", DEMO, *_single_run_args(name), *SAME_DATA)
        assert isinstance(single, dict)  # a single-pruner run still writes one object
        assert (single["pruner"], single["num_tokens"]) == (row["pruner"], row["num_tokens"])
        assert (single["ciou"], single["giou"], single["num_samples"]) == (row["ciou"], row["giou"], row["num_samples"]), name
        assert record_rows(single_dir, single["configuration"]) == record_rows(sweep_dir, name), name


# ------------------------------------------------------------------------------ building sweeps
def test_grid_expands_budget_by_budget_after_the_listed_pruners():
    pruners = collect_pruners(None, [build_pruner("none")], SweepGrid(strategies=["fastv", "litelvlm"], budgets=[192, 64]))
    assert configuration_names(pruners) == ["none", "fastv@192", "litelvlm@192", "fastv@64", "litelvlm@64"]
    assert [p.num_tokens for p in pruners] == [None, 192, 192, 64, 64]


def test_grid_strategies_take_knobs_but_not_the_budget():
    grid = SweepGrid(strategies=[{"class_path": "fastv", "init_args": {"layer": 1, "mode": "mask"}}], budgets=[32])
    (fastv,) = grid.expand()
    assert (fastv.num_tokens, fastv.prune_layer, fastv.mode) == (32, 1, "mask")
    with pytest.raises(SweepError, match="num_tokens"):
        SweepGrid(strategies=[{"class_path": "fastv", "init_args": {"num_tokens": 3}}], budgets=[32]).expand()
    with pytest.raises(SweepError, match="takes no budget"):
        SweepGrid(strategies=["none"], budgets=[32]).expand()
    with pytest.raises(SweepError, match="at least one"):
        SweepGrid(strategies=["fastv"], budgets=[]).expand()


def test_a_strategy_can_run_at_a_subset_of_the_grid_budgets():
    grid = SweepGrid(strategies=["fastv", {"class_path": "pdrop", "budgets": [192, 64]}], budgets=[192, 128, 64, 32])
    pruners = grid.expand()
    assert configuration_names(pruners) == ["fastv@192", "pdrop@192", "fastv@128", "fastv@64", "pdrop@64", "fastv@32"]
    assert pruners[1].layers == (2, 8, 16)  # the budgeted form
    for budgets in ([16], [], 64, [64, "32"]):
        with pytest.raises(SweepError, match=r"budgets must be a non-empty list of the grid's budgets \[192, 64\]"):
            SweepGrid(strategies=[{"class_path": "pdrop", "budgets": budgets}], budgets=[192, 64]).expand()
    with pytest.raises(SweepError, match="a sweep strategy is a pruner name"):
        SweepGrid(strategies=[{"class_path": "pdrop", "budget": [64]}], budgets=[64]).expand()


def test_a_configuration_the_model_cannot_run_fails_before_any_data_naming_it(tmp_path, capsys):
    """The demo's LLM has 4 layers: PyramidDrop's budgeted stages (2/8/16) cannot run on it."""
    with pytest.raises(SystemExit) as exit_info, mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", "--config", DEMO, "--model.pruner", "null", "--model.pruners", "[{class_path: none}]",
              "--model.sweep.strategies", "[fastv, pdrop]", "--model.sweep.budgets", "[64]", *SAME_DATA,
              "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert "configuration pdrop@64: pdrop: layer K=8 (of the layers it acts before, [2, 8, 16]) must be in [1, 3] for this 4-layer LLM" in stderr
    assert not list(tmp_path.rglob("results.json"))


def test_names_show_the_knobs_that_tell_two_configurations_apart():
    pruners = [
        build_pruner("litelvlm", num_tokens=64, text_source="question"),
        build_pruner("litelvlm", num_tokens=64, text_source="expression"),
        build_pruner("fastv", num_tokens=64, mode="mask"),
    ]
    assert configuration_names(pruners) == [
        "litelvlm@64[text_source=question]",
        "litelvlm@64[text_source=expression]",
        "fastv@64",
    ]
    seeded = [build_pruner("random", num_tokens=64, seed=0), build_pruner("random", num_tokens=64, seed=1)]
    assert configuration_names(seeded) == ["random@64[seed=0]", "random@64[seed=1]"]
    with pytest.raises(SweepError, match="configurations 1 and 2 are the same"):
        configuration_names([build_pruner("fastv", num_tokens=64), build_pruner("fastv", num_tokens=64)])


def test_pruner_and_pruners_together_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({"model": {"pruners": [{"class_path": "fastv"}]}}))
    with pytest.raises(SystemExit) as exit_info, mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", "--config", DEMO, "--config", str(config), *SAME_DATA, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert "litelvlm: error: give either model.pruner" in stderr


def test_command_line_sweep_over_the_demo_config(tmp_path):
    results, _, _ = run_cli(
        tmp_path, "--config", DEMO, "--model.pruner", "null", "--model.pruners", "[{class_path: none}]",
        "--model.sweep.strategies", "[random]", "--model.sweep.budgets", "[50]", *SAME_DATA,
    )  # fmt: skip
    assert [row["configuration"] for row in results] == ["none", "random@50"]
    assert [row["visual_tokens"] for row in results] == [576, 50]


# ------------------------------------------------------------------------------ the paper's grid
GRIDS = [("glamm_refseg_grid", "glamm", "bin"), ("lisa_7b_grid", "lisa", "safetensors")]


@pytest.mark.parametrize(("name", "kind", "fmt"), GRIDS, ids=[grid[0] for grid in GRIDS])
def test_experiment_grid_runs_as_is_on_a_released_format_checkpoint(tmp_path, name, kind, fmt):
    """experiments/<model>_grid.yaml unchanged, on the 8 standard splits; here on one split of
    original-layout data with a released-format checkpoint (random weights, tiny width, the 7B
    models' 32 LLM layers so that the in-LLM schedules act at their real layers), one batch."""
    from fixtures_checkpoints import write_released_checkpoint
    from test_data_original import write_original_layout

    config = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
    assert config["data"]["splits"] == [
        "refcoco/val", "refcoco/testA", "refcoco/testB", "refcoco+/val", "refcoco+/testA", "refcoco+/testB",
        "refcocog/val", "refcocog/test",
    ]  # fmt: skip
    checkpoint = write_released_checkpoint(tmp_path / "checkpoint", kind, fmt=fmt, shards=1, llm_layers=32)
    results, _, _ = run_cli(
        tmp_path / "runs", "--config", str(REPO / "experiments" / f"{name}.yaml"),
        "--model.checkpoint", str(checkpoint.folder), "--model.dtype", "float32",
        "--data.data_dir", str(write_original_layout(tmp_path / "data")), "--data.splits", "[refcoco/val]",
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "1",
    )  # fmt: skip
    budgets = (192, 128, 64, 32)
    methods = ("fastv", "vispruner", "litelvlm", "context-only", "similarity-only", "reversed-similarity",
               "fastervlm", "divprune", "cdpruner", "visionzip", "pdrop", "sparsevlm", "dart")
    # GLaMM (576 patches): PyramidDrop's stages at 2/8/16 average at least 52 tokens, so no pdrop@32.
    expected = ["none"] + [
        f"{m}@{b}" for b in budgets for m in methods if not (kind == "glamm" and m == "pdrop" and b == 32)
    ]
    assert [row["configuration"] for row in results] == expected
    assert len(results) == (52 if kind == "glamm" else 53)
    assert all(row["split"] == "refcoco/val" and row["num_samples"] > 0 for row in results)
    # `visual_tokens`: what the LLM's last layer reasoned over. Pre-LLM methods and FastV: the budget;
    # the schedules at their real layers (2/8/16, 2/6/15, 2) end on their reference counts.
    last_layer = {row["configuration"]: row["visual_tokens"] for row in results}
    n = 576 if kind == "glamm" else 256
    for budget in budgets:
        for method in methods[:10]:
            assert last_layer[f"{method}@{budget}"] == budget
        assert last_layer[f"dart@{budget}"] == 4 + 8 * (budget // 8)
        if f"pdrop@{budget}" in last_layer:
            assert last_layer[f"pdrop@{budget}"] == build_pruner("pdrop", num_tokens=budget).counts(n, 32)[-1]
    assert last_layer["none"] == n
    if kind == "glamm":
        assert last_layer["sparsevlm@192"] == 113  # 576 -> 309 -> 204 -> 113, as the issue states


def test_a_sweep_over_several_splits_reports_every_split_and_configuration(tmp_path):
    results, run_dir, _ = run_cli(
        tmp_path, "--config", DEMO, "--model.pruner", "null", "--model.pruners",
        "[{class_path: none}, {class_path: fastv, init_args: {num_tokens: 64}}]", "--data.splits", "[val, test]", *SAME_DATA,
    )  # fmt: skip
    assert [(row["split"], row["configuration"]) for row in results] == [
        ("val", "none"), ("val", "fastv@64"), ("test", "none"), ("test", "fastv@64"),
    ]  # fmt: skip
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    for row in results:
        (logged,) = [event.value for event in accumulator.Scalars(f"val/{row['split']}/{row['configuration']}/ciou")]
        assert logged == pytest.approx(row["ciou"], abs=1e-7)
    recomputed = {(row["split"], row["configuration"]): row["ciou"] for row in metrics_from_records(run_dir)}
    assert recomputed == {(row["split"], row["configuration"]): row["ciou"] for row in results}
