"""Pruning-aware fine-tuning: what is trained, with which optimiser, and one training step.

The recipe of GLaMM's fine-tuning script (docs/finetuning.md, "The recipe"): LoRA (r 8, alpha 16,
dropout 0.05) on the LLM's q_proj/v_proj; the SAM mask decoder, the [SEG] projection
(`text_hidden_fcs`), `lm_head` and `embed_tokens` trained in full; everything else frozen and kept
in eval mode. The pruner runs in every training step (the LLM learns to work from R visual tokens)
unless `prune_during_training` is off, which gives the unpruned fine-tuning baseline; evaluation
always prunes.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import get_linear_schedule_with_warmup

from litelvlm.engine.losses import LossWeights, grounding_loss
from litelvlm.errors import LitelvlmError
from litelvlm.models.batch import GroundingBatch
from litelvlm.pruners.base import TokenPruner
from litelvlm.pruners.simple import NoPruning

# Short names of the parts one may train in full -> their module paths in PixelGroundingLVLM.
TRAINABLE_PARTS: dict[str, str] = {
    "mask_decoder": "sam.mask_decoder",
    "text_hidden_fcs": "text_hidden_fcs",
    "lm_head": "llm.lm_head",
    "embed_tokens": "llm.model.embed_tokens",
    "mm_projector": "mm_projector",
    "llm_norm": "llm.model.norm",
    "prompt_encoder": "sam.prompt_encoder",
    "sam_image_encoder": "sam.vision_encoder",
    "vision_tower": "vision_tower",
}
# Inside the trained modules but never reached by the loss: SAM's IoU head (the references ignore the
# IoU prediction). Kept frozen, so it never changes (as in the references) and plain DDP finds no
# parameter without a gradient.
UNREACHED_BY_LOSS = ("sam.mask_decoder.iou_prediction_head",)
RECIPE_TRAINABLE = ("mask_decoder", "text_hidden_fcs", "lm_head", "embed_tokens")
RECIPE_LORA_TARGETS = ("q_proj", "v_proj")
ADAPTER_NAME = "default"


class FineTuningError(LitelvlmError):
    """A fine-tuning setting, checkpoint or export that cannot be used as given."""


@dataclass
class FineTuning:
    """How to fine-tune (defaults: the GLaMM recipe). `model.finetuning` in a config; None = no fit.

    Args:
        lora_r, lora_alpha, lora_dropout: the LoRA adapters (peft) on `lora_targets`.
        lora_targets: names of the LLM decoder layers' linear layers that get an adapter; [] = no LoRA.
        trainable_modules: parts trained in full: short names (TRAINABLE_PARTS) or module paths.
        prune_during_training: run the configured pruner in training steps (off: unpruned baseline).
        lr, betas, weight_decay: AdamW over the trainable parameters only.
        warmup_steps: linear warm-up over this many optimiser steps, then linear decay to 0 at the
            fit's last step (`trainer.estimated_stepping_batches`).
        loss_weights: weights of cross-entropy, mask BCE and mask DICE.
        activation_checkpointing: recompute each decoder layer in backward (less memory, ~1/3 more time).
        effective_batch_size: samples per optimiser step over all processes (per-device batch x
            accumulation x devices); given, the fit derives `accumulate_grad_batches` from the number
            of devices (GLaMM: 2 x 10 x its GPUs). None: the trainer's accumulation as configured.
        seed: seeds dropout and the training data order per epoch, step and rank, so a resumed fit
            repeats an uninterrupted one.
    """

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(RECIPE_LORA_TARGETS))
    trainable_modules: list[str] = field(default_factory=lambda: list(RECIPE_TRAINABLE))
    prune_during_training: bool = True
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    loss_weights: LossWeights = field(default_factory=LossWeights)
    activation_checkpointing: bool = False
    effective_batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.loss_weights, dict):
            self.loss_weights = LossWeights(**self.loss_weights)
        self.lora_targets, self.trainable_modules = list(self.lora_targets), list(self.trainable_modules)
        self.betas = tuple(self.betas)
        _check_int("lora_r", self.lora_r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha, low=0, low_open=True)
        _check_number("lora_dropout", self.lora_dropout, low=0, high=1)
        _check_names("lora_targets", self.lora_targets)
        _check_names("trainable_modules", self.trainable_modules)
        if not self.lora_targets and not self.trainable_modules:
            raise FineTuningError("finetuning trains nothing: both lora_targets and trainable_modules are empty")
        for name in ("prune_during_training", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise FineTuningError(f"finetuning.{name} must be true or false, got {getattr(self, name)!r}")
        _check_number("lr", self.lr, low=0, low_open=True)
        if len(self.betas) != 2:
            raise FineTuningError(f"finetuning.betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            _check_number("betas", beta, low=0, high=1)
        _check_number("weight_decay", self.weight_decay, low=0)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        if not isinstance(self.loss_weights, LossWeights):
            raise FineTuningError(
                f"finetuning.loss_weights must be LossWeights(ce, bce, dice), got {self.loss_weights!r}"
            )
        if self.effective_batch_size is not None:
            _check_int("effective_batch_size", self.effective_batch_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FineTuning":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FineTuningError(f"unknown fine-tuning settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def adapter_layout(self) -> dict:
        """What decides the trained tensors' names and shapes: two runs with the same layout can share weights."""
        return {
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_targets": sorted(self.lora_targets),
            "trainable_modules": sorted(self.trainable_modules),
        }


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FineTuningError(f"finetuning.{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise FineTuningError(f"finetuning.{name} must be a number {bounds}, got {value!r}")


def _check_names(name: str, values: list) -> None:
    if any(not isinstance(value, str) or not value for value in values):
        raise FineTuningError(f"finetuning.{name} must be a list of names, got {values!r}")
    if len(set(values)) != len(values):
        raise FineTuningError(f"finetuning.{name} lists a name twice: {values!r}")


# ---------------------------------------------------------------------------- the model
def lora_target_names(lvlm: nn.Module) -> list[str]:
    """The linear layers of the LLM's decoder layers, by name: what `lora_targets` may list."""
    layers = lvlm.llm.model.layers
    return sorted({name.rsplit(".", 1)[-1] for name, module in layers.named_modules() if isinstance(module, nn.Linear)})


def resolve_trainable_modules(lvlm: nn.Module, names: list[str]) -> dict[str, str]:
    """Each configured name -> the module path it trains; unknown names list the valid ones."""
    paths = dict(lvlm.named_modules())
    resolved = {}
    for name in names:
        path = TRAINABLE_PARTS.get(name, name)
        if not path or path not in paths:
            raise FineTuningError(
                f"unknown trainable module {name!r}; use one of {', '.join(TRAINABLE_PARTS)} or a module path "
                "of the model (e.g. llm.model.layers.0.mlp)"
            )
        resolved[name] = path
    return resolved


def prepare_for_training(lvlm: nn.Module, settings: FineTuning, float32_trained: bool = True) -> list[str]:
    """Freeze everything, add the LoRA adapters, unfreeze the trained modules; return the trained names.

    The names are parameter names relative to the LVLM, adapter weights included, in model order.
    `float32_trained` keeps the trained parameters in float32 whatever the model's dtype (master
    weights, as the references' bf16 training): a bfloat16 base then trains under autocast
    (`precision: bf16-mixed`) with the frozen weights in half the memory.
    """
    valid_targets = lora_target_names(lvlm)
    unknown = [name for name in settings.lora_targets if name not in valid_targets]
    if unknown:
        raise FineTuningError(
            f"unknown lora_targets {unknown}; the LLM's decoder layers have {', '.join(valid_targets)}"
        )
    module_paths = resolve_trainable_modules(lvlm, settings.trainable_modules)
    adapted = [
        f"llm.model.layers.{name}"
        for name, module in lvlm.llm.model.layers.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in settings.lora_targets
    ]
    for name, path in module_paths.items():
        overlap = [linear for linear in adapted if f"{linear}.".startswith(f"{path}.") or path.startswith(f"{linear}.")]
        if overlap:
            raise FineTuningError(
                f"trainable module {name!r} ({path}) holds LoRA-adapted layers ({overlap[0]}, ...): train them "
                "with LoRA or in full, not both"
            )
    if settings.lora_targets:
        config = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(settings.lora_targets),
            bias="none",
        )
        # The adapters' random init drawn from the settings' seed: the same on every rank and in every run.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # peft's notes on a model without a peft config
            torch.manual_seed(settings.seed)
            inject_adapter_in_model(config, lvlm.llm, adapter_name=ADAPTER_NAME)
    lvlm.requires_grad_(False)  # then exactly the adapters and the trained modules
    for module in lvlm.modules():
        if isinstance(module, BaseTunerLayer):
            for adapter_part in (module.lora_A, module.lora_B):
                adapter_part.requires_grad_(True)
    modules = dict(lvlm.named_modules())
    for path in module_paths.values():
        modules[path].requires_grad_(True)
    for path in UNREACHED_BY_LOSS:
        if path in modules:
            modules[path].requires_grad_(False)
    lvlm.activation_checkpointing = settings.activation_checkpointing
    trained = [name for name, parameter in lvlm.named_parameters() if parameter.requires_grad]
    if float32_trained:
        parameters = dict(lvlm.named_parameters())
        for name in trained:
            parameters[name].data = parameters[name].data.float()
    return trained


def set_training_modes(lvlm: nn.Module, settings: FineTuning | None, training: bool) -> None:
    """Frozen parts always in eval mode; the adapters and the trained modules follow `training`.

    Only the adapters' dropout changes behaviour in this model, but a module in train mode that
    is not trained (a frozen dropout or norm) would silently change the frozen model's outputs.
    """
    lvlm.eval()
    if not training or settings is None:
        return
    for module in lvlm.modules():
        if isinstance(module, BaseTunerLayer):
            module.train()
    modules = dict(lvlm.named_modules())
    for path in resolve_trainable_modules(lvlm, settings.trainable_modules).values():
        modules[path].train()


def check_precision(model_dtype: str, precision: str | None) -> None:
    """A half-precision base trains under autocast: float32 trained weights meet half-precision frozen ones."""
    if model_dtype != "float32" and str(precision) in ("32-true", "64-true", "32", "64"):
        raise FineTuningError(
            f"fit with model.dtype {model_dtype} needs trainer.precision bf16-mixed (or 16-mixed); got {precision}"
        )
    if str(precision) in ("bf16-true", "16-true", "bf16", "16"):  # would cast the float32 trained weights too
        raise FineTuningError(
            f"fit keeps the trained weights in float32: use trainer.precision bf16-mixed (or 16-mixed), not {precision}"
        )


def freeze(lvlm: nn.Module) -> None:
    """Evaluation of fine-tuned weights: nothing needs a gradient."""
    lvlm.requires_grad_(False)
    lvlm.activation_checkpointing = False


# ---------------------------------------------------------------------------- training
def training_pruner(settings: FineTuning, pruner: TokenPruner) -> TokenPruner:
    return pruner if settings.prune_during_training else NoPruning()


def training_losses(lvlm: nn.Module, batch: GroundingBatch, pruner: TokenPruner, settings: FineTuning):
    """One training forward and its losses: (`grounding_loss` dict, GroundingOutput)."""
    if batch.labels is None:
        raise FineTuningError("a training batch has no labels: the training data must come from train_dataloader()")
    output = lvlm(batch, training_pruner(settings, pruner))
    losses = grounding_loss(output.lm_logits, output.labels, output.mask_logits, batch.gt_masks, settings.loss_weights)
    return losses, output


def build_optimizer(parameters: list[nn.Parameter], settings: FineTuning, total_steps: float) -> dict:
    """AdamW over the trained parameters; linear warm-up, then linear decay to 0 at `total_steps`."""
    if not parameters:
        raise FineTuningError("no parameter to train: check finetuning.lora_targets and trainable_modules")
    if not math.isfinite(total_steps):
        raise FineTuningError("the fit has no end (max_steps and max_epochs unset): the learning-rate decay needs one")
    total_steps = int(total_steps)
    if settings.warmup_steps >= total_steps:
        raise FineTuningError(
            f"finetuning.warmup_steps ({settings.warmup_steps}) must be smaller than the fit's {total_steps} "
            "optimiser steps"
        )
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def gradient_accumulation(effective_batch_size: int | None, batch_size: int, devices: int, configured: int) -> int:
    """`accumulate_grad_batches` that makes batch_size x accumulation x devices the effective batch.

    None keeps the configured accumulation. A target the per-step batch does not divide, or one that
    contradicts an accumulation set explicitly (not 1), is an error naming the numbers.
    """
    if effective_batch_size is None:
        return configured
    per_step = batch_size * devices
    if effective_batch_size % per_step:
        raise FineTuningError(
            f"finetuning.effective_batch_size {effective_batch_size} is not a multiple of data.batch_size "
            f"{batch_size} x {devices} device(s) = {per_step}: choose a multiple of {per_step}, or another batch "
            "size or number of devices"
        )
    accumulation = effective_batch_size // per_step
    if configured not in (1, accumulation):
        raise FineTuningError(
            f"trainer.accumulate_grad_batches {configured} contradicts finetuning.effective_batch_size "
            f"{effective_batch_size} (= {batch_size} x {accumulation} x {devices} device(s)): set only one"
        )
    return accumulation


def seed_from(*numbers: int) -> None:
    """Seed torch's generators from a tuple (seed, rank, epoch[, batch]) alone, not from the history.

    Lightning does not save RNG states in checkpoints; seeding every epoch (the data order) and
    every batch (LoRA dropout) from their indices makes a resumed fit draw what an uninterrupted
    one draws.
    """
    digest = hashlib.blake2b(repr(tuple(int(n) for n in numbers)).encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") >> 1)
