"""The in-LLM schedule's sequence rebuild, on hand-written padded batches, and its checks."""

from __future__ import annotations

import pytest
import torch

from litelvlm.models.batch import IGNORE_INDEX
from litelvlm.models.decoder_loop import apply_selection, check_selection
from litelvlm.pruners import LLMSelection, PrunerError


def padded_state():
    """Two right-padded samples of 9 slots: text, 4 visual tokens, text, padding.

    Sample 0: image at 1..4, real length 8 (slot 8 padding); sample 1: image at 2..5, real length 9.
    Hidden state of token j of sample b = 10 b + j, so the gathers can be read off.
    """
    length = 9
    hidden = (torch.arange(length)[None] + 10 * torch.arange(2)[:, None]).float()[..., None]
    key_mask = torch.tensor([[1] * 8 + [0], [1] * 9])
    state = {
        "key_mask": key_mask,
        "position_ids": torch.arange(length).expand(2, length).clone(),
        "seg_mask": torch.zeros(2, length, dtype=torch.bool).index_fill_(1, torch.tensor([6]), True),
        "labels": torch.arange(100, 100 + length).expand(2, length).clone(),
        "visual_positions": torch.tensor([[1, 2, 3, 4], [2, 3, 4, 5]]),
        "visual_ids": torch.arange(4).expand(2, 4),
        "num_patches": 4,
    }
    return hidden, state


def test_original_positions_keep_gaps_and_move_every_per_token_tensor():
    hidden, state = padded_state()
    keep = torch.tensor([[3, 1], [0, 2]])  # any order: kept tokens stay in sequence order
    new_hidden, new = apply_selection(hidden, state, LLMSelection(keep, positions="original"))
    assert new_hidden[..., 0].tolist() == [[0, 2, 4, 5, 6, 7, 8], [10, 11, 12, 14, 16, 17, 18]]
    assert new["position_ids"].tolist() == [[0, 2, 4, 5, 6, 7, 8], [0, 1, 2, 4, 6, 7, 8]]
    assert new["key_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert new["seg_mask"].nonzero().tolist() == [[0, 4], [1, 4]]  # the token at old slot 6 moved
    assert new["labels"][0].tolist() == [100, 102, 104, 105, 106, 107, 108]
    assert new["visual_positions"].tolist() == [[1, 2], [2, 3]]
    assert new["visual_ids"].tolist() == [[1, 3], [0, 2]]


def test_contiguous_positions_renumber_the_rebuilt_sequence():
    hidden, state = padded_state()
    _, new = apply_selection(hidden, state, LLMSelection(torch.tensor([[0, 1], [2, 3]]), positions="contiguous"))
    assert new["position_ids"].tolist() == [list(range(7))] * 2


def test_merged_tokens_go_right_after_the_kept_visual_tokens_and_carry_their_patches():
    hidden, state = padded_state()
    merged = torch.tensor([[[-1.0], [-2.0]], [[-3.0], [-4.0]]])
    members = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 1]], [[0, 1, 0, 0], [1, 0, 0, 1]]], dtype=torch.bool)
    selection = LLMSelection(torch.tensor([[1], [2]]), positions="contiguous", merged=merged, merged_members=members)
    new_hidden, new = apply_selection(hidden, state, selection)
    assert new_hidden[..., 0].tolist() == [[0, 2, -1, -2, 5, 6, 7, 8], [10, 11, 14, -3, -4, 16, 17, 18]]
    assert new["visual_positions"].tolist() == [[1, 2, 3], [2, 3, 4]]
    assert new["visual_ids"].tolist() == [[1, -1, -1], [2, -1, -1]]
    assert new["key_mask"].tolist() == [[1] * 7 + [0], [1] * 8]
    assert new["labels"][0].tolist() == [100, 102, IGNORE_INDEX, IGNORE_INDEX, 105, 106, 107, 108]
    assert new["seg_mask"].nonzero().tolist() == [[0, 5], [1, 5]]
    assert new["position_ids"].tolist() == [list(range(8))] * 2
    assert new["visual_patches"].int().tolist() == [
        [[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]],
        [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1]],
    ]
    # A second stage merging a merged token with a kept patch: its patches are the union.
    again = LLMSelection(
        torch.tensor([[0], [0]]), merged=torch.zeros(2, 1, 1), merged_members=torch.tensor([[[0, 1, 1]], [[1, 0, 1]]]).bool()
    )
    _, after = apply_selection(new_hidden, new, again)
    assert after["visual_ids"].tolist() == [[1, -1], [2, -1]]
    assert after["visual_patches"][:, 1].int().tolist() == [[1, 0, 1, 1], [1, 0, 1, 1]]


def test_mask_mode_keeps_the_sequence_and_masks_the_dropped_tokens():
    hidden, state = padded_state()
    new_hidden, new = apply_selection(hidden, state, LLMSelection(torch.tensor([[0, 3], [1, 2]]), "original", mode="mask"))
    assert torch.equal(new_hidden, hidden)
    assert new["key_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 0, 1, 1, 1]]
    assert new["visual_positions"].tolist() == [[1, 4], [3, 4]]


@pytest.mark.parametrize(
    "selection, message",
    [
        (LLMSelection(torch.tensor([[0, 0], [1, 2]])), "twice"),
        (LLMSelection(torch.tensor([[0, 4], [1, 2]])), "outside"),
        (LLMSelection(torch.tensor([0, 1])), r"\[B, R\]"),
        (LLMSelection(torch.tensor([[0], [1]]), positions="shuffled"), "position rule"),
        (LLMSelection(torch.tensor([[0], [1]]), merged=torch.zeros(2, 1, 1), positions="original"), "contiguous"),
        (LLMSelection(torch.tensor([[0], [1]]), mode="mask", positions="contiguous"), "original"),
        (LLMSelection(torch.tensor([[0], [1]]), merged=torch.zeros(2, 1, 3)), "merged tokens must be"),
    ],
)
def test_bad_selections_get_one_line_errors(selection, message):
    hidden, _ = padded_state()
    with pytest.raises(PrunerError, match=message):
        check_selection(selection, 4, hidden, "demo")
