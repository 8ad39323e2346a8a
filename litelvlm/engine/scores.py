"""Per-mask integer scores and the cIoU/gIoU metric built on them, exact in any summation order.

A mask's score is its intersection and union with the target, in pixels (integers); pixels of an
ignore region (ReasonSeg's "ignore" shapes) count in neither, as LISA's `intersectionAndUnionGPU(...,
ignore_index=255)` (dvlab-research/LISA `utils/utils.py` lines 116-128) leaves them out. The metric
keeps integer sums only: cIoU from the sums of intersections and unions, gIoU from the per-mask
IoUs in fixed point (units of 2**-32, so at most 1.2e-10 from the float mean). Integer sums do not
depend on the order of addition, so one process, several processes, and a run resumed from its
per-sample records (`litelvlm.engine.records`) give the same bits; and `iou_from_scores`
recomputes them in plain Python from the records alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

IOU_FIXED_POINT = 2**32  # per-mask IoU is summed as round(IoU * 2**32)


@dataclass
class MaskScores:
    """The scores of one batch's masks under one configuration (M masks, sample by sample)."""

    intersection: Tensor  # int64 [M] foreground pixels in both prediction and target
    union: Tensor  # int64 [M] foreground pixels in either
    retained_tokens: Tensor  # int64 [M] visual tokens the LLM's last layer reasoned over, per mask
    # int8 [M] the query kind of each mask: 0 short, 1 long (ReasonSeg's is_sentence), -1 none
    query_kind: Tensor | None = None
    # per CLIP text source (`question`, `expression`): each mask's query length in CLIP tokens, -1 unknown;
    # set on scores read back from records, so a resumed run restores its overflow count (engine/text_overflow.py)
    clip_tokens: dict[str, Tensor] | None = None


QUERY_KINDS = ("short", "long")  # index = the value in `MaskScores.query_kind`


def query_kind_tensor(is_sentence: list[list[bool] | None], masks_per_sample: list[int]) -> Tensor:
    """int8 [M]: 1 for a long query, 0 for a short one, -1 where the data set has no query kinds."""
    kinds = []
    for flags, count in zip(is_sentence, masks_per_sample):
        kinds += [-1] * count if flags is None else [int(bool(flag)) for flag in flags]
    return torch.tensor(kinds, dtype=torch.int8)


def score_masks(
    mask_logits: list[Tensor], gt_masks: list[Tensor], retained_tokens: int, ignore_masks: list[Tensor | None] | None = None
) -> MaskScores:
    """Prediction = logits > 0 at the original size (docs/models.md, "Scores"); one score per predicted mask.

    `ignore_masks` (per sample, bool [T, H, W] or None): pixels left out of both intersection and union.
    """
    intersections, unions = [], []
    ignore_masks = ignore_masks or [None] * len(gt_masks)
    for logits, target, ignore in zip(mask_logits, gt_masks, ignore_masks):
        pred, target = logits > 0, target.to(logits.device).bool()
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        counted = torch.ones_like(target) if ignore is None else ~ignore.to(logits.device).bool()
        if counted.shape != target.shape:
            raise ValueError(f"ignore mask shape {tuple(counted.shape)} != target shape {tuple(target.shape)}")
        intersections.append((pred & target & counted).flatten(1).sum(1))
        unions.append(((pred | target) & counted).flatten(1).sum(1))
    intersection = torch.cat(intersections).long().cpu()
    return MaskScores(intersection, torch.cat(unions).long().cpu(), torch.full_like(intersection, retained_tokens))


def fixed_point_iou(intersection: Tensor, union: Tensor) -> Tensor:
    """round(I / U * 2**32) per mask, an empty union counting as IoU 1 (as `ReferringIoU`)."""
    ratio = intersection.double() / union.clamp(min=1).double()
    ratio = torch.where(union > 0, ratio, torch.ones_like(ratio))
    return torch.round(ratio * IOU_FIXED_POINT).long()


class ExactReferringIoU(Metric):
    """cIoU = sum(I) / sum(U); gIoU = mean of per-mask I / U (empty union: 1); mean retained tokens.

    `update` takes per-mask integer scores, not masks, so the same numbers can be written to the
    per-sample records and read back into a resumed run.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("intersection", "union", "iou_fixed", "num_masks", "retained_tokens"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, intersection: Tensor, union: Tensor, retained_tokens: Tensor) -> None:
        intersection, union = intersection.long().to(self.device), union.long().to(self.device)
        self.intersection += intersection.sum()
        self.union += union.sum()
        self.iou_fixed += fixed_point_iou(intersection, union).sum()
        self.num_masks += intersection.numel()
        self.retained_tokens += retained_tokens.long().to(self.device).sum()

    def compute(self) -> dict[str, float]:
        return _iou_from_sums(
            int(self.intersection), int(self.union), int(self.iou_fixed), int(self.num_masks), int(self.retained_tokens)
        )


def iou_from_scores(intersections: Iterable[int], unions: Iterable[int], retained_tokens: Iterable[int] = ()) -> dict:
    """The metric of a set of per-mask scores, in plain Python: what `ExactReferringIoU` reports."""
    intersections, unions, retained = list(intersections), list(unions), list(retained_tokens)
    fixed = fixed_point_iou(torch.tensor(intersections, dtype=torch.int64), torch.tensor(unions, dtype=torch.int64))
    return _iou_from_sums(sum(intersections), sum(unions), int(fixed.sum()), len(intersections), sum(retained))


def _iou_from_sums(intersection: int, union: int, iou_fixed: int, num_masks: int, retained_tokens: int) -> dict:
    # No foreground anywhere: cIoU 0, as the reference's intersection / (union + 1e-10) gives.
    return {
        "ciou": intersection / union if union > 0 else 0.0,
        "giou": iou_fixed / IOU_FIXED_POINT / num_masks if num_masks > 0 else float("nan"),
        "num_masks": num_masks,
        "visual_tokens": retained_tokens / num_masks if num_masks > 0 else float("nan"),
    }
