"""Fine-tuned weights on disk: only the trained tensors, loadable onto a fresh base, and resumable.

A short `fit` through the CLI (configs/finetune_demo.yaml on a small synthetic set) writes Lightning
checkpoints and the export; the tests read them back. The kill/resume and DDP tests run the CLI in
subprocesses (a real SIGKILL; two real ranks).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from process_helpers import run_in_session
from safetensors.torch import load_file, save_file

from litelvlm.cli import main
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.finetuned import BEST_STEM, CHECKPOINT_KEY, MANIFEST_FILE, WEIGHTS_FILE, file_digest
from litelvlm.engine.finetuning import FineTuning, FineTuningError
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.errors import LitelvlmError
from litelvlm.pruners import LiteLVLM

REPO = Path(__file__).resolve().parents[1]
FINETUNE_DEMO = str(REPO / "configs" / "finetune_demo.yaml")
DEMO = str(REPO / "configs" / "demo.yaml")
R = 16
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """Four training images (two steps per epoch at batch 2) and two validation images."""
    from litelvlm.data.synthetic import generate_synthetic_refcoco

    folder = tmp_path_factory.mktemp("finetune_set")
    generate_synthetic_refcoco(folder, num_images=4, seed=5, split="train")
    generate_synthetic_refcoco(folder, num_images=2, seed=6, split="val")
    return folder


def fit_args(data_dir: Path, save_dir: Path, version: str, epochs: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", FINETUNE_DEMO, "--data.data_dir", str(data_dir), "--model.pruner.num_tokens", str(R),
        "--model.finetuning.warmup_steps", "1", "--model.finetuning.lr", "0.01",
        "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(epochs),
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.version", version, *extra,
    ]  # fmt: skip


def run_in_process(args: list[str]):
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), contextlib.redirect_stdout(io.StringIO()):
        return main(args)


@pytest.fixture(scope="module")
def fitted(small_set, tmp_path_factory):
    """A 2-epoch fit through the CLI: the in-memory module and its run folder."""
    save_dir = tmp_path_factory.mktemp("fit_logs")
    cli = run_in_process(fit_args(small_set, save_dir, "run", 2))
    return cli, save_dir / "finetune_demo" / "run"


@pytest.fixture(scope="module")
def val_batch(small_set):
    data = ReferringDataModule(data_dir=str(small_set), split="val", batch_size=2)
    data.setup()
    return next(iter(data.val_dataloader()))


def masks_of(module: ReferringSegmentationModule, batch) -> list[torch.Tensor]:
    module.eval()
    with torch.no_grad():
        return module(batch).mask_logits


def trained_tensors(module: ReferringSegmentationModule) -> dict[str, torch.Tensor]:
    parameters = dict(module.lvlm.named_parameters())
    return {name: parameters[name].detach() for name in module.trained.names}


def test_lightning_checkpoints_hold_exactly_the_trained_tensors(fitted):
    cli, run_dir = fitted
    module = cli.model
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert {path.name for path in checkpoints} >= {"last.ckpt"} and len(checkpoints) >= 2
    expected = {"lvlm." + name for name in module.trained.names}
    frozen = {"lvlm." + name for name, p in module.lvlm.named_parameters()} - expected
    assert frozen  # the base is there, and big
    for path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert set(checkpoint["state_dict"]) == expected, path.name
        assert checkpoint[CHECKPOINT_KEY]["base"] == module.base_identity
        assert checkpoint[CHECKPOINT_KEY]["trained"] == module.trained.names
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for name, value in trained_tensors(module).items():  # saved after the last step: the final weights
        assert torch.equal(final["state_dict"]["lvlm." + name], value), name


def test_the_export_holds_exactly_the_trained_tensors_and_what_they_belong_to(fitted):
    cli, run_dir = fitted
    tensors = load_file(str(run_dir / WEIGHTS_FILE))
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    expected = trained_tensors(cli.model)
    assert set(tensors) == set(expected) == set(manifest["trained"])
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    assert manifest["base"]["checkpoint"] == "tiny-glamm"
    assert FineTuning.from_dict(manifest["finetuning"]) == cli.model.finetuning


def test_the_demo_fit_validates_and_exports_its_best_checkpoint_beside_the_last(fitted):
    cli, run_dir = fitted  # the demo config, validated once (after its last epoch): the best is the last
    best = load_file(str(run_dir / f"{BEST_STEM}.safetensors"))
    origin = json.loads((run_dir / f"{BEST_STEM}.json").read_text())["origin"]
    assert (origin["monitor"], origin["epoch"]) == ("val/giou", 1)
    # The monitored score is the logged value, which Lightning holds as a float32 tensor; results.json
    # has the exact float64 gIoU of the same masks.
    giou = json.loads((run_dir / "results.json").read_text())["giou"]
    assert origin["score"] == torch.tensor(giou, dtype=torch.float32).item()
    for name, value in trained_tensors(cli.model).items():
        assert torch.equal(best[name], value), name


def test_the_export_loaded_onto_a_fresh_base_reproduces_the_fitted_models_masks(fitted, val_batch):
    cli, run_dir = fitted
    fitted_masks = masks_of(cli.model, val_batch)
    for source in (run_dir, run_dir / WEIGHTS_FILE):  # the run folder or the file
        loaded = ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R), finetuned=str(source))
        assert not any(p.requires_grad for p in loaded.parameters())  # evaluation: all frozen
        for mine, theirs in zip(masks_of(loaded, val_batch), fitted_masks):
            assert torch.equal(mine, theirs)
    base = ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R))
    assert not all(torch.equal(a, b) for a, b in zip(masks_of(base, val_batch), fitted_masks))


def test_validate_with_the_export_scores_what_the_fit_scored(fitted, small_set, tmp_path):
    cli, run_dir = fitted
    fit_scores = json.loads((run_dir / "results.json").read_text())
    args = [
        "validate", "--config", DEMO, "--model.pruner.num_tokens", str(R), "--model.finetuned", str(run_dir),
        "--data.data_dir", str(small_set), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    run_in_process(args)
    (results_file,) = tmp_path.rglob("results.json")
    validated = json.loads(results_file.read_text())
    assert validated["num_samples"] == fit_scores["num_samples"] > 0
    assert validated["giou"] == fit_scores["giou"] and validated["ciou"] == fit_scores["ciou"]
    # the results name the weights they were computed with: the export's sha256, null for the base
    assert validated["finetuned"] == json.loads((run_dir / MANIFEST_FILE).read_text())["sha256"]
    assert fit_scores["finetuned"] == "fitted in this run"  # the fit's own validation: the in-memory model


def test_an_export_of_another_base_or_layout_or_content_is_refused(fitted, tmp_path):
    _, run_dir = fitted
    with pytest.raises(FineTuningError, match="trained on base model.*'seed': 1}.*different base weights"):
        ReferringSegmentationModule(seed=1, finetuned=str(run_dir))
    with pytest.raises(FineTuningError, match="'seg_prompt_position': 'at'"):
        ReferringSegmentationModule(seg_prompt_position="at", finetuned=str(run_dir))
    bfloat16 = ReferringSegmentationModule(dtype="bfloat16", finetuned=str(run_dir))  # same weights, half precision
    assert bfloat16.lvlm.llm.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(FineTuningError, match="holds adapters and modules"):
        ReferringSegmentationModule(finetuning=FineTuning(lora_r=4), finetuned=str(run_dir))
    with pytest.raises(FineTuningError, match="no finetuned.safetensors"):
        ReferringSegmentationModule(finetuned=str(tmp_path))
    tensors = load_file(str(run_dir / WEIGHTS_FILE))
    tensors["vision_tower.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FineTuningError, match="does not match the sha256"):  # replaced weights: named, not trusted
        ReferringSegmentationModule(finetuned=str(tmp_path))
    manifest["sha256"] = file_digest(tmp_path / WEIGHTS_FILE)  # a consistent export with an extra tensor
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FineTuningError, match="unexpected \\['vision_tower.extra.weight'\\]"):
        ReferringSegmentationModule(finetuned=str(tmp_path))


def test_a_fit_checkpoint_without_finetuning_settings_points_to_the_export(fitted):
    _, run_dir = fitted
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    with pytest.raises(LitelvlmError, match="--model.finetuned RUN_DIR"):
        ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R)).on_load_checkpoint(checkpoint)


def test_fit_refuses_a_sweep_and_half_precision_trained_weights():
    from litelvlm.engine.finetuning import check_precision

    pruners = [LiteLVLM(num_tokens=R), LiteLVLM(num_tokens=2 * R)]
    module = ReferringSegmentationModule(pruners=pruners, finetuning=FineTuning())
    with pytest.raises(LitelvlmError, match="fit trains with one pruner"):
        module.setup("fit")
    with pytest.raises(FineTuningError, match="not bf16-true"):
        check_precision("bfloat16", "bf16-true")
    check_precision("bfloat16", "bf16-mixed")  # the recipe's: accepted


def test_a_checkpoint_of_another_base_is_refused_on_resume(fitted):
    _, run_dir = fitted
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    other = ReferringSegmentationModule(seed=1, pruner=LiteLVLM(num_tokens=R), finetuning=FineTuning())
    with pytest.raises(FineTuningError, match="trained on base model"):
        other.on_load_checkpoint(checkpoint)
    same = ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R), finetuning=FineTuning())
    checkpoint["state_dict"].pop(next(iter(checkpoint["state_dict"])))
    with pytest.raises(FineTuningError, match="missing"):
        same.on_load_checkpoint(checkpoint)


# ---------------------------------------------------------------------------- subprocesses
KILL_AFTER_STEPS = '''
import os, signal
import lightning as L


class KillAfterSteps(L.Callback):
    """SIGKILL the whole process group once `steps` training batches are done (mid-epoch)."""

    def __init__(self, steps: int = 5) -> None:
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen >= self.steps:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class DumpTrained(L.Callback):
    """Each rank writes its trained tensors at the end of fit."""

    def on_fit_end(self, trainer, pl_module):
        import torch

        parameters = dict(pl_module.lvlm.named_parameters())
        tensors = {name: parameters[name].detach().clone() for name in pl_module.trained.names}
        torch.save(tensors, f"{trainer.default_root_dir}/rank{trainer.global_rank}.pt")
'''


def run_cli(args: list[str], cwd: Path, *callbacks: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process group (one thread per process: the same arithmetic in every run)."""
    (cwd / "finetune_callbacks.py").write_text(KILL_AFTER_STEPS)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # keeps LITELVLM_CACHE, the private cache conftest set
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    extra = [f"--trainer.callbacks+=finetune_callbacks.{name}" for name in callbacks]
    command = [sys.executable, "-m", "litelvlm.cli", *args, *extra]  # after --config, which sets callbacks
    return run_in_session(command, cwd, TIMEOUT_S, env)


def test_a_fit_killed_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(small_set, tmp_path):
    logs = tmp_path / "logs"
    quick = ("--trainer.limit_val_batches", "0")
    whole = run_cli(fit_args(small_set, logs, "whole", 3, *quick), tmp_path)
    assert whole.returncode == 0, whole.stderr[-4000:]
    killed = run_cli(fit_args(small_set, logs, "killed", 3, *quick), tmp_path, "KillAfterSteps")  # in epoch 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    killed_dir = logs / "finetune_demo" / "killed"
    assert not (killed_dir / WEIGHTS_FILE).exists()
    last = killed_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4  # epoch 2's end
    resumed = run_cli(fit_args(small_set, logs, "resumed", 3, *quick, "--ckpt_path", str(last)), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    expected = load_file(str(logs / "finetune_demo" / "whole" / WEIGHTS_FILE))
    found = load_file(str(logs / "finetune_demo" / "resumed" / WEIGHTS_FILE))
    assert set(found) == set(expected)
    for name, value in expected.items():
        assert torch.equal(found[name], value), name


def test_two_process_ddp_fit_leaves_the_trained_weights_identical_on_both_ranks(small_set, tmp_path):
    logs = tmp_path / "logs"
    args = fit_args(
        small_set, logs, "ddp", 2, "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    done = run_cli(args, tmp_path, "DumpTrained")
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    base = ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R), finetuning=FineTuning())
    initial = trained_tensors(base)
    assert set(rank0) == set(rank1) == set(initial)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(not torch.equal(rank0[name], initial[name]) for name in rank0)  # it trained
    exported = load_file(str(logs / "finetune_demo" / "ddp" / WEIGHTS_FILE))  # written once, by rank 0
    assert all(torch.equal(exported[name], rank0[name]) for name in rank0)
