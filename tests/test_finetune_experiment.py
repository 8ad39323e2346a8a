"""experiments/finetune_vs_training_free: its configs hold GLaMM's recipe and a fair evaluation, and its
four commands (fit, validate twice, compare) run end to end on a tiny released-format GLaMM checkpoint
and original-layout data, the same commands as the README's with only paths, size and precision changed."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import sys
from pathlib import Path
from unittest import mock

import pyarrow.compute as pc
import pytest
import torch
import yaml
from fixtures_checkpoints import write_released_checkpoint
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data_original import REFCOCO_REFS, write_original_layout

from litelvlm.cli import main
from litelvlm.data.sources import open_referring_dataset
from litelvlm.engine.finetuned import BEST_STEM, MANIFEST_FILE, WEIGHTS_FILE
from litelvlm.engine.finetuning import FineTuning
from litelvlm.engine.records import read_manifest, read_records
from litelvlm.engine.sweep import collect_pruners, configuration_names
from litelvlm.pruners import build_pruner

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "finetune_vs_training_free"
FIT_BASE = EXPERIMENT / "finetune.yaml"  # the recipe, unpruned; every pruned fit is an overlay on it
OVERLAYS = {f"{strategy}_{budget}": EXPERIMENT / f"finetune_{strategy}_{budget}.yaml"
            for strategy in ("litelvlm", "fastv", "vispruner") for budget in (192, 64)}  # fmt: skip
FIT_PRUNED = OVERLAYS["litelvlm_64"]
EVALUATE = EXPERIMENT / "evaluate.yaml"
BENCHMARK_SPLITS = [
    "refcoco/val", "refcoco/testA", "refcoco/testB",
    "refcoco+/val", "refcoco+/testA", "refcoco+/testB",
    "refcocog/val", "refcocog/test",
]  # fmt: skip
TUNED_NAME = "experiments/finetune_vs_training_free/finetuned_litelvlm_64"  # the README's step 3
FIT_STEPS = 3
LABELS = ("training-free", "finetuned")


def run_cli(args: list[str]):
    """`python -m litelvlm.cli ARGS` in-process (pytest's argv hidden, the result table silenced)."""
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), contextlib.redirect_stdout(io.StringIO()):
        return main(args)


def parsed_config(subcommand: str, *paths: Path) -> dict:
    """The configs as the CLI resolves them (later ones override, defaults filled in, types checked),
    without building the model."""
    stdout = io.StringIO()
    configs = [argument for path in paths for argument in ("--config", str(path))]
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), contextlib.redirect_stdout(stdout):
        with pytest.raises(SystemExit) as exited:
            main([subcommand, *configs, "--print_config"])
    assert exited.value.code in (0, None), stdout.getvalue()
    return yaml.safe_load(stdout.getvalue())


# ------------------------------------------------------------------------------------ the configs
@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    fits = {name: parsed_config("fit", FIT_BASE, path) for name, path in OVERLAYS.items()}
    return {"unpruned": parsed_config("fit", FIT_BASE), **fits, "pruned": fits["litelvlm_64"],
            "evaluate": parsed_config("validate", EVALUATE)}  # fmt: skip


def test_every_yaml_of_the_experiment_is_one_the_tests_parse():
    expected = [FIT_BASE, *OVERLAYS.values(), EVALUATE]
    assert sorted(EXPERIMENT.glob("*.yaml")) == sorted(expected)  # no config left untested
    for path in EXPERIMENT.glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path.name


@pytest.mark.parametrize("name", ["unpruned", *OVERLAYS])
def test_fit_configs_hold_glamms_recipe(configs, name):
    """scripts/finetune_glamm_refsegm.sh + train_ft.py's defaults, as docs/finetuning.md lists them."""
    config = configs[name]
    settings = FineTuning.from_dict(config["model"]["finetuning"])  # validates every field
    assert (settings.lr, settings.betas, settings.weight_decay, settings.warmup_steps) == (3e-4, (0.9, 0.95), 0.0, 100)
    assert (settings.lora_r, settings.lora_alpha, settings.lora_dropout) == (8, 16, 0.05)
    assert settings.lora_targets == ["q_proj", "v_proj"]
    assert settings.trainable_modules == ["mask_decoder", "text_hidden_fcs", "lm_head", "embed_tokens"]
    assert settings.activation_checkpointing is True  # --gradient_checkpointing (default True)
    assert settings.prune_during_training is (name != "unpruned")
    assert config["model"]["checkpoint"] == "MBZUAI/GLaMM-GranD-Pretrained"
    trainer, data = config["trainer"], config["data"]
    assert (trainer["precision"], trainer["max_epochs"], trainer["gradient_clip_val"]) == ("bf16-mixed", 5, 1.0)
    # 2 per GPU x 10 accumulated x 8 GPUs; with fewer devices the accumulation grows to keep 160
    assert (data["batch_size"], trainer["devices"], settings.effective_batch_size) == (2, 8, 160)
    assert trainer["accumulate_grad_batches"] == 1  # derived at fit time: 160 / (2 x 8) = 10
    assert data["train_splits"] == ["refcoco/train", "refcoco+/train", "refcocog/train"]
    assert (data["splits"], data["fit_val_images"], trainer["check_val_every_n_epoch"]) == (["refcocog/val"], 1000, 1)
    monitored = [c["init_args"] for c in trainer["callbacks"] if c["init_args"].get("monitor")]
    assert [(c["monitor"], c["mode"]) for c in monitored] == [("val/giou", "max")]
    assert any(c["init_args"].get("save_last") for c in trainer["callbacks"])
    pruner = config["model"]["pruner"]
    if name == "unpruned":
        assert pruner is None
    else:
        built = build_pruner(pruner["class_path"], **pruner["init_args"])
        assert configuration_names([built]) == [name.replace("_", "@")]
    assert trainer["logger"]["init_args"]["name"] == f"experiments/finetune_vs_training_free/finetune_{name}"


@pytest.mark.parametrize("name", list(OVERLAYS))
def test_each_pruned_fit_differs_from_the_unpruned_only_in_its_pruner_and_log_name(configs, name):
    def without_differences(config: dict) -> dict:
        config = json.loads(json.dumps(config))
        del config["model"]["finetuning"]["prune_during_training"], config["trainer"]["logger"]["init_args"]["name"]
        del config["model"]["pruner"]
        return config

    assert without_differences(configs[name]) == without_differences(configs["unpruned"])


def test_evaluate_config_scores_the_fitted_budget_on_the_standard_splits_as_the_fit_ran(configs):
    evaluate, fit = configs["evaluate"], configs["pruned"]
    assert evaluate["data"]["splits"] == BENCHMARK_SPLITS
    assert evaluate["seed_everything"] == fit["seed_everything"] and isinstance(evaluate["data"]["seed"], int)
    assert evaluate["data"]["protocol"] == fit["data"]["protocol"]
    for key in ("dtype", "seg_prompt_position", "seed"):
        assert evaluate["model"][key] == fit["model"][key], key
    # training-free: the released RefSeg model; the fine-tuned runs add their base (GranD) and export
    assert (evaluate["model"]["checkpoint"], fit["model"]["checkpoint"]) == (
        "MBZUAI/GLaMM-RefSeg", "MBZUAI/GLaMM-GranD-Pretrained"
    )
    model = evaluate["model"]
    pruners = [build_pruner(item["class_path"], **item.get("init_args", {})) for item in model["pruners"]]
    names = configuration_names(collect_pruners(None, pruners, model["sweep"]))
    fitted = build_pruner(fit["model"]["pruner"]["class_path"], **fit["model"]["pruner"]["init_args"])
    assert "none" in names and configuration_names([fitted]) == ["litelvlm@64"]
    assert {name.replace("_", "@") for name in OVERLAYS} <= set(names)  # every fitted configuration
    assert model["finetuned"] is None  # the training-free run; step 3 adds --model.finetuned


# ------------------------------------------------------------------------------------ end to end
FIXTURE_SPLITS = {ref["split"] for ref in REFCOCO_REFS}
EVAL_SPLITS = [split for split in BENCHMARK_SPLITS if split in {f"refcoco/{name}" for name in FIXTURE_SPLITS}]
SMALL_SWEEP = ["--model.sweep.strategies", "[litelvlm]", "--model.sweep.budgets", "[64]"]  # none + litelvlm@64


def short_fit(steps: int = FIT_STEPS) -> list[str]:
    """The recipe's fit cut to a few optimiser steps, in float32 (bf16 autocast is for GPUs)."""
    return [
        "--trainer.precision", "32-true", "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1",
        "--trainer.accumulate_grad_batches", "1", "--trainer.log_every_n_steps", "1",
        "--model.finetuning.warmup_steps", "1", "--model.finetuning.effective_batch_size", "null",
        "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", str(steps),  # one step per epoch: validate once, at the end
        "--data.train_splits", '["refcoco/train"]', "--data.splits", '["refcoco/val"]',  # the sets the fixture has
    ]  # fmt: skip


def visual_tokens_per_step(run_dir: Path) -> list[float]:
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars("train/visual_tokens")]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, compare_tool):
    """The README's steps 1-4 on the fixtures: a 3-step fit (float32 on CPU), validate training-free and
    fine-tuned (one image per split, none + litelvlm@64), compare. Returns the fit's CLI and the folders."""
    assert "train" in FIXTURE_SPLITS and EVAL_SPLITS == ["refcoco/val", "refcoco/testA"]
    tmp = tmp_path_factory.mktemp("finetune_experiment")
    checkpoint = write_released_checkpoint(tmp / "checkpoint", "glamm", shards=1)
    data_root = write_original_layout(tmp / "data")
    common = [
        "--model.checkpoint", str(checkpoint.folder), "--model.dtype", "float32", "--data.data_dir", str(data_root),
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
    ]  # fmt: skip
    fit = run_cli(["fit", "--config", str(FIT_BASE), "--config", str(FIT_PRUNED), *common, *short_fit()])
    fit_dir = Path(fit.trainer.log_dir)
    evaluate = ["validate", "--config", str(EVALUATE), *common, "--data.splits", json.dumps(EVAL_SPLITS),
                "--trainer.limit_val_batches", "1", *SMALL_SWEEP]  # fmt: skip
    free = run_cli(evaluate)
    best = fit_dir / f"{BEST_STEM}.safetensors"  # the README evaluates the best-gIoU checkpoint
    tuned = run_cli([*evaluate, "--model.finetuned", str(best), "--trainer.logger.init_args.name", TUNED_NAME])
    free_dir, tuned_dir = Path(free.trainer.log_dir), Path(tuned.trainer.log_dir)
    out = tmp / "compare"
    argv = [str(free_dir), str(tuned_dir), "--labels", *LABELS, "--paired-run", "training-free"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert compare_tool.main([*argv, "--out", str(out), "--bootstrap", "50"]) == 0
    return {"fit": fit, "fit_dir": fit_dir, "free_dir": free_dir, "tuned_dir": tuned_dir, "out": out,
            "common": common, "data_root": data_root}  # fmt: skip


def test_the_runs_land_in_the_folders_the_readme_names(experiment):
    assert experiment["fit_dir"].as_posix().endswith(f"{FIT_PRUNED.parent.name}/{FIT_PRUNED.stem}/version_0")
    assert experiment["free_dir"].parent.name == "training_free"
    assert experiment["tuned_dir"].parent.as_posix().endswith(TUNED_NAME)
    assert experiment["free_dir"] != experiment["tuned_dir"]


def test_the_export_holds_exactly_the_trained_tensors(experiment):
    module = experiment["fit"].model
    parameters = dict(module.lvlm.named_parameters())
    trained = {name for name, parameter in parameters.items() if parameter.requires_grad}
    tensors = load_file(str(experiment["fit_dir"] / WEIGHTS_FILE))
    assert set(tensors) == trained == set(module.trained.names)
    assert set(json.loads((experiment["fit_dir"] / MANIFEST_FILE).read_text())["trained"]) == trained
    layers = len(module.lvlm.llm.model.layers)
    lora = {name for name in trained if ".lora_" in name}
    assert len(lora) == layers * 2 * 2  # A and B on q_proj and v_proj of every layer
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora} == {"q_proj", "v_proj"}
    in_full = ("sam.mask_decoder.", "text_hidden_fcs.", "llm.lm_head.", "llm.model.embed_tokens.")
    assert all(name.startswith(in_full) for name in trained - lora)
    assert all(any(name.startswith(prefix) for name in trained) for prefix in in_full)
    assert not any(name.startswith("sam.mask_decoder.iou_prediction_head.") for name in trained)
    for name, value in tensors.items():
        assert value.dtype == torch.float32 and torch.equal(value, parameters[name].detach()), name
    # peft starts every LoRA B at zero: after the fit they hold what was trained, not the initial values.
    assert all(tensors[name].abs().sum() > 0 for name in lora if ".lora_B." in name)


def test_both_evaluations_scored_the_same_masks(experiment):
    free, tuned = read_records(experiment["free_dir"]), read_records(experiment["tuned_dir"])
    keys = ["split", "sample_id", "image_id", "sentence_id", "mask_index", "configuration"]

    def masks(table) -> list[tuple]:
        return sorted(zip(*(table[key].to_pylist() for key in keys)))

    assert masks(free) == masks(tuned)
    scores = [sorted(zip(*(table[key].to_pylist() for key in [*keys, "intersection", "union"]))) for table in (free, tuned)]
    assert scores[0] != scores[1]  # the fine-tuned evaluation ran the trained weights (the mask decoder changed)
    configurations = {"none", "litelvlm@64"}
    assert set(free["configuration"].to_pylist()) == configurations
    for split in EVAL_SPLITS:  # the first image of each split (limit_val_batches 1, batch 1), all its masks
        dataset, name = split.split("/")
        data = open_referring_dataset(experiment["data_root"], dataset, name, max_sentences=3, protocol="glamm")
        expected = len(data.items[0][1])
        recorded = free.filter(pc.equal(free["split"], split))
        assert recorded.num_rows == len(configurations) * expected > 0, split
    free_manifest, tuned_manifest = read_manifest(experiment["free_dir"]), read_manifest(experiment["tuned_dir"])
    assert free_manifest["data"] == tuned_manifest["data"]
    assert free_manifest["configurations"] == tuned_manifest["configurations"]


def test_only_the_finetuned_runs_identity_carries_the_exports_sha256(experiment):
    weights = experiment["fit_dir"] / f"{BEST_STEM}.safetensors"  # what step 3 evaluated
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert json.loads((experiment["fit_dir"] / f"{BEST_STEM}.json").read_text())["sha256"] == digest
    free = read_manifest(experiment["free_dir"])["model"]
    tuned = read_manifest(experiment["tuned_dir"])["model"]
    assert tuned["finetuned"] == digest and "finetuned" not in free
    assert {key: value for key, value in tuned.items() if key != "finetuned"} == free


def test_compare_pairs_each_finetuned_configuration_with_the_same_training_free_one(experiment):
    with open(experiment["out"] / "compare.csv") as handle:
        rows = {(row["split"], row["configuration"]): row for row in csv.DictReader(handle)}
    records = read_records(experiment["tuned_dir"])
    names = ("none", "litelvlm@64")
    assert set(rows) == {(split, f"{label}:{name}") for split in EVAL_SPLITS for label in LABELS for name in names}
    for (split, configuration), row in rows.items():
        label, _, name = configuration.partition(":")
        selected = pc.and_(pc.equal(records["split"], split), pc.equal(records["configuration"], name))
        evaluated = records.filter(selected).num_rows
        assert int(row["num_masks"]) == evaluated > 0
        if label == "training-free":
            assert row["baseline"] == "" and row["delta_ciou"] == ""
        else:
            assert row["baseline"] == f"training-free:{name}"
            assert int(row["num_paired_masks"]) == evaluated
            assert float(row["delta_ciou_low"]) <= float(row["delta_ciou"]) <= float(row["delta_ciou_high"])


def test_the_llm_sees_the_fitted_budget_in_every_training_step(experiment):
    assert visual_tokens_per_step(experiment["fit_dir"]) == [64.0] * FIT_STEPS


def test_the_unpruned_fit_trains_on_all_576_visual_tokens(experiment):
    fit = run_cli(["fit", "--config", str(FIT_BASE), *experiment["common"], *short_fit(steps=2)])
    assert visual_tokens_per_step(Path(fit.trainer.log_dir)) == [576.0] * 2
