"""The LightningDataModule: a referring-segmentation split, pre-processed for the model it feeds."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from litelvlm.errors import DataError
from litelvlm.data.records import PROTOCOLS
from litelvlm.data.sampler import UnpaddedDistributedSampler
from litelvlm.data.sources import open_referring_dataset
from litelvlm.data.synthetic import ensure_demo_data


class ProcessedDataset(Dataset):
    """Applies the model's processor per item, so the work happens in the loader's workers."""

    def __init__(self, samples: Dataset, processor) -> None:
        self.samples = samples
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        if sample is None:  # skip mode: the data set recorded why, in this (worker) process
            reasons = [item.as_dict() for item in self.samples.skipped if item.index == index]
            return {"skipped": reasons[-1] if reasons else {"index": index, "reason": "skipped"}}
        return self.processor(sample)


class ReferringDataModule(L.LightningDataModule):
    """A referring-segmentation split, in the original RefCOCO-family layout or the parquet schema.

    Args:
        data_dir: a folder holding `Refer_Segm/` (original layout), a folder of parquet files
            (`lmms-lab/RefCOCO` schema), a hub id, or None for the synthetic demo set (generated
            once into the cache).
        dataset: refcoco, refcoco+, refcocog or grefcoco, for the original layout.
        split: the split evaluated by `validate` and `test`.
        split_by: the refs file variant (unc, umd, google); default per data set.
        protocol: `glamm` (per image, up to `max_sentences` seeded sentences in one multi-round
            prompt), `per-sentence` (LISA: one sentence per forward) or `all-sentences` (every
            sentence, in prompts of up to `max_sentences` rounds).
        checkpoint: the model the batches are for (linked from `model.checkpoint` by the CLI).
        batch_size: prompts per batch.
        max_sentences: sentences per prompt (GLaMM: 3; None: all).
        seed: seeds sentence sampling and prompt templates; the same seed, the same prompts.
        on_error: `raise` (default) stops at a bad sample naming it; `skip` leaves it out and the
            run's results list every skipped sample.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        dataset: str | None = None,
        split: str = "val",
        split_by: str | None = None,
        protocol: str = "glamm",
        checkpoint: str = "tiny-glamm",
        batch_size: int = 2,
        num_workers: int = 0,
        max_sentences: int | None = 3,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if protocol not in PROTOCOLS:
            raise DataError(f"unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        self.data_dir = data_dir
        self.dataset_name = dataset
        self.split = split
        self.split_by = split_by
        self.protocol = protocol
        self.on_error = on_error
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_sentences = max_sentences
        self.seed = seed
        self.dataset: Dataset | None = None
        self.samples = None
        self.processor = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        from litelvlm.models.loading import load_assets
        from litelvlm.models.processor import GroundingProcessor

        source = self.data_dir if self.data_dir is not None else ensure_demo_data()
        samples = open_referring_dataset(
            source,
            dataset=self.dataset_name,
            split=self.split,
            split_by=self.split_by,
            max_sentences=self.max_sentences,
            seed=self.seed,
            on_error=self.on_error,
            protocol=self.protocol,
        )
        self.samples = samples
        assets = load_assets(self.checkpoint)
        self.processor = GroundingProcessor(assets.config, assets.llm_tokenizer, seed=self.seed)
        self.dataset = ProcessedDataset(samples, self.processor)

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        trainer = getattr(self, "trainer", None)
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(self.dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.processor.collate,
            persistent_workers=self.num_workers > 0,
        )

    @property
    def skipped(self) -> list[dict]:
        """Samples left out in skip mode (found while indexing); load-time skips are counted by the module."""
        return [] if self.samples is None else [item.as_dict() for item in self.samples.skipped]

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
