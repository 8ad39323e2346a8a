"""Pruning-aware fine-tuning: settings, what is trained, labels aligned with the pruned sequence, a short fit.

The short fit overfits two synthetic images with LiteLVLM keeping R = 16 tokens; what the LLM saw
is read from the decoder layers' actual inputs (pre-hooks), not from the model's own trace.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from conftest import sam_image_cache

from litelvlm.cli import main
from litelvlm.data.datamodule import ReferringDataModule
from litelvlm.engine.finetuning import (
    TRAINABLE_PARTS,
    FineTuning,
    FineTuningError,
    build_optimizer,
    prepare_for_training,
    training_losses,
)
from litelvlm.engine.losses import LossWeights
from litelvlm.engine.module import ReferringSegmentationModule
from litelvlm.engine.scores import score_masks
from litelvlm.models.batch import IGNORE_INDEX
from litelvlm.models.loading import load_lvlm
from litelvlm.models.lvlm import IMAGE_TOKEN_INDEX, PixelGroundingLVLM
from litelvlm.pruners import FastV, LiteLVLM, SparseVLM

REPO = Path(__file__).resolve().parents[1]
R = 16
FIT_EPOCHS = 32  # one step per epoch: two images, batch 2
# Overfitting two images fast: a large learning rate, and DICE weighted up so the masks do not
# first collapse to all-background under BCE (the recipe's weights need a much longer fit).
FIT_SETTINGS = FineTuning(lr=1e-2, warmup_steps=2, loss_weights=LossWeights(ce=1.0, bce=0.5, dice=2.0))


@pytest.fixture(scope="module")
def train_batch(private_cache) -> object:
    """Two demo training prompts with their labels."""
    data = ReferringDataModule(batch_size=2)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def spliced_labels(batch, r: int) -> torch.Tensor:
    """By hand: each prompt's labels with the image sentinel replaced by r ignored visual slots."""
    rows = []
    for ids, labels in zip(batch.input_ids, batch.labels):
        image = int((ids == IMAGE_TOKEN_INDEX).nonzero())
        rows.append(torch.cat([labels[:image], torch.full((r,), IGNORE_INDEX), labels[image + 1 :]]))
    return torch.stack(rows)


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_targets": ["q_proj", "q_proj"]}, "twice"),
        ({"lora_targets": [], "trainable_modules": []}, "trains nothing"),
        ({"prune_during_training": "yes"}, "prune_during_training"),
        ({"lr": 0.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_are_one_clear_error_naming_the_field(change, phrase):
    with pytest.raises(FineTuningError, match=phrase):
        FineTuning(**change)


def test_unknown_module_names_list_the_valid_ones():
    model = load_lvlm("tiny-glamm", seed=0)
    with pytest.raises(FineTuningError, match="k_proj.*o_proj.*q_proj.*v_proj"):
        prepare_for_training(model, FineTuning(lora_targets=["query"]))
    with pytest.raises(FineTuningError, match=", ".join(TRAINABLE_PARTS)):
        prepare_for_training(model, FineTuning(trainable_modules=["sam_decoder"]))
    with pytest.raises(FineTuningError, match="holds LoRA-adapted layers"):
        prepare_for_training(model, FineTuning(trainable_modules=["llm.model.layers.1"]))
    mlp = prepare_for_training(model, FineTuning(trainable_modules=["llm.model.layers.1.mlp"]))  # beside LoRA: fine
    assert any(name.startswith("llm.model.layers.1.mlp.") for name in mlp)


def test_the_recipe_trains_lora_on_q_v_and_the_four_modules_only():
    model = load_lvlm("tiny-glamm", seed=0)
    names = prepare_for_training(model, FineTuning())
    layers = len(model.llm.model.layers)
    lora = [name for name in names if ".lora_" in name]
    assert len(lora) == layers * 2 * 2  # q_proj and v_proj, A and B, in every decoder layer
    assert {name.split(".self_attn.")[1].split(".")[0] for name in lora} == {"q_proj", "v_proj"}
    full = [name for name in names if ".lora_" not in name]
    prefixes = ("sam.mask_decoder.", "text_hidden_fcs.", "llm.lm_head.", "llm.model.embed_tokens.")
    assert all(name.startswith(prefixes) for name in full)
    for prefix in prefixes:  # every parameter of each module, but SAM's IoU head that the loss never reaches
        module = dict(model.named_modules())[prefix[:-1]]
        expected = {prefix + name for name, _ in module.named_parameters() if "iou_prediction_head" not in name}
        assert {name for name in full if name.startswith(prefix)} == expected
    assert not model.vision_tower.vision_model.embeddings.patch_embedding.weight.requires_grad


# ---------------------------------------------------------------------------- labels
def test_labels_of_a_pre_llm_pruner_put_r_ignored_slots_at_the_image(tiny_model, train_batch):
    with torch.no_grad(), sam_image_cache(tiny_model):
        output = tiny_model(train_batch, LiteLVLM(num_tokens=R))
    expected = spliced_labels(train_batch, R)
    assert torch.equal(output.labels, expected)
    assert output.lm_logits.shape == (*expected.shape, tiny_model.config.llm.vocab_size)


def test_evaluation_batches_without_labels_get_no_lm_logits(tiny_model, demo_batch):
    with torch.no_grad(), sam_image_cache(tiny_model):
        output = tiny_model(demo_batch, LiteLVLM(num_tokens=R))
    assert output.labels is None and output.lm_logits is None


def test_fastv_inplace_drops_the_dropped_tokens_from_the_labels_and_keeps_them_aligned(tiny_model, train_batch):
    """Inplace and mask modes see the same keys: on every kept position their logits agree, row for row."""
    n = tiny_model.num_patches
    with torch.no_grad(), sam_image_cache(tiny_model):
        inplace = tiny_model(train_batch, FastV(num_tokens=R, layer=2, mode="inplace"))
        masked = tiny_model(train_batch, FastV(num_tokens=R, layer=2, mode="mask"))
    assert torch.equal(inplace.labels, spliced_labels(train_batch, R))
    assert torch.equal(masked.labels, spliced_labels(train_batch, n))  # mask mode drops nothing
    keep = torch.ones(masked.labels.shape, dtype=torch.bool)
    for row, ids in enumerate(train_batch.input_ids):
        image = int((ids == IMAGE_TOKEN_INDEX).nonzero())
        dropped = sorted(set(range(n)) - set(inplace.llm_kept_indices[row].tolist()))
        keep[row, [image + index for index in dropped]] = False
    b = keep.shape[0]
    assert torch.equal(masked.labels[keep].view(b, -1), inplace.labels)
    kept_logits = masked.lm_logits[keep].view(b, -1, masked.lm_logits.shape[-1])
    real = inplace.labels != IGNORE_INDEX  # compare where a loss is taken (padding rows attend to nothing)
    torch.testing.assert_close(kept_logits[real], inplace.lm_logits[real], atol=1e-5, rtol=1e-5)


def test_dropping_visual_tokens_gathers_the_labels_with_every_other_token():
    length, visual_positions = 8, torch.tensor([[2, 3, 4, 5]])
    state = {
        "key_mask": torch.ones(1, length, dtype=torch.long),
        "position_ids": torch.arange(length)[None],
        "seg_mask": torch.zeros(1, length, dtype=torch.bool),
        "visual_positions": visual_positions,
        "labels": torch.arange(100, 100 + length)[None],
    }
    hidden = torch.arange(length, dtype=torch.float32)[None, :, None]
    kept = torch.tensor([[3, 1]])  # visual tokens 1 and 3: sequence positions 3 and 5
    new_hidden, new_state = PixelGroundingLVLM._drop_visual_tokens(hidden, state, kept, "inplace")
    assert new_hidden[0, :, 0].tolist() == [0, 1, 3, 5, 6, 7]
    assert new_state["labels"].tolist() == [[100, 101, 103, 105, 106, 107]]
    assert new_state["position_ids"].tolist() == [[0, 1, 3, 5, 6, 7]]


def test_prune_during_training_off_trains_on_every_visual_token(tiny_model, train_batch):
    length, layers = train_batch.input_ids.shape[1], len(tiny_model.llm.model.layers)
    for prune, expected in ((True, R), (False, tiny_model.num_patches)):
        with torch.no_grad(), sam_image_cache(tiny_model):
            losses, output = training_losses(
                tiny_model, train_batch, LiteLVLM(num_tokens=R), FineTuning(prune_during_training=prune)
            )
        assert output.visual_tokens_per_layer == [expected] * layers
        assert output.labels.shape == (2, length - 1 + expected) and torch.isfinite(losses["loss"])


# ---------------------------------------------------------------------------- model pieces under LoRA
def test_sparsevlm_labels_follow_the_merged_sequence_and_the_loss_reaches_the_llm(tiny_model, train_batch):
    """Kept and merged visual slots are ignored, the text keeps its labels; the loss backpropagates (fit)."""
    layer = tiny_model.llm.model.layers[0].mlp.down_proj.weight
    with sam_image_cache(tiny_model):
        layer.requires_grad_(True)
        try:
            output = tiny_model(train_batch, SparseVLM(num_tokens=64, layers=[0, 1, 2]))
            real = output.labels != IGNORE_INDEX
            torch.nn.functional.cross_entropy(output.lm_logits[real], output.labels[real]).backward()
            grad = layer.grad
        finally:
            layer.requires_grad_(False)
            layer.grad = None
    assert output.visual_tokens_per_layer == [576, 82, 32, 18]
    assert torch.equal(output.labels, spliced_labels(train_batch, 18))
    assert grad is not None and bool(grad.abs().sum() > 0)


def test_fastv_attention_goes_through_the_lora_adapter(train_batch):
    """FastV's last-token attention calls q_proj: with an adapter it must see W + scale * B A."""
    model = load_lvlm("tiny-glamm", seed=0)
    prepare_for_training(model, FineTuning(lora_dropout=0.0))
    layer = model.llm.model.layers[1]
    torch.manual_seed(0)
    torch.nn.init.normal_(layer.self_attn.q_proj.lora_B["default"].weight, std=0.5)
    hidden = torch.randn(2, 12, model.config.llm.hidden_size)
    positions = torch.arange(12).expand(2, 12)
    embeddings = model.llm.model.rotary_emb(hidden, position_ids=positions)
    key_mask, visual = torch.ones(2, 12, dtype=torch.long), torch.arange(2, 8).expand(2, 6)

    def attention():
        with torch.no_grad():
            return PixelGroundingLVLM._last_token_attention(layer, hidden, embeddings, key_mask, visual)

    adapted = attention()
    layer.self_attn.q_proj.merge()  # peft folds B A into the base weight; the adapter path is then off
    merged = attention()
    layer.self_attn.q_proj.unmerge()
    torch.nn.init.zeros_(layer.self_attn.q_proj.lora_B["default"].weight)
    base = attention()
    torch.testing.assert_close(adapted, merged, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-4)


def test_activation_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(train_batch):
    model = load_lvlm("tiny-glamm", seed=0)
    settings = FineTuning(lora_dropout=0.0)
    names = prepare_for_training(model, settings)
    calls = []
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in model.llm.model.layers]
    gradients = {}
    with sam_image_cache(model):
        for checkpointing in (False, True):
            model.activation_checkpointing = checkpointing
            model.zero_grad(set_to_none=True)
            calls.clear()
            losses, _ = training_losses(model, train_batch, LiteLVLM(num_tokens=R), settings)
            losses["loss"].backward()
            gradients[checkpointing] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            layers = len(model.llm.model.layers)
            assert len(calls) == layers * (2 if checkpointing else 1)
    for handle in handles:
        handle.remove()
    assert set(gradients[True]) == set(gradients[False]) and set(gradients[True]) <= set(names)
    for name, gradient in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], gradient, atol=1e-6, rtol=1e-5)


def test_frozen_parts_stay_in_eval_mode_when_the_module_trains():
    module = ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R), finetuning=FineTuning())
    module.train()
    modules = dict(module.lvlm.named_modules())
    assert not modules["vision_tower"].training and not modules["sam.vision_encoder"].training
    assert not modules["llm.model.layers.0.mlp"].training
    assert modules["llm.model.layers.0.self_attn.q_proj"].training  # the adapter: its dropout is live
    assert modules["sam.mask_decoder"].training and modules["text_hidden_fcs"].training
    assert not modules["llm.model.layers.0.self_attn.k_proj"].training
    module.eval()
    assert not any(m.training for m in module.lvlm.modules())


def test_learning_rate_warms_up_linearly_then_decays_linearly_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    settings = FineTuning(lr=0.1, warmup_steps=3, betas=(0.8, 0.9))
    config = build_optimizer([parameter], settings, total_steps=10)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["weight_decay"] == 0.0
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.1 * k / 3 for k in range(3)] + [0.1 * (10 - k) / 7 for k in range(3, 10)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(FineTuningError, match="warmup_steps"):
        build_optimizer([parameter], settings, total_steps=3)


def test_fit_without_finetuning_settings_is_one_clear_error(capsys, tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.logger", "false"]
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]), pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "fit needs model.finetuning" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a short fit
class FitRecord(L.Callback):
    """Per training step: the loss, and the sequence length every decoder layer was called with."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.expected_lengths: list[int] = []
        self.layer_lengths: list[list[int]] = []

    def setup(self, trainer, pl_module, stage):
        for layer in pl_module.lvlm.llm.model.layers:
            layer.register_forward_pre_hook(self._seen)

    def _seen(self, layer, args):
        if torch.is_grad_enabled():  # training steps only (evaluation runs under no_grad)
            self.layer_lengths[-1].append(args[0].shape[1])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.expected_lengths.append(batch.input_ids.shape[1] - 1 + R)
        self.layer_lengths.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_set_giou(module, data) -> float:
    """Mean per-mask IoU of the (pruned) model on the training images, epoch-0 prompts."""
    module.eval()
    ious = []
    with torch.no_grad():
        for batch in data.train_dataloader():
            output = module.lvlm(batch, module.pruner)
            scores = score_masks(output.mask_logits, batch.gt_masks, output.num_visual_tokens)
            ious.append(scores.intersection.double() / scores.union.clamp(min=1).double())
    return float(torch.cat(ious).mean())


@pytest.fixture(scope="module")
def short_fit(tmp_path_factory, private_cache):
    from litelvlm.data.synthetic import generate_synthetic_refcoco

    folder = tmp_path_factory.mktemp("fit_data")
    generate_synthetic_refcoco(folder, num_images=2, seed=5, split="train")
    generate_synthetic_refcoco(folder, num_images=2, seed=6, split="val")
    data = ReferringDataModule(data_dir=str(folder), split="val", train_split="train", batch_size=2)
    data.setup("fit")
    module = ReferringSegmentationModule(pruner=LiteLVLM(num_tokens=R), finetuning=FIT_SETTINGS)
    before = {name: p.detach().clone() for name, p in module.lvlm.named_parameters()}
    record = FitRecord()
    trainer = L.Trainer(
        max_epochs=FIT_EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[record],
        default_root_dir=str(folder),  # where the export goes
    )  # fmt: skip
    with sam_image_cache(module.lvlm):
        giou_before = train_set_giou(module, data)
        trainer.fit(module, datamodule=data)
        giou_after = train_set_giou(module, data)
    return dataclasses.make_dataclass("Fit", ["module", "before", "record", "giou_before", "giou_after"])(
        module, before, record, giou_before, giou_after
    )


def test_the_llm_sees_exactly_r_visual_tokens_in_every_training_step(short_fit):
    record = short_fit.record
    assert len(record.layer_lengths) == FIT_EPOCHS
    layers = len(short_fit.module.lvlm.llm.model.layers)
    for expected, lengths in zip(record.expected_lengths, record.layer_lengths):
        assert lengths == [expected] * layers


def test_the_total_loss_falls_well_below_its_start(short_fit):
    losses = short_fit.record.losses
    assert sum(losses[-4:]) / 4 < 0.25 * losses[0], losses  # seen: 9.1 -> 1.3


def test_giou_on_the_training_samples_beats_the_start(short_fit):
    assert short_fit.giou_after > short_fit.giou_before + 0.25, (short_fit.giou_before, short_fit.giou_after)  # seen: 0.04 -> 0.63


def test_only_lora_and_the_trained_modules_change_and_frozen_weights_stay_bit_identical(short_fit):
    module, before = short_fit.module, short_fit.before  # `before`: after the adapters were added
    trained = set(module.trained.names)
    after = dict(module.lvlm.named_parameters())
    assert set(after) == set(before)
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    frozen = set(before) - trained
    assert not changed & frozen  # every frozen parameter bit-identical
    assert changed <= trained
    groups = ("sam.mask_decoder.", "text_hidden_fcs.", "llm.lm_head.", "llm.model.embed_tokens.")
    groups += ("q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B")
    for group in groups:  # each trained part moved
        assert any(group in name for name in changed), group


def test_a_bfloat16_base_trains_float32_weights_under_bf16_mixed_precision(private_cache, tmp_path):
    data = ReferringDataModule(batch_size=2)
    module = ReferringSegmentationModule(dtype="bfloat16", pruner=LiteLVLM(num_tokens=R), finetuning=FineTuning(warmup_steps=0))
    before = {name: p.detach().clone() for name, p in module.lvlm.named_parameters()}
    trainer = L.Trainer(
        max_steps=2, precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    trained = set(module.trained.names)
    for name, parameter in module.lvlm.named_parameters():
        if name in trained:  # float32 master weights, moved by the steps
            assert parameter.dtype == torch.float32, name
        else:  # the frozen base stays bfloat16, bit for bit
            assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, before[name]), name
    assert any(not torch.equal(module.lvlm.get_parameter(name), before[name].float()) for name in trained)
