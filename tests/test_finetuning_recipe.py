"""GLaMM's fine-tuning recipe: several training sets concatenated, the effective batch, per-epoch
validation on a fixed subset, and the best-gIoU checkpoint exported beside the last.

The fits run the tiny random-weight model on small original-layout sets (tests/test_data_original.py).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from litelvlm.data.datamodule import ReferringDataModule, first_images
from litelvlm.data.sampler import EpochShuffledSampler
from litelvlm.data.training import draw_training_sentences
from litelvlm.engine.finetuned import BEST_STEM, MODULE_PREFIX, WEIGHTS_FILE
from litelvlm.engine.finetuning import FineTuning, FineTuningError, gradient_accumulation
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.pruners import LiteLVLM
from test_data_original import REFCOCO_REFS, image_key, ref, sentence, write_original_layout

R = 16

# Two referring sets over the same COCO images, as refcoco and refcocog are: image 2 is in both, so
# one epoch must show it twice (once per set), images 1 and 3 once.
REFCOCO_TRAIN = [
    ref(6, 101, 1, "train", sentence("a train sentence", 60)),
    ref(10, 201, 2, "train", sentence("two train squares", 100), sentence("the train pair", 101)),
]
REFCOCOG_TRAIN = [
    ref(20, 202, 2, "train", sentence("the long thin bar on the image", 200)),
    ref(21, 301, 3, "train", sentence("a small square near the corner", 210), sentence("the little square", 211)),
    ref(22, 203, 2, "val", sentence("the two corner pieces", 220)),
]
# What each training item is: (set, image), told apart by its sentence ids.
ITEMS = {frozenset({"60"}): ("refcoco", 1), frozenset({"100", "101"}): ("refcoco", 2),
         frozenset({"200"}): ("refcocog", 2), frozenset({"210", "211"}): ("refcocog", 3)}  # fmt: skip


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_sets") / "data"
    write_original_layout(root, "refcoco", refs=[r for r in REFCOCO_REFS if r["split"] != "train"] + REFCOCO_TRAIN)
    write_original_layout(root, "refcocog", refs=REFCOCOG_TRAIN)
    return root


def two_set_data(root: Path, **kwargs) -> ReferringDataModule:
    return ReferringDataModule(
        data_dir=str(root), train_splits=["refcoco/train", "refcocog/train"], splits=["refcoco/val"], **kwargs
    )


class SeenItems(L.Callback):
    """Which training items (by their sentence ids) each epoch's batches held."""

    def __init__(self) -> None:
        self.seen: dict[int, list[frozenset]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        items = [frozenset(ids) for ids in batch.sentence_ids]
        self.seen.setdefault(trainer.current_epoch, []).extend(items)


def quiet_trainer(root: Path, epochs: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=callbacks, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_set_fit(two_sets, tmp_path_factory):
    """Two epochs on the two sets at batch 1 with an effective batch of 2: 2 optimiser steps per epoch."""
    seen = SeenItems()
    module = ReferringSegmentationModule(
        pruner=LiteLVLM(num_tokens=R), finetuning=FineTuning(lr=1e-3, warmup_steps=0, effective_batch_size=2)
    )
    trainer = quiet_trainer(
        tmp_path_factory.mktemp("two_set_fit"), 2, [seen], enable_checkpointing=False, limit_val_batches=0
    )
    trainer.fit(module, datamodule=two_set_data(two_sets, batch_size=1))
    return trainer, seen


# ---------------------------------------------------------------------------- several training sets
def test_every_image_of_both_sets_is_seen_once_per_epoch(two_set_fit):
    trainer, seen = two_set_fit
    assert sorted(seen.seen) == [0, 1]
    for epoch, items in seen.seen.items():
        assert Counter(items) == Counter(ITEMS.keys()), epoch  # each (set, image) exactly once
        assert Counter(image for _, image in (ITEMS[item] for item in items)) == {1: 1, 2: 2, 3: 1}
        # shuffled together, in the order torch's DistributedSampler draws from seed + epoch
        order = torch.randperm(len(ITEMS), generator=torch.Generator().manual_seed(0 + epoch)).tolist()
        assert items == [list(ITEMS)[index] for index in order]
    assert seen.seen[0] != seen.seen[1]


def test_the_concatenation_follows_the_listed_order_and_draws_by_its_own_index(two_sets):
    data = two_set_data(two_sets, batch_size=1)
    data.setup("fit")
    dataset = data.train_dataset
    assert len(dataset) == 4 and [dataset.locate(index) for index in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    item = dataset[(2, 3)]  # refcocog's first image, drawn as item 2 of epoch 3
    assert item["sample_id"] == 2 and set(item["sentence_ids"]) == {"200"}
    # the draw (sentences, templates) is that of index 2 in the concatenation, not of refcocog's item 0
    assert dataset.positions(2, 3) == draw_training_sentences(1, 3, data.seed, 3, 2)
    with pytest.raises(IndexError):
        dataset.locate(4)


def test_two_ranks_run_the_same_batches_and_together_see_every_item(two_sets):
    data = two_set_data(two_sets, batch_size=1)
    data.setup("fit")
    shards = []
    for rank in range(2):
        sampler = EpochShuffledSampler(data.train_dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(1)
        shards.append([index for index, _ in sampler])
    assert len(shards[0]) == len(shards[1]) == 2
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3]


def test_a_training_split_listed_twice_is_a_clear_error(two_sets):
    from litelvlm.errors import DataError

    with pytest.raises(DataError, match="twice"):
        ReferringDataModule(data_dir=str(two_sets), train_splits=["refcoco/train", "refcoco/train"])


# ---------------------------------------------------------------------------- the effective batch
@pytest.mark.parametrize(
    "target, batch, devices, configured, accumulation",
    [(160, 2, 8, 1, 10), (160, 2, 1, 1, 80), (160, 2, 4, 20, 20), (None, 2, 4, 7, 7), (2, 1, 1, 1, 2)],
)
def test_the_accumulation_makes_batch_x_accumulation_x_devices_the_effective_batch(
    target, batch, devices, configured, accumulation
):
    assert gradient_accumulation(target, batch, devices, configured) == accumulation
    if target is not None:
        assert batch * accumulation * devices == target


@pytest.mark.parametrize(
    "target, batch, devices, configured, phrase",
    [(20, 2, 3, 1, r"not a multiple of data.batch_size 2 x 3 device\(s\) = 6"), (20, 2, 1, 5, "contradicts")],
)
def test_an_effective_batch_that_cannot_be_made_is_one_clear_error(target, batch, devices, configured, phrase):
    with pytest.raises(FineTuningError, match=phrase):
        gradient_accumulation(target, batch, devices, configured)
    with pytest.raises(FineTuningError, match="effective_batch_size"):
        FineTuning(effective_batch_size=0)


def test_the_fit_steps_the_optimiser_once_per_effective_batch(two_set_fit):
    trainer, seen = two_set_fit
    assert trainer.accumulate_grad_batches == 2  # 2 = 1 per device x 2 x 1 device
    assert sum(len(items) for items in seen.seen.values()) == 8  # 4 items x 2 epochs, one per batch
    assert trainer.global_step == 4  # optimiser steps: 8 batches / 2
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4 and scheduler.get_last_lr()[0] == 0.0  # decayed to 0 at the 4th step


# ---------------------------------------------------------------------------- validation and the best checkpoint
def test_fit_validation_scores_the_first_images_in_glamms_set_order():
    class Split:  # records in first-appearance order, one item per image (glamm) or two (per sentence)
        records = [type("R", (), {"image_id": f"COCO_train2014_{n:012d}"})() for n in (581857, 9, 16, 77, 8)]

    Split.items = [(index, [0]) for index in range(5)]
    order = list(set([581857, 9, 16, 77, 8]))  # what GLaMM's getImgIds returns
    assert order != [581857, 9, 16, 77, 8]  # the set order is not the refs order: the test can tell them apart
    position = {581857: 0, 9: 1, 16: 2, 77: 3, 8: 4}
    assert first_images(Split, 3) == sorted(position[image_id] for image_id in order[:3])
    Split.items = [(index, [s]) for index in range(5) for s in (0, 1)]
    assert first_images(Split, 1) == [2 * position[order[0]], 2 * position[order[0]] + 1]


class SetMasksBeforeValidation(L.Callback):
    """Before epoch 1's validation every mask logit is made positive (the whole image predicted: IoU
    = target area / image area > 0), before the last epoch's negative (nothing predicted: IoU 0),
    through the trained mask decoder: upscale_conv2 outputs 1 everywhere, each hypernetwork MLP the
    constant `sign`. So epoch 1 is the best and the last epoch worse, whatever the random model does."""

    SIGNS = {1: 1.0, 2: -1.0}

    def on_validation_epoch_start(self, trainer, module) -> None:
        sign = self.SIGNS.get(trainer.current_epoch)
        if trainer.state.fn != "fit" or sign is None:
            return
        decoder = module.lvlm.sam.mask_decoder
        with torch.no_grad():
            decoder.upscale_conv2.weight.zero_()
            decoder.upscale_conv2.bias.fill_(1.0)
            for mlp in decoder.output_hypernetworks_mlps:
                mlp.proj_out.weight.zero_()
                mlp.proj_out.bias.fill_(sign)


class Scores(L.Callback):
    """Each validation's gIoU and the images it scored."""

    def __init__(self) -> None:
        self.giou: list[float] = []
        self.images: list[list[str]] = []

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.images.append([])

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.images[-1].extend(batch.image_ids)

    def on_validation_end(self, trainer, module) -> None:
        self.giou.append(float(trainer.callback_metrics["val/giou"]))


@pytest.fixture(scope="module")
def best_fit(two_sets, tmp_path_factory):
    """Three epochs, validated after each; epoch 1 made the best, the last worse (SetMasksBeforeValidation)."""
    folder = tmp_path_factory.mktemp("best_fit")
    scores = Scores()
    best = ModelCheckpoint(monitor="val/giou", mode="max", filename="best-{epoch}")
    module = ReferringSegmentationModule(
        pruner=LiteLVLM(num_tokens=R), finetuning=FineTuning(lr=1e-2, warmup_steps=0)
    )
    trainer = quiet_trainer(
        folder, 3, [ModelCheckpoint(save_last=True, save_on_train_epoch_end=True), best, SetMasksBeforeValidation(), scores],
        num_sanity_val_steps=0,
    )
    data = two_set_data(two_sets, batch_size=2, fit_val_images=1)
    trainer.fit(module, datamodule=data)
    return trainer, module, best, scores, folder


def test_validation_runs_after_every_epoch_on_the_first_images_only(best_fit):
    trainer, module, best, scores, folder = best_fit
    assert len(scores.giou) == 3
    # refcoco val holds images 2 and 1, in that order in the refs file; GLaMM's list(set(ids)) puts 1 first
    assert list(set([2, 1])) == [1, 2] and scores.images == [[image_key(1)]] * 3
    assert scores.giou[2] == 0.0 < scores.giou[1] and scores.giou[0] <= scores.giou[1]  # the last epoch is worse


def test_the_best_giou_checkpoint_is_kept_and_exported_beside_the_last(best_fit):
    trainer, module, best, scores, folder = best_fit
    best_epoch = max(range(3), key=lambda epoch: (scores.giou[epoch], -epoch))
    assert best_epoch < 2 and Path(best.best_model_path).name == f"best-epoch={best_epoch}.ckpt"
    assert sorted(path.name for path in Path(best.best_model_path).parent.iterdir()) == [
        f"best-epoch={best_epoch}.ckpt", "epoch=2-step=6.ckpt", "last.ckpt"
    ]
    assert float(best.best_model_score) == scores.giou[best_epoch]
    last, best_export = load_file(str(folder / WEIGHTS_FILE)), load_file(str(folder / f"{BEST_STEM}.safetensors"))
    checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    parameters = dict(module.lvlm.named_parameters())
    assert set(last) == set(best_export) == set(module.trained.names)
    for name in module.trained.names:
        assert torch.equal(last[name], parameters[name].detach())  # the last: the weights the fit ended with
        assert torch.equal(best_export[name], checkpoint["state_dict"][MODULE_PREFIX + name])
    assert not all(torch.equal(last[name], best_export[name]) for name in module.trained.names)
    origin = json.loads((folder / f"{BEST_STEM}.json").read_text())["origin"]
    assert (origin["epoch"], origin["monitor"], origin["score"]) == (best_epoch, "val/giou", scores.giou[best_epoch])


def test_each_export_loads_with_model_finetuned_and_scores_what_its_epoch_scored(best_fit, two_sets):
    trainer, module, best, scores, folder = best_fit
    best_epoch = max(range(3), key=lambda epoch: (scores.giou[epoch], -epoch))
    for weights, expected in ((folder / WEIGHTS_FILE, scores.giou[2]), (folder / f"{BEST_STEM}.safetensors", scores.giou[best_epoch])):
        loaded = ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R), finetuned=str(weights))
        data = ReferringDataModule(data_dir=str(two_sets), splits=["refcoco/val"], batch_size=2)
        data.setup()
        data.datasets[0] = torch.utils.data.Subset(data.datasets[0], first_images(data.all_samples[0], 1))
        (result,) = quiet_trainer(folder / "validate", 1, []).validate(loaded, datamodule=data, verbose=False)
        assert result["val/giou"] == pytest.approx(expected, abs=1e-7), weights.name
