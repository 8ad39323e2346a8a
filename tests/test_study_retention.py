"""Token retention panels: the image views, the overlay, and the config end to end against the model."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from litelvlm.analysis import TokenRetentionVisualizer
from litelvlm.analysis.retention import (
    KEPT_FILL_ALPHA,
    PRUNED_BRIGHTNESS,
    clip_view,
    four_panel_figure,
    original_view,
    patch_boxes_on_original,
    retained,
    retention_overlay,
    token_pixels,
    tokens_on_original,
)
from litelvlm.analysis.reversal import StudyError
from litelvlm.models.image_processing import (
    clip_crop_geometry,
    clip_preprocess,
    mask_to_clip_patch_coverage,
    sam_preprocess,
)
from litelvlm.pruners import FastV, LiteLVLM, VisPruner

REPO = Path(__file__).resolve().parents[1]


def test_clip_view_is_the_resized_centre_crop_the_pruner_saw():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    resized_h, resized_w, top, left = clip_crop_geometry(30, 50, 28)
    resized = np.asarray(image.resize((resized_w, resized_h), Image.Resampling.BICUBIC))
    expected = resized[top : top + 28, left : left + 28]
    np.testing.assert_allclose(clip_view(clip_preprocess(image, 28)), expected / 255.0, atol=1e-5)


def test_original_view_drops_the_sam_padding_and_returns_to_the_original_size():
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (200, 20, 20)
    pixels[:, 30:] = (10, 10, 180)
    sam_input, resized = sam_preprocess(Image.fromarray(pixels), 64)  # 32 x 64, padded to 64 x 64
    view = original_view(sam_input, torch.tensor(resized), torch.tensor([30, 60]))
    assert view.shape == (30, 60, 3)
    np.testing.assert_allclose(view[:, :25], np.broadcast_to(np.array([200, 20, 20]) / 255, (30, 25, 3)), atol=1e-4)
    np.testing.assert_allclose(view[:, 35:], np.broadcast_to(np.array([10, 10, 180]) / 255, (30, 25, 3)), atol=1e-4)


def test_overlay_dims_pruned_cells_and_tints_kept_cells_by_group():
    from matplotlib.colors import to_rgb

    image = np.full((4, 6, 3), 0.5)  # a 2 x 3 patch grid of 2 x 2 pixel cells
    overlay = retention_overlay(image, kept=[0, 4], groups=[0, 1], grid=(2, 3))
    for index in (1, 2, 3, 5):  # pruned
        row, col = divmod(index, 3)
        np.testing.assert_allclose(overlay[2 * row : 2 * row + 2, 2 * col : 2 * col + 2], 0.5 * PRUNED_BRIGHTNESS)
    for index, colour in ((0, "tab:orange"), (4, "tab:cyan")):
        row, col = divmod(index, 3)
        expected = 0.5 * (1 - KEPT_FILL_ALPHA) + np.array(to_rgb(colour)) * KEPT_FILL_ALPHA
        cell = overlay[2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
        np.testing.assert_allclose(cell, np.broadcast_to(expected, (2, 2, 3)))


def test_overlay_draws_a_merged_token_over_its_members_and_a_token_of_no_patch_nowhere():
    from matplotlib.colors import to_rgb

    image = np.full((4, 6, 3), 0.5)
    # token 0: patch 0 (group 0); token 1: merged from patches 1 and 5 (group 1); token 2: [CLS], no patch.
    overlay = retention_overlay(image, kept=[[0], [1, 5], []], groups=[0, 1, 0], grid=(2, 3))
    for index, colour in ((0, "tab:orange"), (1, "tab:cyan"), (5, "tab:cyan"), (2, None), (3, None), (4, None)):
        row, col = divmod(index, 3)
        cell = overlay[2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
        expected = 0.5 * PRUNED_BRIGHTNESS if colour is None else (
            0.5 * (1 - KEPT_FILL_ALPHA) + np.array(to_rgb(colour)) * KEPT_FILL_ALPHA)
        np.testing.assert_allclose(cell, np.broadcast_to(expected, (2, 2, 3)))


def test_tokens_merged_inside_the_llm_are_read_as_their_member_patches_and_drawn_over_them():
    from matplotlib.colors import to_rgb

    from litelvlm.models.batch import GroundingOutput

    # The last layer saw patch 1, then two tokens merged inside the LLM (SparseVLM's recycled tokens,
    # id -1, group 1) standing for patches {0, 3} and {5}.
    patches = torch.zeros(1, 3, 6, dtype=torch.bool)
    patches[0, 0, 1] = patches[0, 1, 0] = patches[0, 1, 3] = patches[0, 2, 5] = True
    output = GroundingOutput(mask_logits=[], kept_indices=None, visual_tokens_per_layer=[6, 3],
                             sequence_length_per_layer=[9, 6], kept_groups=torch.tensor([[0, 1, 1]]),
                             group_names=("kept", "recycled"), llm_kept_indices=torch.tensor([[1, -1, -1]]),
                             llm_visual_patches=patches)
    tokens, groups, where = retained(output, 0)
    assert (tokens, groups, where) == ([[1], [0, 3], [5]], [0, 1, 1], "inside the LLM")
    overlay = retention_overlay(np.full((4, 6, 3), 0.5), tokens, groups, (2, 3))
    for index, colour in ((1, "tab:orange"), (0, "tab:cyan"), (3, "tab:cyan"), (5, "tab:cyan"), (2, None), (4, None)):
        row, col = divmod(index, 3)
        expected = 0.5 * PRUNED_BRIGHTNESS if colour is None else (
            0.5 * (1 - KEPT_FILL_ALPHA) + np.array(to_rgb(colour)) * KEPT_FILL_ALPHA)
        np.testing.assert_allclose(overlay[2 * row : 2 * row + 2, 2 * col : 2 * col + 2], np.broadcast_to(expected, (2, 2, 3)))
    without = GroundingOutput(mask_logits=[], kept_indices=None, visual_tokens_per_layer=[6], sequence_length_per_layer=[9],
                              kept_groups=torch.zeros(1, 2, dtype=torch.long), llm_kept_indices=torch.tensor([[1, 4]]))
    assert retained(without, 0)[0] == [[1], [4]]


def test_a_patch_lands_on_its_pixels_of_the_original_frame():
    from matplotlib.colors import to_rgb

    # 168 x 336 -> shortest side to 336 (x2) -> 336 x 672, centre crop drops 168 resized columns on the
    # left. Patch (row 3, col 10) = crop rows 42..56, cols 140..154 = resized cols 308..322 = original
    # rows 21..28, cols 154..161.
    boxes = patch_boxes_on_original(168, 336, 336, 14)
    assert boxes.shape == (576, 4)
    np.testing.assert_allclose(boxes[3 * 24 + 10], [21, 154, 28, 161])
    overlay = tokens_on_original(np.full((168, 336, 3), 0.5), [3 * 24 + 10], "tab:orange", boxes)
    expected = np.full((168, 336, 3), 0.5 * PRUNED_BRIGHTNESS)
    expected[21:28, 154:161] = 0.5 * (1 - KEPT_FILL_ALPHA) + np.array(to_rgb("tab:orange")) * KEPT_FILL_ALPHA
    np.testing.assert_allclose(overlay, expected)


def test_token_pixels_are_what_the_reversal_coverage_puts_back_on_the_patch():
    # A portrait frame (scale 1.5, crop offset in rows): the pixels drawn for a patch, read back through
    # the coverage the reversal study computes, cover exactly that patch.
    boxes = patch_boxes_on_original(300, 224, 336, 14)
    for index in (0, 5 * 24 + 7, 575):
        pixels = token_pixels([index], boxes, (300, 224))
        coverage = mask_to_clip_patch_coverage(pixels, 336, 14).flatten()
        assert coverage[index] > 0.85 and float(coverage.sum() - coverage[index]) < 0.2, index
        assert int(coverage.argmax()) == index


def test_four_panel_figure_has_four_panels_per_sentence_row():
    boxes = patch_boxes_on_original(60, 80, 28, 14)  # a 2 x 2 grid
    record = {"kept_indices": [0, 3, 1], "kept_groups": ["context-aware", "similarity-aware", "similarity-aware"],
              "group_names": ["similarity-aware", "context-aware"], "iou": 0.5}
    sentences = [{**record, "expression": "the dog"}, {**record, "expression": "the red ball"}]
    fig = four_panel_figure(np.full((60, 80, 3), 0.5), boxes, sentences, [np.zeros((60, 80), bool)] * 2)
    try:
        assert len(fig.axes) == 8
        rows = fig.subfigs
        assert [row._suptitle.get_text() for row in rows] == ['"the dog"', '"the red ball"']
        titles = [ax.get_title() for ax in fig.axes[:4]]
        assert titles == ["input image", "similarity-aware tokens (2)", "context-aware tokens (1)",
                          "output mask (IoU 0.50)"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_bad_settings_are_refused():
    with pytest.raises(StudyError, match="num_samples"):
        TokenRetentionVisualizer(num_samples=0)
    with pytest.raises(StudyError, match="folder"):
        TokenRetentionVisualizer(folder="../elsewhere")
    with pytest.raises(StudyError, match="layout"):
        TokenRetentionVisualizer(layout="two")


# ------------------------------------------------------------------ end to end
BATCH_SIZE, NUM_SAMPLES = 3, 2  # one batch of 3, of which only the first 2 samples are drawn
CONFIGURATIONS = {"litelvlm@64": LiteLVLM(num_tokens=64), "vispruner@64": VisPruner(num_tokens=64),
                  "fastv@64": FastV(num_tokens=64)}


@pytest.fixture(scope="module")
def retention_run(tmp_path_factory):
    from litelvlm.cli import main

    save_dir = tmp_path_factory.mktemp("retention_logs")
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):  # pytest's own arguments are not the CLI's
        main(["validate", "--config", str(REPO / "configs/studies/visualize.yaml"),
              "--trainer.limit_val_batches", "1", "--data.batch_size", str(BATCH_SIZE),
              "--trainer.callbacks.init_args.num_samples", str(NUM_SAMPLES), "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(save_dir)])
    [folder] = save_dir.rglob("retention")
    panels = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return folder, panels


@pytest.fixture(scope="module")
def first_batch(private_cache):
    from litelvlm.data.datamodule import ReferringDataModule

    data = ReferringDataModule(batch_size=BATCH_SIZE, max_sentences=3)
    data.setup()
    return next(iter(data.val_dataloader()))


def test_the_first_samples_get_a_panel_per_sentence_and_configuration(retention_run, first_batch):
    _, panels = retention_run
    sample_ids = [int(i) for i in first_batch.sample_ids]
    assert sorted({panel["sample_id"] for panel in panels}) == sample_ids[:NUM_SAMPLES]  # the 3rd is not drawn
    for b, sample_id in enumerate(sample_ids[:NUM_SAMPLES]):
        keys = {(p["sentence"], p["configuration"]) for p in panels if p["sample_id"] == sample_id}
        sentences = len(first_batch.expressions[b])
        assert keys == {(t, name) for t in range(sentences) for name in CONFIGURATIONS}
        for panel in (p for p in panels if p["sample_id"] == sample_id):
            assert panel["expression"] == first_batch.expressions[b][panel["sentence"]]


def test_every_panel_holds_r_kept_patches_and_group_counts_that_add_up(retention_run):
    _, panels = retention_run
    for panel in panels:
        pruner = CONFIGURATIONS[panel["configuration"]]
        kept = panel["kept_indices"]
        assert panel["R"] == len(kept) == len(set(kept)) == 64 and panel["grid"] == [24, 24]
        assert all(0 <= i < 576 for i in kept)
        assert panel["group_names"] == list(pruner.group_names)
        assert len(panel["kept_groups"]) == 64 and set(panel["kept_groups"]) <= set(panel["group_names"])
        assert panel["group_counts"] == {name: Counter(panel["kept_groups"])[name] for name in panel["group_names"]}
        assert sum(panel["group_counts"].values()) == 64


def test_panels_report_what_the_model_kept(retention_run, first_batch, tiny_model):
    _, panels = retention_run
    pruners = list(CONFIGURATIONS.values())
    with torch.no_grad():
        shared = tiny_model.encode(first_batch, pruners)
        outputs = {name: tiny_model.ground(first_batch, shared, pruner) for name, pruner in CONFIGURATIONS.items()}
    by_key = {(p["sample_id"], p["sentence"], p["configuration"]): p for p in panels}
    for b, sample_id in enumerate(int(i) for i in first_batch.sample_ids[:NUM_SAMPLES]):
        for name, output in outputs.items():
            kept = output.llm_kept_indices if name.startswith("fastv") else output.kept_indices
            names = [output.group_names[g] for g in output.kept_groups[b].tolist()]
            for t in range(len(first_batch.expressions[b])):
                panel = by_key[(sample_id, t, name)]
                assert panel["kept_indices"] == kept[b].tolist(), (sample_id, t, name)
                assert panel["kept_groups"] == names
                union = (output.mask_logits[b][t] > 0) | first_batch.gt_masks[b][t]
                intersection = (output.mask_logits[b][t] > 0) & first_batch.gt_masks[b][t]
                assert panel["iou"] == pytest.approx(float(intersection.sum() / union.sum()))


def test_pngs_open_and_tensorboard_holds_every_panel(retention_run, first_batch):
    folder, panels = retention_run
    # LiteLVLM gets the paper's four panels, one figure per sample with a row per sentence; the others three.
    assert {p["layout"] for p in panels if p["configuration"] == "litelvlm@64"} == {"four"}
    assert {p["layout"] for p in panels if p["configuration"] != "litelvlm@64"} == {"three"}
    for b, sample_id in enumerate(int(i) for i in first_batch.sample_ids[:NUM_SAMPLES]):
        four = {p["png"] for p in panels if p["sample_id"] == sample_id and p["layout"] == "four"}
        assert four == {f"val_sample{sample_id:06d}_litelvlm@64.png"}
        with Image.open(folder / four.pop()) as image:  # four panels side by side, a row per sentence
            assert image.size[0] > 1000 and image.size[1] > 250 * len(first_batch.expressions[b])
    for panel in panels:
        with Image.open(folder / panel["png"]) as image:
            assert image.size[0] > 500 and image.size[1] > 200
    accumulator = EventAccumulator(str(folder.parent), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["images"]
    assert len(tags) == len({p["png"] for p in panels})
    assert "retention/litelvlm@64/val_sample{}".format(panels[0]["sample_id"]) in tags
    assert "retention/vispruner@64/val_sample{}_sentence0".format(panels[0]["sample_id"]) in tags


def test_an_encoders_only_run_is_refused_with_one_line():
    """Nothing is grounded in an encoders-only run: the visualiser says so instead of drawing nothing."""
    from types import SimpleNamespace

    from litelvlm.analysis import TokenRetentionVisualizer
    from litelvlm.analysis.reversal import StudyError

    with pytest.raises(StudyError, match="model.encoders_only"):
        TokenRetentionVisualizer().setup(SimpleNamespace(), SimpleNamespace(encoders_only=True), "validate")


# ------------------------------------------------------------------ the pre-LLM baselines, merged tokens included
BASELINES = ("fastervlm", "divprune", "cdpruner", "visionzip")


@pytest.fixture(scope="module")
def baselines_run(tmp_path_factory):
    from litelvlm.cli import main

    save_dir = tmp_path_factory.mktemp("retention_baselines")
    pruners = save_dir / "pruners.yaml"
    pruners.write_text("model:\n  pruners:\n" + "".join(
        f"    - class_path: {name}\n      init_args:\n        num_tokens: 64\n" for name in BASELINES))
    with mock.patch.object(sys, "argv", ["litelvlm.cli"]):
        main(["validate", "--config", str(REPO / "configs/studies/visualize.yaml"), "--config", str(pruners),
              "--trainer.limit_val_batches", "1", "--data.batch_size", "1",
              "--trainer.callbacks.init_args.num_samples", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(save_dir)])
    [folder] = save_dir.rglob("retention")
    return folder, [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def test_the_visualiser_draws_all_four_baselines_with_what_the_model_fed_the_llm(baselines_run, tiny_model):
    from litelvlm.data.datamodule import ReferringDataModule
    from litelvlm.pruners import build_pruner

    folder, panels = baselines_run
    data = ReferringDataModule(batch_size=1, max_sentences=3)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    pruners = {f"{name}@64": build_pruner(name, num_tokens=64) for name in BASELINES}
    with torch.no_grad():
        shared = tiny_model.encode(batch, list(pruners.values()))
        outputs = {name: tiny_model.ground(batch, shared, pruner) for name, pruner in pruners.items()}
    assert {p["configuration"] for p in panels} == set(pruners)
    for panel in panels:
        output = outputs[panel["configuration"]]
        members = [row.nonzero().flatten().tolist() for row in output.token_members[0]]
        assert panel["token_patches"] == members and panel["R"] == 64 and panel["layout"] == "three"
        assert panel["kept_groups"] == [output.group_names[g] for g in output.kept_groups[0].tolist()]
        with Image.open(folder / panel["png"]) as image:
            assert image.size[0] > 500 and image.size[1] > 200
        if panel["configuration"] == "visionzip@64":  # [CLS] (no patch), 53 patches, 10 merged tokens over the rest
            assert panel["kept_indices"] is None and members[0] == []
            assert panel["group_counts"] == {"dominant": 54, "contextual": 10}
            assert sorted(i for token in members for i in token) == list(range(576)) == list(range(panel["patches_shown"]))
        else:
            assert panel["kept_indices"] == output.kept_indices[0].tolist() and panel["patches_shown"] == 64
