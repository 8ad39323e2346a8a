"""The LightningDataModule: referring-segmentation splits, pre-processed for the model they feed."""

from __future__ import annotations

import hashlib
import json
import re

import lightning as L
from torch.utils.data import DataLoader, Dataset, Subset

from litelvlm.errors import DataError
from litelvlm.data.records import check_protocol
from litelvlm.data.sampler import EpochShuffledSampler, UnpaddedDistributedSampler
from litelvlm.data.shard import parse_shard, shard_items
from litelvlm.data.sources import default_protocol, open_referring_dataset
from litelvlm.data.synthetic import ensure_demo_data
from litelvlm.data.training import TrainingDataset
from litelvlm.models.loading import load_assets
from litelvlm.models.processor import GroundingProcessor


class ProcessedDataset(Dataset):
    """Applies the model's processor per item, so the work happens in the loader's workers.

    Items in `recorded` (scored by an earlier attempt of a resumed run) come back as placeholders,
    unloaded: the loader still walks the same batches as an uninterrupted run, so batch limits and
    sharding mean the same, but nothing is loaded or evaluated twice.
    """

    def __init__(self, samples: Dataset, processor) -> None:
        self.samples = samples
        self.processor = processor
        self.recorded: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        if index in self.recorded:
            return {"placeholder": True}
        sample = self.samples[index]
        if sample is None:  # skip mode: the data set recorded why, in this (worker) process
            reasons = [item.as_dict() for item in self.samples.skipped if item.index == index]
            return {"skipped": reasons[-1] if reasons else {"index": index, "reason": "skipped"}}
        return self.processor(sample)


class CollateSkippingPlaceholders:
    """The processor's collate, minus placeholder items; a batch of only placeholders is an empty
    list (nothing to score). A class, not a closure, so loader workers can pickle it."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items: list[dict]):
        items = [item for item in items if "placeholder" not in item]
        return self.collate(items) if items else []


class ReferringDataModule(L.LightningDataModule):
    """A referring-segmentation split, in the original RefCOCO-family layout or the parquet schema.

    Args:
        data_dir: a folder holding `Refer_Segm/` (original layout), a folder of parquet files
            (`lmms-lab/RefCOCO` schema), a hub id, or None for the synthetic demo set (generated
            once into the cache).
        dataset: refcoco, refcoco+, refcocog or grefcoco, for the original layout.
        split: the split evaluated by `validate` and `test`.
        splits: several splits evaluated in one run, each `split` or `dataset/split` (e.g. the
            standard benchmark `[refcoco/val, refcoco/testA, ..., refcocog/test]`); overrides
            `split`. Each is a separate data loader with its own metrics.
        split_by: the refs file variant (unc, umd, google); default per data set.
        protocol: `glamm` (per image, up to `max_sentences` seeded sentences in one multi-round
            prompt), `per-sentence` (LISA: one sentence per forward) or `all-sentences` (every
            sentence, in prompts of up to `max_sentences` rounds); `lisa-reasonseg` (ReasonSeg: the first query of each image, LISA's validation).
            None (default): each split's own, `lisa-reasonseg` for ReasonSeg, `glamm` otherwise.
        checkpoint: the model the batches are for (linked from `model.checkpoint` by the CLI).
        batch_size: prompts per batch.
        max_sentences: sentences per prompt (GLaMM: 3; None: all).
        seed: seeds sentence sampling and prompt templates; the same seed, the same prompts.
        on_error: `raise` (default) stops at a bad sample naming it; `skip` leaves it out and the
            run's results list every skipped sample (in training, the next sample takes its place).
        train_split: the split `fit` trains on, `split` or `dataset/split` (original layout: the
            refs' `train` split; parquet: that split's files; the demo set has one).
        train_splits: several training splits concatenated (GLaMM's fine-tuning: `[refcoco/train,
            refcoco+/train, refcocog/train]`), every item of every split once per epoch, shuffled
            together; overrides `train_split`.
        fit_val_images: validation during `fit` scores only the first N images of each evaluated
            split (GLaMM's `--mask_validation`: the first 1,000 of refcocog val); None: all.
        max_train_sentences: sentences per training prompt, redrawn every epoch (GLaMM: 3; None:
            all). LISA-format models train on one sentence per prompt.
        shard: `i/n` evaluates only the i-th (0-based) of n disjoint parts of each split's images,
            so n jobs cover a split (`tools/merge_runs.py` joins them; docs/scaling.md); None: all.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        dataset: str | None = None,
        split: str = "val",
        splits: list[str] | None = None,
        split_by: str | None = None,
        protocol: str | None = None,
        checkpoint: str = "tiny-glamm",
        batch_size: int = 2,
        num_workers: int = 0,
        max_sentences: int | None = 3,
        seed: int = 0,
        on_error: str = "raise",
        train_split: str = "train",
        max_train_sentences: int | None = 3,
        train_splits: list[str] | None = None,
        fit_val_images: int | None = None,
        shard: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if max_train_sentences is not None and max_train_sentences < 1:
            raise DataError(f"max_train_sentences must be >= 1 or None (all sentences), got {max_train_sentences}")
        if fit_val_images is not None and (isinstance(fit_val_images, bool) or fit_val_images < 1):
            raise DataError(f"fit_val_images must be >= 1 or None (all), got {fit_val_images}")
        if train_splits is not None and len(set(train_splits)) != len(train_splits):
            raise DataError(f"train_splits lists a split twice: {train_splits}")
        if protocol is not None:
            check_protocol(protocol)
        self.shard = parse_shard(shard)
        self.data_dir = data_dir
        self.dataset_name = dataset
        self.split = split
        self.splits = list(splits) if splits else None
        self.split_by = split_by
        self.protocol = protocol
        self.on_error = on_error
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_sentences = max_sentences
        self.seed = seed
        self.train_split = train_split
        self.train_splits = list(train_splits) if train_splits else [train_split]
        self.fit_val_images = fit_val_images
        self.max_train_sentences = max_train_sentences
        self.datasets: list[Dataset] | None = None
        self.samples = None
        self.processor = None
        self.train_dataset: TrainingDataset | None = None

    @property
    def split_names(self) -> list[str]:
        """One name per evaluated split, in data-loader order."""
        return self.splits or [self.split if self.dataset_name is None else f"{self.dataset_name}/{self.split}"]

    def _open(self, name: str):
        dataset, _, split = name.rpartition("/") if self.splits else (self.dataset_name, "", self.split)
        return self._open_split(dataset, split, self.max_sentences, self.protocol)

    def _open_train(self) -> list:
        """The training splits, one item per image for GLaMM-format models, per sentence for LISA's."""
        protocol = "per-sentence" if self.processor.config.protocol == "lisa" else "glamm"
        parts = []
        for name in self.train_splits:
            dataset, _, split = name.rpartition("/")
            parts.append(self._open_split(dataset, split, self.max_train_sentences, protocol))
        return parts

    def _open_split(self, dataset: str | None, split: str, max_sentences: int | None, protocol: str):
        if self.data_dir is None and (dataset or self.dataset_name) == "reasonseg":
            raise DataError("ReasonSeg has no demo set: pass --data.data_dir (ReasonSeg/, reason_seg/ or the data root)")
        source = self.data_dir if self.data_dir is not None else ensure_demo_data()
        return open_referring_dataset(
            source,
            dataset=dataset or self.dataset_name,
            split=split,
            split_by=self.split_by,
            max_sentences=max_sentences,
            seed=self.seed,
            on_error=self.on_error,
            protocol=protocol,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.shard is not None:
            raise DataError("data.shard splits an evaluation (validate/test) across jobs; fit trains on every image")
        if self.datasets is None:
            assets = load_assets(self.checkpoint)
            self.processor = GroundingProcessor(
                assets.config, assets.llm_tokenizer, seed=self.seed, clip_tokenizer=assets.clip_tokenizer
            )
            self.all_samples = [self._open(name) for name in self.split_names]
            self.samples = self.all_samples[0]
            self.datasets = [ProcessedDataset(samples, self.processor) for samples in self.all_samples]
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = TrainingDataset(
                self._open_train(), self.processor.for_training(), self.max_train_sentences, self.seed
            )

    @property
    def dataset(self) -> Dataset:
        """The (first) evaluated split, processed."""
        if self.datasets is None:
            self.setup()
        return self.datasets[0]

    def _loaders(self) -> DataLoader | list[DataLoader]:
        if self.datasets is None:
            self.setup()
        datasets = self.datasets
        trainer = getattr(self, "trainer", None)
        if self.shard is not None:
            datasets = [
                Subset(dataset, shard_items(samples, *self.shard, name))
                for dataset, samples, name in zip(datasets, self.all_samples, self.split_names)
            ]
        if self.fit_val_images is not None and trainer is not None and trainer.state.fn == "fit":
            datasets = [
                Subset(dataset, first_images(samples, self.fit_val_images))
                for dataset, samples in zip(self.datasets, self.all_samples)
            ]
        loaders = [self._loader(dataset, name) for dataset, name in zip(datasets, self.split_names)]
        return loaders[0] if len(loaders) == 1 else loaders

    def _loader(self, dataset: Dataset, name: str) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            if len(dataset) < trainer.world_size:  # a process with no batch skips the epoch-end sync: a hang
                raise DataError(
                    f"split {name} has {len(dataset)} items, fewer than the {trainer.world_size} processes: "
                    f"every process needs at least one (run with --trainer.devices {max(len(dataset), 1)} or fewer)"
                )
            sampler = UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=CollateSkippingPlaceholders(self.processor.collate),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch (seed + epoch); under DDP every rank gets a disjoint shard of the same
        length (padded by repetition, so all ranks run the same number of steps)."""
        self.setup("fit")
        trainer = getattr(self, "trainer", None)
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffledSampler(self.train_dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.train_dataset.processor.collate,
            persistent_workers=self.num_workers > 0,
        )

    def skip_recorded(self, split_index: int, sample_ids: set[int]) -> None:
        """Leave out samples an earlier attempt of this run already recorded (resume); before the loaders are built."""
        if self.datasets is None:
            self.setup()
        self.datasets[split_index].recorded = frozenset(sample_ids)

    def fingerprint(self) -> dict:
        """What this module evaluates, so a resumed run can check it is still the same data.

        Per split: its name, number of items and a hash of every item's (sample id, image id,
        sentence ids); plus the knobs that shape prompts, and the part (`shard`) when only one is
        evaluated. Cheap: read from the index, no image loaded.
        """
        if self.datasets is None:
            self.setup()
        splits = []
        for name, samples in zip(self.split_names, self.all_samples):
            digest = hashlib.sha256()
            for index, item in enumerate(_item_identities(samples)):
                digest.update(json.dumps([index, *item]).encode())
            splits.append({"split": name, "num_items": len(samples), "sha256": digest.hexdigest()})
        shard = {"shard": "/".join(map(str, self.shard))} if self.shard is not None else {}  # absent: the whole split
        protocol = self.protocol or default_protocol(self.dataset_name)
        return {"protocol": protocol, "max_sentences": self.max_sentences, "seed": self.seed, "splits": splits, **shard}

    def skipped_in(self, split_index: int = 0) -> list[dict]:
        """Samples of a split left out in skip mode while indexing; load-time skips reach the module in batches."""
        if self.datasets is None:
            return []
        # Load-time skips also land in `skipped` when the loader runs in this process (no workers);
        # they reach the module in their batches, so counting them here too would count them twice.
        return [item.as_dict() for item in self.all_samples[split_index].skipped if item.stage == "index"]

    @property
    def skipped(self) -> list[dict]:
        return self.skipped_in(0)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders()

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders()

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loaders()


def first_images(samples, count: int) -> list[int]:
    """Item indices of the first `count` images of a split, in GLaMM's order.

    GLaMM's `--mask_validation` keeps `loadImgs(getImgIds(refs of the split))[:1000]`
    (`dataset/segm_datasets/RefCOCO_Segm_ds.py`), and `getImgIds` returns `list(set(image ids))`
    (`dataset/utils/refcoco_refer.py`): CPython's set order of the integer COCO ids, rebuilt here
    from the records (first appearance in the refs file, the order that set was filled in). Image
    ids that are not numbers (other sources) keep the data set's order.
    """
    records = samples.records
    numbers = [re.search(r"(\d+)$", str(record.image_id)) for record in records]
    order = list(range(len(records)))
    if all(numbers):
        position = {int(number[1]): index for index, number in enumerate(numbers)}
        order = [position[image_id] for image_id in list(set(int(number[1]) for number in numbers))]
    kept = set(order[:count])
    return [index for index, (record_index, _) in enumerate(samples.items) if record_index in kept]


def _item_identities(samples) -> list[tuple[str, list[str]]]:
    """(image id, sentence ids) of every item of an indexed split (`ReferringRecordDataset`)."""
    records, items = getattr(samples, "records", None), getattr(samples, "items", None)
    if records is None or items is None:  # a data set without an index: only its size identifies it
        return [("", [])] * len(samples)
    identities = []
    for record_index, positions in items:
        record = records[record_index]
        pool = record.pooled_sentences()
        identities.append((str(record.image_id), [str(pool[position][1]) for position in positions]))
    return identities
