"""The in-LLM baselines (PyramidDrop, DART, SparseVLM) beyond one evaluation process: a two-process DDP sweep
equal to one process, per configuration and per layer; `fit` with each schedule active in every step; and
a two-process DDP `fit` with SparseVLM (merged tokens) that leaves both ranks with the same weights.

The tiny model's LLM has 4 layers, so the schedules are those of tests/test_in_llm_everywhere.py."""

from __future__ import annotations

import json
import sys
from unittest import mock

import lightning as L
import pytest
import torch
import yaml
from conftest import sam_image_cache
from test_ddp import DEMO, NUM_IMAGES, assert_same_numbers, expected_masks, odd_split, run_ddp  # noqa: F401 (fixtures)
from test_finetuning import FIT_SETTINGS, spliced_labels
from test_finetuning_checkpoints import fit_args, run_cli, small_set, trained_tensors  # noqa: F401 (fixture)
from test_in_llm_everywhere import in_llm_pruners

from litelvlm.cli import main
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine import finetuning
from litelvlm.engine.finetuning import FineTuning
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.engine.records import read_records

# The same three schedules as in_llm_pruners(), for the CLI.
PRUNERS = (
    "[{class_path: pdrop, init_args: {layers: [1, 2, 3], ratio: 0.5}}, {class_path: dart, init_args: {num_tokens: 64}},"
    " {class_path: sparsevlm, init_args: {num_tokens: 64, layers: [0, 1, 2]}}]"
)
# Visual tokens each decoder layer runs on (576 patches): PyramidDrop halves before layers 1-3; DART keeps
# 4 + 8 * (64 // 8) = 68 from layer 2; SparseVLM's stages at 64 keep 66+16, 30+2, 17+1 (kept + merged).
PER_LAYER = {"pdrop": [576, 288, 144, 72], "dart": [576, 576, 68, 68], "sparsevlm": [576, 82, 32, 18]}
CONFIGURATIONS = {"pdrop": "pdrop", "dart@64": "dart", "sparsevlm@64": "sparsevlm"}  # results.json's names
GROUNDING_LOSS = finetuning.grounding_loss  # the loss fit computes, wrapped below to see its labels


@pytest.fixture
def one_thread():
    """One torch thread for the in-process runs: the tiny model gains nothing from more, and two threads
    spinning on a busy shared CPU made these runs up to ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sweep_outputs(save_dir) -> tuple[list[dict], list[dict], dict]:
    """(results.json rows, efficiency.json records, {(configuration, sample, mask): retained tokens})."""
    (results,) = save_dir.rglob("results.json")
    (efficiency,) = save_dir.rglob("efficiency.json")
    table = read_records(results.parent).to_pylist()
    retained = {(row["configuration"], row["sample_id"], row["mask_index"]): row["retained_tokens"] for row in table}
    return json.loads(results.read_text()), json.loads(efficiency.read_text())["records"], retained


def test_two_process_ddp_sweep_of_the_in_llm_methods_matches_one_process(
    odd_split, expected_masks, tmp_path, one_thread  # noqa: F811
):
    """One image per batch, as for the pre-LLM baselines: each rank runs exactly the one process's batches.
    The efficiency profiler (no FLOP counting) records every batch's visual tokens per layer, on every rank."""
    sweep = ["--model.pruner", "null", "--model.pruners", PRUNERS, "--data.batch_size", "1", "--data.max_sentences", "3",
             "--data.seed", "0", "--data.data_dir", str(odd_split), "--trainer.enable_progress_bar", "false",
             "--trainer.callbacks+=litelvlm.engine.callbacks.EfficiencyProfiler", "--trainer.callbacks.count_flops",
             "false", "--trainer.callbacks.warmup_batches", "0"]  # fmt: skip
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", "--config", DEMO, *sweep, "--trainer.devices", "1",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "one")])  # fmt: skip
    command = [sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, *sweep, "--trainer.accelerator", "cpu",
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger.init_args.save_dir",
               str(tmp_path / "two")]  # fmt: skip
    done = run_ddp(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    singles, single_layers, single_retained = sweep_outputs(tmp_path / "one")
    multis, multi_layers, multi_retained = sweep_outputs(tmp_path / "two")
    assert [row["configuration"] for row in multis] == [row["configuration"] for row in singles] == list(CONFIGURATIONS)
    for one, two in zip(singles, multis):
        assert_same_numbers(two, one, expected_masks)
        assert one["visual_tokens"] == two["visual_tokens"] == PER_LAYER[CONFIGURATIONS[one["configuration"]]][-1]
    # Per layer: both sides ran every image (one batch each) through the same schedule, on the same sequences.
    for records in (single_layers, multi_layers):
        assert sorted((r["configuration"], r["sample_ids"]) for r in records) == sorted(
            (name, [image]) for name in CONFIGURATIONS for image in range(NUM_IMAGES)
        )
        for record in records:
            assert record["visual_tokens_per_layer"] == PER_LAYER[CONFIGURATIONS[record["configuration"]]], record
    by_sample = {(r["configuration"], r["sample_ids"][0]): r["sequence_length_per_layer"] for r in single_layers}
    assert {(r["configuration"], r["sample_ids"][0]): r["sequence_length_per_layer"] for r in multi_layers} == by_sample
    # Every scored mask on exactly one rank, with the last layer's visual tokens.
    assert multi_retained == single_retained and len(single_retained) == 3 * expected_masks
    assert all(count == PER_LAYER[CONFIGURATIONS[key[0]]][-1] for key, count in single_retained.items())


class SeenByTheLayers(L.Callback):
    """Per training step: the sequence length every decoder layer ran on, and the labels the loss was given."""

    def __init__(self, per_layer: list[int]) -> None:
        self.per_layer, self.lengths, self.expected_lengths = per_layer, [], []
        self.labels, self.expected_labels, self.losses = [], [], []

    def on_fit_start(self, trainer, pl_module) -> None:
        for layer in pl_module.lvlm.llm.model.layers:
            layer.register_forward_pre_hook(self._seen)

    def _seen(self, module, args) -> None:
        if torch.is_grad_enabled():  # a training forward, not the check after fit
            self.lengths[-1].append(args[0].shape[1])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        text = batch.input_ids.shape[1] - 1  # the prompt without its image sentinel
        self.lengths.append([])
        self.expected_lengths.append([text + visual for visual in self.per_layer])
        self.expected_labels.append(spliced_labels(batch, self.per_layer[-1]))  # visual slots and merged: ignored

    def loss(self, logits, labels, *args, **kwargs):
        self.labels.append(labels.detach().clone())
        assert logits.shape[:2] == labels.shape
        losses = GROUNDING_LOSS(logits, labels, *args, **kwargs)
        self.losses.append(float(losses["loss"].detach()))
        return losses


@pytest.mark.parametrize("name", list(PER_LAYER))
def test_fit_trains_with_the_in_llm_schedule_active(name, tmp_path, private_cache, one_thread):
    data = ReferringDataModule(batch_size=2, max_sentences=2)
    data.setup("fit")
    module = ReferringSegmentationModule(pruner=in_llm_pruners()[name], finetuning=FIT_SETTINGS)
    trained = {n: p.detach().clone() for n, p in module.lvlm.named_parameters() if p.requires_grad}
    seen = SeenByTheLayers(PER_LAYER[name])
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[seen], default_root_dir=str(tmp_path),
    )  # fmt: skip
    with sam_image_cache(module.lvlm), mock.patch.object(finetuning, "grounding_loss", seen.loss):
        trainer.fit(module, datamodule=data)
        batch = next(iter(data.train_dataloader()))
        with torch.no_grad():
            output = module.lvlm(batch, module.pruner)
    # Every layer of every step ran on the prompt plus that layer's visual tokens (padded batch of two).
    assert len(seen.lengths) == 3 and seen.lengths == seen.expected_lengths
    assert len(seen.labels) == 3 and all(torch.isfinite(torch.tensor(seen.losses)))
    for labels, expected in zip(seen.labels, seen.expected_labels):
        assert torch.equal(labels, expected)
    assert output.visual_tokens_per_layer == PER_LAYER[name]
    assert torch.equal(output.labels, spliced_labels(batch, PER_LAYER[name][-1]))
    changed = [n for n, p in module.lvlm.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert any(".lora_" in n for n in changed) and torch.isfinite(output.lm_logits).all()


def test_two_process_ddp_fit_with_sparsevlm_leaves_identical_weights_on_both_ranks(small_set, tmp_path):
    """SparseVLM (merged tokens, three stages) under DDP fit: both ranks end with the same trained tensors."""
    logs = tmp_path / "logs"
    args = fit_args(
        small_set, logs, "ddp", 2, "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path),
        "--model.pruner", "sparsevlm", "--model.pruner.num_tokens", "64", "--model.pruner.layers", "[0, 1, 2]",
    )  # fmt: skip
    done = run_cli(args, tmp_path, "DumpTrained")
    assert done.returncode == 0, done.stderr[-4000:]
    ran = yaml.safe_load((logs / "finetune_demo" / "ddp" / "config.yaml").read_text())["model"]["pruner"]
    assert ran["class_path"].endswith(".SparseVLM") and ran["init_args"]["layers"] == [0, 1, 2]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    initial = trained_tensors(ReferringSegmentationModule(pruner=in_llm_pruners()["sparsevlm"], finetuning=FineTuning()))
    assert set(rank0) == set(rank1) == set(initial)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(not torch.equal(rank0[name], initial[name]) for name in rank0)  # it trained
