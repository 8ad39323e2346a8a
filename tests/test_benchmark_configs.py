"""The benchmark configs: every file names a real pruner with valid knobs and the standard splits,
and a GLaMM and a LISA released-format checkpoint run through them end to end on original-layout data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fixtures_checkpoints import write_released_checkpoint
from test_data_original import write_original_layout

from litelvlm.cli import main
from litelvlm.data.records import PROTOCOLS
from litelvlm.data.sources import open_referring_dataset
from litelvlm.pruners import build_pruner

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_SPLITS = [
    "refcoco/val", "refcoco/testA", "refcoco/testB",
    "refcoco+/val", "refcoco+/testA", "refcoco+/testB",
    "refcocog/val", "refcocog/test",
]
# The RefCOCO-family benchmark configs (ReasonSeg's, reasonseg_*.yaml: tests/test_reasonseg_configs.py).
CONFIGS = [
    path
    for path in sorted((ROOT / "configs").glob("glamm_refseg/*.yaml")) + sorted((ROOT / "configs").glob("lisa_7b/*.yaml"))
    if not path.stem.startswith("reasonseg_")
]


def test_there_is_a_config_per_model_and_pruner():
    names = {path.stem for path in CONFIGS if path.parent.name == "glamm_refseg"}
    assert names == {path.stem for path in CONFIGS if path.parent.name == "lisa_7b"}
    assert {"none", "litelvlm_192", "litelvlm_64", "fastv_192", "fastv_64", "vispruner_192", "vispruner_64"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_benchmark_config_names_a_buildable_pruner_and_the_standard_splits(path):
    config = yaml.safe_load(path.read_text())
    pruner = config["model"]["pruner"]
    built = build_pruner(pruner["class_path"], **pruner.get("init_args", {}))
    budget = pruner.get("init_args", {}).get("num_tokens")
    assert built.num_tokens == budget
    if budget is not None:
        assert str(budget) in path.stem
    assert config["data"]["splits"] == BENCHMARK_SPLITS
    assert config["data"]["protocol"] in PROTOCOLS
    lisa = path.parent.name == "lisa_7b"
    assert config["data"]["protocol"] == ("per-sentence" if lisa else "glamm")
    assert config["model"]["checkpoint"] == ("xinlai/LISA-7B-v1" if lisa else "MBZUAI/GLaMM-RefSeg")


@pytest.mark.parametrize(("folder", "kind", "fmt"), [("glamm_refseg", "glamm", "bin"), ("lisa_7b", "lisa", "safetensors")])
def test_released_checkpoint_runs_a_benchmark_config_on_original_layout_data(tmp_path, folder, kind, fmt):
    checkpoint = write_released_checkpoint(tmp_path / "checkpoint", kind, fmt=fmt, shards=2)
    data_root = write_original_layout(tmp_path / "data")
    main(
        [
            "validate",
            "--config", str(ROOT / "configs" / folder / "litelvlm_64.yaml"),
            "--model.checkpoint", str(checkpoint.folder),
            "--model.dtype", "float32",
            "--data.data_dir", str(data_root),
            "--data.splits", "[refcoco/val]",
            "--data.num_workers", "0",
            "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        ]
    )
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    protocol = "per-sentence" if kind == "lisa" else "glamm"
    dataset = open_referring_dataset(data_root, "refcoco", "val", max_sentences=1 if kind == "lisa" else 3, protocol=protocol)
    expected_masks = sum(len(positions) for _, positions in dataset.items)
    assert (results["pruner"], results["num_tokens"], results["split"]) == ("litelvlm", 64, "refcoco/val")
    assert results["num_samples"] == expected_masks
    assert results["random_weights"] is False
    assert 0.0 <= results["ciou"] <= 1.0
