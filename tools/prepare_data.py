"""Check a data folder against the original RefCOCO-family layout; optionally convert it to parquet.

    python tools/prepare_data.py ROOT [--dataset refcoco --dataset refcocog ...] [--split val ...]
                                      [--verify] [--to-parquet OUT [--skip-unrepresentable]]
    python tools/prepare_data.py ROOT --dataset reasonseg [--split val ...]

`--dataset reasonseg` checks LISA's ReasonSeg folder (ROOT may be the data root, reason_seg/ or
ReasonSeg/; default: every split present): it reads every JSON and image and lists, one line each,
a missing or unreadable JSON, an unreadable image, a JSON without its image and a polygon with points
outside its image; nothing stops the check.

Prints every missing piece with its expected path and where to get it; exit code 0 when all the
requested data sets and splits are complete, 1 otherwise. Without `--verify` it checks that files
exist (and says so); `--verify` also decodes every image and draws every mask, with a progress bar,
and lists each unreadable file in one line. `--to-parquet OUT` writes
OUT/<dataset>/data/<split>-00000-of-00001.parquet in the lmms-lab/RefCOCO schema, which
`ReferringImageDataset` (and `datasets`) read. docs/datasets.md explains the layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from litelvlm.data.refcoco_original import (
    BENCHMARK_SPLITS,
    DATASETS,
    DEFAULT_SPLIT_BY,
    IMAGE_FOLDERS,
    REFER_SEGM,
    OriginalReferringDataset,
    find_image_folder,
    image_id_from_coco_name,
    read_instances,
    read_refs,
    refs_file_names,
)
from litelvlm.data.masks import MalformedSegmentationError, ref_mask
from litelvlm.data.reasonseg import (
    DATASET_NAME as REASONSEG,
    SPLIT_SIZES as REASONSEG_SPLIT_SIZES,
    find_split_folder,
    mask_from_json,
    polygon_inside,
    read_annotation,
)
from litelvlm.data.images import decode_rgb
from litelvlm.data.refcoco_parquet import CorruptImageError, image_id_from_file_name
from litelvlm.data.samples import ReferringRef
from litelvlm.errors import DataError
from litelvlm.data.synthetic import PARQUET_SCHEMA, QUESTION

STANDARD_DATASETS = ("refcoco", "refcoco+", "refcocog")  # the benchmark; grefcoco on request
# Splits a release may lack without the folder being incomplete (gRefCOCO first shipped train/val).
OPTIONAL_SPLITS = {("grefcoco", "testA"), ("grefcoco", "testB")}
_REFER_ARCHIVE = "https://web.archive.org/web/{stamp}/https://bvisionweb1.cs.unc.edu/licheng/referit/data/{name}.zip"
_ARCHIVE_STAMPS = {"refcoco": "20220413011718", "refcoco+": "20220413011656", "refcocog": "20220413012904"}
COCO_IMAGES_SOURCE = (
    "the COCO 2014 train images (cocodataset.org, http://images.cocodataset.org/zips/train2014.zip, "
    "about 13 GB): unzip so that ROOT/coco_2014/train2014/COCO_train2014_000000000009.jpg exists"
)


def annotations_source(dataset: str) -> str:
    """Where a reader finds a data set's refs file and instances.json."""
    if dataset == "grefcoco":
        return (
            "gRefCOCO (github.com/henghuiding/gRefCOCO; OneDrive and Google Drive links in its README): "
            "put grefs(unc).json and instances.json into ROOT/Refer_Segm/grefcoco/"
        )
    url = _REFER_ARCHIVE.format(stamp=_ARCHIVE_STAMPS[dataset], name=dataset)
    return (
        f"{dataset}.zip of the refer API (github.com/lichengunc/refer, 'Download'; its UNC server is down, "
        f"GLaMM's docs/datasets.md links the archived copy {url}): unzip into ROOT/Refer_Segm/ so that "
        f"ROOT/Refer_Segm/{dataset}/{refs_file_names(dataset, DEFAULT_SPLIT_BY[dataset])[0]} exists"
    )


@dataclass
class Finding:
    """Something missing or wrong: the path it concerns, what it is, how to fix it."""

    path: Path
    what: str
    fix: str


@dataclass
class SplitSummary:
    dataset: str
    split: str
    images: int
    refs: int
    sentences: int


@dataclass
class LayoutReport:
    root: Path
    missing: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    splits: list[SplitSummary] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


def _check_dataset(root: Path, dataset: str, splits, image_folder: Path | None, report: LayoutReport) -> None:
    split_by = DEFAULT_SPLIT_BY[dataset]
    dataset_dir = root / REFER_SEGM / dataset
    names = refs_file_names(dataset, split_by)
    refs_file = next((dataset_dir / name for name in names if (dataset_dir / name).is_file()), None)
    instances_file = dataset_dir / "instances.json"
    source = annotations_source(dataset)
    if refs_file is None:
        expected = dataset_dir / names[-1]
        report.missing.append(Finding(expected, f"the {dataset} refs file ({' or '.join(names)})", source))
    if not instances_file.is_file():
        report.missing.append(Finding(instances_file, f"the {dataset} annotations (instances.json)", source))
    if refs_file is None or not instances_file.is_file():
        return
    try:
        refs = read_refs(refs_file)
    except Exception as error:  # an unsafe or damaged file: report it with the rest
        report.missing.append(Finding(refs_file, f"a readable {dataset} refs file ({error})", source))
        return
    try:
        images, _ = read_instances(instances_file)
    except Exception as error:
        report.missing.append(Finding(instances_file, f"a readable {dataset} instances.json ({error})", source))
        return
    for split in splits or BENCHMARK_SPLITS[dataset]:
        split_refs = [ref for ref in refs if ref.get("split") == split]
        if not split_refs:
            message = f"{dataset}: {refs_file.name} has no ref in split {split!r}"
            if (dataset, split) in OPTIONAL_SPLITS:
                report.notes.append(message + " (not in every release of this set)")
            else:
                report.missing.append(Finding(refs_file, f"the {split!r} split of {dataset}", source))
            continue
        known = [ref for ref in split_refs if ref["image_id"] in images]
        file_names = list(dict.fromkeys(images[ref["image_id"]]["file_name"] for ref in known))
        unknown = sorted({str(ref["image_id"]) for ref in split_refs if ref["image_id"] not in images})
        if unknown:
            report.missing.append(
                Finding(instances_file, f"{len(unknown)} image ids of {dataset} {split} (e.g. {unknown[:5]})", source)
            )
        report.splits.append(
            SplitSummary(
                dataset, split, len(file_names), len(split_refs), sum(len(ref["sentences"]) for ref in split_refs)
            )
        )
        if image_folder is not None:
            absent = [name for name in file_names if not (image_folder / name).is_file()]
            if absent:
                shown = ", ".join(absent[:10]) + (", ..." if len(absent) > 10 else "")
                report.missing.append(
                    Finding(
                        image_folder,
                        f"{len(absent)} of the {len(file_names)} images of {dataset} {split}: {shown}",
                        COCO_IMAGES_SOURCE,
                    )
                )


def check_layout(root: str | Path, datasets=STANDARD_DATASETS, splits=None) -> LayoutReport:
    """Everything the requested data sets (and splits; default: their benchmark splits) need under ROOT."""
    root = Path(root).expanduser()
    report = LayoutReport(root)
    image_folder = find_image_folder(root)
    if image_folder is None:
        report.missing.append(Finding(root / IMAGE_FOLDERS[0], "the COCO train2014 image folder", COCO_IMAGES_SOURCE))
    for dataset in datasets:
        if dataset not in DATASETS:
            raise ValueError(f"unknown data set {dataset!r}; known: {list(DATASETS)}")
        _check_dataset(root, dataset, splits, image_folder, report)
    return report


def format_report(report: LayoutReport) -> str:
    lines = [f"data folder: {report.root}"]
    for summary in report.splits:
        lines.append(
            f"  found {summary.dataset} {summary.split}: {summary.images} images, {summary.refs} refs, "
            f"{summary.sentences} sentences"
        )
    lines += [f"  note: {note}" for note in report.notes]
    if report.complete:
        lines.append("complete: nothing is missing (checked that the files exist; --verify decodes every image and mask)")
        return "\n".join(lines)
    lines.append(f"MISSING ({len(report.missing)}):")
    for finding in report.missing:
        lines += [f"  - {finding.what}", f"      at:  {finding.path}", f"      get: {finding.fix}"]
    return "\n".join(lines)


# --- --verify: decode what exists -------------------------------------------------------------------


@dataclass
class VerifyReport:
    images: int = 0  # distinct image files decoded
    masks: int = 0  # ref targets drawn
    bad: dict[str, str] = field(default_factory=dict)  # file (or annotation) -> what is wrong with it


def verify_files(root: str | Path, splits: list[SplitSummary], progress: bool = True) -> VerifyReport:
    """Decode every image and draw every ref's mask of the checked splits, as an evaluation would.

    An image that several splits share is decoded once; each bad file is reported once.
    """
    from tqdm import tqdm

    report, sizes = VerifyReport(), {}  # image path -> (height, width) once decoded
    sources = []
    for summary in splits:
        try:
            sources.append(OriginalReferringDataset(root, summary.dataset, summary.split, max_sentences=None, on_error="skip"))
        except (DataError, FileNotFoundError) as error:
            report.bad[f"{summary.dataset} {summary.split}"] = str(error)
    total = sum(len(source.records) for source in sources)
    with tqdm(total=total, desc="decoding images and masks", unit="image", disable=not progress, file=sys.stderr) as bar:
        for source in sources:
            for item in source.skipped:  # annotations that cannot become a sample
                report.bad.setdefault(f"{source.instances_file} (ref {item.ref_id}, image {item.image_id})", item.reason)
            for record in source.records:
                bar.update()
                path = source.image_path(record)
                if str(path) in report.bad:
                    continue
                if path not in sizes:
                    try:
                        image = source.load_image(record)
                    except (FileNotFoundError, CorruptImageError) as error:
                        report.bad[str(path)] = str(error)
                        continue
                    sizes[path] = (image.height, image.width)
                    report.images += 1
                for ref in record.refs:
                    try:
                        ref_mask(ref.segmentations, *sizes[path])
                        report.masks += 1
                    except (MalformedSegmentationError, ValueError) as error:
                        key = f"{source.instances_file} (ref {ref.ref_id}, image {record.image_id})"
                        report.bad.setdefault(key, str(error))
    return report


def format_verify_report(report: VerifyReport) -> str:
    if not report.bad:
        return f"verified: {report.images} images and {report.masks} masks decode"
    lines = [f"UNREADABLE ({len(report.bad)}), one per line:"]
    lines += [f"  - {where}: {reason}" for where, reason in report.bad.items()]
    return "\n".join(lines)


# --- ReasonSeg --------------------------------------------------------------------------------------

REASONSEG_SOURCE = (
    "LISA's ReasonSeg release (github.com/dvlab-research/LISA, README 'Dataset', Google Drive link): unzip so "
    "that ROOT/reason_seg/ReasonSeg/val/NAME.jpg and NAME.json exist"
)


@dataclass
class ReasonSegReport:
    found: list[str] = field(default_factory=list)  # one line per split checked
    problems: list[str] = field(default_factory=list)  # one line per bad file or shape
    notes: list[str] = field(default_factory=list)


def check_reasonseg(root: str | Path, splits=None) -> ReasonSegReport:
    """Read every JSON and image of the ReasonSeg splits (default: those present) and list each problem."""
    root, report = Path(root).expanduser(), ReasonSegReport()
    wanted = list(splits or REASONSEG_SPLIT_SIZES)
    folders = {}
    for split in wanted:
        try:
            folders[split] = find_split_folder(root, split)
        except (FileNotFoundError, DataError) as error:
            if splits:  # asked for by name: its absence is a problem
                report.problems.append(f"{error}; get: {REASONSEG_SOURCE}")
    if not folders and not splits:
        report.problems.append(f"no ReasonSeg split under {root}; get: {REASONSEG_SOURCE}")
    for split, folder in folders.items():
        images = sorted(folder.glob("*.jpg"))
        stems = {path.stem for path in images}
        report.problems += [f"{path}: no image {path.stem}.jpg beside it" for path in sorted(folder.glob("*.json")) if path.stem not in stems]
        queries = {False: 0, True: 0}
        for path in images:
            json_path = path.with_suffix(".json")
            if not json_path.is_file():
                report.problems.append(f"{json_path}: missing (the annotation of {path.name})")
                continue
            try:
                annotation = read_annotation(json_path)
                image = decode_rgb(path)
            except (DataError, OSError, ValueError) as error:
                report.problems.append(f"{json_path if isinstance(error, DataError) else path}: unreadable ({error})")
                continue
            queries[annotation["is_sentence"]] += len(annotation["text"])
            try:  # first: points that are not [x, y] pairs of numbers
                mask_from_json(annotation, image.height, image.width)
            except MalformedSegmentationError as error:
                report.problems.append(f"{json_path}: {error}")
                continue
            for number, shape in enumerate(annotation["shapes"]):
                if shape["label"].lower() != "flag" and not polygon_inside(shape["points"], image.height, image.width):
                    report.problems.append(
                        f"{json_path}: shape {number} ({shape['label']!r}) has points outside the "
                        f"{image.width}x{image.height} (w x h) image"
                    )
        report.found.append(f"found ReasonSeg {split}: {len(images)} images, {queries[False]} short and {queries[True]} long queries")
        if len(images) != REASONSEG_SPLIT_SIZES.get(split, len(images)):
            report.notes.append(f"ReasonSeg {split} holds {len(images)} images; the release has {REASONSEG_SPLIT_SIZES[split]}")
    return report


def format_reasonseg_report(report: ReasonSegReport) -> str:
    lines = [*report.found, *(f"  note: {note}" for note in report.notes)]
    if not report.problems:
        return "\n".join(lines + ["complete: every ReasonSeg image and annotation reads"])
    return "\n".join(lines + [f"PROBLEMS ({len(report.problems)}), one per line:"] + [f"  - {p}" for p in report.problems])


# --- conversion to the lmms-lab/RefCOCO parquet schema -------------------------------------------


class UnrepresentableRefError(ValueError):
    """The parquet schema holds one flat polygon per ref; this ref's target is not one polygon."""


def ref_polygon(ref: ReferringRef) -> list[float]:
    """The single flat polygon of a ref ([] for no target), as the parquet `segmentation` holds it."""
    if not ref.segmentations:
        return []
    if len(ref.segmentations) > 1:
        raise UnrepresentableRefError(f"ref {ref.ref_id}: its target is {len(ref.segmentations)} annotations or RLEs")
    segmentation = ref.segmentations[0]
    if isinstance(segmentation, dict):
        raise UnrepresentableRefError(f"ref {ref.ref_id}: its target is an RLE, not a polygon")
    if segmentation and all(isinstance(value, list) for value in segmentation):
        if len(segmentation) != 1:
            raise UnrepresentableRefError(f"ref {ref.ref_id}: its annotation has {len(segmentation)} polygons")
        segmentation = segmentation[0]
    return [float(value) for value in segmentation]


@dataclass
class ConversionResult:
    path: Path
    rows: int
    skipped_refs: list[dict]


def convert_to_parquet(
    root: str | Path,
    dataset: str,
    split: str,
    out_dir: str | Path,
    split_by: str | None = None,
    skip_unrepresentable: bool = False,
    rows_per_group: int = 64,
) -> ConversionResult:
    """Write OUT/<dataset>/data/<split>-00000-of-00001.parquet: one row per ref, images in data-set order.

    Image bytes are copied from the files unchanged, so both loaders decode the same pixels. Refs the
    schema cannot hold (several polygons, RLE, several annotations) stop the conversion, or, with
    `skip_unrepresentable`, are left out and listed in OUT/<dataset>/skipped-<split>.json.
    """
    source = OriginalReferringDataset(root, dataset, split, split_by=split_by, max_sentences=None)
    rows, skipped, written = [], [], 0
    for record in source.records:
        for ref in record.refs:
            try:
                rows.append((record, ref, ref_polygon(ref)))
            except UnrepresentableRefError as error:
                skipped.append({"ref_id": ref.ref_id, "image_id": record.image_id, "reason": str(error)})
    if skipped and not skip_unrepresentable:
        shown = "; ".join(item["reason"] for item in skipped[:5])
        raise UnrepresentableRefError(
            f"{len(skipped)} refs of {dataset} {split} cannot be written in the lmms-lab parquet schema, which "
            f"holds one flat polygon per ref: {shown}{' ...' if len(skipped) > 5 else ''}. Evaluate the original "
            f"layout directly, or pass --skip-unrepresentable to leave them out (they are listed in a report)."
        )
    target = Path(out_dir) / dataset / "data" / f"{split}-00000-of-00001.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    current_image: tuple[str, bytes] = ("", b"")  # rows come image by image: read each file once
    with pq.ParquetWriter(partial, PARQUET_SCHEMA) as writer:
        for start in range(0, len(rows), rows_per_group):
            columns = {name: [] for name in PARQUET_SCHEMA.names}
            for record, ref, polygon in rows[start : start + rows_per_group]:
                if current_image[0] != record.image_id:
                    current_image = (record.image_id, source.image_path(record).read_bytes())
                file_name = f"{record.image_id}_{ref.ref_id}.jpg"
                if image_id_from_file_name(file_name) != image_id_from_coco_name(record.file_name):
                    raise ValueError(
                        f"image {record.file_name}: not a COCO name, so a parquet file_name cannot group its rows"
                    )
                columns["question_id"].append(ref.ref_id)
                columns["image"].append({"bytes": current_image[1], "path": record.file_name})
                columns["question"].append(QUESTION)
                columns["answer"].append(list(ref.sentences))
                columns["segmentation"].append(polygon)
                columns["bbox"].append(list(ref.bbox) if ref.bbox else [])
                columns["iscrowd"].append(ref.iscrowd)
                columns["file_name"].append(file_name)
            writer.write_table(pa.Table.from_pydict(columns, schema=PARQUET_SCHEMA))
            written += len(columns["question_id"])
    os.replace(partial, target)
    if skipped:
        report = Path(out_dir) / dataset / f"skipped-{split}.json"
        report.write_text(json.dumps(skipped, indent=1))
    return ConversionResult(target, written, skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the folder that holds (or will hold) Refer_Segm/ and coco_2014/")
    parser.add_argument(
        "--dataset",
        action="append",
        choices=(*DATASETS, REASONSEG),
        help="repeatable; default: refcoco, refcoco+, refcocog; reasonseg checks a ReasonSeg folder",
    )
    parser.add_argument("--split", action="append", help="repeatable; default: each data set's benchmark splits")
    parser.add_argument("--to-parquet", metavar="OUT", help="also convert the checked splits to parquet under OUT")
    parser.add_argument(
        "--skip-unrepresentable",
        action="store_true",
        help="with --to-parquet: leave out (and list) refs the schema cannot hold",
    )
    parser.add_argument("--verify", action="store_true", help="also decode every image and mask (slow: reads every file)")
    args = parser.parse_args(argv)
    if args.dataset and REASONSEG in args.dataset:
        if len(args.dataset) > 1 or args.to_parquet:
            parser.error("--dataset reasonseg is checked on its own (no other --dataset, no --to-parquet)")
        reasonseg = check_reasonseg(args.root, args.split)
        print(format_reasonseg_report(reasonseg))
        return 1 if reasonseg.problems else 0
    datasets = tuple(args.dataset or STANDARD_DATASETS)
    report = check_layout(args.root, datasets, args.split)
    print(format_report(report))
    if not report.complete:
        return 1
    if args.verify:
        verified = verify_files(args.root, report.splits)
        print(format_verify_report(verified))
        if verified.bad:
            return 1
    if args.to_parquet:
        for summary in report.splits:
            result = convert_to_parquet(
                args.root,
                summary.dataset,
                summary.split,
                args.to_parquet,
                skip_unrepresentable=args.skip_unrepresentable,
            )
            skipped = f", {len(result.skipped_refs)} refs left out (listed beside it)" if result.skipped_refs else ""
            print(f"wrote {result.path}: {result.rows} refs{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
