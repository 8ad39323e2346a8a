"""The LightningModule: run the pruned frozen LVLM on a batch and update the IoU metrics. Nothing else.

A run evaluates one pruner, or several (a sweep): per batch the pruner-independent encoders (CLIP
vision, CLIP text if needed, SAM image encoder) run once, then each configuration selects, runs the
LLM and decodes its masks. Each (split, configuration) has its own metric. The encoder pass also
computes what study callbacks declare (`ReadsEncodings`); with `encoders_only` it is all that is built and runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import lightning as L
import torch
from torch import nn

from litelvlm.engine import finetuned as finetuned_weights
from litelvlm.engine.finetuning import (
    FineTuning,
    build_optimizer,
    check_precision,
    gradient_accumulation,
    seed_from,
    set_training_modes,
    training_losses,
)
from litelvlm.engine.scores import QUERY_KINDS, ExactReferringIoU, MaskScores, query_kind_tensor, score_masks
from litelvlm.engine.sweep import SweepGrid, collect_pruners, configuration_names
from litelvlm.engine.text_overflow import TextOverflowCount, query_lengths, text_source
from litelvlm.errors import LitelvlmError
from litelvlm.models.batch import GroundingBatch, GroundingOutput
from litelvlm.models.loading import load_lvlm
from litelvlm.models.lvlm import SharedEncodings
from litelvlm.pruners.base import PrunerError, Signal, TokenPruner
from litelvlm.pruners.simple import NoPruning


@runtime_checkable
class ReadsEncodings(Protocol):
    """A callback (a study) that reads the batch's CLIP encodings from `EvaluatedBatch.shared`.

    The module adds what it declares to its own encoder passes, so CLIP runs once per batch for the
    pruners and every such callback together.
    """

    required_signals: frozenset[Signal]  # vision signals, as a pruner declares them
    required_text: frozenset[tuple[str, str, str]]  # CLIP text embeddings by (source, pooling, overflow)


@dataclass
class EvaluatedBatch:
    """What one evaluation step hands to callbacks: per configuration, the model's output and the mask scores.

    Masks are listed sample by sample, in each sample's sentence order. The GroundingOutput fields
    read through to the first configuration, so a callback written for one pruner reads a
    single-pruner run unchanged. `shared` holds the batch's encodings (CLIP signals and text
    embeddings); in an encoders-only run it is all there is: `outputs` and `scores` are empty.
    """

    split: str
    sample_ids: list[int]
    image_ids: list[str]
    sentence_ids: list[list[str]]
    outputs: dict[str, GroundingOutput]
    scores: dict[str, MaskScores]
    shared: SharedEncodings | None = None
    is_sentence: list[list[bool] | None] | None = None  # per sample: ReasonSeg's long-query flags
    query_llm_tokens: list[list[int]] | None = None  # per sample and mask: the query's LLM tokens
    query_clip_tokens: list[list[int]] | None = None  # per sample and mask: CLIP tokens, -1 unknown
    question_clip_tokens: list[list[int]] | None = None  # per sample and mask: the question's, when a pruner embeds it

    @property
    def primary(self) -> GroundingOutput:
        if not self.outputs:
            raise LitelvlmError("encoders-only run: no configuration was grounded, so there are no model outputs")
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
    """Evaluate pruning strategies on a frozen pixel-grounding LVLM, or fine-tune it with the pruner active (`fit`).

    Args:
        checkpoint: a model preset with random weights (`tiny-glamm`) or a released checkpoint.
        pruner: the pruning strategy and its budget (None: no pruning), for a single-pruner run.
        pruners: a sweep: several pruner configurations evaluated in one pass over the data.
        sweep: a sweep grid, every `strategies` entry at every `budgets` entry (after `pruners`).
        dtype: weights' dtype, `float32`, `bfloat16` or `float16`.
        seg_prompt_position: `before` (reference: the state just before each [SEG] prompts SAM) or `at`.
        seed: seeds the random weights of a preset; the same seed gives the same model everywhere.
        finetuning: what `fit` trains and how (LoRA, trained modules, optimiser, loss); None: no fit.
        finetuned: a fit's exported weights (`finetuned.safetensors` or its run folder), loaded onto
            the frozen base for validate/test and sweeps.
        encoders_only: validate/test run only the CLIP passes the study callbacks (`ReadsEncodings`)
            need, and hand them over in `EvaluatedBatch.shared`: no LLM, no SAM, no masks, no IoU.
            Only the CLIP towers are built and loaded; `fit`, `finetuning` and `finetuned` are
            refused (an export may adapt CLIP itself, so ignoring it could change a study's numbers).
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
        finetuning: FineTuning | None = None,
        finetuned: str | None = None,
        encoders_only: bool = False,
    ) -> None:
        super().__init__()
        if encoders_only and (finetuning is not None or finetuned is not None):
            given = "model.finetuning" if finetuning is not None else "model.finetuned"
            raise LitelvlmError(
                f"{given} needs the whole model, but model.encoders_only builds only CLIP; set one of them off"
            )
        self.encoders_only = encoders_only
        swept = collect_pruners(pruner, pruners, sweep)
        self.is_sweep = swept is not None
        configured = swept if self.is_sweep else [pruner if pruner is not None else NoPruning()]
        self.configuration_names = configuration_names(configured)
        self.pruners = nn.ModuleList(configured)
        self.pruner = configured[0]  # what `forward` runs; the only one outside a sweep
        model_hparams = {"checkpoint": checkpoint, "dtype": dtype, "seg_prompt_position": seg_prompt_position, "seed": seed}
        if finetuned is not None:
            model_hparams["finetuned"] = str(finetuned)
        # The pruners are logged by name and knobs; TensorBoard keeps only the first hparams record.
        if self.is_sweep:
            self.save_hyperparameters(model_hparams | {"configurations": ", ".join(self.configuration_names)})
        else:
            self.save_hyperparameters(model_hparams | self.pruner.hparams())
        self.lvlm = load_lvlm(
            checkpoint, dtype=dtype, seed=seed, seg_prompt_position=seg_prompt_position, encoders_only=encoders_only
        )
        self.lvlm.requires_grad_(False).eval()
        self.base_identity = None  # it fingerprints the LLM too: a full build's only (nothing else is fine-tuned)
        if not encoders_only:
            self.base_identity = finetuned_weights.base_identity(
                self.lvlm, checkpoint, seed, seg_prompt_position, self.random_weights
            )
        self.trained = finetuned_weights.attach(self.lvlm, finetuning, finetuned, self.base_identity)
        self.finetuning = finetuning
        self.strict_loading = finetuning is None  # a fit's checkpoints hold the trained tensors only
        self._check_configurations(configured)
        self.split_names = ["val"]
        self.metrics = self._build_metrics()
        self.last_results: dict | list[dict] | None = None
        self._skipped: list[dict] = []

    def _check_configurations(self, configured: list[TokenPruner]) -> None:
        """Fail now, before any data is read, on a configuration this model cannot run: a budget out of
        range, a schedule layer the LLM lacks, a budget too small for the method's stages."""
        num_llm_layers = None if self.encoders_only else self.lvlm.config.llm.num_layers
        for name, configured_pruner in zip(self.configuration_names, configured):
            try:
                configured_pruner.check_model(self.lvlm.num_patches, num_llm_layers)
            except PrunerError as error:
                if not self.is_sweep:
                    raise
                raise PrunerError(f"configuration {name}: {error}") from None

    @property
    def random_weights(self) -> bool:
        return bool(getattr(self.lvlm, "random_weights", False))

    @property
    def model_identity(self) -> dict:
        """What, besides the pruners, decides this run's numbers: the weights and how they run."""
        identity = {key: self.hparams[key] for key in ("checkpoint", "dtype", "seg_prompt_position", "seed")}
        if self.trained is not None and self.trained.export_digest is not None:
            identity["finetuned"] = self.trained.export_digest
        return identity

    def forward(self, batch: GroundingBatch) -> GroundingOutput:
        return self.lvlm(batch, self.pruner)

    def setup(self, stage: str) -> None:
        """One metric per evaluated split (the data module may hold several) and configuration."""
        if stage == "fit" and self.encoders_only:
            raise LitelvlmError("fit trains the whole model, but model.encoders_only builds only CLIP; set it false")
        if stage == "fit" and self.finetuning is None:
            raise LitelvlmError("fit needs model.finetuning (what to train and how); see configs/finetune_demo.yaml")
        if stage == "fit" and self.is_sweep:
            raise LitelvlmError("fit trains with one pruner: set model.pruner, not model.pruners / model.sweep")
        if stage == "fit":  # the frozen parts are in eval mode on purpose (set_training_modes)
            check_precision(self.hparams.dtype, self.trainer.precision)
            self._set_gradient_accumulation()
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        names = getattr(getattr(self.trainer, "datamodule", None), "split_names", None) or ["val"]
        self.split_names = list(names)
        self.metrics = self._build_metrics()

    def _set_gradient_accumulation(self) -> None:
        """The trainer's accumulation from `finetuning.effective_batch_size` and the number of devices."""
        batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if batch_size is None:
            if self.finetuning.effective_batch_size is not None:
                raise LitelvlmError("finetuning.effective_batch_size needs the data module's batch_size to divide it")
            return
        trainer = self.trainer
        trainer.accumulate_grad_batches = gradient_accumulation(
            self.finetuning.effective_batch_size, batch_size, trainer.world_size, trainer.accumulate_grad_batches
        )
        self.effective_batch_size = batch_size * trainer.accumulate_grad_batches * trainer.world_size
        if trainer.is_global_zero:
            print(
                f"effective batch {self.effective_batch_size} = {batch_size} per device x "
                f"{trainer.accumulate_grad_batches} accumulated x {trainer.world_size} device(s)"
            )

    def _build_metrics(self) -> nn.ModuleList:
        count = len(self.split_names) * len(self.pruners)
        # One more per query kind (short, long) and (split, configuration): `by_query_kind` in results.
        self.kind_metrics = nn.ModuleList(ExactReferringIoU() for _ in range(count * len(QUERY_KINDS)))
        # Per split and CLIP text source of the text-guided pruners: queries over CLIP's window (engine/text_overflow.py).
        self.text_sources = sorted({source for source in map(text_source, self.pruners) if source is not None})
        window = self.lvlm.config.text.max_length
        self.overflow_counts = nn.ModuleDict({
            f"{split}:{source}": TextOverflowCount(window)
            for split in range(len(self.split_names)) for source in self.text_sources
        })
        return nn.ModuleList(ExactReferringIoU() for _ in range(count))

    def metric(self, split_index: int, configuration_index: int) -> ExactReferringIoU:
        return self.metrics[split_index * len(self.pruners) + configuration_index]

    def kind_metric(self, split_index: int, configuration_index: int, kind: int) -> ExactReferringIoU:
        return self.kind_metrics[(split_index * len(self.pruners) + configuration_index) * len(QUERY_KINDS) + kind]

    def _update(self, split_index: int, configuration_index: int, scores: MaskScores) -> None:
        """The split's metric, and each query kind's with the masks of that kind."""
        self.metric(split_index, configuration_index).update(scores.intersection, scores.union, scores.retained_tokens)
        if scores.query_kind is None:
            return
        for kind in range(len(QUERY_KINDS)):
            chosen = scores.query_kind == kind
            if chosen.any():
                self.kind_metric(split_index, configuration_index, kind).update(
                    scores.intersection[chosen], scores.union[chosen], scores.retained_tokens[chosen]
                )

    def restore_scores(self, split: str, configuration: str, scores: MaskScores) -> None:
        """Count scores an earlier attempt of this run recorded (resume). Call on one process only:
        metric states are summed over processes."""
        if configuration == self.configuration_names[0]:  # each recorded query once, whatever the configurations
            for source in self.text_sources:
                lengths = (scores.clip_tokens or {}).get(source)
                if lengths is not None:
                    self.overflow_counts[f"{self.split_names.index(split)}:{source}"].update(lengths[lengths >= 0].tolist())
        self._update(self.split_names.index(split), self.configuration_names.index(configuration), scores)

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
        grounded = [] if self.encoders_only else list(self.pruners)  # encoders-only: no pruner runs
        readers = self._encoding_readers()
        shared = self.lvlm.encode(
            batch,
            grounded,
            extra_signals=frozenset().union(*(reader.required_signals for reader in readers)),
            extra_text_keys=[key for reader in readers for key in reader.required_text],
            for_grounding=bool(grounded),
        )
        text_lengths = {}  # per text source a text-guided pruner embeds: each query's CLIP tokens, per sample
        for source in (self.text_sources if grounded else []):
            texts = batch.expressions if source == "expression" else batch.questions
            text_lengths[source] = [query_lengths(self.lvlm.clip_tokenizer, [sample]) for sample in texts]
            self.overflow_counts[f"{split_index}:{source}"].update([n for sample in text_lengths[source] for n in sample])
        outputs, scores = {}, {}
        for index, (name, pruner) in enumerate(zip(self.configuration_names, grounded)):
            output = self.lvlm.ground(batch, shared, pruner)
            score = score_masks(output.mask_logits, batch.gt_masks, output.num_visual_tokens, batch.ignore_masks)
            if batch.is_sentence:
                score.query_kind = query_kind_tensor(batch.is_sentence, [len(ids) for ids in batch.sentence_ids])
            self._update(split_index, index, score)
            outputs[name], scores[name] = output, score
        return EvaluatedBatch(
            split=split,
            sample_ids=[int(i) for i in batch.sample_ids.tolist()],
            image_ids=list(batch.image_ids),
            sentence_ids=[list(ids) for ids in batch.sentence_ids],
            outputs=outputs,
            scores=scores,
            shared=shared,
            is_sentence=list(batch.is_sentence) or None,
            query_llm_tokens=list(batch.query_llm_tokens) or None,
            query_clip_tokens=list(batch.query_clip_tokens) or None,
            question_clip_tokens=text_lengths.get("question"),
        )

    def _encoding_readers(self) -> list[ReadsEncodings]:
        """The trainer's callbacks that read the encodings from the step output (the studies)."""
        callbacks = self._trainer.callbacks if self._trainer is not None else []
        return [callback for callback in callbacks if isinstance(callback, ReadsEncodings)]

    def _finish(self, stage: str) -> None:
        if self.encoders_only:  # no mask was predicted: there is no IoU to log or report
            self.last_results, self._skipped = None, []
            return
        skipped = self._all_skipped()
        rows = []
        for split_index, split in enumerate(self.split_names):
            for index, (name, pruner) in enumerate(zip(self.configuration_names, self.pruners)):
                metric = self.metric(split_index, index)
                with warnings.catch_warnings():  # a process that saw no batch still joins the sum
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                    values = metric.compute()
                metric.reset()
                by_kind = self._by_query_kind(split_index, index)
                prefix = self._prefix(stage, split_index, name)
                for key in ("ciou", "giou", "num_masks", "visual_tokens"):
                    self.log(f"{prefix}/{key}", float(values[key]), sync_dist=False, add_dataloader_idx=False)
                for kind, kind_values in (by_kind or {}).items():
                    for key in ("ciou", "giou", "num_samples") if kind_values["num_samples"] else ():
                        self.log(f"{prefix}/{kind}/{key}", float(kind_values[key]), sync_dist=False, add_dataloader_idx=False)
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
                        "finetuned": self._weights_note(),
                        "random_weights": self.random_weights,
                        "skipped": [item for item in skipped if item.get("split") == split],
                        **({"by_query_kind": by_kind} if by_kind else {}),
                        **self._overflow(split_index, pruner),
                    }
                )
        for count in self.overflow_counts.values():
            count.reset()
        self.last_results = rows[0] if len(rows) == 1 and not self.is_sweep else rows
        self._skipped = []

    def _overflow(self, split_index: int, pruner: TokenPruner) -> dict:
        """`clip_text_overflow` of a text-guided configuration's row: its split's queries over CLIP's window."""
        source = text_source(pruner)
        if source is None:
            return {}
        with warnings.catch_warnings():  # a process that saw no batch still joins the sum
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return {"clip_text_overflow": {**self.overflow_counts[f"{split_index}:{source}"].compute(), "text_source": source}}

    def _by_query_kind(self, split_index: int, configuration_index: int) -> dict | None:
        """{"short": {...}, "long": {...}} with the top-level keys' meaning; None when no mask had a kind.

        Every process computes (the states are summed over processes), so all join the same syncs.
        """
        by_kind = {}
        for kind, kind_name in enumerate(QUERY_KINDS):
            metric = self.kind_metric(split_index, configuration_index, kind)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
                values = metric.compute()
            metric.reset()
            by_kind[kind_name] = {
                "ciou": values["ciou"],
                "giou": values["giou"],
                "num_samples": values["num_masks"],
                "visual_tokens": values["visual_tokens"],
            }
        return by_kind if any(values["num_samples"] for values in by_kind.values()) else None

    def _weights_note(self) -> str | None:
        """Which fine-tuned weights the numbers come from: an export's sha256, this run's fit, or None (base)."""
        if self.finetuning is not None:
            return "fitted in this run"
        return self.model_identity.get("finetuned")

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

    # ------------------------------------------------------------------ fine-tuning (engine/finetuning.py)
    def training_step(self, batch: GroundingBatch, batch_idx: int) -> torch.Tensor:
        losses, output = training_losses(self.lvlm, batch, self.pruner, self.finetuning)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch.batch_size)
        self.log("train/visual_tokens", float(output.num_visual_tokens), batch_size=batch.batch_size)
        return losses["loss"]

    def configure_optimizers(self):
        if self.finetuning is None:  # evaluation only
            return None
        trained = [parameter for parameter in self.lvlm.parameters() if parameter.requires_grad]
        return build_optimizer(trained, self.finetuning, self.trainer.estimated_stepping_batches)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode during fit; only adapters and trained modules switch."""
        super().train(mode)
        if "lvlm" in self._modules:
            set_training_modes(self.lvlm, getattr(self, "finetuning", None), mode)
        return self

    def on_train_epoch_start(self) -> None:  # anything drawing the epoch's data order from torch's RNG
        seed_from(self.finetuning.seed, self.global_rank, self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:  # the step's dropout
        seed_from(self.finetuning.seed, self.global_rank, self.current_epoch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.finetuning is not None:
            finetuned_weights.trim_checkpoint(checkpoint, self.trained.names, self.finetuning, self.base_identity)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.finetuning is None and finetuned_weights.CHECKPOINT_KEY in checkpoint:
            raise LitelvlmError(
                "this is a fit checkpoint (the trained tensors only): resume it with the fit's model.finetuning, "
                "or evaluate the fit's export with --model.finetuned RUN_DIR"
            )
        if self.finetuning is not None:
            finetuned_weights.check_checkpoint(checkpoint, self.trained.names, self.finetuning, self.base_identity)

    def on_fit_end(self) -> None:
        finetuned_weights.export_at_fit_end(self.trainer, self.trained, self.base_identity)

    @torch.no_grad()
    def predict_step(self, batch: GroundingBatch, batch_idx: int) -> GroundingOutput:
        return self(batch)
