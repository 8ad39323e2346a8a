"""The fine-tuning loss of the references: next-token cross-entropy plus mask BCE and DICE.

GLaMM (`model/GLaMM.py`) and LISA (`model/LISA.py`) train with
  loss = ce_weight * CE(answer tokens) + bce_weight * BCE(masks) + dice_weight * DICE(masks),
the mask terms computed per mask and averaged over every mask of the batch. All math here runs in
float32 whatever the model's dtype, so bf16/fp16 training sees the same loss values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from litelvlm.errors import LitelvlmError
from litelvlm.models.batch import IGNORE_INDEX

# The references' dice_loss divides predictions and targets by `scale` before summing, then adds
# `eps`: the same as eps * scale = 1e-3 added to the unscaled sums (GLaMM and LISA use these values).
DICE_SCALE = 1000.0
DICE_EPS = 1e-6


class LossInputError(LitelvlmError):
    """Loss inputs whose shapes do not fit together, or that hold nothing to learn from."""


@dataclass
class LossWeights:
    """Weights of the three terms; defaults are the GLaMM/LISA recipe (docs/finetuning.md, "The recipe")."""

    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5

    def __post_init__(self) -> None:
        bad = {
            name: value for name, value in vars(self).items()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
        }  # fmt: skip
        if bad:
            raise LossInputError(f"loss weights must be finite numbers >= 0, got {bad}")


def next_token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of predicting token t+1 from position t, over the supervised targets.

    `labels` [B, L] is aligned with `logits` [B, L, V] and NOT shifted (HF convention): the shift
    happens here. Positions labelled IGNORE_INDEX carry no loss; the mean is over supervised
    tokens of the whole batch (as transformers' causal-LM loss, which the references use).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise LossInputError(
            f"next-token loss needs logits [B, L, V] and labels [B, L] of the same B and L, got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    targets = labels[:, 1:].to(logits.device)
    if not bool((targets != IGNORE_INDEX).any()):
        raise LossInputError(
            f"labels {tuple(labels.shape)} hold no supervised target after the shift (all IGNORE_INDEX): "
            "the batch has no assistant answer to learn"
        )
    predictions = logits[:, :-1].float()
    return F.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _paired_masks(mask_logits: list[Tensor], gt_masks: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per sample, float32 [T_b, H*W] logits and targets (sizes differ between samples); shapes checked."""
    if len(mask_logits) != len(gt_masks):
        raise LossInputError(f"{len(mask_logits)} samples of mask logits but {len(gt_masks)} of target masks")
    logits_rows, target_rows = [], []
    for sample, (logits, target) in enumerate(zip(mask_logits, gt_masks)):
        if logits.dim() != 3 or logits.shape != target.shape:
            raise LossInputError(
                f"sample {sample}: mask logits {tuple(logits.shape)} and target masks {tuple(target.shape)} "
                "must both be [T, H, W] with the same T (masks), H and W"
            )
        logits_rows.append(logits.float().flatten(1))
        target_rows.append(target.to(device=logits.device, dtype=torch.float32).flatten(1))
    if sum(rows.shape[0] for rows in logits_rows) == 0:
        raise LossInputError("the batch holds no mask: nothing for the mask losses to average")
    return logits_rows, target_rows


def mask_bce_loss(mask_logits: list[Tensor], gt_masks: list[Tensor]) -> Tensor:
    """Per mask, the pixel-mean binary cross-entropy with logits; averaged over all masks of the batch.

    Args:
        mask_logits: per sample, [T_b, H, W] logits (> 0 is foreground).
        gt_masks: per sample, bool [T_b, H, W] targets of the same shape.
    """
    logits_rows, target_rows = _paired_masks(mask_logits, gt_masks)
    per_mask = [
        F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
        for logits, target in zip(logits_rows, target_rows)
    ]
    return torch.cat(per_mask).mean()


def mask_dice_loss(mask_logits: list[Tensor], gt_masks: list[Tensor]) -> Tensor:
    """Per mask 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) with p = sigmoid(logits); averaged over masks.

    Follows GLaMM's `calculate_dice_loss` (= LISA's `dice_loss`): sums taken over p / 1000 and
    t / 1000 with eps = 1e-6 (DICE_SCALE, DICE_EPS), so an empty target predicted empty costs ~0.
    """
    logits_rows, target_rows = _paired_masks(mask_logits, gt_masks)
    per_mask = []
    for logits, target in zip(logits_rows, target_rows):
        probabilities = logits.sigmoid() / DICE_SCALE
        numerator = 2 * (probabilities * target).sum(dim=1)
        denominator = probabilities.sum(dim=1) + (target / DICE_SCALE).sum(dim=1)
        per_mask.append(1 - (numerator + DICE_EPS) / (denominator + DICE_EPS))
    return torch.cat(per_mask).mean()


def grounding_loss(
    lm_logits: Tensor,
    labels: Tensor,
    mask_logits: list[Tensor],
    gt_masks: list[Tensor],
    weights: LossWeights | None = None,
) -> dict[str, Tensor]:
    """The training objective and its parts.

    Returns `loss` (the weighted total to back-propagate) and the UNWEIGHTED terms `ce`, `bce`,
    `dice` (for logging), so `loss == weights.ce * ce + weights.bce * bce + weights.dice * dice`.
    """
    weights = weights or LossWeights()
    ce = next_token_cross_entropy(lm_logits, labels)
    bce = mask_bce_loss(mask_logits, gt_masks)
    dice = mask_dice_loss(mask_logits, gt_masks)
    total = weights.ce * ce + weights.bce * bce.to(ce.device) + weights.dice * dice.to(ce.device)
    return {"loss": total, "ce": ce, "bce": bce, "dice": dice}
