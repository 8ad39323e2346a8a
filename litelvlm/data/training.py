"""Training items: item `(index, epoch)` is sample `index` with what it draws for that epoch.

GLaMM trains on one image per item with up to 3 of its pooled sentences, drawn anew every time
(`ReferSegmDataset.__getitem__`); here the draw is seeded by (seed, epoch, index), so a run is
reproducible and the draw does not depend on the number of processes or loader workers. LISA-format
models train on one sentence per item (LISA's conversations hold one sentence each).
"""

from __future__ import annotations

import random

from torch.utils.data import Dataset

from litelvlm.data.records import ReferringRecordDataset
from litelvlm.errors import DataError


def draw_training_sentences(
    num_sentences: int, max_sentences: int | None, seed: int, epoch: int, index: int
) -> list[int]:
    """Pooled-sentence positions of item `index` in `epoch`: all, in order, when there are at most
    `max_sentences` (None: always all); else `max_sentences` drawn without replacement (GLaMM)."""
    if max_sentences is None or num_sentences <= max_sentences:
        return list(range(num_sentences))
    rng = random.Random(f"litelvlm-train-sentences:{seed}:{epoch}:{index}")
    return rng.sample(range(num_sentences), max_sentences)


class TrainingDataset(Dataset):
    """Processed training items, keyed `(index, epoch)` (from `EpochShuffledSampler`).

    Args:
        samples: the training split; one item per image (`glamm` protocol) to redraw sentences
            from, or one per sentence (`per-sentence`, LISA) kept as they are.
        processor: a `GroundingProcessor` in training mode.
        max_sentences: sentences per item (GLaMM: 3) when redrawing.
        seed: seeds the sentence draw (the processor seeds the templates).

    In skip mode a sample that fails to load is replaced by the next one that loads, and the
    replaced sample's record travels in the item (`replaced`): every batch stays full, so all DDP
    ranks run the same number of optimiser steps.
    """

    def __init__(
        self, samples: ReferringRecordDataset, processor, max_sentences: int | None = 3, seed: int = 0
    ) -> None:
        if max_sentences is not None and max_sentences < 1:
            raise DataError(f"max_train_sentences must be >= 1 or None (all sentences), got {max_sentences}")
        if not getattr(processor, "training", False):
            raise DataError("TrainingDataset needs a GroundingProcessor in training mode (processor.for_training())")
        self.samples = samples
        self.processor = processor
        self.max_sentences = max_sentences
        self.seed = seed
        self.redraw = samples.protocol == "glamm"

    def __len__(self) -> int:
        return len(self.samples)

    def positions(self, index: int, epoch: int) -> list[int]:
        """The pooled sentences item `index` trains on in `epoch`."""
        record_index, positions = self.samples.items[index]
        if not self.redraw:
            return positions
        count = self.samples.records[record_index].num_sentences
        return draw_training_sentences(count, self.max_sentences, self.seed, epoch, index)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        replaced = []
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            sample = self.samples.load(candidate, self.positions(candidate, epoch))
            if sample is not None:
                item = self.processor(sample, epoch)
                if replaced:
                    item["replaced"] = replaced
                return item
            reasons = [record.as_dict() for record in self.samples.skipped if record.index == candidate]
            replaced.append(reasons[-1] if reasons else {"index": candidate, "reason": "skipped"})
        raise DataError(
            f"no training sample of {self.samples.describe()} could be loaded; first problems: "
            + "; ".join(str(record.get("reason")) for record in replaced[:3])
        )
