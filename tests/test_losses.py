"""The fine-tuning loss terms against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from litelvlm.engine.losses import (
    LossInputError,
    LossWeights,
    grounding_loss,
    mask_bce_loss,
    mask_dice_loss,
    next_token_cross_entropy,
)
from litelvlm.errors import LitelvlmError
from litelvlm.models.batch import IGNORE_INDEX

LN2, LN3 = math.log(2), math.log(3)


def _ce_example() -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 4, 3]: position t predicts label t + 1. Targets after the shift: 2, 0, ignored."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [5.0, -1.0, 2.0], [9.0, 9.0, -9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX]])
    return logits, labels


def test_cross_entropy_shifts_and_averages_over_supervised_tokens():
    logits, labels = _ce_example()
    # Position 0 predicts label[1] = 2 from uniform logits: -log(1/3) = ln 3.
    # Position 1 predicts label[2] = 0 from (ln 2, 0, 0): softmax_0 = 2 / (2 + 1 + 1) = 1/2, loss ln 2.
    # Position 2 predicts label[3] = IGNORE; position 3 predicts nothing. Mean of two: (ln 3 + ln 2) / 2.
    expected = (LN3 + LN2) / 2
    assert next_token_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_ignores_masked_positions():
    logits, labels = _ce_example()
    reference = next_token_cross_entropy(logits, labels)
    changed = logits.clone()
    changed[0, 2] = torch.tensor([-7.0, 3.0, 11.0])  # predicts an ignored label
    changed[0, 3] = torch.tensor([1.0, 2.0, 3.0])  # the last position predicts nothing
    relabelled = labels.clone()
    relabelled[0, 0] = 1  # label 0 is never a target (nothing predicts the first token)
    assert torch.equal(next_token_cross_entropy(changed, relabelled), reference)
    # Control: changing a supervised position does change the loss.
    changed[0, 1] = torch.tensor([0.0, 0.0, 0.0])
    assert next_token_cross_entropy(changed, labels).item() == pytest.approx(LN3, rel=1e-6)


def test_cross_entropy_runs_in_float32_for_half_precision_logits():
    logits, labels = _ce_example()
    loss = next_token_cross_entropy(logits.to(torch.bfloat16), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((LN3 + LN2) / 2, abs=2e-2)  # bf16 rounding of the inputs only


def test_cross_entropy_rejects_no_supervision_and_mismatched_shapes():
    logits, labels = _ce_example()
    with pytest.raises(LossInputError, match="no supervised target"):
        next_token_cross_entropy(logits, torch.full_like(labels, IGNORE_INDEX))
    with pytest.raises(LitelvlmError, match=r"\(1, 4, 3\).*\(1, 5\)"):
        next_token_cross_entropy(logits, torch.zeros(1, 5, dtype=torch.long))


def test_bce_is_the_pixel_mean_per_mask_averaged_over_every_mask_of_the_batch():
    # Sample 0, mask A (2x2): logits (0, 0 / ln3, -ln3), targets (1, 0 / 1, 0).
    #   logit 0: ln 2 whatever the target; logit ln3 with target 1: -log(sigmoid(ln3)) = -log(3/4);
    #   logit -ln3 with target 0: -log(1 - 1/4) = -log(3/4). Mean: (2 ln2 + 2 ln(4/3)) / 4.
    # Sample 0, mask A2 (2x2): all logits ln3, all targets 1: ln(4/3).
    # Sample 1, mask B (3x3): all logits 0: ln 2.
    # Over masks (not per sample first): (A + A2 + B) / 3.
    mask_a = (2 * LN2 + 2 * math.log(4 / 3)) / 4
    expected = (mask_a + math.log(4 / 3) + LN2) / 3
    logits = [
        torch.tensor([[[0.0, 0.0], [LN3, -LN3]], [[LN3, LN3], [LN3, LN3]]]),
        torch.zeros(1, 3, 3),
    ]
    targets = [
        torch.tensor([[[True, False], [True, False]], [[True, True], [True, True]]]),
        torch.tensor([[[True, False, False], [False, False, False], [False, False, True]]]),
    ]
    assert mask_bce_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_dice_follows_the_references_scale_and_eps():
    # p = sigmoid(logits); sums are taken over p/1000 and t/1000, eps 1e-6; multiplying numerator
    # and denominator by 1000 gives 1 - (2 sum(pt) + 0.001) / (sum p + sum t + 0.001).
    # Mask A (2x2): logits (100, 0 / ln3, -100) -> p = (1, 1/2 / 3/4, 0); targets (1, 1 / 0, 0).
    #   sum pt = 1.5, sum p = 2.25, sum t = 2: 1 - 3.001 / 4.251.
    # Mask B (3x3): logits -100 (p = 0), empty target: 1 - 0.001 / 0.001 = 0.
    # Mask C (3x3): logits 0 (p = 1/2), one target pixel: sum pt = 0.5, sum p = 4.5, sum t = 1:
    #   1 - 1.001 / 5.501.
    expected = ((1 - 3.001 / 4.251) + 0.0 + (1 - 1.001 / 5.501)) / 3
    logits = [
        torch.tensor([[[100.0, 0.0], [LN3, -100.0]]]),
        torch.stack([torch.full((3, 3), -100.0), torch.zeros(3, 3)]),
    ]
    one_pixel = torch.zeros(3, 3, dtype=torch.bool)
    one_pixel[1, 1] = True
    targets = [
        torch.tensor([[[True, True], [False, False]]]),
        torch.stack([torch.zeros(3, 3, dtype=torch.bool), one_pixel]),
    ]
    assert mask_dice_loss(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_mask_losses_name_mismatched_shapes():
    with pytest.raises(LossInputError, match=r"sample 1: mask logits \(2, 3, 3\) and target masks \(1, 3, 3\)"):
        mask_bce_loss(
            [torch.zeros(1, 2, 2), torch.zeros(2, 3, 3)],
            [torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 3, 3, dtype=torch.bool)],
        )
    with pytest.raises(LossInputError, match="2 samples of mask logits but 1"):
        mask_dice_loss([torch.zeros(1, 2, 2)] * 2, [torch.zeros(1, 2, 2, dtype=torch.bool)])


def test_grounding_loss_weights_the_three_terms():
    logits, labels = _ce_example()
    mask_logits = [torch.tensor([[[0.0, 0.0], [LN3, -LN3]]], requires_grad=True)]
    targets = [torch.tensor([[[True, False], [True, False]]])]
    weights = LossWeights()
    assert (weights.ce, weights.bce, weights.dice) == (1.0, 2.0, 0.5)  # GLaMM's recipe
    parts = grounding_loss(logits, labels, mask_logits, targets, weights)
    assert set(parts) == {"loss", "ce", "bce", "dice"}
    assert parts["ce"].item() == pytest.approx((LN3 + LN2) / 2, rel=1e-6)
    assert parts["bce"].item() == pytest.approx((2 * LN2 + 2 * math.log(4 / 3)) / 4, rel=1e-6)
    # p = (1/2, 1/2 / 3/4, 1/4), t = (1, 0 / 1, 0): sum pt = 1.25, sum p = 2, sum t = 2.
    assert parts["dice"].item() == pytest.approx(1 - 2.501 / 4.001, rel=1e-5)
    total = parts["ce"] + 2.0 * parts["bce"] + 0.5 * parts["dice"]
    assert parts["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    parts["loss"].backward()
    assert mask_logits[0].grad is not None and mask_logits[0].grad.abs().sum() > 0
    only_masks = grounding_loss(logits, labels, mask_logits, targets, LossWeights(ce=0.0, bce=1.0, dice=0.0))
    assert only_masks["loss"].item() == pytest.approx(parts["bce"].item(), rel=1e-6)


def test_negative_loss_weights_are_rejected():
    with pytest.raises(LossInputError, match="dice"):
        LossWeights(dice=-1.0)
    for bad in (float("nan"), float("inf"), "2"):  # not finite, or not a number: named, not a TypeError later
        with pytest.raises(LossInputError, match="finite numbers >= 0.*'bce'"):
            LossWeights(bce=bad)
