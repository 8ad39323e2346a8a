"""The LightningDataModule: a referring-segmentation split, pre-processed for the model it feeds."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from litelvlm.data.refcoco_parquet import ReferringImageDataset
from litelvlm.data.sampler import UnpaddedDistributedSampler
from litelvlm.data.synthetic import ensure_demo_data


class ProcessedDataset(Dataset):
    """Applies the model's processor per item, so the work happens in the loader's workers."""

    def __init__(self, samples: Dataset, processor) -> None:
        self.samples = samples
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.processor(self.samples[index])


class ReferringDataModule(L.LightningDataModule):
    """Evaluation data in the `lmms-lab/RefCOCO` parquet schema.

    Args:
        data_dir: a folder of parquet files, a hub id, or None for the synthetic demo set
            (generated once into the cache).
        split: the split evaluated by `validate` and `test`.
        checkpoint: the model the batches are for (linked from `model.checkpoint` by the CLI).
        batch_size: images per batch (each with up to `max_sentences` sentences).
        max_sentences: sentences sampled per image (GLaMM protocol: 3; None: all).
        seed: seeds sentence sampling and prompt templates; the same seed, the same prompts.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        split: str = "val",
        checkpoint: str = "tiny-glamm",
        batch_size: int = 2,
        num_workers: int = 0,
        max_sentences: int | None = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data_dir = data_dir
        self.split = split
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_sentences = max_sentences
        self.seed = seed
        self.dataset: Dataset | None = None
        self.processor = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        from litelvlm.models.loading import load_assets
        from litelvlm.models.processor import GroundingProcessor

        source = self.data_dir if self.data_dir is not None else ensure_demo_data()
        samples = ReferringImageDataset(source, split=self.split, max_sentences=self.max_sentences, seed=self.seed)
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

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
