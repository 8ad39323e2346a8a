"""From an image record to a sample: the part every loader shares.

Loaders differ in where records and images come from (parquet rows, the original refs files and
COCO images); choosing the sentences of a sample and drawing their masks is the same for all, so
it lives here once and every source evaluates the same protocol.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from litelvlm.errors import DataError
from litelvlm.data.masks import MalformedSegmentationError, ref_mask
from litelvlm.data.samples import ReferringImageRecord, ReferringSample


def choose_sentences(num_sentences: int, max_sentences: int | None, seed: int, index: int) -> list[int]:
    """Which pooled sentences sample `index` evaluates: up to `max_sentences`, without replacement.

    GLaMM's evaluation draws them with an unseeded `random.sample`; here the draw is seeded from
    (seed, index), so every process and every run picks the same ones. None keeps all, in order.
    """
    if max_sentences is None:
        return list(range(num_sentences))
    rng = random.Random(f"litelvlm-sentences:{seed}:{index}")  # str seeds hash stably (sha512)
    return rng.sample(range(num_sentences), min(num_sentences, max_sentences))


PROTOCOLS = ("glamm", "per-sentence", "all-sentences", "lisa-reasonseg")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def protocol_items(
    records: list[ReferringImageRecord], protocol: str, max_sentences: int | None, seed: int
) -> list[tuple[int, list[int]]]:
    """The evaluation items of a split: (record index, positions in its pooled sentences) each.

    - `glamm`: one item per image, up to `max_sentences` sentences drawn with the seed (GLaMM's
      evaluation, made deterministic); they share one multi-round prompt.
    - `per-sentence`: one item per sentence (LISA's evaluation: one sentence per forward).
    - `all-sentences`: every sentence of every ref, in conversations of up to `max_sentences`
      consecutive sentences (None: all of an image's sentences in one).
    - `lisa-reasonseg`: one item per image with its first sentence (LISA's ReasonSeg validation).
    """
    check_protocol(protocol)
    items = []
    for record_index, record in enumerate(records):
        count = record.num_sentences
        if protocol == "glamm":
            items.append((record_index, choose_sentences(count, max_sentences, seed, record_index)))
        elif protocol == "lisa-reasonseg":
            items.append((record_index, [0]))
        elif protocol == "per-sentence":
            items.extend((record_index, [position]) for position in range(count))
        else:
            step = max_sentences or count
            items.extend((record_index, list(range(start, min(start + step, count)))) for start in range(0, count, step))
    return items


def record_to_sample(
    record: ReferringImageRecord,
    image: Image.Image,
    index: int,
    positions: list[int],
    where: str,
) -> ReferringSample:
    """Sample `index`: the record's image, the pooled sentences at `positions`, one mask each.

    `where` names the source in errors (e.g. "refcoco val"), so a bad annotation can be found.
    """
    width, height = image.size
    pool = record.pooled_sentences()
    chosen = [pool[position] for position in positions]
    masks_by_ref: dict[int, np.ndarray] = {}
    for _, _, ref_index in chosen:
        if ref_index not in masks_by_ref:
            ref = record.refs[ref_index]
            try:
                masks_by_ref[ref_index] = ref_mask(ref.segmentations, height, width)
            except MalformedSegmentationError as error:
                raise MalformedSegmentationError(
                    f"ref {ref.ref_id} of image {record.image_id} ({where}): {error}"
                ) from error
    return ReferringSample(
        index=index,
        image_id=record.image_id,
        image=image,
        sentences=[sentence for sentence, _, _ in chosen],
        sentence_ids=[sentence_id for _, sentence_id, _ in chosen],
        masks=np.stack([masks_by_ref[ref_index] for _, _, ref_index in chosen]),
        ref_ids=[record.refs[ref_index].ref_id for _, _, ref_index in chosen],
    )


@dataclass(frozen=True)
class SkippedItem:
    """A sample (or one ref of it) left out in skip mode, and why; results files list these.

    `stage` is "index" for problems found while reading the annotations (the ref or image never
    becomes a sample, so `index` is None) and "load" for problems found when the sample is loaded
    (`index` is the sample's position; the data set still counts it).
    """

    image_id: str
    reason: str
    stage: str
    ref_id: str | None = None
    index: int | None = None
    file: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class ReferringRecordDataset(torch.utils.data.Dataset):
    """Item i: image record i with up to `max_sentences` of its pooled sentences and their masks.

    Subclasses fill `records` and implement `load_image`; `skipped` lists what skip mode left out
    (always empty for a source without skip mode).
    """

    records: list[ReferringImageRecord]

    def __init__(self, max_sentences: int | None = 3, seed: int = 0, protocol: str = "glamm"):
        if max_sentences is not None and max_sentences < 1:
            raise DataError(f"max_sentences must be >= 1 or None (all sentences), got {max_sentences}")
        check_protocol(protocol)
        self.max_sentences = max_sentences
        self.seed = seed
        self.protocol = protocol
        self.skipped: list[SkippedItem] = []
        self._items: list[tuple[int, list[int]]] | None = None

    @property
    def items(self) -> list[tuple[int, list[int]]]:
        """(record index, sentence positions) of every item, built once the records are known."""
        if self._items is None:
            self._items = protocol_items(self.records, self.protocol, self.max_sentences, self.seed)
        return self._items

    def build_sample(self, index: int, positions: list[int] | None = None) -> ReferringSample:
        record_index, item_positions = self.items[index]
        record = self.records[record_index]
        positions = item_positions if positions is None else positions
        return record_to_sample(record, self.load_image(record), index, positions, self.describe())

    # Sources with a skip mode set `on_error` and the load-time problems it covers (a missing or
    # undecodable image, a segmentation pycocotools cannot read); the others catch nothing here.
    on_error: str = "raise"
    load_errors: tuple[type[Exception], ...] = ()

    def load(self, index: int, positions: list[int] | None = None) -> ReferringSample | None:
        """Item `index`, with the pooled sentences at `positions` instead of the item's own when
        given (training redraws them every epoch). A `load_errors` problem is raised naming the
        sample, or in skip mode recorded in `skipped` and None returned (the collate drops it)."""
        try:
            return self.build_sample(index, positions)
        except self.load_errors as error:
            message = f"sample {index} of {self.describe()}: {error}"
            if self.on_error == "raise":
                raise type(error)(message) from error
            record = self.records[self.items[index][0]]
            self.skipped.append(SkippedItem(record.image_id, message, "load", index=index, file=self.image_file(record)))
            return None

    def image_file(self, record: ReferringImageRecord) -> str:
        """The file a skipped sample's entry names."""
        return record.file_name

    def describe(self) -> str:
        """The source and split, as errors name them."""
        return type(self).__name__

    def load_image(self, record: ReferringImageRecord) -> Image.Image:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ReferringSample | None:
        return self.load(index)
