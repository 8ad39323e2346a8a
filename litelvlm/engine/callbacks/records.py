"""Write every scored mask to the run folder, and resume an interrupted run from what it wrote.

On a run folder that already holds records (a run re-started with the same logger version, or
`python -m litelvlm.cli ... --resume RUN_DIR`), the samples recorded under every configuration
are not evaluated again: the data module leaves them out, and their recorded scores go into the
metrics before the first batch. The metrics' states are integer sums (`ExactReferringIoU`), so
the final numbers equal those of an uninterrupted run bit for bit. Records of a different
evaluation (other model, configurations or data) are refused, never mixed.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pyarrow as pa
import torch

from litelvlm.engine.module import EvaluatedBatch
from litelvlm.engine.sweep import pruner_knobs
from litelvlm.engine.records import (
    MANIFEST_FILE,
    PartWriter,
    RecordsError,
    batch_table,
    build_manifest,
    check_manifest,
    completed_samples,
    next_attempt,
    part_files,
    read_manifest,
    read_records,
    recorded_scores,
    records_folder,
    remove_partial_writes,
    write_manifest,
)

EVALUATION_STAGES = ("validate", "test")


class SampleRecords(L.Callback):
    """Per-sample Parquet records in `<run folder>/records/`, and resume from them.

    An encoders-only run (`model.encoders_only`) predicts no mask: it records nothing and resumes nothing.
    """

    def __init__(self) -> None:
        self.writer: PartWriter | None = None
        self.run_dir: Path | None = None
        self.resumed_samples: dict[str, set[int]] = {}
        self._to_restore = None
        self.resuming, self.evaluated_now = False, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in EVALUATION_STAGES or getattr(pl_module, "encoders_only", False):
            return
        datamodule = trainer.datamodule
        # `trainer.log_dir` broadcasts under DDP: every rank asks.
        self.run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        folder = records_folder(self.run_dir)
        # Every rank reads what earlier attempts left before any rank writes (the barrier below).
        manifest, table = earlier_records(self.run_dir, stage, pl_module, datamodule)
        self.resuming, self.evaluated_now = table is not None, 0
        attempt = next_attempt(folder)
        trainer.strategy.barrier("litelvlm-records-read")
        if trainer.is_global_zero:
            remove_partial_writes(folder)
            write_manifest(self.run_dir, manifest)
        trainer.strategy.barrier("litelvlm-records-manifest")
        if read_manifest(self.run_dir) is None:  # rank zero wrote it: this process cannot see rank zero's files
            raise RecordsError(
                f"rank {trainer.global_rank} cannot see {folder / MANIFEST_FILE}, which rank 0 wrote: the run folder "
                f"must be on a file system every node shares (set --trainer.logger.init_args.save_dir to one)"
            )
        self.writer = PartWriter(folder, attempt, trainer.global_rank)
        self.resumed_samples = completed_samples(table, pl_module.configuration_names) if table is not None else {}
        for split_index, split in enumerate(datamodule.split_names):
            datamodule.skip_recorded(split_index, self.resumed_samples.get(split, set()))
        self._to_restore = table if self.resumed_samples else None

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Recorded scores into the metrics, on one process (the metric states are summed over processes)."""
        table, self._to_restore = self._to_restore, None
        if table is None or not trainer.is_global_zero:
            return
        for split, sample_ids in self.resumed_samples.items():
            for name in pl_module.configuration_names:
                pl_module.restore_scores(split, name, recorded_scores(table, split, name, sample_ids))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer, pl_module)

    def _write(self, outputs) -> None:
        if self.writer is not None and isinstance(outputs, EvaluatedBatch):
            self.writer.write(batch_table(outputs))
            self.evaluated_now += len(outputs.sample_ids)

    def _report_resume(self, trainer: L.Trainer) -> None:
        """What a resumed run reused and what it ran: every rank joins the sum, rank zero prints."""
        if self.writer is None or not self.resuming:
            return
        evaluated = int(trainer.strategy.reduce(torch.tensor(self.evaluated_now), reduce_op="sum"))
        reused = sum(len(ids) for ids in self.resumed_samples.values())
        if trainer.is_global_zero:
            print(f"resumed {self.run_dir}: {reused} samples from its earlier records, {evaluated} evaluated now")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report_resume(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report_resume(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._write(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._write(outputs)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.writer, self._to_restore = None, None


def earlier_records(run_dir: Path, stage: str, pl_module, datamodule) -> tuple[dict, pa.Table | None]:
    """This evaluation's manifest, and the records an earlier attempt left in `run_dir` (None: a new run).

    Records of another evaluation are refused. The CLI asks before the run starts, so a refused run
    folder gets nothing written into it.
    """
    _require(datamodule, "ReferringDataModule", ("fingerprint", "skip_recorded", "split_names"))
    _require(pl_module, "ReferringSegmentationModule", ("configuration_names", "pruners", "model_identity", "restore_scores"))
    manifest = build_manifest(stage, pl_module.model_identity, _configurations(pl_module), datamodule.fingerprint())
    folder = records_folder(run_dir)
    recorded = read_manifest(run_dir)
    if recorded is None and part_files(folder):
        raise RecordsError(f"{folder} holds records but no {MANIFEST_FILE}: cannot tell what they belong to")
    if recorded is None:
        return manifest, None
    check_manifest(recorded, manifest, run_dir)
    return manifest, read_records(run_dir)


def _require(owner, kind: str, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise RecordsError(f"SampleRecords needs a {kind}-like {type(owner).__name__} (missing {', '.join(missing)})")


def _configurations(pl_module) -> list[dict]:
    """What the manifest keeps of each configuration: name, class, hparams and every knob."""
    return [
        {"name": name, "class": f"{type(p).__module__}.{type(p).__qualname__}", **p.hparams(), "knobs": pruner_knobs(p)}
        for name, p in zip(pl_module.configuration_names, pl_module.pruners)
    ]
