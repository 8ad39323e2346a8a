"""The data records every loader produces and every consumer (collate, model, metrics) reads.

Loaders turn their source format into `ReferringRef`s (one annotated object with its sentences),
group them per image into `ReferringImageRecord`s, and the data set turns one record into one
`ReferringSample` (decoded image, chosen sentences, one ground-truth mask per sentence).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from PIL import Image

from litelvlm.errors import DataError

# A COCO segmentation: a flat polygon [x0, y0, x1, y1, ...], a list of such polygons, or an RLE
# dict {"size": [h, w], "counts": str | bytes | list[int]}.
Segmentation = Union[list[float], list[list[float]], dict[str, Any]]


@dataclass
class ReferringRef:
    """One referred object: its sentences and the annotation(s) they point to.

    `segmentations` holds one COCO segmentation per annotation: one for RefCOCO/+/g, several for
    a gRefCOCO ref whose target is a union, none for a no-target ref (its mask is all zeros).
    """

    ref_id: str
    image_id: str
    sentences: list[str]
    sentence_ids: list[str]
    segmentations: list[Segmentation]
    bbox: list[float] | None = None  # COCO [x, y, w, h] of the annotation, when the source has it
    iscrowd: int = 0
    file_name: str | None = None  # image file name (relative to the source's image folder)
    image_bytes: bytes | None = None  # encoded image, for sources that embed it

    def __post_init__(self):
        if len(self.sentences) != len(self.sentence_ids):
            raise DataError(
                f"ref {self.ref_id!r}: {len(self.sentences)} sentences but {len(self.sentence_ids)} sentence ids"
            )


@dataclass
class ReferringImageRecord:
    """All refs of one image, in source order; `image_row` says where a table-backed source keeps its bytes."""

    image_id: str
    file_name: str | None
    refs: list[ReferringRef]
    image_row: int | None = None

    def pooled_sentences(self) -> list[tuple[str, str, int]]:
        """Every (sentence, sentence_id, index of its ref) of the image, refs in order: the pool
        from which the GLaMM protocol samples."""
        return [
            (sentence, sentence_id, ref_index)
            for ref_index, ref in enumerate(self.refs)
            for sentence, sentence_id in zip(ref.sentences, ref.sentence_ids)
        ]

    @property
    def num_sentences(self) -> int:
        return sum(len(ref.sentences) for ref in self.refs)


@dataclass
class ReferringSample:
    """One image with the sentences to evaluate on it and one ground-truth mask per sentence.

    `masks` is bool [T, H, W] at the original image size; a no-target sentence has an all-zero mask.
    """

    index: int  # position in the data set: a stable id across processes and runs
    image_id: str
    image: Image.Image  # RGB
    sentences: list[str]
    sentence_ids: list[str]
    masks: np.ndarray
    ref_ids: list[str] = field(default_factory=list)  # the ref of each sentence, when known
    # bool [T, H, W]: pixels that count in neither intersection nor union (ReasonSeg's "ignore"
    # regions, LISA's ignore_index=255); None: every pixel counts.
    ignore_masks: np.ndarray | None = None
    # Per sentence, whether it is a long query (ReasonSeg's is_sentence); None: a data set without
    # query kinds (RefCOCO). It also chooses ReasonSeg's prompt form.
    is_sentence: list[bool] | None = None

    def __post_init__(self):
        num_sentences = len(self.sentences)
        if len(self.sentence_ids) != num_sentences:
            raise DataError(
                f"sample {self.index} (image {self.image_id}): {num_sentences} sentences "
                f"but {len(self.sentence_ids)} sentence ids"
            )
        if self.ref_ids and len(self.ref_ids) != num_sentences:
            raise DataError(
                f"sample {self.index} (image {self.image_id}): {num_sentences} sentences "
                f"but {len(self.ref_ids)} ref ids"
            )
        width, height = self.image.size
        expected_shape = (num_sentences, height, width)
        if self.masks.dtype != np.bool_ or self.masks.shape != expected_shape:
            raise DataError(
                f"sample {self.index} (image {self.image_id}): masks must be bool {expected_shape} "
                f"(one per sentence, at the image size), got {self.masks.dtype} {self.masks.shape}"
            )
        if self.ignore_masks is not None and (
            self.ignore_masks.dtype != np.bool_ or self.ignore_masks.shape != expected_shape
        ):
            raise DataError(
                f"sample {self.index} (image {self.image_id}): ignore masks must be bool {expected_shape}, "
                f"got {self.ignore_masks.dtype} {self.ignore_masks.shape}"
            )
        if self.is_sentence is not None and len(self.is_sentence) != num_sentences:
            raise DataError(
                f"sample {self.index} (image {self.image_id}): {num_sentences} sentences "
                f"but {len(self.is_sentence)} is_sentence flags"
            )
