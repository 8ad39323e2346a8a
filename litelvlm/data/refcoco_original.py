"""RefCOCO, RefCOCO+, RefCOCOg and gRefCOCO in the layout the reference evaluations read.

  ROOT/Refer_Segm/<dataset>/refs(<split_by>).p   refcoco, refcoco+: unc; refcocog: umd (the refer API)
  ROOT/Refer_Segm/grefcoco/grefs(unc).json       as gRefCOCO ships it (grefs(unc).p also read, first,
                                                 as GLaMM's and LISA's G_REFER do)
  ROOT/Refer_Segm/<dataset>/instances.json       COCO-style: images, annotations, categories
  ROOT/coco_2014/train2014/COCO_train2014_<12-digit image id>.jpg

A refs file is a list of dicts: ref_id, ann_id (a list for gRefCOCO, [-1] when the sentence has
no target), image_id, split, sentences [{sent, sent_id, raw, tokens}], category_id, file_name.
The ref's own file_name carries a per-ref suffix ("COCO_train2014_000000388997_445869.jpg"); the
image file is the one instances.json names for the image id.

Problems are found in two places. At index time (building the data set, metadata only): an image
or annotation id that instances.json lacks, an annotation without a segmentation key, a ref without
sentences, an image file that does not exist. At load time (`__getitem__`): an image that cannot
be decoded or whose size disagrees with instances.json, a segmentation pycocotools cannot read.
`on_error="raise"` (default) raises naming the ref, image and file; `on_error="skip"` records a
`SkippedItem` in `dataset.skipped` instead: index-time problems leave the ref (or the image, for
a missing file) out of the data set, load-time problems make `__getitem__` return None, and the
collate must drop it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from litelvlm.errors import DataError
from litelvlm.data.masks import MalformedSegmentationError
from litelvlm.data.images import decode_rgb
from litelvlm.data.records import ReferringRecordDataset, SkippedItem
from litelvlm.data.refcoco_parquet import CorruptImageError
from litelvlm.data.safe_pickle import load_refs_pickle
from litelvlm.data.samples import ReferringImageRecord, ReferringRef, Segmentation

REFER_SEGM = "Refer_Segm"
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}
DATASETS = tuple(DEFAULT_SPLIT_BY)
# The evaluation splits of each set (gRefCOCO's first release held testA and testB back).
BENCHMARK_SPLITS = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
    "grefcoco": ("val", "testA", "testB"),
}
# Where the COCO train2014 images are looked for, in order: the documented place (GLaMM's
# docs/datasets.md), then the one GLaMM's dataset code ends up joining (Refer_Segm/coco_2014/...).
IMAGE_FOLDERS = ("coco_2014/train2014", f"{REFER_SEGM}/coco_2014/train2014")
ON_ERROR_MODES = ("raise", "skip")
NO_TARGET_ANN_ID = -1


class AnnotationError(DataError):
    """The refs file and instances.json disagree, or an annotation lacks what a mask needs."""


def refs_file_names(dataset: str, split_by: str) -> tuple[str, ...]:
    """The refs file names of a set, in the order the reference readers try them."""
    if dataset == "grefcoco":
        return (f"grefs({split_by}).p", f"grefs({split_by}).json")
    return (f"refs({split_by}).p",)


def check_dataset_name(dataset: str | None) -> str:
    if dataset not in DEFAULT_SPLIT_BY:
        raise DataError(f"the original layout holds the data sets {list(DATASETS)}; name one, got {dataset!r}")
    return dataset


def find_refs_file(dataset_dir: Path, dataset: str, split_by: str) -> Path:
    names = refs_file_names(dataset, split_by)
    for name in names:
        if (dataset_dir / name).is_file():
            return dataset_dir / name
    present = sorted(path.name for path in dataset_dir.glob("*")) if dataset_dir.is_dir() else []
    raise FileNotFoundError(
        f"no refs file for {dataset} (split_by {split_by!r}) in {dataset_dir}: looked for "
        f"{' or '.join(names)}; the folder holds {present or 'nothing'} (tools/prepare_data.py says where to get it)"
    )


def find_image_folder(root: Path) -> Path | None:
    for relative in IMAGE_FOLDERS:
        if (root / relative).is_dir():
            return root / relative
    return None


REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


def read_refs(path: Path) -> list[dict]:
    """A refs file: pickles through the containers-only unpickler, JSON as JSON."""
    if path.suffix == ".json":
        refs = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
            raise DataError(f"{path}: a refs file holds a list of dicts")
    else:
        refs = load_refs_pickle(path)
    for position, ref in enumerate(refs):
        missing = [key for key in REQUIRED_REF_KEYS if key not in ref]
        if missing:
            raise DataError(f"{path}: ref {position} (ref_id {ref.get('ref_id')}) lacks the keys {missing}")
    return refs


def read_instances(path: Path) -> tuple[dict[Any, dict], dict[Any, dict]]:
    """instances.json as (images by id, annotations by id)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (tools/prepare_data.py says where to get it)")
    instances = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in ("images", "annotations") if key not in instances]
    if missing:
        raise DataError(f"{path}: a COCO instances file has 'images' and 'annotations'; this one lacks {missing}")
    images = {image["id"]: image for image in instances["images"]}
    annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    return images, annotations


def target_annotation_ids(ref: dict) -> list:
    """The annotations a ref's sentences point to; [] when there is no target (gRefCOCO's [-1])."""
    ann_ids = ref.get("ann_id")
    if ann_ids is None:
        return []
    if not isinstance(ann_ids, list):
        ann_ids = [ann_ids]
    if NO_TARGET_ANN_ID in ann_ids:
        if len(ann_ids) != 1:
            raise AnnotationError(f"ref {ref.get('ref_id')}: ann_id {ann_ids} mixes 'no target' (-1) with annotations")
        return []
    return ann_ids


def annotation_segmentations(segmentation: Any) -> list[Segmentation]:
    """The pieces of one annotation whose union is the object: its polygon list, its RLE, or each
    RLE of a list of RLEs (a form GLaMM's reader accepts)."""
    if isinstance(segmentation, list) and all(isinstance(piece, dict) for piece in segmentation):
        return list(segmentation)
    return [segmentation]


def image_id_from_coco_name(file_name: str) -> str:
    """'COCO_train2014_000000098304.jpg' -> 'COCO_train2014_000000098304' (the parquet path's id too)."""
    return Path(file_name).stem


class _Indexer:
    """Turns the refs of one split into image records, raising or recording each problem."""

    def __init__(self, images: dict, annotations: dict, where: str, skipped: list[SkippedItem] | None):
        self.images = images
        self.annotations = annotations
        self.where = where
        self.skipped = skipped  # None: raise

    def problem(self, error: Exception, image_id: str, ref_id: str | None = None, file: str | None = None) -> None:
        if self.skipped is None:
            raise error
        self.skipped.append(SkippedItem(image_id, str(error), "index", ref_id=ref_id, file=file))

    def ref(self, raw: dict) -> ReferringRef | None:
        ref_id = str(raw["ref_id"])
        image = self.images.get(raw["image_id"])
        if image is None:
            error = AnnotationError(
                f"ref {ref_id} ({self.where}): its image id {raw['image_id']} is not in instances.json"
            )
            return self.problem(error, str(raw["image_id"]), ref_id)
        image_id = image_id_from_coco_name(image["file_name"])
        sentences = raw.get("sentences") or []
        if not sentences or any("sent" not in sentence for sentence in sentences):
            error = AnnotationError(
                f"ref {ref_id} of image {image_id} ({self.where}): "
                + ("its sentence list is empty" if not sentences else "a sentence lacks its 'sent' text")
            )
            return self.problem(error, image_id, ref_id)
        try:
            ann_ids = target_annotation_ids(raw)
            segmentations: list[Segmentation] = []
            for ann_id in ann_ids:
                segmentations.extend(self.segmentations(ann_id, raw, ref_id, image_id))
        except AnnotationError as error:
            return self.problem(error, image_id, ref_id)
        single = self.annotations[ann_ids[0]] if len(ann_ids) == 1 else {}
        return ReferringRef(
            ref_id=ref_id,
            image_id=image_id,
            sentences=[str(sentence["sent"]) for sentence in sentences],
            sentence_ids=[
                str(sentence.get("sent_id", f"{ref_id}_{number}")) for number, sentence in enumerate(sentences)
            ],
            segmentations=segmentations,
            bbox=list(single["bbox"]) if single.get("bbox") else None,
            iscrowd=int(single.get("iscrowd", 0) or 0),
            file_name=image["file_name"],
        )

    def segmentations(self, ann_id, raw: dict, ref_id: str, image_id: str) -> list[Segmentation]:
        annotation = self.annotations.get(ann_id)
        where = f"ref {ref_id} of image {image_id} ({self.where})"
        if annotation is None:
            raise AnnotationError(f"{where}: annotation {ann_id} is not in instances.json")
        if annotation.get("image_id") != raw["image_id"]:
            raise AnnotationError(
                f"{where}: annotation {ann_id} belongs to image {annotation.get('image_id')}, not {raw['image_id']}"
            )
        segmentation = annotation.get("segmentation")
        if segmentation is None:
            raise AnnotationError(f"{where}: annotation {ann_id} has no segmentation")
        if isinstance(segmentation, (list, tuple)) and len(segmentation) == 0:
            # An empty list adds nothing to the ref's mask, as in LISA's and GLaMM's readers
            # (`utils/refer_seg_dataset.py`: `len(ann["segmentation"]) == 0` gives an all-zero mask).
            return []
        return annotation_segmentations(segmentation)

    def records(self, refs: Iterable[dict], image_folder: Path) -> list[ReferringImageRecord]:
        """Image records in order of first appearance in the refs file, refs in file order."""
        records: dict[str, ReferringImageRecord] = {}
        for raw in refs:
            ref = self.ref(raw)
            if ref is None:
                continue
            if ref.image_id not in records:
                records[ref.image_id] = ReferringImageRecord(image_id=ref.image_id, file_name=ref.file_name, refs=[])
            records[ref.image_id].refs.append(ref)
        kept = []
        for record in records.values():
            path = image_folder / record.file_name
            if not path.is_file():
                ref_ids = ", ".join(ref.ref_id for ref in record.refs)
                error = FileNotFoundError(
                    f"image {record.image_id} (refs {ref_ids}; {self.where}): the image file {path} does not exist"
                )
                self.problem(error, record.image_id, file=str(path))
                continue
            kept.append(record)
        return kept


class OriginalReferringDataset(ReferringRecordDataset):
    """Item i: image i of the split (first appearance in the refs file) with up to `max_sentences`
    of its pooled sentences and their masks. Same items as `ReferringImageDataset` gives for the
    same data in parquet form.

    Args:
        root: the folder that holds `Refer_Segm/` and `coco_2014/`.
        dataset: refcoco, refcoco+, refcocog or grefcoco.
        split: e.g. train (fine-tuning), val, testA, testB (refcoco, refcoco+), val, test (refcocog).
        split_by: the refs file variant; None: unc, except umd for refcocog.
        on_error: "raise" or "skip" (see the module docstring).
    """

    load_errors = (FileNotFoundError, CorruptImageError, MalformedSegmentationError)

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str = "val",
        split_by: str | None = None,
        max_sentences: int | None = 3,
        seed: int = 0,
        on_error: str = "raise",
        protocol: str = "glamm",
    ):
        super().__init__(max_sentences=max_sentences, seed=seed, protocol=protocol)
        if on_error not in ON_ERROR_MODES:
            raise DataError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
        self.root = Path(root).expanduser()
        self.dataset = check_dataset_name(dataset)
        self.split = split
        self.split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        self.on_error = on_error
        dataset_dir = self.root / REFER_SEGM / dataset
        self.refs_file = find_refs_file(dataset_dir, dataset, self.split_by)
        self.instances_file = dataset_dir / "instances.json"
        self.image_folder = find_image_folder(self.root)
        if self.image_folder is None:
            raise FileNotFoundError(
                f"no COCO train2014 image folder under {self.root}: looked for "
                f"{' and '.join(str(self.root / folder) for folder in IMAGE_FOLDERS)}"
            )
        refs = read_refs(self.refs_file)
        split_refs = [ref for ref in refs if ref.get("split") == split]
        if not split_refs:
            available = sorted({str(ref.get("split")) for ref in refs})
            raise DataError(f"{self.refs_file} has no ref in split {split!r}; its splits: {available}")
        images, annotations = read_instances(self.instances_file)
        indexer = _Indexer(images, annotations, self.describe(), self.skipped if on_error == "skip" else None)
        self.records = indexer.records(split_refs, self.image_folder)
        by_name = {image["file_name"]: image for image in images.values()}
        self._image_sizes = {  # (width, height) per record, to check decoded images against
            record.image_id: (by_name[record.file_name].get("width"), by_name[record.file_name].get("height"))
            for record in self.records
        }
        if not self.records:  # skip mode left nothing: a set-up problem, not a few bad samples
            reasons = "; ".join(item.reason for item in self.skipped[:3])
            raise DataError(
                f"{self.describe()}: every image was skipped ({len(self.skipped)} problems), e.g. {reasons}"
            )

    def describe(self) -> str:
        return f"{self.dataset} ({self.split_by}) split {self.split!r} under {self.root}"

    def image_path(self, record: ReferringImageRecord) -> Path:
        return self.image_folder / record.file_name

    def load_image(self, record: ReferringImageRecord) -> Image.Image:
        """Decode a record's image to RGB; its size must be the one instances.json gives."""
        path = self.image_path(record)
        if not path.is_file():
            raise FileNotFoundError(f"image {record.image_id}: the image file {path} does not exist")
        try:
            image = decode_rgb(path)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise CorruptImageError(f"image {record.image_id}: {path} cannot be decoded ({error})") from error
        width, height = self._image_sizes.get(record.image_id, (None, None))
        if width is not None and (image.width, image.height) != (width, height):
            raise CorruptImageError(
                f"image {record.image_id}: {path} is {image.width}x{image.height} (w x h) but instances.json "
                f"says {width}x{height}; the masks would not line up"
            )
        return image

    def image_file(self, record: ReferringImageRecord) -> str:
        return str(self.image_path(record))
