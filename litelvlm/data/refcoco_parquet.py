"""Referring segmentation data in the `lmms-lab/RefCOCO` parquet schema, read through `datasets`.

The schema (as published for lmms-lab/RefCOCO, RefCOCOplus and RefCOCOg): one row per ref, with
  question_id  string        the COCO annotation id of the ref
  image        Image         struct {bytes, path}; the whole image, repeated in every row of that image
  question     string        a fixed region-captioning instruction (not a referring expression)
  answer       list<string>  the ref's referring sentences
  segmentation list<float32> one flat polygon [x0, y0, x1, y1, ...] (empty: no target)
  bbox         list<float32> COCO [x, y, w, h]
  iscrowd      int8
  file_name    string        e.g. "COCO_train2014_000000296747_0.jpg": the image's COCO name plus a suffix

Accepted sources, for a split name SPLIT (first layout that matches wins):
  FOLDER/SPLIT-*.parquet          e.g. val-00000-of-00004.parquet
  FOLDER/data/SPLIT-*.parquet     a snapshot of the hub repository
  FOLDER/SPLIT/*.parquet
  FILE.parquet                    one file, the split name is ignored
  owner/name                      a hub id, when no such local path exists (needs network access)

Rows are grouped into images (the GLaMM protocol pools every sentence of every ref of an image).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from PIL import Image, UnidentifiedImageError

from litelvlm.errors import DataError
from litelvlm.data.images import decode_rgb
from litelvlm.data.records import ReferringRecordDataset, choose_sentences  # noqa: F401  (public here too)
from litelvlm.data.samples import ReferringImageRecord, ReferringRef

PARQUET_COLUMNS = ("question_id", "image", "question", "answer", "segmentation", "bbox", "iscrowd", "file_name")
REQUIRED_COLUMNS = ("question_id", "image", "answer", "segmentation")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# "COCO_train2014_000000296747_0" -> "COCO_train2014_000000296747": a 12-digit COCO image number,
# then the optional per-row suffix that the lmms-lab files add.
_IMAGE_STEM = re.compile(r"^(?P<image>.+_\d{12})(?:_\d+)?$")


class CorruptImageError(DataError):
    """A row's image cannot be read or decoded."""


class MissingSplitError(DataError, FileNotFoundError):
    """A local source holds no parquet file of the asked split (e.g. no `train` for fine-tuning)."""


def split_files(folder: Path, split: str) -> list[Path]:
    """The parquet files of one split in a local folder, sorted by name (so row order is stable)."""
    patterns = (f"{split}-*.parquet", f"data/{split}-*.parquet", f"{split}/*.parquet")
    for pattern in patterns:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    found = sorted(str(path.relative_to(folder)) for path in folder.rglob("*.parquet"))[:10]
    raise MissingSplitError(
        f"no parquet files for split {split!r} in {folder}: looked for "
        f"{', '.join(patterns)}; parquet files present: {found or 'none'}"
    )


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def load_refcoco_rows(source: str | Path, split: str = "val", cache_dir: str | None = None):
    """Load the raw rows of one split as a `datasets.Dataset` (images left encoded)."""
    import datasets

    if isinstance(source, str) and _is_hub_id(source):
        try:
            rows = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
        except Exception as error:  # offline, unknown id, unknown split: all end the same way
            raise FileNotFoundError(
                f"{source!r} is not a local path, and loading it as the hub data set {source!r} "
                f"(split {split!r}) failed: {type(error).__name__}: {error}. Without network access, "
                f"download the repository's parquet files on a machine that has it (e.g. "
                f"`huggingface-cli download {source} --repo-type dataset --local-dir DIR`), copy DIR "
                f"here and pass DIR: it must hold DIR/data/{split}-*.parquet (the hub layout), "
                f"DIR/{split}-*.parquet or DIR/{split}/*.parquet."
            ) from error
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data folder {path} does not exist")
        files = [path] if path.is_file() else split_files(path, split)
        for file in files:
            check_parquet_file(file)
        with _quiet_progress(datasets):
            rows = datasets.load_dataset(
                "parquet", data_files=[str(file) for file in files], split="train", cache_dir=cache_dir
            )
    missing = [column for column in REQUIRED_COLUMNS if column not in rows.column_names]
    if missing:
        raise DataError(
            f"{source} (split {split!r}) lacks the columns {missing} of the lmms-lab/RefCOCO schema; "
            f"it has {rows.column_names}"
        )
    return rows.cast_column("image", datasets.Image(decode=False))


def check_parquet_file(file: Path) -> None:
    """A file that is not whole parquet (truncated by an interrupted download, say), named in one line."""
    try:
        pq.read_metadata(file)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{file} is not a readable parquet file ({error}); download it again") from None


@contextlib.contextmanager
def _quiet_progress(datasets):
    """No "Generating train split" bar: `datasets` names every parquet split "train", which reads as
    the wrong split while val is evaluated, and indexing a local file is quick anyway."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def image_id_from_file_name(file_name: str) -> str:
    """The image a row belongs to: its file name without extension and without the per-row suffix."""
    stem = Path(file_name).stem
    match = _IMAGE_STEM.match(stem)
    return match.group("image") if match else stem


def group_rows_by_image(rows) -> list[ReferringImageRecord]:
    """One record per image, in order of first appearance; refs in row order.

    Images are keyed by file name (see `image_id_from_file_name`); rows without one are keyed by a
    hash of their image bytes. Images whose refs hold no sentence are left out: nothing to score.
    """
    metadata_columns = [column for column in PARQUET_COLUMNS if column in rows.column_names and column != "image"]
    table = rows.select_columns(metadata_columns).to_dict()
    file_names = table.get("file_name") or [None] * len(rows)
    bboxes = table.get("bbox") or [None] * len(rows)
    iscrowds = table.get("iscrowd") or [0] * len(rows)
    records: dict[str, ReferringImageRecord] = {}
    for row in range(len(rows)):
        file_name = file_names[row]
        if file_name:
            image_id = image_id_from_file_name(file_name)
        else:
            image_bytes = rows[row]["image"]["bytes"] or b""
            image_id = "sha1:" + hashlib.sha1(image_bytes).hexdigest()
        ref_id = str(table["question_id"][row])
        sentences = [str(sentence) for sentence in (table["answer"][row] or [])]
        polygon = table["segmentation"][row] or []
        ref = ReferringRef(
            ref_id=ref_id,
            image_id=image_id,
            sentences=sentences,
            sentence_ids=[f"{ref_id}_{number}" for number in range(len(sentences))],
            segmentations=[list(polygon)] if len(polygon) > 0 else [],
            bbox=list(bboxes[row]) if bboxes[row] else None,
            iscrowd=int(iscrowds[row] or 0),
            file_name=file_name,
        )
        if image_id not in records:
            records[image_id] = ReferringImageRecord(image_id=image_id, file_name=file_name, refs=[], image_row=row)
        records[image_id].refs.append(ref)
    return [record for record in records.values() if record.num_sentences > 0]


class ReferringImageDataset(ReferringRecordDataset):
    """Item i: image i of the split with up to `max_sentences` of its pooled sentences and their masks.

    Images and masks are decoded on access, so building the data set only reads metadata.
    """

    def __init__(
        self,
        source: str | Path,
        split: str = "val",
        max_sentences: int | None = 3,
        seed: int = 0,
        cache_dir: str | None = None,
        protocol: str = "glamm",
    ):
        super().__init__(max_sentences=max_sentences, seed=seed, protocol=protocol)
        self.source = source
        self.split = split
        rows = load_refcoco_rows(source, split, cache_dir=cache_dir)
        self.records = group_rows_by_image(rows)
        self._images = rows.select_columns(["image"])

    def describe(self) -> str:
        return f"{self.source} split {self.split!r}"

    def load_image(self, record: ReferringImageRecord) -> Image.Image:
        """Decode a record's image to RGB, naming the row and file when that fails."""
        row = record.image_row
        cell = self._images[row]["image"]
        where = f"row {row} (file_name {record.file_name!r}) of {self.source} split {self.split!r}"
        data = cell.get("bytes")
        if data is None:
            path = cell.get("path")
            candidates = [Path(path), Path(self.source) / path] if path else []
            existing = [candidate for candidate in candidates if candidate.is_file()]
            if not existing:
                raise CorruptImageError(f"{where} has no image bytes, and its image path {path!r} is not a file")
            data = existing[0].read_bytes()
        try:
            return decode_rgb(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise CorruptImageError(f"{where}: the image cannot be decoded ({error})") from error
