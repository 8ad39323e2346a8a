"""The field's pre-LLM baselines (FasterVLM, DivPrune, CDPruner, VisionZip) where a pruner goes beyond one
evaluation process: `fit` with the pruner active, and a two-process DDP sweep equal to one process."""

from __future__ import annotations

import json
import sys
from unittest import mock

import lightning as L
import pytest
import torch
from conftest import sam_image_cache
from test_ddp import DEMO, assert_same_numbers, expected_masks, odd_split, run_ddp  # noqa: F401 (fixtures)
from test_finetuning import FIT_SETTINGS, spliced_labels

from litelvlm.cli import main
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.pruners import build_pruner

BASELINES = ("fastervlm", "divprune", "cdpruner", "visionzip")
R = 16


class SeenByTheLLM(L.Callback):
    """Per training step: the sequence length the first decoder layer ran on, and the labels' layout."""

    def __init__(self) -> None:
        self.lengths, self.expected = [], []

    def on_fit_start(self, trainer, pl_module) -> None:
        layer = pl_module.lvlm.llm.model.layers[0]
        layer.register_forward_pre_hook(lambda module, args: self.lengths.append(args[0].shape[1]) if torch.is_grad_enabled() else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.expected.append(batch.input_ids.shape[1] - 1 + R)


@pytest.mark.parametrize("name", BASELINES)
def test_fit_trains_with_the_pruner_active(name, tmp_path, private_cache):
    data = ReferringDataModule(batch_size=2, max_sentences=2)
    data.setup("fit")
    module = ReferringSegmentationModule(pruner=build_pruner(name, num_tokens=R), finetuning=FIT_SETTINGS)
    trained = {n: p.detach().clone() for n, p in module.lvlm.named_parameters() if p.requires_grad}
    seen = SeenByTheLLM()
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[seen], default_root_dir=str(tmp_path),
    )  # fmt: skip
    with sam_image_cache(module.lvlm):
        trainer.fit(module, datamodule=data)
        batch = next(iter(data.train_dataloader()))
        with torch.no_grad():
            output = module.lvlm(batch, module.pruner)
    assert seen.lengths == seen.expected and len(seen.lengths) == 3  # R visual tokens in every step
    assert torch.equal(output.labels, spliced_labels(batch, R))  # R ignored slots where the image was
    changed = [n for n, p in module.lvlm.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert any(".lora_" in n for n in changed) and torch.isfinite(output.lm_logits).all()


def test_two_process_ddp_sweep_of_the_baselines_matches_one_process(odd_split, expected_masks, tmp_path):  # noqa: F811
    """One image per batch on both sides: the ranks then compute exactly the one process's batches (with two,
    they would pad other questions together, which moves CDPruner's CLIP text embeddings by ~1e-6 and can
    change its greedy DPP: tests/test_batching.py)."""
    sweep = ["--model.pruner", "null", "--model.sweep.strategies", f"[{', '.join(BASELINES)}]",
             "--model.sweep.budgets", "[64]", "--data.batch_size", "1", "--data.max_sentences", "3", "--data.seed", "0",
             "--data.data_dir", str(odd_split), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    one_dir = tmp_path / "one"
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", "--config", DEMO, *sweep, "--trainer.devices", "1",
              "--trainer.logger.init_args.save_dir", str(one_dir)])
    (single,) = one_dir.rglob("results.json")
    command = [sys.executable, "-m", "litelvlm.cli", "validate", "--config", DEMO, *sweep, "--trainer.accelerator", "cpu",
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger.init_args.save_dir",
               str(tmp_path / "two")]  # fmt: skip
    done = run_ddp(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    (multi,) = (tmp_path / "two").rglob("results.json")
    singles, multis = json.loads(single.read_text()), json.loads(multi.read_text())
    assert [row["configuration"] for row in multis] == [row["configuration"] for row in singles] == [
        f"{name}@64" for name in BASELINES
    ]
    for one, two in zip(singles, multis):
        assert_same_numbers(two, one, expected_masks)
