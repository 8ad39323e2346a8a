"""Training items: item `(index, epoch)` is sample `index` with what it draws for that epoch.

GLaMM trains on one image per item with up to 3 of its pooled sentences, drawn anew every time
(`ReferSegmDataset.__getitem__`); here the draw is seeded by (seed, epoch, index), so a run is
reproducible and the draw does not depend on the number of processes or loader workers. LISA-format
models train on one sentence per item (LISA's conversations hold one sentence each).

Several training sets are concatenated as GLaMM's fine-tuning does (`train_ft.py`: a `ConcatDataset`
of one `ReferSegmDataset` per set, each as long as its image list): item i of the concatenation is
item i - offset of the set it falls in, so one pass of the sampler sees every image of every set once.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import replace

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
        samples: the training split, or several (concatenated in the given order); one item per
            image (`glamm` protocol) to redraw sentences from, or one per sentence (`per-sentence`,
            LISA) kept as they are. Item indices (and what they draw) run over the concatenation.
        processor: a `GroundingProcessor` in training mode.
        max_sentences: sentences per item (GLaMM: 3) when redrawing.
        seed: seeds the sentence draw (the processor seeds the templates).

    In skip mode a sample that fails to load is replaced by the next one that loads, and the
    replaced sample's record travels in the item (`replaced`): every batch stays full, so all DDP
    ranks run the same number of optimiser steps.
    """

    def __init__(
        self,
        samples: ReferringRecordDataset | list[ReferringRecordDataset],
        processor,
        max_sentences: int | None = 3,
        seed: int = 0,
    ) -> None:
        if max_sentences is not None and max_sentences < 1:
            raise DataError(f"max_train_sentences must be >= 1 or None (all sentences), got {max_sentences}")
        if not getattr(processor, "training", False):
            raise DataError("TrainingDataset needs a GroundingProcessor in training mode (processor.for_training())")
        self.parts = list(samples) if isinstance(samples, (list, tuple)) else [samples]
        if not self.parts:
            raise DataError("TrainingDataset needs at least one training split")
        protocols = {part.protocol for part in self.parts}
        if len(protocols) != 1:
            raise DataError(f"the training splits were opened with different protocols {sorted(protocols)}")
        self.samples = self.parts[0]  # the (first) split, for callers that know there is one
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))
        self.processor = processor
        self.max_sentences = max_sentences
        self.seed = seed
        self.redraw = self.samples.protocol == "glamm"

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(training set, item in it) of item `index` of the concatenation."""
        if not 0 <= index < len(self):
            raise IndexError(f"training item {index} out of range (0..{len(self) - 1})")
        part = bisect.bisect_right(self.offsets, index) - 1
        return part, index - self.offsets[part]

    def positions(self, index: int, epoch: int) -> list[int]:
        """The pooled sentences item `index` trains on in `epoch`."""
        part, local = self.locate(index)
        record_index, positions = self.parts[part].items[local]
        if not self.redraw:
            return positions
        count = self.parts[part].records[record_index].num_sentences
        return draw_training_sentences(count, self.max_sentences, self.seed, epoch, index)

    def _load(self, index: int, epoch: int):
        """Item `index`'s sample, indexed by its place in the concatenation (which seeds its templates)."""
        part, local = self.locate(index)
        sample = self.parts[part].load(local, self.positions(index, epoch))
        return sample if sample is None or sample.index == index else replace(sample, index=index)

    def _skip_reason(self, index: int) -> dict:
        part, local = self.locate(index)
        reasons = [record.as_dict() for record in self.parts[part].skipped if record.index == local]
        return reasons[-1] if reasons else {"index": local, "reason": "skipped"}

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        replaced = []
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            sample = self._load(candidate, epoch)
            if sample is not None:
                item = self.processor(sample, epoch)
                if replaced:
                    item["replaced"] = replaced
                return item
            replaced.append(self._skip_reason(candidate))
        raise DataError(
            f"no training sample of {', '.join(part.describe() for part in self.parts)} could be loaded; first problems: "
            + "; ".join(str(record.get("reason")) for record in replaced[:3])
        )
