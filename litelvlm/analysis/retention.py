"""Token retention panels: which patches each pruner kept, by which of its rules, next to the masks.

One panel per (sample, sentence, configuration): the CLIP-branch view of the image (the crop the
pruner saw) with every kept patch filled and outlined in its group's colour (LiteLVLM:
similarity-aware / context-aware; VisPruner: important / diverse; FastV: kept at layer K) and the
pruned patches dimmed; beside it the predicted and the ground-truth mask on the original image.

Everything comes from the evaluation step's output (`EvaluatedBatch`) and the batch: the callback
never runs the model. Each panel is a PNG plus a JSON of the same name under
`<log dir>/retention/`, named by split, sample id, sentence and configuration, so DDP ranks (each
drawing the first `num_samples` samples it sees) never write the same file.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor

from litelvlm.analysis.reversal import StudyError, _pyplot, study_folder, tensorboard_writers
from litelvlm.models.batch import GroundingBatch, GroundingOutput
from litelvlm.models.image_processing import CLIP_MEAN, CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD

GROUP_COLOURS = ("tab:orange", "tab:cyan", "tab:purple", "tab:olive", "tab:pink", "tab:brown")
PRUNED_BRIGHTNESS = 0.3  # pruned patches keep this share of their brightness
KEPT_FILL_ALPHA = 0.35  # a kept patch is this much its group's colour
MASK_COLOUR = (1.0, 0.0, 1.0)  # magenta: tint and outline of a mask, rare in natural images
MASK_TINT = 0.3


def clip_view(clip_pixel_values: Tensor) -> np.ndarray:
    """float [S, S, 3] in [0, 1]: the CLIP input un-normalised, i.e. the resized, centre-cropped image."""
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    pixels = clip_pixel_values.detach().float().cpu() * std + mean
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def original_view(sam_pixel_values: Tensor, resized_size: Tensor, original_size: Tensor) -> np.ndarray:
    """float [H, W, 3] in [0, 1]: the SAM input un-normalised, unpadded and resized back to the
    original size, so it lines up pixel for pixel with the masks (which are at the original size)."""
    mean = torch.tensor(SAM_PIXEL_MEAN)[:, None, None]
    std = torch.tensor(SAM_PIXEL_STD)[:, None, None]
    resized_h, resized_w = (int(v) for v in resized_size)
    height, width = (int(v) for v in original_size)
    pixels = sam_pixel_values.detach().float().cpu()[:, :resized_h, :resized_w] * std + mean
    pixels = F.interpolate(pixels[None] / 255.0, (height, width), mode="bilinear", align_corners=False)[0]
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def retention_overlay(image: np.ndarray, kept: list[int], groups: list[int], grid: tuple[int, int]) -> np.ndarray:
    """`image` [S, S, 3] with pruned patch cells dimmed and each kept cell tinted by its group's colour.

    Patch `i` is the cell at row `i // grid_w`, column `i % grid_w` (raster order, as the CLIP patches).
    """
    from matplotlib.colors import to_rgb

    grid_h, grid_w = grid
    if image.shape[0] % grid_h or image.shape[1] % grid_w:
        raise StudyError(f"image {image.shape[:2]} is not a whole number of {grid_h} x {grid_w} patch cells")
    cell_h, cell_w = image.shape[0] // grid_h, image.shape[1] // grid_w
    # Per cell: brightness factor and tint; expanded to pixels by repeating each cell.
    scale = np.full((grid_h * grid_w, 1), PRUNED_BRIGHTNESS)
    tint = np.zeros((grid_h * grid_w, 3))
    alpha = np.zeros((grid_h * grid_w, 1))
    for index, group in zip(kept, groups):
        scale[index] = 1.0
        tint[index] = to_rgb(group_colour(group))
        alpha[index] = KEPT_FILL_ALPHA
    to_pixels = lambda cells: cells.reshape(grid_h, grid_w, -1).repeat(cell_h, 0).repeat(cell_w, 1)  # noqa: E731
    return image * to_pixels(scale) * (1 - to_pixels(alpha)) + to_pixels(tint) * to_pixels(alpha)


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` [H, W, 3] dimmed outside `mask` [H, W] (as pruned patches are) and tinted inside it."""
    inside = image * (1 - MASK_TINT) + np.asarray(MASK_COLOUR) * MASK_TINT
    return np.where(mask[..., None], inside, image * PRUNED_BRIGHTNESS)


def group_colour(group: int) -> str:
    return GROUP_COLOURS[group % len(GROUP_COLOURS)]


def retained(output: GroundingOutput, b: int) -> tuple[list[int], list[int], str]:
    """Sample `b`'s kept patch indices (in the order the model reports them), their group labels, and
    where the selection acted (`before the LLM` / `inside the LLM`)."""
    if output.kept_indices is not None:
        kept, where = output.kept_indices[b], "before the LLM"
    elif output.llm_kept_indices is not None:
        kept, where = output.llm_kept_indices[b], "inside the LLM"
    else:
        raise StudyError("the model's output records no kept indices (neither kept_indices nor llm_kept_indices)")
    if output.kept_groups is None:
        raise StudyError("the model's output records no group labels (kept_groups is None)")
    return kept.tolist(), output.kept_groups[b].tolist(), where


def safe_filename(text: str) -> str:
    """A configuration name as a file name: letters, digits and `.@-` kept, anything else `_`."""
    return re.sub(r"[^A-Za-z0-9.@-]+", "_", text).strip("_")


class TokenRetentionVisualizer(L.Callback):
    """Draws token-retention panels for the first `num_samples` samples of a validate/test run.

    Args:
        num_samples: samples drawn per process (each with every sentence and configuration),
            counted over the run in data order; under DDP each rank draws its own first samples.
        folder: sub-folder of the run's log folder that receives the PNG + JSON pairs.
        dpi: resolution of the PNGs.
    """

    def __init__(self, num_samples: int = 4, folder: str = "retention", dpi: int = 100) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise StudyError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise StudyError(f"folder must be a relative sub-folder name of the log folder, got {folder!r}")
        if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 10:
            raise StudyError(f"dpi must be an integer >= 10, got {dpi!r}")
        self.num_samples, self.folder, self.dpi = num_samples, folder, dpi
        self.drawn = 0  # samples drawn by this process in this run
        self.panels: list[dict] = []  # the JSON records written by this process
        self.output_dir: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(pl_module, "encoders_only", False):
            raise StudyError("TokenRetentionVisualizer draws predicted masks, which model.encoders_only skips: set it false")
        self.drawn, self.panels = 0, []

    def _resolve_folder(self, trainer, pl_module) -> None:
        # `trainer.log_dir` broadcasts under DDP: resolved at epoch start, where every rank arrives.
        self.output_dir = study_folder(trainer) / self.folder

    on_validation_epoch_start = _resolve_folder
    on_test_epoch_start = _resolve_folder

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._draw_batch(trainer, pl_module, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._draw_batch(trainer, pl_module, outputs, batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._report()

    def on_test_end(self, trainer, pl_module) -> None:
        self._report()

    def _report(self) -> None:
        if self.panels:
            rank_zero_info(f"token retention panels written to {self.output_dir}")

    # ------------------------------------------------------------------ drawing
    def _draw_batch(self, trainer, pl_module, outputs, batch) -> None:
        if trainer.sanity_checking or self.drawn >= self.num_samples:
            return
        if outputs is None or not isinstance(batch, GroundingBatch):  # every sample skipped or already recorded
            return
        if not hasattr(outputs, "outputs") or not hasattr(outputs, "scores"):
            raise StudyError(f"TokenRetentionVisualizer reads EvaluatedBatch outputs, got {type(outputs).__name__}")
        grid = tuple(pl_module.lvlm.config.grid)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        writers = tensorboard_writers(trainer)
        mask_offset = 0
        for b in range(batch.batch_size):
            num_masks = batch.gt_masks[b].shape[0]
            if self.drawn < self.num_samples:
                for t in range(num_masks):
                    for index, (name, output) in enumerate(outputs.outputs.items()):
                        scores = outputs.scores[name]
                        record = self._panel_record(outputs, batch, b, t, name, output, scores, mask_offset + t, grid)
                        pixels = self._draw_panel(batch, b, t, output, record)
                        self._save(record, pixels, writers, trainer.global_step)
                self.drawn += 1
            mask_offset += num_masks
        for writer in writers:
            writer.flush()

    def _panel_record(self, outputs, batch, b, t, name, output, scores, mask_index, grid) -> dict:
        kept, groups, where = retained(output, b)
        group_names = list(output.group_names)  # labels index into them: the model checked that
        intersection, union = int(scores.intersection[mask_index]), int(scores.union[mask_index])
        sample_id = outputs.sample_ids[b]
        sentence_ids = outputs.sentence_ids[b]
        stem = f"{outputs.split}_sample{sample_id:06d}_sentence{t}_{safe_filename(name)}"
        return {
            "split": outputs.split,
            "sample_id": sample_id,
            "image_id": outputs.image_ids[b],
            "sentence": t,
            "sentence_id": sentence_ids[t] if t < len(sentence_ids) else None,
            "expression": batch.expressions[b][t],
            "question": batch.questions[b][t],
            "configuration": name,
            "selected": where,
            "R": len(kept),
            "num_patches": grid[0] * grid[1],
            "grid": list(grid),
            "kept_indices": kept,
            "kept_groups": [group_names[g] for g in groups],
            "group_names": group_names,
            "group_counts": {group: groups.count(i) for i, group in enumerate(group_names)},
            "iou": intersection / union if union else 1.0,
            "png": f"{stem}.png",
        }

    def _draw_panel(self, batch: GroundingBatch, b: int, t: int, output: GroundingOutput, record: dict) -> np.ndarray:
        """The panel as RGB uint8 [h, w, 3]."""
        from matplotlib.patches import Patch, Rectangle

        plt = _pyplot()
        grid_h, grid_w = record["grid"]
        groups = [record["group_names"].index(g) for g in record["kept_groups"]]
        clip_image = clip_view(batch.clip_pixel_values[b])
        cell = clip_image.shape[0] // grid_h
        original = original_view(batch.sam_pixel_values[b], batch.sam_resized_sizes[b], batch.original_sizes[b])
        prediction = (output.mask_logits[b][t] > 0).cpu().numpy()
        target = batch.gt_masks[b][t].bool().cpu().numpy()

        fig, axes = plt.subplots(1, 3, figsize=(13, 5), dpi=self.dpi)
        axes[0].imshow(retention_overlay(clip_image, record["kept_indices"], groups, (grid_h, grid_w)))
        for index, group in zip(record["kept_indices"], groups):
            row, col = divmod(index, grid_w)
            axes[0].add_patch(Rectangle((col * cell - 0.5, row * cell - 0.5), cell, cell, fill=False,
                                        edgecolor=group_colour(group), linewidth=0.8))
        axes[0].set_title(f"{record['configuration']}: {record['R']} of {record['num_patches']} patches, "
                          f"{record['selected']}", fontsize=9)
        for ax, mask, title in (
            (axes[1], prediction, f"prediction (IoU {record['iou']:.2f})"),
            (axes[2], target, "ground truth"),
        ):
            ax.imshow(mask_overlay(original, mask))
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[MASK_COLOUR], linewidths=1.0)
            ax.set_title(title, fontsize=9)
        for ax in axes:
            ax.set_axis_off()
        handles = [Patch(color=group_colour(i), label=f"{name}: {record['group_counts'][name]}")
                   for i, name in enumerate(record["group_names"])]
        handles.append(Patch(facecolor=(0.2, 0.2, 0.2), label=f"pruned: {record['num_patches'] - record['R']}"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
        title = textwrap.fill(f'"{record["expression"]}"', width=110)
        where = f"{record['split']} sample {record['sample_id']}, sentence {record['sentence']}"
        fig.suptitle(f"{title}\n{where}", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.93))
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return pixels

    def _save(self, record: dict, pixels: np.ndarray, writers: list, step: int) -> None:
        png = self.output_dir / record["png"]
        Image.fromarray(pixels).save(png)
        png.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        panel = f"{record['split']}_sample{record['sample_id']}_sentence{record['sentence']}"
        tag = f"retention/{record['configuration']}/{panel}"
        for writer in writers:
            writer.add_image(tag, pixels, step, dataformats="HWC")
        self.panels.append(record)
