"""The ReasonSeg benchmark configs and grid: every method at 192 and 64, val and test, runnable as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from litelvlm.cli import main
from litelvlm.data.synthetic import generate_synthetic_reasonseg
from litelvlm.pruners import build_pruner
from litelvlm.pruners.registry import class_path_of, list_pruners

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "lisa_7b").glob("reasonseg_*.yaml"))
SPLITS = ["reasonseg/val", "reasonseg/test"]
NOT_BENCHMARKED = {"random"}  # a sanity baseline, as in the RefCOCO benchmark configs


def test_every_registered_method_has_a_config_at_192_and_64():
    # The package's pruners, not those other tests register.
    shipped = {name for name in list_pruners() if class_path_of(name).startswith("litelvlm.pruners.")}
    methods = sorted(shipped - NOT_BENCHMARKED - {"none"})
    expected = {"reasonseg_none"} | {f"reasonseg_{m.replace('-', '_')}_{b}" for m in methods for b in (192, 64)}
    assert {path.stem for path in CONFIGS} == expected


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_names_a_buildable_pruner_both_splits_and_lisas_protocol(path):
    config = yaml.safe_load(path.read_text())
    pruner = config["model"]["pruner"]
    built = build_pruner(pruner["class_path"], **pruner.get("init_args", {}))
    budget = pruner.get("init_args", {}).get("num_tokens")
    assert built.num_tokens == budget and (budget is None or path.stem.endswith(f"_{budget}"))
    assert config["data"]["splits"] == SPLITS and config["data"]["protocol"] == "lisa-reasonseg"
    assert config["model"]["checkpoint"] == "xinlai/LISA-7B-v1"
    assert config["trainer"]["logger"]["init_args"]["name"] == f"lisa_7b/{path.stem}"


def test_grid_runs_as_is_on_a_released_format_lisa_checkpoint(tmp_path):
    """experiments/lisa_7b_reasonseg_grid.yaml unchanged on the ReasonSeg fixture, one image per split;
    the checkpoint has LISA-7B's 32 LLM layers (tiny width) so the in-LLM schedules act at their layers."""
    from fixtures_checkpoints import write_released_checkpoint

    grid = ROOT / "experiments" / "lisa_7b_reasonseg_grid.yaml"
    config = yaml.safe_load(grid.read_text())
    assert config["data"]["splits"] == SPLITS
    checkpoint = write_released_checkpoint(tmp_path / "checkpoint", "lisa", fmt="safetensors", shards=1, llm_layers=32)
    folder = generate_synthetic_reasonseg(tmp_path / "data", {"val": 2, "test": 2})
    main(
        [
            "validate", "--config", str(grid), "--model.checkpoint", str(checkpoint.folder), "--model.dtype", "float32",
            "--data.data_dir", str(folder.parent.parent), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        ]
    )  # fmt: skip
    (found,) = (tmp_path / "runs").rglob("results.json")
    results = json.loads(found.read_text())
    methods = [item if isinstance(item, str) else item["class_path"] for item in config["model"]["sweep"]["strategies"]]
    names = ["none"] + [f"{m}@{b}" for b in (192, 64) for m in methods]
    shipped = {name for name in list_pruners() if class_path_of(name).startswith("litelvlm.pruners.")}
    assert set(methods) == shipped - NOT_BENCHMARKED - {"none"}  # every method of the package, as its configs
    assert [(row["split"], row["configuration"]) for row in results] == [(s, n) for s in SPLITS for n in names]
    for row in results:  # image 0 of each split asks a short query (the fixture's pattern)
        assert row["num_samples"] == 1 and row["by_query_kind"]["short"]["num_samples"] == 1
        assert row["by_query_kind"]["short"]["ciou"] == row["ciou"]
        assert row["by_query_kind"]["long"]["num_samples"] == 0
