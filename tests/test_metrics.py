"""cIoU / gIoU against values worked out by hand on tiny masks."""

import pytest
import torch

from litelvlm.engine.metrics import ReferringIoU


def masks(*rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_ciou_and_giou_match_hand_computed_values():
    metric = ReferringIoU()
    # mask A: pred 3 px, target 2 px, overlap 2 -> I=2, U=3, IoU=2/3
    pred_a = masks([1, 1, 1, 0], [0, 0, 0, 0])
    gt_a = masks([0, 1, 1, 0], [0, 0, 0, 0])
    # mask B: pred 1 px, target 3 px elsewhere -> I=0, U=4, IoU=0
    pred_b = masks([1, 0, 0, 0], [0, 0, 0, 0])
    gt_b = masks([0, 0, 0, 0], [0, 1, 1, 1])
    # mask C: both empty -> I=0, U=0, IoU counts as 1 for gIoU, adds nothing to cIoU
    empty = masks([0, 0, 0, 0], [0, 0, 0, 0])
    metric.update(torch.stack([pred_a, pred_b]), torch.stack([gt_a, gt_b]))
    metric.update(empty, empty)
    result = metric.compute()
    assert result["ciou"].item() == pytest.approx(2 / 7)  # (2 + 0 + 0) / (3 + 4 + 0)
    assert result["giou"].item() == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result["num_masks"].item() == 3


def test_images_of_different_sizes_accumulate_and_reset_clears():
    metric = ReferringIoU()
    metric.update(torch.ones(1, 2, 3, dtype=torch.bool), torch.ones(1, 2, 3, dtype=torch.bool))  # I=U=6
    metric.update(torch.ones(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool))  # I=0, U=16
    result = metric.compute()
    assert result["ciou"].item() == pytest.approx(6 / 22)
    assert result["giou"].item() == pytest.approx(0.5)
    metric.reset()
    assert metric.compute()["num_masks"].item() == 0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        ReferringIoU().update(torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool))
