"""Token retention panels: which patches each pruner kept, by which of its rules, next to the masks.

Two layouts. `three`: one panel per (sample, sentence, configuration): the CLIP-branch view of the
image (the crop the pruner saw) with every kept patch filled and outlined in its group's colour
(LiteLVLM: similarity-aware / context-aware; VisPruner: important / diverse; FastV: kept at layer
K; VisionZip: dominant / contextual; SparseVLM: kept / recycled; a merged token's member patches filled in its
colour, outlined dashed, with a dot at their centre) and the pruned patches dimmed; beside it the predicted and the ground-truth mask on the original
image. `four` (the paper's figure, the default for LiteLVLM and its ablations): one figure per
(sample, configuration), one row per sentence titled by it: the input image, the first group's
tokens (similarity-aware), the second group's (context-aware), the output mask, with the tokens
mapped back onto the original frame through the CLIP resize and centre crop.

Everything comes from the evaluation step's output (`EvaluatedBatch`) and the batch: the callback
never runs the model. Each figure is a PNG under `<log dir>/retention/` with a JSON per sentence it
shows, named by split, sample id, (sentence) and configuration, so DDP ranks (each drawing the first
`num_samples` samples it sees) never write the same file.
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
from litelvlm.models.image_processing import CLIP_MEAN, CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD, clip_crop_geometry

GROUP_COLOURS = ("tab:orange", "tab:cyan", "tab:purple", "tab:olive", "tab:pink", "tab:brown")
PRUNED_BRIGHTNESS = 0.3  # pruned patches keep this share of their brightness
KEPT_FILL_ALPHA = 0.35  # a kept patch is this much its group's colour
MASK_COLOUR = (1.0, 0.0, 1.0)  # magenta: tint and outline of a mask, rare in natural images
MASK_TINT = 0.3
LAYOUTS = ("auto", "three", "four")
FOUR_PANEL_FIRST_GROUP = "similarity-aware"  # `auto` draws four panels for pruners whose first group this is


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


def retention_overlay(image: np.ndarray, kept: list, groups: list[int], grid: tuple[int, int]) -> np.ndarray:
    """`image` [S, S, 3] with pruned patch cells dimmed and each kept cell tinted by its group's colour.

    `kept`: per token, its patch index, or the list of patches it stands for (a merged token: every
    member cell takes the token's colour). Patch `i` is the cell at row `i // grid_w`, column
    `i % grid_w` (raster order, as the CLIP patches).
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
    for token, group in zip(kept, groups):
        cells = [token] if isinstance(token, int) else list(token)
        scale[cells] = 1.0
        tint[cells] = to_rgb(group_colour(group))
        alpha[cells] = KEPT_FILL_ALPHA
    to_pixels = lambda cells: cells.reshape(grid_h, grid_w, -1).repeat(cell_h, 0).repeat(cell_w, 1)  # noqa: E731
    return image * to_pixels(scale) * (1 - to_pixels(alpha)) + to_pixels(tint) * to_pixels(alpha)


def patch_boxes_on_original(orig_h: int, orig_w: int, size: int, patch: int) -> np.ndarray:
    """float64 [N, 4]: each CLIP patch's (top, left, bottom, right) on the original frame, raster order.

    The inverse of the CLIP geometry (shortest side to `size`, centre crop; the same geometry the
    reversal study puts masks through): a crop pixel edge e lies at resized edge e + crop offset, and a
    resized edge r at original edge r * original / resized (PIL maps pixel edges linearly).
    """
    resized_h, resized_w, top, left = clip_crop_geometry(orig_h, orig_w, size)
    grid = size // patch
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    scale_h, scale_w = orig_h / resized_h, orig_w / resized_w
    return np.stack([(rows * patch + top) * scale_h, (cols * patch + left) * scale_w,
                     ((rows + 1) * patch + top) * scale_h, ((cols + 1) * patch + left) * scale_w], axis=1)


def token_pixels(indices: list[int], boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: the original-frame pixels whose centres fall inside the boxes of `indices`."""
    covered = np.zeros(shape, dtype=bool)
    for top, left, bottom, right in boxes[list(indices)]:
        # pixel y spans [y, y + 1); its centre y + 0.5 is in [top, bottom) for y in [ceil(top - .5), ceil(bottom - .5))
        rows = slice(int(np.ceil(top - 0.5)), int(np.ceil(bottom - 0.5)))
        cols = slice(int(np.ceil(left - 0.5)), int(np.ceil(right - 0.5)))
        covered[rows, cols] = True
    return covered


def tokens_on_original(image: np.ndarray, indices: list[int], colour: str, boxes: np.ndarray) -> np.ndarray:
    """`image` [H, W, 3] with the pixels of the `indices` patches tinted in `colour` and the rest dimmed
    (as `retention_overlay` does on the crop)."""
    from matplotlib.colors import to_rgb

    inside = token_pixels(indices, boxes, image.shape[:2])[..., None]
    tinted = image * (1 - KEPT_FILL_ALPHA) + np.asarray(to_rgb(colour)) * KEPT_FILL_ALPHA
    return np.where(inside, tinted, image * PRUNED_BRIGHTNESS)


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` [H, W, 3] dimmed outside `mask` [H, W] (as pruned patches are) and tinted inside it."""
    inside = image * (1 - MASK_TINT) + np.asarray(MASK_COLOUR) * MASK_TINT
    return np.where(mask[..., None], inside, image * PRUNED_BRIGHTNESS)


def group_colour(group: int) -> str:
    return GROUP_COLOURS[group % len(GROUP_COLOURS)]


def retained(output: GroundingOutput, b: int) -> tuple[list[list[int]], list[int], str]:
    """Sample `b`'s visual tokens as the patches each stands for (in the order the model reports them: a
    kept patch `[i]`, a merged token its members, [CLS] `[]`), their group labels, and where the
    selection acted (`before the LLM` / `inside the LLM`)."""
    if output.token_members is not None:
        tokens = [row.nonzero().flatten().tolist() for row in output.token_members[b].cpu()]
        where = "before the LLM"
    elif output.kept_indices is not None:
        tokens, where = [[i] for i in output.kept_indices[b].tolist()], "before the LLM"
    elif output.llm_kept_indices is not None:  # a token merged inside the LLM (id -1): its member patches
        patches = output.llm_visual_patches
        tokens = [[i] if i >= 0 else patches[b, v].nonzero().flatten().tolist()
                  for v, i in enumerate(output.llm_kept_indices[b].tolist())]
        where = "inside the LLM"
    else:
        raise StudyError("the model's output records no kept tokens (no token_members, kept_indices or llm_kept_indices)")
    if output.kept_groups is None:
        raise StudyError("the model's output records no group labels (kept_groups is None)")
    return tokens, output.kept_groups[b].tolist(), where


def figure_pixels(fig) -> np.ndarray:
    """RGB uint8 [h, w, 3] of a drawn figure; closes it."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _pyplot().close(fig)
    return pixels


def draw_mask(ax, image: np.ndarray, mask: np.ndarray, title: str) -> None:
    """`mask` on `image`: outside dimmed, inside tinted and outlined in magenta."""
    ax.imshow(mask_overlay(image, mask))
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[MASK_COLOUR], linewidths=1.0)
    ax.set_title(title, fontsize=9)


def four_panel_figure(original: np.ndarray, boxes: np.ndarray, sentences: list[dict], predictions: list[np.ndarray],
                      dpi: int = 100):
    """The paper's figure: one row per sentence record (titled by its expression), four panels each:
    input image | first group's tokens | second group's tokens | output mask (all on the original frame).

    Each record holds `kept_indices`, `kept_groups`, `group_names`, `iou` and `expression`;
    `predictions` are the bool [H, W] output masks. Returns the matplotlib figure.
    """
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    height, width = original.shape[:2]
    panel = 3.2  # inches per panel's width
    fig = plt.figure(figsize=(4 * panel + 0.4, len(sentences) * (panel * height / width + 0.6)), dpi=dpi,
                     layout="constrained")
    rows = fig.subfigures(len(sentences), 1, squeeze=False)[:, 0]
    for row, record, prediction in zip(rows, sentences, predictions):
        axes = row.subplots(1, 4)
        names = record["group_names"]
        axes[0].imshow(original)
        axes[0].set_title("input image", fontsize=9)
        for column, group in ((1, 0), (2, 1)):
            ax = axes[column]
            if group >= len(names):
                ax.imshow(original * PRUNED_BRIGHTNESS)
                ax.set_title("(no second group)", fontsize=9)
                continue
            tokens = [t for t, g in zip(record_tokens(record), record["kept_groups"]) if g == names[group]]
            indices = [i for token in tokens for i in token]  # a merged token: all its member patches
            ax.imshow(tokens_on_original(original, indices, group_colour(group), boxes))
            for top, left, bottom, right in boxes[indices]:
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                       edgecolor=group_colour(group), linewidth=0.6))
            ax.set_title(f"{names[group]} tokens ({len(tokens)})", fontsize=9)
        draw_mask(axes[3], original, prediction, f"output mask (IoU {record['iou']:.2f})")
        for ax in axes:
            ax.set_axis_off()
        row.suptitle(textwrap.fill(f'"{record["expression"]}"', width=100), fontsize=10)
    return fig


def record_tokens(record: dict) -> list[list[int]]:
    """A panel record's tokens as the patches each stands for (records of one patch per token may hold
    only `kept_indices`)."""
    if record.get("token_patches") is not None:
        return record["token_patches"]
    return [[i] for i in record["kept_indices"]]


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
        layout: `four` (the paper's figure per sample and configuration, a row per sentence),
            `three` (a panel per sentence: crop with tokens, prediction, ground truth), or `auto`:
            four for pruners whose first group is similarity-aware (LiteLVLM and its ablations).
    """

    def __init__(self, num_samples: int = 4, folder: str = "retention", dpi: int = 100, layout: str = "auto") -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise StudyError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise StudyError(f"folder must be a relative sub-folder name of the log folder, got {folder!r}")
        if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 10:
            raise StudyError(f"dpi must be an integer >= 10, got {dpi!r}")
        if layout not in LAYOUTS:
            raise StudyError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        self.num_samples, self.folder, self.dpi, self.layout = num_samples, folder, dpi, layout
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
        vision = pl_module.lvlm.config.vision
        self.output_dir.mkdir(parents=True, exist_ok=True)
        writers = tensorboard_writers(trainer)
        mask_offset = 0
        for b in range(batch.batch_size):
            num_masks = batch.gt_masks[b].shape[0]
            if self.drawn < self.num_samples:
                for name, output in outputs.outputs.items():
                    scores = outputs.scores[name]
                    records = [self._panel_record(outputs, batch, b, t, name, output, scores, mask_offset + t, grid)
                               for t in range(num_masks)]
                    if not records:
                        continue
                    if self.layout_of(output) == "three":
                        for t, record in enumerate(records):
                            self._save([record], self._draw_panel(batch, b, t, output, record), writers,
                                       trainer.global_step)
                        continue
                    stem = f"{outputs.split}_sample{outputs.sample_ids[b]:06d}_{safe_filename(name)}"
                    for record in records:
                        record.update(layout="four", png=f"{stem}.png")
                    self._save(records, self._draw_four(batch, b, output, records, vision), writers,
                               trainer.global_step)
                self.drawn += 1
            mask_offset += num_masks
        for writer in writers:
            writer.flush()

    def layout_of(self, output: GroundingOutput) -> str:
        """`three` or `four` for a configuration's output (`auto` decides by the pruner's groups)."""
        if self.layout != "auto":
            return self.layout
        return "four" if output.group_names[:1] == (FOUR_PANEL_FIRST_GROUP,) else "three"

    def _draw_four(self, batch: GroundingBatch, b: int, output: GroundingOutput, records: list[dict],
                   vision) -> np.ndarray:
        """The four-panel figure of sample `b` (a row per sentence) as RGB uint8 [h, w, 3]."""
        original = original_view(batch.sam_pixel_values[b], batch.sam_resized_sizes[b], batch.original_sizes[b])
        boxes = patch_boxes_on_original(original.shape[0], original.shape[1], vision.image_size, vision.patch_size)
        predictions = [(output.mask_logits[b][t] > 0).cpu().numpy() for t in range(len(records))]
        return figure_pixels(four_panel_figure(original, boxes, records, predictions, self.dpi))

    def _panel_record(self, outputs, batch, b, t, name, output, scores, mask_index, grid) -> dict:
        tokens, groups, where = retained(output, b)
        one_patch_each = all(len(token) == 1 for token in tokens)
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
            "R": len(tokens),
            "num_patches": grid[0] * grid[1],
            "grid": list(grid),
            # per token its patch (null when some token is merged or stands for none, e.g. [CLS])
            "kept_indices": [token[0] for token in tokens] if one_patch_each else None,
            "token_patches": tokens,  # per token, the patches it stands for
            "patches_shown": len({i for token in tokens for i in token}),
            "kept_groups": [group_names[g] for g in groups],
            "group_names": group_names,
            "group_counts": {group: groups.count(i) for i, group in enumerate(group_names)},
            "iou": intersection / union if union else 1.0,
            "layout": "three",
            "png": f"{stem}.png",
            "json": f"{stem}.json",
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

        tokens = record_tokens(record)
        fig, axes = plt.subplots(1, 3, figsize=(13, 5), dpi=self.dpi)
        axes[0].imshow(retention_overlay(clip_image, tokens, groups, (grid_h, grid_w)))
        for token, group in zip(tokens, groups):
            if len(token) == 1:
                row, col = divmod(token[0], grid_w)
                axes[0].add_patch(Rectangle((col * cell - 0.5, row * cell - 0.5), cell, cell, fill=False,
                                            edgecolor=group_colour(group), linewidth=0.8))
            elif token:  # a merged token over its members: their outline, dashed, and a dot at their centre
                cells = np.zeros(grid_h * grid_w, dtype=np.float32)
                cells[token] = 1.0
                region = cells.reshape(grid_h, grid_w).repeat(cell, 0).repeat(cell, 1)
                axes[0].contour(region, levels=[0.5], colors=[group_colour(group)], linewidths=0.8, linestyles="dashed")
                rows, cols = np.divmod(np.asarray(token), grid_w)
                axes[0].plot((cols.mean() + 0.5) * cell - 0.5, (rows.mean() + 0.5) * cell - 0.5, "o", markersize=3,
                             color=group_colour(group))
        axes[0].set_title(f"{record['configuration']}: {record['R']} tokens over {record['patches_shown']} of "
                          f"{record['num_patches']} patches, {record['selected']}", fontsize=9)
        draw_mask(axes[1], original, prediction, f"prediction (IoU {record['iou']:.2f})")
        draw_mask(axes[2], original, target, "ground truth")
        for ax in axes:
            ax.set_axis_off()
        handles = [Patch(color=group_colour(i), label=f"{name}: {record['group_counts'][name]}")
                   for i, name in enumerate(record["group_names"])]
        handles.append(Patch(facecolor=(0.2, 0.2, 0.2), label=f"pruned: {record['num_patches'] - record['patches_shown']}"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
        title = textwrap.fill(f'"{record["expression"]}"', width=110)
        where = f"{record['split']} sample {record['sample_id']}, sentence {record['sentence']}"
        fig.suptitle(f"{title}\n{where}", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.93))
        return figure_pixels(fig)

    def _save(self, records: list[dict], pixels: np.ndarray, writers: list, step: int) -> None:
        """One PNG (and TensorBoard image) holding `records`' sentences; a JSON per sentence."""
        first = records[0]
        Image.fromarray(pixels).save(self.output_dir / first["png"])
        for record in records:
            (self.output_dir / record["json"]).write_text(json.dumps(record, indent=2) + "\n")
        panel = f"{first['split']}_sample{first['sample_id']}"
        if first["layout"] == "three":
            panel += f"_sentence{first['sentence']}"
        for writer in writers:
            writer.add_image(f"retention/{first['configuration']}/{panel}", pixels, step, dataformats="HWC")
        self.panels.extend(records)
