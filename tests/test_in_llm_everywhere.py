"""PyramidDrop and DART everywhere a pruner goes, on the 4-layer tiny model: one-pass sweeps, the
retention visualiser (tokens that survive to the last layer) and fine-tuning batches with labels."""

from __future__ import annotations

import pytest
import torch
from conftest import sam_image_cache

from litelvlm.analysis.retention import retained
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.finetuning import FineTuning, training_losses
from litelvlm.models.batch import IGNORE_INDEX
from litelvlm.models.lvlm import IMAGE_TOKEN_INDEX
from litelvlm.pruners import DART, PyramidDrop, SparseVLM

N = 576


def in_llm_pruners():
    # The 4-layer tiny LLM has no layer 8: PyramidDrop's explicit form at layers 1/2/3 (576 -> 288 -> 144 -> 72).
    return {"pdrop": PyramidDrop(layers=[1, 2, 3], ratio=0.5), "dart": DART(num_tokens=64),
            "sparsevlm": SparseVLM(num_tokens=64, layers=[0, 1, 2])}


@pytest.fixture(scope="module")
def separate_runs(tiny_model, demo_batch):
    with torch.no_grad(), sam_image_cache(tiny_model):
        return {name: tiny_model(demo_batch, pruner) for name, pruner in in_llm_pruners().items()}


def test_one_pass_sweep_equals_separate_runs(tiny_model, demo_batch, separate_runs):
    pruners = in_llm_pruners()
    with torch.no_grad(), sam_image_cache(tiny_model):
        shared = tiny_model.encode(demo_batch, list(pruners.values()))
        swept = {name: tiny_model.ground(demo_batch, shared, pruner) for name, pruner in pruners.items()}
    for name, output in swept.items():
        alone = separate_runs[name]
        assert torch.equal(output.llm_kept_indices, alone.llm_kept_indices), name
        assert torch.equal(output.seg_hidden_states, alone.seg_hidden_states), name
        assert output.visual_tokens_per_layer == alone.visual_tokens_per_layer
    assert swept["pdrop"].visual_tokens_per_layer == [576, 288, 144, 72]
    assert swept["dart"].visual_tokens_per_layer == [576, 576, 68, 68]
    assert swept["sparsevlm"].visual_tokens_per_layer == [576, 82, 32, 18]
    assert torch.equal(swept["sparsevlm"].llm_visual_patches, separate_runs["sparsevlm"].llm_visual_patches)


def test_the_visualiser_draws_the_tokens_that_reach_the_last_layer(tiny_model, demo_batch):
    last_layer = tiny_model.llm.model.layers[-1]
    lengths = []
    handle = last_layer.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True)
    try:
        with torch.no_grad(), sam_image_cache(tiny_model):
            output = tiny_model(demo_batch, PyramidDrop(layers=[1, 2, 3], ratio=0.5))
    finally:
        handle.remove()
    assert lengths == [demo_batch.input_ids.shape[1] - 1 + 72]
    for b in range(2):
        tokens, groups, where = retained(output, b)
        assert all(len(members) == 1 for members in tokens)  # no merged token: each stands for its own patch
        kept = [members[0] for members in tokens]
        assert where == "inside the LLM" and len(kept) == len(set(kept)) == 72 and kept == sorted(kept)
        assert groups == [0] * 72


def test_fine_tuning_batches_keep_labels_aligned_with_the_kept_tokens(tiny_model):
    data = ReferringDataModule(batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad(), sam_image_cache(tiny_model):
        losses, output = training_losses(tiny_model, batch, DART(num_tokens=64), FineTuning())
    assert torch.isfinite(losses["loss"])
    # Every visual slot is ignored, so after DART the labels are the prompt's with 68 ignored slots.
    rows = []
    for ids, labels in zip(batch.input_ids, batch.labels):
        image = int((ids == IMAGE_TOKEN_INDEX).nonzero())
        rows.append(torch.cat([labels[:image], torch.full((68,), IGNORE_INDEX), labels[image + 1 :]]))
    assert torch.equal(output.labels, torch.stack(rows))
    assert output.lm_logits.shape[:2] == output.labels.shape


def test_back_to_back_schedule_layers_see_the_previous_layer_as_it_ran(tiny_model, demo_batch):
    """At layer 2, `previous` is layer 1 after layer 1's own selection: its input is the shortened sequence."""
    from litelvlm.pruners import LLMSelection, TokenPruner

    class HalveTwice(TokenPruner):
        needs_previous_layer = True
        prune_layers = (1, 2)

        def __init__(self):
            super().__init__()
            self.seen = []

        def prune_in_llm(self, context):
            previous = context.previous
            self.seen.append((context.index, previous.index, previous.hidden.shape[1], context.hidden.shape[1]))
            v = context.visual_positions.shape[1]
            return LLMSelection(torch.arange(v // 2).expand(context.hidden.shape[0], -1), positions="contiguous")

    pruner = HalveTwice()
    with torch.no_grad(), sam_image_cache(tiny_model):
        output = tiny_model(demo_batch, pruner)
    text = demo_batch.input_ids.shape[1] - 1
    assert pruner.seen == [(1, 0, text + N, text + N), (2, 1, text + N // 2, text + N // 2)]
    assert output.visual_tokens_per_layer == [N, N // 2, N // 4, N // 4]
    assert output.llm_kept_indices.tolist() == [list(range(N // 4))] * 2
