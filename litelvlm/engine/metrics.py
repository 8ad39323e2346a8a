"""cIoU and gIoU of referring segmentation, as the reference evaluations compute them.

All four states are sums, so DDP reduces them exactly: a split evaluated on 2 processes gives the
numbers of 1 process, provided no sample is seen twice (see `UnpaddedDistributedSampler`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class ReferringIoU(Metric):
    """cIoU = sum(I) / sum(U) over all masks; gIoU = mean over masks of I / U, empty union counting as 1."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("intersection", default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_masks", default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """preds, targets: bool [M, H, W] (or [H, W]) foreground masks of the same size."""
        if preds.shape != targets.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} != target shape {tuple(targets.shape)}")
        preds, targets = preds.bool(), targets.bool()
        if preds.dim() == 2:
            preds, targets = preds[None], targets[None]
        intersection = (preds & targets).flatten(1).sum(1).double()
        union = (preds | targets).flatten(1).sum(1).double()
        per_mask = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        self.intersection += intersection.sum()
        self.union += union.sum()
        self.iou_sum += per_mask.sum()
        self.num_masks += preds.shape[0]

    def compute(self) -> dict[str, Tensor]:
        # No foreground anywhere: 0, as the references' intersection / (union + 1e-10) gives
        # (docs/models.md, "Scores").
        ciou = self.intersection / self.union if self.union > 0 else torch.zeros((), dtype=torch.float64)
        giou = self.iou_sum / self.num_masks if self.num_masks > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return {"ciou": ciou, "giou": giou, "num_masks": self.num_masks}
