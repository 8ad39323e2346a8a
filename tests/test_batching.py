"""Batched evaluation: prompts of different lengths, right-padded, give each sample its own result.

Padding must be invisible to every pruner: the key mask hides the pad tokens, FastV reads the
attention of each prompt's last REAL token, [SEG] positions move with their tokens. So a batch of 4
must give, sample by sample, what each sample gives alone, and the metrics of 4 demo images in
a batch of 4 must match those of batches of 1 within 1e-4 cIoU (float32). The CLI runs batches
(configs/demo.yaml: 2, configs/sweep_demo.yaml: 4) through the same model calls.
"""

from __future__ import annotations

import pytest
import torch

from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.scores import ExactReferringIoU, score_masks
from litelvlm.models.visual_reduction import signals_for
from litelvlm.pruners import build_pruner
from litelvlm.pruners.base import VisualSignals

PRUNERS = {
    "none": ("none", {}),
    "random": ("random", {"num_tokens": 64}),
    "fastv": ("fastv", {"num_tokens": 64}),
    "fastv-mask": ("fastv", {"num_tokens": 64, "mode": "mask"}),
    "vispruner": ("vispruner", {"num_tokens": 64}),
    "litelvlm": ("litelvlm", {"num_tokens": 64}),
    "litelvlm-original-positions": ("litelvlm", {"num_tokens": 64, "position_ids": "original", "kept_order": "raster"}),
    "context-only": ("context-only", {"num_tokens": 64}),
    "similarity-only": ("similarity-only", {"num_tokens": 64}),
    "reversed-similarity": ("reversed-similarity", {"num_tokens": 64}),
    "fastervlm": ("fastervlm", {"num_tokens": 64}),
    "divprune": ("divprune", {"num_tokens": 64}),
    "cdpruner": ("cdpruner", {"num_tokens": 64}),
    "visionzip": ("visionzip", {"num_tokens": 64}),
}


@pytest.fixture(scope="module")
def batches(private_cache):
    """The first 4 demo images: as one batch of 4, and as 4 batches of 1."""
    by_four = ReferringDataModule(batch_size=4, max_sentences=3)
    by_one = ReferringDataModule(batch_size=1, max_sentences=3)
    four, one = iter(by_four.val_dataloader()), iter(by_one.val_dataloader())
    return [(next(four), [next(one) for _ in range(4)])]


def test_demo_batches_hold_prompts_of_different_lengths(batches):
    for batch, _ in batches:
        lengths = batch.attention_mask.sum(1)
        assert len(set(lengths.tolist())) > 1, lengths
        for row, length in enumerate(lengths.tolist()):  # right padding: real tokens first
            assert batch.attention_mask[row, :length].all() and not batch.attention_mask[row, length:].any()


@pytest.fixture(scope="module")
def outputs(tiny_model, batches):
    """Per pruner and batch: the batch's output, and each of its samples' output alone.

    Encoded once for all pruners, batched and alone (a sweep; test_sweep pins that this changes nothing)."""
    pruners = {name: build_pruner(kind, **kwargs) for name, (kind, kwargs) in PRUNERS.items()}
    found = {name: [] for name in pruners}
    with torch.no_grad():
        for batch, singles in batches:
            shared = tiny_model.encode(batch, list(pruners.values()))
            shared_alone = [tiny_model.encode(single, list(pruners.values())) for single in singles]
            for name, pruner in pruners.items():
                together = tiny_model.ground(batch, shared, pruner)
                alone = [tiny_model.ground(single, encoded, pruner) for single, encoded in zip(singles, shared_alone)]
                found[name].append((together, alone, signals_for(shared, pruner), [signals_for(e, pruner) for e in shared_alone]))
    return pruners, found


# Selections that follow near-equal scores through a greedy order: a ~1e-7 change in their inputs between
# a batch and a sample alone can change what they keep (each has its own test below).
ORDER_SENSITIVE = ("vispruner", "cdpruner")


@pytest.mark.parametrize("name", [name for name in PRUNERS if name not in ORDER_SENSITIVE])
def test_each_sample_of_a_padded_batch_gets_what_it_gets_alone(outputs, name):
    for together, alone, _, _ in outputs[1][name]:
        if together.kept_indices is not None:
            for row, single in enumerate(alone):
                assert torch.equal(together.kept_indices[row], single.kept_indices[0]), (name, row)
        if together.token_members is not None:  # merged tokens (VisionZip): the same members per sample
            for row, single in enumerate(alone):
                assert torch.equal(together.token_members[row], single.token_members[0]), (name, row)
        torch.testing.assert_close(
            together.seg_hidden_states, torch.cat([single.seg_hidden_states for single in alone]), rtol=0, atol=1e-5
        )
        for logits, single in zip(together.mask_logits, alone):
            torch.testing.assert_close(logits, single.mask_logits[0], rtol=0, atol=1e-5)


def test_vispruner_selects_per_sample_whatever_the_batch(outputs):
    """VisPruner's duplicate removal follows the attention ORDER of all tokens, so a 1e-10 change in
    CLS attention (batched vs single matrix products) can reorder near-equal tokens and change what it
    keeps. Given the same signals, though, it selects for each sample exactly what it selects alone."""
    pruner = outputs[0]["vispruner"]
    for _, _, batched, alone in outputs[1]["vispruner"]:
        torch.testing.assert_close(batched.cls_attention, torch.cat([s.cls_attention for s in alone]), rtol=0, atol=1e-8)
        stacked = VisualSignals(
            patch_features=torch.cat([s.patch_features for s in alone]),
            cls_attention=torch.cat([s.cls_attention for s in alone]),
            grid=batched.grid,
            num_patches=batched.num_patches,
            batch_size=len(alone),
        )
        kept = pruner.select(stacked)
        for row, signals in enumerate(alone):
            assert torch.equal(kept[row], pruner.select(signals)[0])


def test_cdpruner_selects_per_sample_whatever_the_batch(outputs):
    """CDPruner's CLIP text embeddings of a batch and of a sample alone differ by ~1e-6 (the batch pads its
    questions to another length, so the tower's sums run in another order); on the tiny random model its
    greedy DPP then changes course. Given the same signals it selects for each sample exactly what it
    selects alone, and its other inputs are the same to the bit."""
    pruner = outputs[0]["cdpruner"]
    for _, _, batched, alone in outputs[1]["cdpruner"]:
        for row, signals in enumerate(alone):
            questions = signals.text_embeds.shape[1]
            torch.testing.assert_close(batched.text_embeds[row, :questions], signals.text_embeds[0], rtol=0, atol=1e-5)
            assert torch.equal(batched.projected_features[row], signals.projected_features[0])
            one = VisualSignals(
                projected_features=batched.projected_features[row : row + 1],
                patch_embeds=batched.patch_embeds[row : row + 1],
                text_embeds=batched.text_embeds[row : row + 1],
                text_mask=batched.text_mask[row : row + 1],
                num_patches=batched.num_patches,
                batch_size=1,
            )
            assert torch.equal(pruner.select(batched)[row], pruner.select(one)[0]), row


def _metrics(outputs, gt_masks) -> dict:
    metric = ExactReferringIoU()
    for output, masks in zip(outputs, gt_masks):
        scores = score_masks(output.mask_logits, masks, output.num_visual_tokens)
        metric.update(scores.intersection, scores.union, scores.retained_tokens)
    return metric.compute()


@pytest.mark.parametrize("name", [name for name in PRUNERS if name != "cdpruner"])
def test_batch_size_4_matches_batch_size_1_within_1e_4(outputs, batches, name):
    together = _metrics([found[0] for found in outputs[1][name]], [batch.gt_masks for batch, _ in batches])
    alone_outputs = [single for found in outputs[1][name] for single in found[1]]
    alone = _metrics(alone_outputs, [single.gt_masks for _, singles in batches for single in singles])
    assert together["num_masks"] == alone["num_masks"] == 12  # 4 images x 3 sentences
    assert abs(together["ciou"] - alone["ciou"]) < 1e-4
    assert abs(together["giou"] - alone["giou"]) < 1e-4
