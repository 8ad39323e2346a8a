"""Fine-tuned weights on disk: only what was trained, never the frozen base.

Two forms, one content (tensor names are parameter names relative to PixelGroundingLVLM):
- Lightning checkpoints (`--ckpt_path` resume): `state_dict` holds the trained tensors alone (with
  the module's `lvlm.` prefix), and `CHECKPOINT_KEY` holds the base model and fine-tuning settings.
- The export written at the end of a fit: `finetuned.safetensors` (trained tensors) and
  `finetuned.json` (base model, settings, trained names), loaded onto a freshly built base with
  `model.finetuned: PATH` for `validate` and sweeps. A fit whose ModelCheckpoint monitors a metric
  also exports the best checkpoint's tensors as `finetuned-best.safetensors` + `finetuned-best.json`
  (GLaMM keeps its best-gIoU model too: `save_checkpoint` in `train_ft.py`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from litelvlm.engine.finetuning import FineTuning, FineTuningError, freeze, prepare_for_training
from litelvlm.engine.runs import resolve_run

WEIGHTS_FILE = "finetuned.safetensors"
MANIFEST_FILE = "finetuned.json"
BEST_STEM = "finetuned-best"  # finetuned-best.safetensors + finetuned-best.json
EXPORT_FORMAT = 1
CHECKPOINT_KEY = "litelvlm_finetuning"
MODULE_PREFIX = "lvlm."  # ReferringSegmentationModule holds the model as `lvlm`


# Frozen tensors whose first values identify the base weights (read before any adapter is added).
FINGERPRINT_TENSORS = (
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "llm.model.layers.0.mlp.down_proj.weight",
)
FINGERPRINT_VALUES = 16


def base_identity(
    lvlm: nn.Module, checkpoint: str, seed: int, seg_prompt_position: str, random_weights: bool
) -> dict:
    """What the trained tensors go with: the base weights (a fingerprint of their values, so the same
    weights match whatever folder or hub id they were loaded from, in any dtype) and the [SEG] prompt
    position. The checkpoint name and the seed of a random-weight preset are kept for the message."""
    parameters = dict(lvlm.named_parameters())
    fingerprint = [
        round(float(value), 6)
        for name in FINGERPRINT_TENSORS
        for value in parameters[name].detach().flatten()[:FINGERPRINT_VALUES].float().cpu()
    ]
    identity = {"checkpoint": checkpoint, "seg_prompt_position": seg_prompt_position, "fingerprint": fingerprint}
    if random_weights:
        identity["seed"] = seed
    return identity


def check_base(saved: dict, current: dict, source: str) -> None:
    """Same [SEG] prompt position and the same base weights (to bfloat16 precision)."""
    same_weights = len(saved["fingerprint"]) == len(current["fingerprint"]) and torch.allclose(
        torch.tensor(saved["fingerprint"]), torch.tensor(current["fingerprint"]), rtol=1e-2, atol=1e-5
    )
    if not same_weights or saved["seg_prompt_position"] != current["seg_prompt_position"]:
        def describe(identity: dict) -> dict:
            return {key: value for key, value in identity.items() if key != "fingerprint"}

        raise FineTuningError(
            f"{source} was trained on base model {describe(saved)}, but this run builds {describe(current)}"
            + ("" if same_weights else " (different base weights)")
        )


def check_layout(saved: FineTuning, current: FineTuning, source: str) -> None:
    if saved.adapter_layout() != current.adapter_layout():
        raise FineTuningError(
            f"{source} holds adapters and modules {saved.adapter_layout()}, but model.finetuning asks for "
            f"{current.adapter_layout()}"
        )


def check_names(found: set[str], expected: set[str], source: str) -> None:
    """The stored tensors must be exactly the trained ones: none missing, none extra."""
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise FineTuningError(
            f"{source} does not match the trained parameters of this model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )


# ---------------------------------------------------------------------------- Lightning checkpoints
def trim_checkpoint(checkpoint: dict, trained: list[str], settings: FineTuning, base: dict) -> None:
    """Keep only the trained tensors in a Lightning checkpoint, and record what they belong to."""
    keep = {MODULE_PREFIX + name for name in trained}
    checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in keep}
    check_names(set(checkpoint["state_dict"]), keep, "the checkpoint being saved")
    checkpoint[CHECKPOINT_KEY] = {"base": base, "finetuning": settings.to_dict(), "trained": list(trained)}
    # The module's hparams are a flat record for the logger, not its init arguments: LightningCLI would
    # parse them as such on `--ckpt_path`. The run's config comes from its own config; CHECKPOINT_KEY
    # says what the tensors belong to.
    checkpoint.pop("hyper_parameters", None)
    checkpoint.pop("hparams_name", None)


def check_checkpoint(checkpoint: dict, trained: list[str], settings: FineTuning, base: dict) -> None:
    """Before Lightning loads a checkpoint non-strictly: same base, same layout, exactly the trained tensors."""
    record = checkpoint.get(CHECKPOINT_KEY)
    if record is None:
        raise FineTuningError("the checkpoint holds no fine-tuning record: it was not written by a litelvlm fit")
    check_base(record["base"], base, "the checkpoint")
    check_layout(FineTuning.from_dict(record["finetuning"]), settings, "the checkpoint")
    check_names(set(checkpoint["state_dict"]), {MODULE_PREFIX + name for name in trained}, "the checkpoint")
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    if progress.get("is_last_batch") is False:
        warnings.warn(
            "resuming from a checkpoint saved mid-epoch: the data loader restarts its epoch, so the fit will not "
            "repeat an uninterrupted one exactly (save at epoch ends: ModelCheckpoint(save_on_train_epoch_end=True))",
            stacklevel=2,
        )


# ---------------------------------------------------------------------------- export
def write_export(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    settings: FineTuning,
    base: dict,
    stem: str = Path(WEIGHTS_FILE).stem,
    origin: dict | None = None,
) -> Path:
    """Write `<stem>.safetensors` + `<stem>.json` into `folder`; return the weights file.

    `origin` says which checkpoint the tensors come from (the best one: its path, epoch and score)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{stem}.safetensors"
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(weights))
    manifest = {
        "format": EXPORT_FORMAT,
        "base": base,
        "finetuning": settings.to_dict(),
        "trained": list(tensors),
        "sha256": file_digest(weights),
    }
    if origin is not None:
        manifest["origin"] = origin
    manifest_file(weights).write_text(json.dumps(manifest, indent=2) + "\n")
    return weights


def manifest_file(weights: Path) -> Path:
    """`finetuned.json` beside `finetuned.safetensors`, `finetuned-best.json` beside `finetuned-best.safetensors`."""
    return weights.with_suffix(".json")


def resolve_export(path: str | Path) -> Path:
    """`model.finetuned` names a weights file (`finetuned.safetensors`, `finetuned-best.safetensors`),
    the run folder holding `finetuned.safetensors` (the last weights), or that folder's parent."""
    path = resolve_run(path, lambda run: (run / WEIGHTS_FILE).is_file(), WEIGHTS_FILE, flag="model.finetuned")
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FineTuningError(f"model.finetuned: no {WEIGHTS_FILE} at {path} (give the file or the fit's run folder)")
    if not manifest_file(weights).is_file():
        raise FineTuningError(f"model.finetuned: {weights} has no {manifest_file(weights).name} beside it")
    return weights


def read_manifest(weights: Path) -> dict:
    manifest = json.loads(manifest_file(weights).read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise FineTuningError(f"{manifest_file(weights)}: unknown export format {manifest.get('format')!r}")
    return manifest


def load_export(lvlm: nn.Module, weights: Path, trained: list[str]) -> None:
    """Copy the exported tensors into the (already adapted) model; names and shapes must match exactly."""
    tensors = load_file(str(weights))
    check_names(set(tensors), set(trained), str(weights))
    parameters = dict(lvlm.named_parameters())
    with torch.no_grad():
        for name in trained:
            target, value = parameters[name], tensors[name]
            if target.shape != value.shape:
                raise FineTuningError(
                    f"{weights}: {name} has shape {tuple(value.shape)}, the model {tuple(target.shape)}"
                )
            target.copy_(value.to(dtype=target.dtype))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- onto the model
@dataclass
class TrainedParts:
    """What a module trains (or trained): settings, trained parameter names, and the export it loaded."""

    settings: FineTuning  # model.finetuning when fitting, else the loaded export's settings
    names: list[str]  # trained parameter names relative to the LVLM, in model order
    training: bool  # model.finetuning was given: this module can fit
    export_digest: str | None = None  # sha256 of the loaded finetuned.safetensors


def attach(lvlm: nn.Module, finetuning: FineTuning | None, finetuned: str | None, base: dict) -> TrainedParts | None:
    """Make a freshly built frozen base trainable (`finetuning`) and/or load an export onto it (`finetuned`).

    The adapters are injected first, from the export's settings, then its tensors loaded strictly.
    With an export and no `finetuning`, everything stays frozen (evaluation).
    """
    if finetuning is None and finetuned is None:
        return None
    settings, weights, manifest = finetuning, None, None
    if finetuned is not None:
        weights = resolve_export(finetuned)
        manifest = read_manifest(weights)
        if file_digest(weights) != manifest.get("sha256"):  # results name the weights by this digest
            raise FineTuningError(
                f"{weights} does not match the sha256 in its {manifest_file(weights).name}: the file was replaced"
            )
        check_base(manifest["base"], base, str(weights))
        saved = FineTuning.from_dict(manifest["finetuning"])
        if finetuning is not None:
            check_layout(saved, finetuning, str(weights))
        settings = finetuning or saved
    names = prepare_for_training(lvlm, settings, float32_trained=finetuning is not None)  # evaluation: model dtype
    digest = None
    if weights is not None:
        load_export(lvlm, weights, names)
        digest = manifest["sha256"]
    if finetuning is None:
        freeze(lvlm)
    return TrainedParts(settings, names, training=finetuning is not None, export_digest=digest)


def export_at_fit_end(trainer, parts: TrainedParts, base: dict) -> Path | None:
    """Write the trained tensors into the run folder, and the best checkpoint's beside them.

    Every rank calls (the state dict may be sharded); rank 0 writes.
    """
    state = trainer.strategy.lightning_module_state_dict()  # full on rank 0 under FSDP's full state dict
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    best = best_checkpoint(trainer)
    weights = None
    if trainer.is_global_zero:
        tensors = {name: state[MODULE_PREFIX + name] for name in parts.names}
        weights = write_export(folder, tensors, parts.settings, base)
        print(f"fine-tuned weights written to {weights} (evaluate them: --model.finetuned {folder})")
        if best is not None:
            written = export_best(trainer, best, folder, parts, base)
            print(f"best checkpoint's weights ({best.monitor} {float(best.best_model_score):.4f}) written to {written}")
    trainer.strategy.barrier("litelvlm-finetuned-export")
    return weights


def best_checkpoint(trainer):
    """The first ModelCheckpoint that monitors a metric and has saved a best checkpoint, else None."""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is not None and callback.best_model_path:
            return callback
    return None


def export_best(trainer, callback, folder: Path, parts: TrainedParts, base: dict) -> Path:
    """`finetuned-best.safetensors`: the trained tensors of the monitored best checkpoint, checked as on resume."""
    checkpoint = trainer.strategy.checkpoint_io.load_checkpoint(callback.best_model_path)
    check_checkpoint(checkpoint, parts.names, parts.settings, base)
    tensors = {name: checkpoint["state_dict"][MODULE_PREFIX + name] for name in parts.names}
    origin = {
        "checkpoint": str(callback.best_model_path),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "monitor": callback.monitor,
        "score": float(callback.best_model_score),
    }
    return write_export(folder, tensors, parts.settings, base, stem=BEST_STEM, origin=origin)
