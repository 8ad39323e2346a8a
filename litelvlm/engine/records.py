"""Per-sample records of a run: every scored mask as a Parquet row, written so a crash loses nothing written.

Layout, inside the run folder:

    records/manifest.json                      what the run evaluates (model, configurations, data)
    records/part-a<attempt>-r<rank>-b<n>.parquet  one file per evaluated batch and process

A part file is written under a temporary name in the same folder and renamed into place
(`os.replace` is atomic), so a batch's rows are either all there or absent, whatever kills the
process; each process writes its own files, so ranks never collide. One row per (mask,
configuration): split, sample id, image id, sentence id, mask index, configuration,
intersection, union (ignore-region pixels in neither), retained tokens, and the query: whether it
is a long one (ReasonSeg's is_sentence; null where the data set has no query kinds) and its length
in LLM tokens and in CLIP tokens with [SOS]/[EOS] (-1 where unknown; null in records written before
these columns). A batch's file holds every configuration's rows, so a recorded sample is complete
for all configurations at once.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from litelvlm.engine.scores import MaskScores, iou_from_scores
from litelvlm.errors import LitelvlmError

RECORDS_DIR = "records"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "litelvlm-records/1"
PART_FILE = re.compile(r"part-a(\d+)-r(\d+)-b(\d+)\.parquet")
KEY_COLUMNS = ["split", "sample_id", "mask_index", "configuration"]
SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("sample_id", pa.int64()),
        ("image_id", pa.string()),
        ("sentence_id", pa.string()),
        ("mask_index", pa.int32()),
        ("configuration", pa.string()),
        ("intersection", pa.int64()),
        ("union", pa.int64()),
        ("retained_tokens", pa.int64()),
        ("is_sentence", pa.bool_()),
        ("query_llm_tokens", pa.int64()),
        ("query_clip_tokens", pa.int64()),
        ("question_clip_tokens", pa.int64()),  # the question's CLIP tokens when a pruner embeds it (else null)
    ]
)


class RecordsError(LitelvlmError):
    """Records that cannot be read, or a run folder whose records belong to a different evaluation."""


def records_folder(run: str | Path) -> Path:
    """The records folder of a run folder (or the records folder itself)."""
    run = Path(run)
    return run if (run / MANIFEST_FILE).is_file() or run.name == RECORDS_DIR else run / RECORDS_DIR


def has_records(run: str | Path) -> bool:
    """A run folder (or records folder) that holds a records manifest."""
    return (records_folder(run) / MANIFEST_FILE).is_file()


# ------------------------------------------------------------------------------------ writing
def batch_table(evaluated) -> pa.Table:
    """The rows of one `EvaluatedBatch`: every mask under every configuration."""
    sample_ids, image_ids, sentence_ids, mask_index = [], [], [], []
    is_sentence, llm_tokens, clip_tokens, question_tokens = [], [], [], []
    samples = len(evaluated.sample_ids)
    flags = getattr(evaluated, "is_sentence", None) or [None] * samples
    llm = getattr(evaluated, "query_llm_tokens", None) or [None] * samples
    clip = getattr(evaluated, "query_clip_tokens", None) or [None] * samples
    question = getattr(evaluated, "question_clip_tokens", None) or [None] * samples
    for sample_id, image_id, sentences, sample_flags, sample_llm, sample_clip, sample_question in zip(
        evaluated.sample_ids, evaluated.image_ids, evaluated.sentence_ids, flags, llm, clip, question
    ):
        sample_ids += [sample_id] * len(sentences)
        image_ids += [image_id] * len(sentences)
        sentence_ids += list(sentences)
        mask_index += list(range(len(sentences)))
        is_sentence += list(sample_flags) if sample_flags is not None else [None] * len(sentences)
        llm_tokens += list(sample_llm) if sample_llm is not None else [None] * len(sentences)
        clip_tokens += list(sample_clip) if sample_clip is not None else [None] * len(sentences)
        question_tokens += list(sample_question) if sample_question is not None else [None] * len(sentences)
    columns = {name: [] for name in SCHEMA.names}
    for configuration, scores in evaluated.scores.items():
        if scores.intersection.numel() != len(sample_ids):
            raise RecordsError(
                f"{configuration}: {scores.intersection.numel()} scored masks but the batch names {len(sample_ids)} sentences"
            )
        columns["split"] += [evaluated.split] * len(sample_ids)
        columns["sample_id"] += sample_ids
        columns["image_id"] += image_ids
        columns["sentence_id"] += sentence_ids
        columns["mask_index"] += mask_index
        columns["configuration"] += [configuration] * len(sample_ids)
        columns["intersection"] += scores.intersection.tolist()
        columns["union"] += scores.union.tolist()
        columns["retained_tokens"] += scores.retained_tokens.tolist()
        columns["is_sentence"] += is_sentence
        columns["query_llm_tokens"] += llm_tokens
        columns["query_clip_tokens"] += clip_tokens
        columns["question_clip_tokens"] += question_tokens
    return pa.table(columns, schema=SCHEMA)


class PartWriter:
    """Writes one process's part files for one attempt: atomically, never overwriting."""

    def __init__(self, folder: Path, attempt: int, rank: int) -> None:
        self.folder = Path(folder)
        self.attempt = attempt
        self.rank = rank
        self.count = 0

    def write(self, table: pa.Table) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-a{self.attempt:03d}-r{self.rank:03d}-b{self.count:06d}.parquet"
        path, temporary = self.folder / name, self.folder / f".{name}.tmp"
        with open(temporary, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # atomic: the rows appear all at once or not at all
        self.count += 1
        return path


def next_attempt(folder: Path) -> int:
    """One past the highest attempt with a part file here (0 for a new run)."""
    attempts = [int(match.group(1)) for path in Path(folder).glob("part-*.parquet") if (match := PART_FILE.fullmatch(path.name))]
    return max(attempts, default=-1) + 1


def remove_partial_writes(folder: Path) -> None:
    """Temporary files a killed process left behind: never renamed into place, so never records."""
    for path in Path(folder).glob(".part-*.tmp"):
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ reading
def part_files(folder: Path) -> list[Path]:
    return sorted(path for path in Path(folder).glob("part-*.parquet") if PART_FILE.fullmatch(path.name))


def read_records(run: str | Path) -> pa.Table:
    """Every row of a run (all attempts and processes); a mask recorded twice is an error."""
    folder = records_folder(run)
    files = part_files(folder)
    table = pa.concat_tables([pq.read_table(path, schema=SCHEMA) for path in files]) if files else SCHEMA.empty_table()
    counts = table.group_by(KEY_COLUMNS).aggregate([([], "count_all")])
    if counts.num_rows and max(counts["count_all"].to_pylist()) > 1:
        raise RecordsError(f"{folder}: some masks are recorded more than once; these records cannot be trusted")
    return table


def completed_samples(table: pa.Table, configurations: list[str]) -> dict[str, set[int]]:
    """Per split, the samples recorded under every configuration: those a resumed run skips."""
    wanted = pa.array(configurations, pa.string())
    table = table.filter(pc.is_in(table["configuration"], value_set=wanted))
    per_sample = table.group_by(["split", "sample_id"]).aggregate([("configuration", "count_distinct")])
    done: dict[str, set[int]] = {}
    for split, sample_id, count in zip(*(per_sample[name].to_pylist() for name in per_sample.column_names)):
        if count == len(configurations):
            done.setdefault(split, set()).add(sample_id)
    return done


def recorded_scores(table: pa.Table, split: str, configuration: str, sample_ids: set[int]) -> MaskScores:
    """The scores of some recorded samples under one configuration, for a resumed run's metrics."""
    mask = pc.and_(
        pc.and_(pc.equal(table["split"], split), pc.equal(table["configuration"], configuration)),
        pc.is_in(table["sample_id"], value_set=pa.array(sorted(sample_ids), pa.int64())),
    )
    rows = table.filter(mask)

    def column(name: str) -> torch.Tensor:
        return torch.tensor(rows[name].to_pylist(), dtype=torch.int64)

    flags = rows["is_sentence"].to_pylist()
    kinds = torch.tensor([-1 if flag is None else int(flag) for flag in flags], dtype=torch.int8)
    def lengths(name: str) -> torch.Tensor:
        return torch.tensor([-1 if value is None else value for value in rows[name].to_pylist()], dtype=torch.int64)

    clip_tokens = {"question": lengths("question_clip_tokens"), "expression": lengths("query_clip_tokens")}
    return MaskScores(column("intersection"), column("union"), column("retained_tokens"), kinds, clip_tokens)


def metrics_from_records(run: str | Path) -> list[dict]:
    """cIoU, gIoU, mask count and mean retained tokens per (split, configuration), from the records alone."""
    table = read_records(run)
    results = []
    keys = table.select(["split", "configuration"]).group_by(["split", "configuration"]).aggregate([]).to_pylist()
    for key in keys:
        rows = table.filter(
            pc.and_(
                pc.equal(table["split"], key["split"]), pc.equal(table["configuration"], key["configuration"])
            )
        )
        values = iou_from_scores(
            rows["intersection"].to_pylist(), rows["union"].to_pylist(), rows["retained_tokens"].to_pylist()
        )
        by_kind = _by_query_kind(rows)
        results.append({**key, **values, **({"by_query_kind": by_kind} if by_kind else {})})
    return results


def _by_query_kind(rows: pa.Table) -> dict | None:
    """results.json's `by_query_kind` from records with query kinds (ReasonSeg); None without."""
    flags = rows["is_sentence"].to_pylist()
    if all(flag is None for flag in flags):
        return None
    by_kind = {}
    for name, wanted in (("short", False), ("long", True)):
        chosen = [index for index, flag in enumerate(flags) if flag is wanted]
        columns = [rows[name].to_pylist() for name in ("intersection", "union", "retained_tokens")]
        values = iou_from_scores(*([column[i] for i in chosen] for column in columns))
        by_kind[name] = {"ciou": values["ciou"], "giou": values["giou"], "num_samples": values["num_masks"],
                         "visual_tokens": values["visual_tokens"]}  # fmt: skip
    return by_kind


# ------------------------------------------------------------------------------------ manifest
def build_manifest(stage: str, model_identity: dict, configurations: list[dict], data: dict) -> dict:
    return {"format": MANIFEST_FORMAT, "stage": stage, "model": model_identity, "configurations": configurations, "data": data}


def read_manifest(run: str | Path) -> dict | None:
    path = records_folder(run) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecordsError(f"{path} is not valid JSON ({error}); move the run folder aside or delete it") from None


def write_manifest(run: str | Path, manifest: dict) -> Path:
    folder = records_folder(run)
    folder.mkdir(parents=True, exist_ok=True)
    path, temporary = folder / MANIFEST_FILE, folder / f".{MANIFEST_FILE}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path


def check_manifest(recorded: dict, current: dict, run: str | Path) -> None:
    """Refuse to mix: the run folder's records must come from this very evaluation."""
    difference = manifest_difference(recorded, current)
    if difference is not None:
        raise RecordsError(
            f"run folder {Path(run)} holds records of a different evaluation: {difference}; "
            "resume with the original configuration, or start a new run folder"
        )


def manifest_difference(recorded: dict, current: dict) -> str | None:
    """What differs between two evaluations' manifests, in a few words (`recorded` is "there",
    `current` "here"); None when they are the same evaluation."""
    recorded, current = _normalised(recorded), _normalised(current)
    if recorded.get("format") != current["format"]:
        return f"records format {recorded.get('format')!r}, expected {current['format']!r}"
    if recorded["stage"] != current["stage"]:
        return f"it was a `{recorded['stage']}` run, this is `{current['stage']}`"
    if recorded["model"] != current["model"]:
        differing = sorted(key for key in current["model"] if recorded["model"].get(key) != current["model"][key])
        return f"the model differs in {', '.join(differing)}"
    if recorded["configurations"] != current["configurations"]:
        old = [item["name"] for item in recorded["configurations"]]
        new = [item["name"] for item in current["configurations"]]
        detail = f"[{', '.join(old)}] there, [{', '.join(new)}] here" if old != new else "the same names with different knobs"
        return f"the configurations differ ({detail})"
    if recorded["data"] != current["data"]:
        return f"the data differs ({_data_difference(recorded['data'], current['data'])})"
    return None


def _normalised(manifest: dict) -> dict:
    return json.loads(json.dumps(manifest, sort_keys=True))


def _data_difference(old: dict, new: dict) -> str:
    for key in ("protocol", "max_sentences", "seed", "shard"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)!r} there, {new.get(key)!r} here"
    old_splits, new_splits = old.get("splits", []), new.get("splits", [])
    if [s["split"] for s in old_splits] != [s["split"] for s in new_splits]:
        return f"splits {[s['split'] for s in old_splits]} there, {[s['split'] for s in new_splits]} here"
    for before, after in zip(old_splits, new_splits):
        if before != after:
            return f"split {after['split']}: {before['num_items']} items there, {after['num_items']} here, or other samples"
    return "fingerprints differ"
