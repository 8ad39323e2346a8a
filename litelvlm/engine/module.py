"""The LightningModule: run the pruned frozen LVLM on a batch and update the IoU metrics. Nothing else.

A run evaluates one pruner, or several (a sweep): per batch the pruner-independent encoders (CLIP
vision, CLIP text if needed, SAM image encoder) run once, then each configuration selects, runs the
LLM and decodes its masks. Each (split, configuration) has its own metric.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from litelvlm.engine.scores import ExactReferringIoU, MaskScores, score_masks
from litelvlm.engine.sweep import SweepGrid, collect_pruners, configuration_names
from litelvlm.models.batch import GroundingBatch, GroundingOutput
from litelvlm.models.loading import load_lvlm
from litelvlm.pruners.base import TokenPruner
from litelvlm.pruners.simple import NoPruning


@dataclass
class EvaluatedBatch:
    """What one evaluation step hands to callbacks: per configuration, the model's output and the mask scores.

    Masks are listed sample by sample, in each sample's sentence order. The GroundingOutput fields
    read through to the first configuration, so a callback written for one pruner reads a
    single-pruner run unchanged.
    """

    split: str
    sample_ids: list[int]
    image_ids: list[str]
    sentence_ids: list[list[str]]
    outputs: dict[str, GroundingOutput]
    scores: dict[str, MaskScores]

    @property
    def primary(self) -> GroundingOutput:
        return next(iter(self.outputs.values()))

    @property
    def mask_logits(self) -> list[torch.Tensor]:
        return self.primary.mask_logits

    @property
    def kept_indices(self) -> torch.Tensor | None:
        return self.primary.kept_indices

    @property
    def visual_tokens_per_layer(self) -> list[int]:
        return self.primary.visual_tokens_per_layer

    @property
    def sequence_length_per_layer(self) -> list[int]:
        return self.primary.sequence_length_per_layer

    @property
    def seg_hidden_states(self) -> torch.Tensor | None:
        return self.primary.seg_hidden_states

    @property
    def num_visual_tokens(self) -> int:
        return self.primary.num_visual_tokens


class ReferringSegmentationModule(L.LightningModule):
    """Evaluate pruning strategies on a frozen pixel-grounding LVLM.

    Args:
        checkpoint: a model preset with random weights (`tiny-glamm`) or a released checkpoint.
        pruner: the pruning strategy and its budget (None: no pruning), for a single-pruner run.
        pruners: a sweep: several pruner configurations evaluated in one pass over the data.
        sweep: a sweep grid, every `strategies` entry at every `budgets` entry (after `pruners`).
        dtype: weights' dtype, `float32`, `bfloat16` or `float16`.
        seg_prompt_position: `before` (reference: the state just before each [SEG] prompts SAM) or `at`.
        seed: seeds the random weights of a preset; the same seed gives the same model everywhere.
    """

    def __init__(
        self,
        checkpoint: str = "tiny-glamm",
        pruner: TokenPruner | None = None,
        pruners: list[TokenPruner] | None = None,
        sweep: SweepGrid | None = None,
        dtype: str = "float32",
        seg_prompt_position: str = "before",
        seed: int = 0,
    ) -> None:
        super().__init__()
        swept = collect_pruners(pruner, pruners, sweep)
        self.is_sweep = swept is not None
        configured = swept if self.is_sweep else [pruner if pruner is not None else NoPruning()]
        self.configuration_names = configuration_names(configured)
        self.pruners = nn.ModuleList(configured)
        self.pruner = configured[0]  # what `forward` runs; the only one outside a sweep
        model_hparams = {"checkpoint": checkpoint, "dtype": dtype, "seg_prompt_position": seg_prompt_position, "seed": seed}
        # The pruners are logged by name and knobs; TensorBoard keeps only the first hparams record.
        if self.is_sweep:
            self.save_hyperparameters(model_hparams | {"configurations": ", ".join(self.configuration_names)})
        else:
            self.save_hyperparameters(model_hparams | self.pruner.hparams())
        self.lvlm = load_lvlm(checkpoint, dtype=dtype, seed=seed, seg_prompt_position=seg_prompt_position)
        self.lvlm.requires_grad_(False).eval()
        for configured_pruner in configured:  # fail now, with a clear message, on a budget out of range
            configured_pruner.budget(self.lvlm.num_patches)
        self.split_names = ["val"]
        self.metrics = self._build_metrics()
        self.last_results: dict | list[dict] | None = None
        self._skipped: list[dict] = []

    @property
    def random_weights(self) -> bool:
        return bool(getattr(self.lvlm, "random_weights", False))

    @property
    def model_identity(self) -> dict:
        """What, besides the pruners, decides this run's numbers: the weights and how they run."""
        return {key: self.hparams[key] for key in ("checkpoint", "dtype", "seg_prompt_position", "seed")}

    def forward(self, batch: GroundingBatch) -> GroundingOutput:
        return self.lvlm(batch, self.pruner)

    def setup(self, stage: str) -> None:
        """One metric per evaluated split (the data module may hold several) and configuration."""
        names = getattr(getattr(self.trainer, "datamodule", None), "split_names", None) or ["val"]
        self.split_names = list(names)
        self.metrics = self._build_metrics()

    def _build_metrics(self) -> nn.ModuleList:
        return nn.ModuleList(ExactReferringIoU() for _ in range(len(self.split_names) * len(self.pruners)))

    def metric(self, split_index: int, configuration_index: int) -> ExactReferringIoU:
        return self.metrics[split_index * len(self.pruners) + configuration_index]

    def restore_scores(self, split: str, configuration: str, scores: MaskScores) -> None:
        """Count scores an earlier attempt of this run recorded (resume). Call on one process only:
        metric states are summed over processes."""
        metric = self.metric(self.split_names.index(split), self.configuration_names.index(configuration))
        metric.update(scores.intersection, scores.union, scores.retained_tokens)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> EvaluatedBatch | None:
        return self._evaluate(batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> EvaluatedBatch | None:
        return self._evaluate(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _prefix(self, stage: str, split_index: int, configuration: str) -> str:
        """`val[/<split>][/<configuration>]`: the split when a run evaluates several, the configuration in a sweep."""
        parts = [stage]
        if len(self.split_names) > 1:
            parts.append(self.split_names[split_index])
        if self.is_sweep:
            parts.append(configuration)
        return "/".join(parts)

    def _evaluate(self, batch: GroundingBatch | list[dict], split_index: int) -> EvaluatedBatch | None:
        split = self.split_names[split_index]
        if isinstance(batch, list):  # every sample of this batch was skipped (skip mode) or already recorded
            self._skipped.extend({**item, "split": split} for item in batch)
            return None
        self._skipped.extend({**item, "split": split} for item in batch.skipped)
        shared = self.lvlm.encode(batch, list(self.pruners))
        outputs, scores = {}, {}
        for index, (name, pruner) in enumerate(zip(self.configuration_names, self.pruners)):
            output = self.lvlm.ground(batch, shared, pruner)
            score = score_masks(output.mask_logits, batch.gt_masks, output.num_visual_tokens)
            self.metric(split_index, index).update(score.intersection, score.union, score.retained_tokens)
            outputs[name], scores[name] = output, score
        return EvaluatedBatch(
            split=split,
            sample_ids=[int(i) for i in batch.sample_ids.tolist()],
            image_ids=list(batch.image_ids),
            sentence_ids=[list(ids) for ids in batch.sentence_ids],
            outputs=outputs,
            scores=scores,
        )

    def _finish(self, stage: str) -> None:
        skipped = self._all_skipped()
        rows = []
        for split_index, split in enumerate(self.split_names):
            for index, (name, pruner) in enumerate(zip(self.configuration_names, self.pruners)):
                metric = self.metric(split_index, index)
                with warnings.catch_warnings():  # a process that saw no batch still joins the sum
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    values = metric.compute()
                metric.reset()
                prefix = self._prefix(stage, split_index, name)
                for key in ("ciou", "giou", "num_masks", "visual_tokens"):
                    self.log(f"{prefix}/{key}", float(values[key]), sync_dist=False, add_dataloader_idx=False)
                rows.append(
                    {
                        "stage": stage,
                        "split": split,
                        "configuration": name,
                        **pruner.hparams(),
                        "ciou": values["ciou"],
                        "giou": values["giou"],
                        "num_samples": values["num_masks"],
                        "visual_tokens": values["visual_tokens"],
                        "checkpoint": self.hparams.checkpoint,
                        "random_weights": self.random_weights,
                        "skipped": [item for item in skipped if item.get("split") == split],
                    }
                )
        self.last_results = rows[0] if len(rows) == 1 and not self.is_sweep else rows
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
