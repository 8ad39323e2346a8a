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


def test_attention_rows_equal_the_eager_llamas_probabilities_on_a_padded_batch(tiny_model):
    """`LayerContext.attention_rows` = rows of transformers' eager attention map (causal + padding)."""
    import copy

    from litelvlm.models.decoder_loop import LayerContext

    decoder = tiny_model.llm.model
    torch.manual_seed(0)
    length = 12
    embeds = torch.randn(2, length, decoder.config.hidden_size)
    key_mask = torch.tensor([[1] * 9 + [0] * 3, [1] * 12])
    positions = torch.arange(length).expand(2, length)
    eager = copy.deepcopy(decoder)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        maps = eager(inputs_embeds=embeds, attention_mask=key_mask, position_ids=positions, output_attentions=True).attentions
        context = LayerContext(
            index=1, layer=decoder.layers[1], decoder=decoder, hidden=None, position_ids=positions,
            position_embeddings=decoder.rotary_emb(embeds, position_ids=positions), key_mask=key_mask,
            visual_positions=torch.tensor([[2, 3, 4], [2, 3, 4]]), visual_ids=torch.arange(3).expand(2, 3),
            num_patches=3, input_embeds=embeds, input_key_mask=key_mask, input_visual_positions=None,
        )
        context.hidden = decoder.layers[0](
            embeds, attention_mask=None, position_ids=positions, position_embeddings=context.position_embeddings
        )  # layer 1's input: SDPA, causal without a mask (padding comes last, so real rows never see it)
        rows = torch.tensor([[8, 3], [11, 5]])  # each sample's last real token, and an earlier one
        probs = context.attention_rows(rows, "float32")
        last = context.last_token_attention("float32")
    for b in range(2):
        expected = maps[1][b][:, rows[b]]  # [H, Q, L]
        torch.testing.assert_close(probs[b], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(last[b], expected[:, 0].mean(0)[[2, 3, 4]], atol=1e-6, rtol=1e-5)
    assert bool((probs[0, :, :, 9:] == 0).all())  # padding is never attended
    assert bool((probs[:, :, 1, 6:] == 0).all())  # causal: row 3 / 5 sees nothing after itself
