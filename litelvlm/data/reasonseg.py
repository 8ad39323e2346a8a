"""LISA's ReasonSeg in its release layout, read and rasterised as LISA's evaluation does.

  ROOT/reason_seg/ReasonSeg/{train,val,test}/NAME.jpg   the image
  ROOT/reason_seg/ReasonSeg/{train,val,test}/NAME.json  {"text": [queries], "is_sentence": bool,
                                                         "shapes": [{"label", "points", "shape_type"}]}

The reference is dvlab-research/LISA @3cb2d43: `utils/dataset.py` ValDataset (lines 289-293, 381-411:
the images of a split by glob, the FIRST query only, the two prompt forms) and
`utils/data_processing.py` get_mask_from_json (lines 9-60: the mask). The folder given may be
`ReasonSeg/`, its parent `reason_seg/`, or the data root above that. Images are taken in file-name
order (the reference's glob order is the file system's). Facts: docs/datasets.md, "ReasonSeg".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from litelvlm.data.images import decode_rgb
from litelvlm.data.masks import MAX_OUTSIDE, MalformedSegmentationError
from litelvlm.data.records import ReferringRecordDataset, SkippedItem
from litelvlm.data.refcoco_parquet import CorruptImageError
from litelvlm.data.samples import ReferringImageRecord, ReferringRef, ReferringSample
from litelvlm.errors import DataError

REASON_SEG = "reason_seg"
REASONSEG = "ReasonSeg"
DATASET_NAME = "reasonseg"  # what --data.dataset names it
SPLIT_SIZES = {"train": 239, "val": 200, "test": 779}  # images per split, LISA README "Dataset"
REASONSEG_PROTOCOLS = ("lisa-reasonseg", "per-sentence")  # first query per image (LISA), or every query
TARGET, IGNORE = 1, 255


def read_annotation(path: Path) -> dict:
    """A ReasonSeg JSON file; a file that is not valid UTF-8 is read as cp1252, as the reference does."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    try:
        annotation = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error})") from None
    check_annotation(annotation, str(path))
    return annotation


def check_annotation(annotation, where: str) -> None:
    """The keys and types the reader relies on; one line naming the first problem."""
    if not isinstance(annotation, dict):
        raise DataError(f"{where}: a ReasonSeg annotation is a JSON object, got {type(annotation).__name__}")
    missing = [key for key in ("text", "is_sentence", "shapes") if key not in annotation]
    if missing:
        raise DataError(f"{where}: the annotation lacks the keys {missing}")
    text = annotation["text"]
    if isinstance(text, str):
        text = [text]
    if not text or not all(isinstance(query, str) and query.strip() for query in text):
        raise DataError(f"{where}: 'text' must be a non-empty list of non-empty queries, got {annotation['text']!r}")
    if not isinstance(annotation["is_sentence"], bool):
        raise DataError(f"{where}: 'is_sentence' must be true or false, got {annotation['is_sentence']!r}")
    if not isinstance(annotation["shapes"], list):
        raise DataError(f"{where}: 'shapes' must be a list")
    for number, shape in enumerate(annotation["shapes"]):
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str) or "points" not in shape:
            raise DataError(f"{where}: shape {number} needs a string 'label' and 'points'")


def queries(annotation: dict) -> list[str]:
    """The annotation's queries in file order (a lone string counts as one)."""
    text = annotation["text"]
    return [text] if isinstance(text, str) else list(text)


def _points(shape: dict, number: int, height: int, width: int) -> np.ndarray:
    """A shape's points as the reference passes them to OpenCV: int32 [1, N, 2], truncated toward zero."""
    points = shape["points"]
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise MalformedSegmentationError(f"shape {number} ({shape['label']!r}): points are not numbers") from None
    if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise MalformedSegmentationError(
            f"shape {number} ({shape['label']!r}): points must be a non-empty list of [x, y], got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise MalformedSegmentationError(f"shape {number} ({shape['label']!r}): a point is not finite")
    limit = MAX_OUTSIDE * max(height, width, 1)
    if np.abs(array).max() > limit:
        raise MalformedSegmentationError(
            f"shape {number} ({shape['label']!r}): a point lies more than {MAX_OUTSIDE} image sizes outside "
            f"the {width}x{height} (w x h) image"
        )
    return np.array([points], dtype=np.float64).astype(np.int32)


def mask_from_json(annotation: dict, height: int, width: int) -> np.ndarray:
    """uint8 [height, width]: 0 background, 1 target, 255 ignore, drawn as LISA's get_mask_from_json.

    Shapes labelled exactly "flag" (any case) are dropped; the rest are sorted by their drawn area,
    largest first, and each is drawn with OpenCV as an outline of thickness 1 plus its fill, value
    255 when the label contains "ignore" and 1 otherwise, so a smaller shape drawn later wins.
    """
    import cv2  # OpenCV is the reference's rasteriser; imported here so other readers never load it

    kept, areas = [], []
    for number, shape in enumerate(annotation["shapes"]):
        if shape["label"].lower() == "flag":  # the reference: deprecated, meaningless annotations
            continue
        points = _points(shape, number, height, width)
        scratch = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(scratch, points, True, 1, 1)
        cv2.fillPoly(scratch, points, 1)
        areas.append(scratch.sum())
        kept.append((shape["label"], points))
    mask = np.zeros((height, width), dtype=np.uint8)
    for index in list(np.argsort(areas)[::-1].astype(np.int32)):  # the reference's call, ties included
        label, points = kept[index]
        value = IGNORE if "ignore" in label.lower() else TARGET
        cv2.polylines(mask, points, True, value, 1)
        cv2.fillPoly(mask, points, value)
    return mask


def find_split_folder(path: Path, split: str) -> Path:
    """`ReasonSeg/<split>` from the ReasonSeg folder, its parent `reason_seg/`, or the data root."""
    path = Path(path).expanduser()
    candidates = [path / split, path / REASONSEG / split, path / REASON_SEG / REASONSEG / split]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    for base in (path, path / REASONSEG, path / REASON_SEG / REASONSEG):
        present = sorted(child.name for child in base.iterdir() if child.is_dir()) if base.is_dir() else []
        if set(present) & set(SPLIT_SIZES):
            raise DataError(f"{base} holds the ReasonSeg splits {present} but not {split!r}")
    raise FileNotFoundError(
        f"no ReasonSeg split {split!r} under {path}: looked for {', '.join(str(c) for c in candidates)} "
        f"(the release layout is DATA_ROOT/{REASON_SEG}/{REASONSEG}/{{train,val,test}}/NAME.jpg + NAME.json)"
    )


def is_reasonseg_layout(path: Path) -> bool:
    """A folder that holds ReasonSeg splits at one of the accepted levels."""
    path = Path(path)
    return any((base / split).is_dir() for base in (path / REASONSEG, path / REASON_SEG / REASONSEG) for split in SPLIT_SIZES) or (
        path.name == REASONSEG and any((path / split).is_dir() for split in SPLIT_SIZES)
    )


class ReasonSegDataset(ReferringRecordDataset):
    """Item i: one ReasonSeg image with one query (protocol `lisa-reasonseg`: the first, LISA's
    validation; `per-sentence`: every query, one item each) and its target and ignore masks.

    Every query of an image refers to the same target. A missing or unreadable JSON is found at
    index time, a bad image or polygon at load time; `on_error="skip"` records them as the
    RefCOCO reader does, `raise` (default) stops naming the file.
    """

    load_errors = (FileNotFoundError, CorruptImageError, MalformedSegmentationError)

    def __init__(self, root: str | Path, split: str = "val", protocol: str = "lisa-reasonseg", on_error: str = "raise"):
        if protocol not in REASONSEG_PROTOCOLS:
            raise DataError(
                f"ReasonSeg is evaluated with the protocol {' or '.join(REASONSEG_PROTOCOLS)}, got {protocol!r}"
            )
        super().__init__(max_sentences=None, seed=0, protocol=protocol)
        self.root = Path(root).expanduser()
        self.split = split
        self.on_error = on_error
        self.folder = find_split_folder(self.root, split)
        self.annotations: dict[str, dict] = {}
        self.records = []
        for image_path in sorted(self.folder.glob("*.jpg")):
            json_path = image_path.with_suffix(".json")
            try:
                if not json_path.is_file():
                    raise FileNotFoundError(f"image {image_path.name} has no annotation {json_path}")
                annotation = read_annotation(json_path)
            except (FileNotFoundError, DataError, OSError) as error:
                if on_error == "raise":
                    raise type(error)(f"{self.describe()}: {error}") from None
                self.skipped.append(SkippedItem(image_path.stem, str(error), "index", file=str(json_path)))
                continue
            self.annotations[image_path.stem] = annotation
            self.records.append(self._record(image_path, annotation))
        if not self.records:
            detail = f" ({len(self.skipped)} skipped)" if self.skipped else ""
            raise DataError(f"{self.describe()}: no image with its annotation in {self.folder}{detail}")

    @staticmethod
    def _record(image_path: Path, annotation: dict) -> ReferringImageRecord:
        name = image_path.stem
        texts = queries(annotation)
        ref = ReferringRef(
            ref_id=name,
            image_id=name,
            sentences=texts,
            sentence_ids=[f"{name}:{number}" for number in range(len(texts))],
            segmentations=[],
            file_name=image_path.name,
        )
        return ReferringImageRecord(image_id=name, file_name=image_path.name, refs=[ref])

    def describe(self) -> str:
        return f"ReasonSeg split {self.split!r} under {self.root}"

    def load_image(self, record: ReferringImageRecord) -> Image.Image:
        path = self.folder / record.file_name
        try:
            return decode_rgb(path)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise CorruptImageError(f"image {record.image_id}: {path} cannot be decoded ({error})") from error

    def build_sample(self, index: int, positions: list[int] | None = None) -> ReferringSample:
        record_index, item_positions = self.items[index]
        record = self.records[record_index]
        positions = item_positions if positions is None else positions
        annotation = self.annotations[record.image_id]
        image = self.load_image(record)
        try:
            labels = mask_from_json(annotation, image.height, image.width)
        except MalformedSegmentationError as error:
            raise MalformedSegmentationError(f"{self.folder / record.image_id}.json: {error}") from error
        ref = record.refs[0]
        count = len(positions)
        return ReferringSample(
            index=index,
            image_id=record.image_id,
            image=image,
            sentences=[ref.sentences[position] for position in positions],
            sentence_ids=[ref.sentence_ids[position] for position in positions],
            masks=np.repeat((labels == TARGET)[None], count, axis=0),
            ref_ids=[ref.ref_id] * count,
            ignore_masks=np.repeat((labels == IGNORE)[None], count, axis=0),
            is_sentence=[bool(annotation["is_sentence"])] * count,
        )


def polygon_inside(points, height: int, width: int) -> bool:
    """Every point of a shape (already valid for `mask_from_json`) lies in [0, width] x [0, height]."""
    array = np.asarray(points, dtype=np.float64)
    xs, ys = array[:, 0], array[:, 1]
    return bool((xs >= 0).all() and (xs <= width).all() and (ys >= 0).all() and (ys <= height).all())
