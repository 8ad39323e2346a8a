"""The LightningModule: run the pruned frozen LVLM on a batch and update the IoU metrics. Nothing else."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from litelvlm.engine.metrics import ReferringIoU
from litelvlm.models.batch import GroundingBatch, GroundingOutput
from litelvlm.models.loading import load_lvlm
from litelvlm.pruners.base import TokenPruner
from litelvlm.pruners.simple import NoPruning


class ReferringSegmentationModule(L.LightningModule):
    """Evaluate a pruning strategy on a frozen pixel-grounding LVLM.

    Args:
        checkpoint: a model preset with random weights (`tiny-glamm`) or a released checkpoint.
        pruner: the pruning strategy and its budget (None: no pruning).
        dtype: weights' dtype, `float32`, `bfloat16` or `float16`.
        seg_prompt_position: `before` (reference: the state just before each [SEG] prompts SAM) or `at`.
        seed: seeds the random weights of a preset; the same seed gives the same model everywhere.
    """

    def __init__(
        self,
        checkpoint: str = "tiny-glamm",
        pruner: TokenPruner | None = None,
        dtype: str = "float32",
        seg_prompt_position: str = "before",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.pruner = pruner if pruner is not None else NoPruning()
        # The pruner is logged by name and knobs; TensorBoard keeps only the first hparams record.
        self.save_hyperparameters(
            {"checkpoint": checkpoint, "dtype": dtype, "seg_prompt_position": seg_prompt_position, "seed": seed}
            | self.pruner.hparams()
        )
        self.lvlm = load_lvlm(checkpoint, dtype=dtype, seed=seed, seg_prompt_position=seg_prompt_position)
        self.lvlm.requires_grad_(False).eval()
        self.pruner.budget(self.lvlm.num_patches)  # fail now, with a clear message, on a budget out of range
        self.split_names = ["val"]
        self.split_metrics = nn.ModuleList([ReferringIoU()])
        self.last_results: dict | None = None
        self._skipped: list[dict] = []

    @property
    def random_weights(self) -> bool:
        return bool(getattr(self.lvlm, "random_weights", False))

    def forward(self, batch: GroundingBatch) -> GroundingOutput:
        return self.lvlm(batch, self.pruner)

    def setup(self, stage: str) -> None:
        """One metric per evaluated split (the data module may hold several)."""
        names = getattr(getattr(self.trainer, "datamodule", None), "split_names", None) or ["val"]
        self.split_names = list(names)
        self.split_metrics = nn.ModuleList(ReferringIoU() for _ in self.split_names)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> GroundingOutput | None:
        return self._evaluate(batch, "val", dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> GroundingOutput | None:
        return self._evaluate(batch, "test", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _prefix(self, stage: str, split_index: int) -> str:
        """`val/...` for one split; `val/<split>/...` when a run evaluates several."""
        return stage if len(self.split_names) == 1 else f"{stage}/{self.split_names[split_index]}"

    def _evaluate(self, batch: GroundingBatch | list[dict], stage: str, split_index: int) -> GroundingOutput | None:
        if isinstance(batch, list):  # every sample of this batch was skipped (skip mode)
            self._skipped.extend({**item, "split": self.split_names[split_index]} for item in batch)
            return None
        self._skipped.extend({**item, "split": self.split_names[split_index]} for item in batch.skipped)
        output = self(batch)
        metric = self.split_metrics[split_index]
        for logits, target in zip(output.mask_logits, batch.gt_masks):
            metric.update(logits > 0, target)
        self.log(
            f"{self._prefix(stage, split_index)}/visual_tokens",
            float(output.num_visual_tokens),
            batch_size=batch.batch_size,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            add_dataloader_idx=False,
        )
        return output

    def _finish(self, stage: str) -> None:
        skipped = self._all_skipped()
        rows = []
        for split_index, (name, metric) in enumerate(zip(self.split_names, self.split_metrics)):
            values = metric.compute() if metric.update_called else {"ciou": 0.0, "giou": float("nan"), "num_masks": 0}
            metric.reset()
            prefix = self._prefix(stage, split_index)
            for key in ("ciou", "giou", "num_masks"):
                self.log(f"{prefix}/{key}", float(values[key]), sync_dist=False, add_dataloader_idx=False)
            rows.append(
                {
                    "stage": stage,
                    "split": name,
                    **self.pruner.hparams(),
                    "ciou": float(values["ciou"]),
                    "giou": float(values["giou"]),
                    "num_samples": int(values["num_masks"]),
                    "checkpoint": self.hparams.checkpoint,
                    "random_weights": self.random_weights,
                    "skipped": [item for item in skipped if item.get("split") == name],
                }
            )
        self.last_results = rows[0] if len(rows) == 1 else rows
        self._skipped = []

    def _all_skipped(self) -> list[dict]:
        """Skipped samples of the whole run: found while indexing, plus those of every rank's batches."""
        datamodule = getattr(self.trainer, "datamodule", None)
        found_at_load = self._skipped
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self._skipped)
            found_at_load = [item for rank_items in gathered for item in rank_items]
        found_at_index = []
        if hasattr(datamodule, "skipped_in"):
            for split_index, name in enumerate(self.split_names):
                found_at_index += [{**item, "split": name} for item in datamodule.skipped_in(split_index)]
        return found_at_index + sorted(found_at_load, key=lambda item: str(item.get("index")))

    def configure_optimizers(self):  # evaluation only in this module; fine-tuning has its own
        return None

    @torch.no_grad()
    def predict_step(self, batch: GroundingBatch, batch_idx: int) -> GroundingOutput:
        return self(batch)
