"""The hidden states that reach SAM come from the positions models.md names.

The references prompt SAM with the final state of the token just BEFORE each [SEG]. Under teacher
forcing (causal attention) the k-th [SEG] token can then affect only the masks of later rounds. We
perturb one input embedding (a forward hook on the LLM's embedding table, whose output is indexed by
the ORIGINAL prompt positions, before the image splice) and watch which masks move.
"""

from __future__ import annotations


import pytest
from conftest import sam_image_cache
import torch

from litelvlm.pruners import FastV, NoPruning, RandomPruner

PRUNERS = {"none": lambda: NoPruning(), "random-64": lambda: RandomPruner(num_tokens=64)}
UNCHANGED = 1e-6  # relative to the mask's largest |logit| (random SAM logits are of order 1e-5)
CHANGED = 1e-5  # changes seen are >= 1e-4; unaffected masks are bit-identical


@pytest.fixture(scope="module", autouse=True)
def fast_sam(tiny_model):
    with sam_image_cache(tiny_model):
        yield


def seg_positions(model, batch) -> list[list[int]]:
    """Per sample, the prompt positions of its [SEG] tokens, in order."""
    return [(row == model.seg_token_id).nonzero().flatten().tolist() for row in batch.input_ids]


@torch.no_grad()
def forward_perturbed(model, batch, pruner, positions: list[int] | None):
    """Run the model, adding a large vector to the input embedding at `positions[b]` of each sample."""
    if positions is None:
        return model(batch, pruner)
    hidden = model.config.llm.hidden_size
    push = 10.0 * torch.randn(hidden, generator=torch.Generator().manual_seed(1))

    def hook(module, args, output):
        output = output.clone()
        for b, position in enumerate(positions):
            output[b, position] += push.to(output.dtype)
        return output

    handle = model.llm.model.embed_tokens.register_forward_hook(hook)
    try:
        return model(batch, pruner)
    finally:
        handle.remove()


def mask_changes(output, reference) -> list[list[float]]:
    """Per sample and mask: max |change| of the logits relative to the mask's largest |logit|."""
    return [
        [float((a[i] - b[i]).abs().max() / b[i].abs().max()) for i in range(len(b))]
        for a, b in zip(output.mask_logits, reference.mask_logits)
    ]


class FinalStates:
    """Captures the output of the LLM's final norm: the states the [SEG] projection reads."""

    def __init__(self, model) -> None:
        self.handle = model.llm.model.norm.register_forward_hook(lambda m, a, out: setattr(self, "states", out))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_demo_sample_has_three_seg_tokens_with_text_around_them(tiny_model, demo_batch):
    lengths = demo_batch.attention_mask.sum(1).tolist()
    image = (demo_batch.input_ids == -200).int().argmax(1).tolist()
    for positions, length, image_pos in zip(seg_positions(tiny_model, demo_batch), lengths, image):
        assert len(positions) == 3
        assert image_pos < positions[0] - 1  # the token before the first [SEG] is text after the image
        assert positions[-1] + 1 < length  # a real text token follows the last [SEG]


@pytest.fixture(scope="module", params=list(PRUNERS))
def setting(request, tiny_model, demo_batch):
    """The pruner factory, the unperturbed output and the final-norm states of that forward."""
    make = PRUNERS[request.param]
    with FinalStates(tiny_model) as final:
        reference = forward_perturbed(tiny_model, demo_batch, make(), None)
    return make, reference, final.states


@pytest.mark.parametrize("k", [1, 2, 3])
def test_perturbing_kth_seg_leaves_masks_up_to_k_and_changes_later_masks(tiny_model, demo_batch, setting, k):
    make, reference, _ = setting
    positions = [row[k - 1] for row in seg_positions(tiny_model, demo_batch)]
    changes = mask_changes(forward_perturbed(tiny_model, demo_batch, make(), positions), reference)
    for sample in changes:
        assert all(c <= UNCHANGED for c in sample[:k]), changes
        assert all(c > CHANGED for c in sample[k:]), changes


def test_perturbing_the_token_before_the_first_seg_changes_mask_1(tiny_model, demo_batch, setting):
    make, reference, _ = setting
    positions = [row[0] - 1 for row in seg_positions(tiny_model, demo_batch)]
    changes = mask_changes(forward_perturbed(tiny_model, demo_batch, make(), positions), reference)
    assert all(sample[0] > CHANGED for sample in changes), changes


def test_perturbing_text_after_the_last_seg_changes_nothing(tiny_model, demo_batch, setting):
    make, reference, _ = setting
    positions = [row[-1] + 1 for row in seg_positions(tiny_model, demo_batch)]
    output = forward_perturbed(tiny_model, demo_batch, make(), positions)
    assert all(c <= UNCHANGED for sample in mask_changes(output, reference) for c in sample)
    torch.testing.assert_close(output.seg_hidden_states, reference.seg_hidden_states, rtol=0, atol=1e-6)


def states_before_each_seg(model, batch, final_states, visual: int) -> torch.Tensor:
    """A prompt position p after the image sits at p - 1 + V in a sequence with V visual tokens, so
    the token just before the [SEG] at p sits at p - 2 + V."""
    assert final_states.shape[1] == batch.input_ids.shape[1] - 1 + visual
    rows = seg_positions(model, batch)
    return torch.stack([final_states[b, p - 2 + visual] for b, row in enumerate(rows) for p in row])


def test_seg_hidden_states_are_final_states_just_before_each_seg(tiny_model, demo_batch, setting):
    _, reference, final_states = setting
    visual = reference.visual_tokens_per_layer[-1]
    expected = states_before_each_seg(tiny_model, demo_batch, final_states, visual)
    torch.testing.assert_close(reference.seg_hidden_states, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode, visual", [("inplace", 64), ("mask", None)])
def test_fastv_seg_states_are_read_before_each_seg_in_the_shortened_sequence(tiny_model, demo_batch, mode, visual):
    # Inplace: the sequence after layer K holds 64 visual tokens and the [SEG] positions must move
    # with it; mask mode keeps all N positions.
    with FinalStates(tiny_model) as final, torch.no_grad():
        output = tiny_model(demo_batch, FastV(num_tokens=64, mode=mode))
    visual = visual or tiny_model.num_patches
    expected = states_before_each_seg(tiny_model, demo_batch, final.states, visual)
    torch.testing.assert_close(output.seg_hidden_states, expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def at_model(private_cache):
    from litelvlm.models.loading import load_lvlm

    model = load_lvlm("tiny-glamm", seed=0, seg_prompt_position="at")
    with sam_image_cache(model):
        yield model


@pytest.fixture(scope="module")
def at_reference(at_model, demo_batch):
    with FinalStates(at_model) as final:
        output = forward_perturbed(at_model, demo_batch, NoPruning(), None)
    return output, final.states


@pytest.mark.parametrize("k", [1, 2, 3])
def test_seg_prompt_position_at_makes_the_kth_seg_drive_mask_k(at_model, demo_batch, at_reference, k):
    at_reference = at_reference[0]
    positions = [row[k - 1] for row in seg_positions(at_model, demo_batch)]
    changes = mask_changes(forward_perturbed(at_model, demo_batch, NoPruning(), positions), at_reference)
    for sample in changes:
        assert all(c <= UNCHANGED for c in sample[: k - 1]), changes
        assert all(c > CHANGED for c in sample[k - 1 :]), changes


def test_seg_prompt_position_at_reads_the_seg_tokens_own_final_state(at_model, demo_batch, at_reference):
    output, final_states = at_reference
    n = at_model.num_patches
    expected = torch.stack(
        [final_states[b, p - 1 + n] for b, row in enumerate(seg_positions(at_model, demo_batch)) for p in row]
    )
    torch.testing.assert_close(output.seg_hidden_states, expected, rtol=0, atol=0)
