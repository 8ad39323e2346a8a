"""Join the runs of one evaluation split across jobs (`--data.shard i/n`) into one run folder.

Each part's records are its scored masks, under sample ids of the whole split, so the union of
the parts' records is what one run over the whole split records; its metrics, recomputed from
those records with the integer sums the run itself uses (`iou_from_scores`), are that run's to
the bit. Parts must be the same evaluation (model, configurations, data) and their shards must be
0/n .. n-1/n exactly once each: anything else is refused in one line, and nothing is written.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from litelvlm.data.shard import parse_shard
from litelvlm.engine.records import (
    PartWriter,
    RecordsError,
    has_records,
    manifest_difference,
    metrics_from_records,
    read_manifest,
    read_records,
    records_folder,
    write_manifest,
)
from litelvlm.engine.runs import COMPLETE, read_status, write_status

RESULTS_FILE = "results.json"
METRIC_FIELDS = {"ciou": "ciou", "giou": "giou", "num_samples": "num_masks", "visual_tokens": "visual_tokens"}


class MergeError(RecordsError):
    """Runs that are not the parts of one evaluation: other configurations, overlapping or missing shards."""


def merge_runs(out: str | Path, runs: list[str | Path]) -> list[dict]:
    """Write `out/records/` and `out/results.json` from the parts in `runs`; return the result rows."""
    out, runs = Path(out), [Path(run) for run in runs]
    if not runs:
        raise MergeError("name the run folders to merge: python tools/merge_runs.py OUT RUN_DIR...")
    if has_records(out):
        raise MergeError(f"{out} already holds records; merge into a new folder")
    manifests = [_manifest(run) for run in runs]
    _check_same_evaluation(runs, manifests)
    _check_shards(runs, [manifest["data"].get("shard") for manifest in manifests])
    tables = [read_records(run) for run in runs]
    merged_manifest = {**manifests[0], "data": {k: v for k, v in manifests[0]["data"].items() if k != "shard"}}
    folder = records_folder(out)
    for attempt, table in enumerate(tables):  # one part file per merged run
        PartWriter(folder, attempt=attempt, rank=0).write(table)
    write_manifest(out, merged_manifest)
    read_records(out)  # a mask in two parts is refused here (shards of one split never share one)
    metrics = {(row["split"], row["configuration"]): row for row in metrics_from_records(out)}
    rows = _merged_rows([_results(run) for run in runs], metrics, read_records(out))
    first = json.loads((runs[0] / RESULTS_FILE).read_text())
    (out / RESULTS_FILE).write_text(json.dumps(rows if isinstance(first, list) else rows[0], indent=2) + "\n")
    write_status(out, COMPLETE, stage="merge", merged=[str(run) for run in runs])
    return rows


def _manifest(run: Path) -> dict:
    manifest = read_manifest(run)
    if manifest is None:
        raise MergeError(f"{run}: no records/manifest.json there; name the version_N folder of each part")
    status = read_status(run)
    if status != COMPLETE or not (run / RESULTS_FILE).is_file():
        raise MergeError(f"{run} is not a complete run (status {status or 'missing'}); resume it with --resume {run} first")
    return manifest


def _check_same_evaluation(runs: list[Path], manifests: list[dict]) -> None:
    def without_shard(manifest: dict) -> dict:
        return {**manifest, "data": {k: v for k, v in manifest["data"].items() if k != "shard"}}

    for run, manifest in zip(runs[1:], manifests[1:]):
        difference = manifest_difference(without_shard(manifests[0]), without_shard(manifest))
        if difference is not None:
            difference = re.sub(r"\bthere\b", f"in {_short(runs[0])}", difference)
            difference = re.sub(r"\bhere\b", f"in {_short(run)}", difference)
            raise MergeError(f"{run} and {runs[0]} are parts of different evaluations: {difference}")


def _short(run: Path) -> str:
    return "/".join(run.parts[-2:])


def _check_shards(runs: list[Path], shards: list[str | None]) -> None:
    """Every part of one splitting exactly once: 0/n, 1/n, ..., n-1/n."""
    whole = [run for run, shard in zip(runs, shards) if shard is None]
    if whole and len(runs) > 1:
        raise MergeError(f"{whole[0]} evaluated the whole split (no --data.shard): it overlaps every other part")
    if whole:
        return
    parsed = [parse_shard(shard) for shard in shards]
    counts = sorted({count for _, count in parsed})
    if len(counts) > 1:
        listed = ", ".join(f"{shard} ({run})" for run, shard in zip(runs, shards))
        raise MergeError(f"overlapping shards: parts of different splittings ({listed}) cover some images twice")
    seen: dict[int, Path] = {}
    for run, (index, count) in zip(runs, parsed):
        if index in seen:
            raise MergeError(f"overlapping shards: {index}/{count} is both {seen[index]} and {run}")
        seen[index] = run
    missing = [f"{index}/{counts[0]}" for index in range(counts[0]) if index not in seen]
    if missing:
        raise MergeError(f"missing shards: {', '.join(missing)} (name every part of the split)")


def _results(run: Path) -> list[dict]:
    results = json.loads((run / RESULTS_FILE).read_text())
    return results if isinstance(results, list) else [results]


def _merged_rows(parts: list[list[dict]], metrics: dict[tuple[str, str], dict], records: pa.Table | None = None) -> list[dict]:
    """The first part's rows, their numbers (and, given the merged `records`, `clip_text_overflow`) from
    the merged records, their skipped samples from every part. Any other field whose value differs
    between the parts is a per-part number this merge does not recompute: it is left out (and named
    on stderr), never copied from one part."""
    if any(len(part) != len(parts[0]) for part in parts):
        raise MergeError("the parts' results.json list different numbers of rows; they are not parts of one evaluation")
    dropped = {
        key
        for position, template in enumerate(parts[0])
        for part in parts
        for key in set(template) | set(part[position])
        if part[position].get(key) != template.get(key)
    } - set(METRIC_FIELDS) - {"skipped", "by_query_kind"} - ({"clip_text_overflow"} if records is not None else set())
    rows = []
    for position, template in enumerate(parts[0]):
        template = {key: value for key, value in template.items() if key not in dropped}
        key = (template["split"], template["configuration"])
        if key not in metrics:
            raise MergeError(f"split {key[0]}, configuration {key[1]}: no merged record; the parts hold no mask of it")
        skipped: list[dict] = []
        for part in parts:
            skipped += [item for item in part[position].get("skipped") or [] if item not in skipped]
        numbers = {field: metrics[key][source] for field, source in METRIC_FIELDS.items()}
        if "by_query_kind" in metrics[key]:  # ReasonSeg: per query kind, from the merged records too
            numbers["by_query_kind"] = metrics[key]["by_query_kind"]
        if template.get("clip_text_overflow") and records is not None:
            numbers["clip_text_overflow"] = _overflow_from_records(records, key[0], template["clip_text_overflow"])
        rows.append({**template, **numbers, "skipped": sorted(skipped, key=lambda item: str(item.get("index")))})
    if dropped:
        print(f"merge_runs: left out (they differ between the parts and are not recomputed): {', '.join(sorted(dropped))}", file=sys.stderr)
    return rows


# Which records column holds a text source's query lengths in CLIP tokens (engine/records.py).
CLIP_TOKEN_COLUMNS = {"question": "question_clip_tokens", "expression": "query_clip_tokens"}


def _overflow_from_records(records: pa.Table, split: str, count: dict) -> dict:
    """A split's `clip_text_overflow` from the merged records: every recorded query once (the masks of one
    configuration: each configuration scores the same queries), as a resumed run counts them."""
    lengths_column = CLIP_TOKEN_COLUMNS[count["text_source"]]
    rows = records.filter(pc.equal(records["split"], split))
    for configuration in sorted(set(rows["configuration"].to_pylist())):
        chosen = rows.filter(pc.equal(rows["configuration"], configuration))
        lengths = [value for value in chosen[lengths_column].to_pylist() if value is not None and value >= 0]
        if lengths:
            break
    else:
        raise MergeError(f"split {split}: the records hold no {count['text_source']} lengths to count clip_text_overflow from")
    window = int(count["window"])
    return {"window": window, "queries": len(lengths), "overflowed": sum(length > window for length in lengths),
            "longest": max(lengths), "text_source": count["text_source"]}
