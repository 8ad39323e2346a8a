"""Compare configurations from the per-sample records of one or more runs, with honest uncertainty.

    python tools/compare.py RUN_DIR [RUN_DIR ...] [--baseline CONFIG] [--out DIR]
                            [--labels LABEL ...] [--paired-run LABEL]
                            [--bootstrap 1000] [--seed 0] [--confidence 0.95] [--no-query-kinds]

Per split and configuration: cIoU and gIoU (exactly the numbers the run logged, recomputed from
its records) with bootstrap intervals that resample IMAGES (the unit the data was drawn in; the
sentences of an image are not independent), and, against `--baseline`, the paired difference
on the masks both evaluated, with its interval from the same resamples. Two methods whose
difference interval spans 0 are not shown apart by this data.

Runs of the same configurations (training-free vs fine-tuned, two checkpoints): `--labels` names
each run (`--labels training-free finetuned` gives `finetuned:litelvlm@64`), and `--paired-run
training-free` compares every configuration with the SAME configuration of that run (the fine-tuned
`litelvlm@64` with the training-free `litelvlm@64`, and so on per budget).

Records with query kinds (ReasonSeg's is_sentence) add rows for `<split>/short` and `<split>/long`,
the masks of each kind alone, with their own image resamples (`--no-query-kinds` leaves them out).

Writes compare.md (the table, also printed), compare.csv (fractions, not percent) and
ciou_vs_tokens.png (cIoU and gIoU against the visual-token budget, one line per method with its
points dodged, a row of two panels per split) into --out (default: the first run folder). The
table's `budget` is the configuration's num_tokens (what the methods are matched on), `tokens` the
visual tokens the LLM's last layer saw (they differ for the in-LLM methods: PyramidDrop at 64
averages 64 per layer and ends on 4).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from litelvlm.engine.records import has_records, read_manifest, read_records
from litelvlm.engine.runs import resolve_run
from litelvlm.engine.scores import IOU_FIXED_POINT, fixed_point_iou, iou_from_scores
from litelvlm.errors import LitelvlmError

CSV_COLUMNS = [
    "split", "configuration", "method", "num_tokens", "retained_tokens", "num_images", "num_masks",
    "ciou", "ciou_low", "ciou_high", "giou", "giou_low", "giou_high",
    "baseline", "num_paired_masks", "delta_ciou", "delta_ciou_low", "delta_ciou_high",
    "delta_giou", "delta_giou_low", "delta_giou_high",
]  # fmt: skip


class CompareError(LitelvlmError):
    """Runs that cannot be compared as asked (no records, an unknown baseline, ...)."""


# ------------------------------------------------------------------------------------ loading
def load_runs(runs: Sequence[str | Path], labels: Sequence[str] | None = None) -> tuple[pa.Table, dict[str, dict]]:
    """All runs' records in one table, and each configuration's knobs (from the run manifests).

    With `labels` (one per run) every configuration is prefixed with its run's label (`label:name`);
    without, a name that occurs in several runs is prefixed with its run (`parent/run:name`).
    """
    if labels is not None and (len(labels) != len(runs) or len(set(labels)) != len(labels)):
        raise CompareError(f"--labels needs one distinct label per run: {len(runs)} runs, labels {list(labels)}")
    if labels is not None and any(":" in label or not label for label in labels):
        raise CompareError(f"--labels must be non-empty and free of ':' (it separates label and configuration): {list(labels)}")
    tables, per_run = [], []
    for run in runs:
        manifest = read_manifest(run)
        table = read_records(run)
        if manifest is None or table.num_rows == 0:
            raise CompareError(f"{run}: no records there (records/manifest.json and part files)")
        knobs = {item["name"]: item for item in manifest["configurations"]}
        per_run.append((Path(run), table, knobs))
    counts: dict[str, int] = {}
    for _, table, knobs in per_run:
        for name in knobs:
            counts[name] = counts.get(name, 0) + 1
    all_knobs: dict[str, dict] = {}
    for position, (run, table, knobs) in enumerate(per_run):
        if labels is not None:
            rename = {name: f"{labels[position]}:{name}" for name in knobs}
        else:
            label = f"{run.resolve().parent.name}/{run.resolve().name}"
            rename = {name: (f"{label}:{name}" if counts[name] > 1 else name) for name in knobs}
        if any(new in all_knobs for new in rename.values()):
            raise CompareError(f"{run}: configuration names clash with another run's even with the run prefixed")
        column = [rename[name] for name in table["configuration"].to_pylist()]
        tables.append(table.set_column(table.schema.get_field_index("configuration"), "configuration", pa.array(column)))
        all_knobs.update({rename[name]: item for name, item in knobs.items()})
    return pa.concat_tables(tables), all_knobs


def with_query_kinds(table: pa.Table) -> pa.Table:
    """The records plus, for rows that know their query kind, a copy under `<split>/short` or `<split>/long`."""
    if "is_sentence" not in table.column_names:
        return table
    flags = table["is_sentence"].to_pylist()
    known = [index for index, flag in enumerate(flags) if flag is not None]
    if not known:
        return table
    extra = table.take(pa.array(known, pa.int64()))
    splits = [f"{split}/{'long' if flags[index] else 'short'}" for split, index in zip(extra["split"].to_pylist(), known)]
    extra = extra.set_column(extra.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
    return pa.concat_tables([table, extra])


def paired_baselines(configurations: Sequence[str], paired_label: str) -> dict[str, str]:
    """`label:name` -> `paired_label:name` for every configuration of the other runs that the paired
    run also evaluated (configurations named `label:name`, as `load_runs` with labels makes them)."""
    prefix = f"{paired_label}:"
    if not any(name.startswith(prefix) for name in configurations):
        raise CompareError(f"--paired-run '{paired_label}' is not one of the --labels (configurations: {', '.join(configurations)})")
    mapping = {}
    for name in configurations:
        label, _, configuration = name.partition(":")
        if label != paired_label and f"{prefix}{configuration}" in configurations:
            mapping[name] = f"{prefix}{configuration}"
    if not mapping:
        raise CompareError(f"no configuration of the other runs is also in run '{paired_label}': nothing to pair")
    return mapping


def budget_of(row: dict) -> float:
    """Where a configuration sits on the token axis: its budget (`num_tokens`), what the methods are
    matched on (in-LLM methods: tokens from layer K on, or PyramidDrop's average per layer), else the
    visual tokens its last LLM layer saw (the unpruned model: all of them)."""
    return row["num_tokens"] if row.get("num_tokens") is not None else row["retained_tokens"]


def method_of(configuration: str) -> str:
    """The method a configuration belongs to: its name without the budget (`litelvlm@192` -> `litelvlm`)."""
    return re.sub(r"@\d+", "", configuration)


# ------------------------------------------------------------------------------------ statistics
def _per_image(rows: dict[str, np.ndarray], images: dict[str, int]) -> np.ndarray:
    """[4, n_images]: per image, the sums of intersections, unions, per-mask IoUs, and the mask count."""
    index = np.array([images[image] for image in rows["image_id"]], dtype=np.int64)
    # Per-mask IoU exactly as the logged gIoU counts it (fixed point), so a point value lies in its interval.
    iou = fixed_point_iou(torch.from_numpy(rows["intersection"]), torch.from_numpy(rows["union"])).numpy() / IOU_FIXED_POINT
    intersection, union = rows["intersection"].astype(np.float64), rows["union"].astype(np.float64)
    return np.stack([np.bincount(index, weights=w, minlength=len(images)) for w in (intersection, union, iou, np.ones_like(iou))])


def _statistics(weights: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cIoU and gIoU of each resample (weights [B, n_images]: how often each image was drawn)."""
    intersection, union, iou, count = weights @ sums.T[:, 0], weights @ sums.T[:, 1], weights @ sums.T[:, 2], weights @ sums.T[:, 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, 0.0), np.where(count > 0, iou / count, np.nan)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def compare(
    table: pa.Table,
    knobs: dict[str, dict] | None = None,
    baseline: str | dict[str, str] | None = None,
    num_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[dict]:
    """One row per (split, configuration): point estimates, bootstrap intervals, paired differences.

    Resamples draw images with replacement, the same draws for every configuration of a split (so
    differences are paired); the generator is seeded per split, so a result is reproducible.
    `baseline` is one configuration every other is compared with, or a mapping configuration ->
    its own baseline (configurations not in it get no difference).
    """
    knobs = knobs or {}
    columns = {name: np.array(table[name].to_pylist()) for name in ("split", "configuration", "image_id", "sentence_id")}
    for name in ("intersection", "union", "retained_tokens"):
        columns[name] = np.array(table[name].to_pylist(), dtype=np.int64)
    configurations = list(dict.fromkeys(columns["configuration"].tolist()))
    if isinstance(baseline, str):
        baseline = {name: baseline for name in configurations}
    for name in sorted(set((baseline or {}).values())):
        if name not in configurations:
            raise CompareError(f"baseline '{name}' is not among the configurations: {', '.join(configurations)}")
    results = []
    for split_index, split in enumerate(dict.fromkeys(columns["split"].tolist())):
        in_split = columns["split"] == split
        images = {image: index for index, image in enumerate(sorted(set(columns["image_id"][in_split].tolist())))}
        rng = np.random.default_rng([seed, split_index])
        weights = rng.multinomial(len(images), np.full(len(images), 1 / len(images)), size=num_bootstrap).astype(np.float64)
        by_configuration = {
            name: {key: value[in_split & (columns["configuration"] == name)] for key, value in columns.items()}
            for name in configurations
        }
        for name in configurations:
            rows = by_configuration[name]
            if len(rows["split"]) == 0:
                continue
            point = iou_from_scores(rows["intersection"].tolist(), rows["union"].tolist(), rows["retained_tokens"].tolist())
            ciou_samples, giou_samples = _statistics(weights, _per_image(rows, images))
            item = knobs.get(name, {})
            result = {
                "split": split,
                "configuration": name,
                "method": method_of(name),
                "num_tokens": item.get("num_tokens"),
                "retained_tokens": point["visual_tokens"],
                "num_images": len(set(rows["image_id"].tolist())),
                "num_masks": point["num_masks"],
                "ciou": point["ciou"],
                "giou": point["giou"],
            }
            result["ciou_low"], result["ciou_high"] = _interval(ciou_samples, confidence)
            result["giou_low"], result["giou_high"] = _interval(giou_samples, confidence)
            if baseline and name in baseline:
                base = baseline[name]
                result.update(_paired(rows, by_configuration[base], images, weights, confidence), baseline=base)
            results.append(result)
    return results


def _paired(rows: dict, base_rows: dict, images: dict[str, int], weights: np.ndarray, confidence: float) -> dict:
    """Configuration minus baseline on the masks both scored (matched by image and sentence)."""
    keys = list(zip(rows["image_id"].tolist(), rows["sentence_id"].tolist()))
    base_keys = list(zip(base_rows["image_id"].tolist(), base_rows["sentence_id"].tolist()))
    if len(set(keys)) != len(keys) or len(set(base_keys)) != len(base_keys):
        raise CompareError("a (image, sentence) pair is scored twice in one configuration; cannot pair masks")
    common = set(keys) & set(base_keys)
    if not common:
        return {"num_paired_masks": 0}
    mine = {key: value[[k in common for k in keys]] for key, value in rows.items()}
    theirs = {key: value[[k in common for k in base_keys]] for key, value in base_rows.items()}
    point_mine = iou_from_scores(mine["intersection"].tolist(), mine["union"].tolist())
    point_theirs = iou_from_scores(theirs["intersection"].tolist(), theirs["union"].tolist())
    ciou_mine, giou_mine = _statistics(weights, _per_image(mine, images))
    ciou_theirs, giou_theirs = _statistics(weights, _per_image(theirs, images))
    delta = {"num_paired_masks": len(common)}
    delta["delta_ciou"] = point_mine["ciou"] - point_theirs["ciou"]
    delta["delta_giou"] = point_mine["giou"] - point_theirs["giou"]
    delta["delta_ciou_low"], delta["delta_ciou_high"] = _interval(ciou_mine - ciou_theirs, confidence)
    delta["delta_giou_low"], delta["delta_giou_high"] = _interval(giou_mine - giou_theirs, confidence)
    return delta


# ------------------------------------------------------------------------------------ outputs
def _percent(value, low=None, high=None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    text = f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"
    return text if low is None else f"{text} [{100 * low:.2f}, {100 * high:.2f}]"


def to_markdown(results: list[dict], confidence: float = 0.95) -> str:
    baselines = list(dict.fromkeys(row["baseline"] for row in results if "baseline" in row))
    with_baseline, one_baseline = bool(baselines), len(baselines) == 1
    level = f"{round(100 * confidence)}%"
    header = ["split", "configuration", "budget", "tokens", "masks", f"cIoU [{level} CI]", f"gIoU [{level} CI]"]
    if with_baseline and one_baseline:
        header += [f"ΔcIoU vs {baselines[0]}", f"ΔgIoU vs {baselines[0]}"]
    elif with_baseline:  # each configuration against its own baseline (paired runs)
        header += ["vs", "ΔcIoU", "ΔgIoU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        cells = [
            row["split"],
            row["configuration"],
            "-" if row.get("num_tokens") is None else str(row["num_tokens"]),
            f"{row['retained_tokens']:.0f}",
            str(row["num_masks"]),
            _percent(row["ciou"], row["ciou_low"], row["ciou_high"]),
            _percent(row["giou"], row["giou_low"], row["giou_high"]),
        ]
        if with_baseline and not one_baseline:
            cells.append(row.get("baseline", ""))
        if with_baseline:
            cells += [
                _percent(row.get("delta_ciou"), row.get("delta_ciou_low"), row.get("delta_ciou_high"), signed=True),
                _percent(row.get("delta_giou"), row.get("delta_giou_low"), row.get("delta_giou_high"), signed=True),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(results: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


DODGE_WIDTH = 0.8  # log2 units shared by the methods at one budget; neighbouring budgets (64, 192) are 1.58 apart
METRICS = (("ciou", "cIoU (%)"), ("giou", "gIoU (%)"))


def dodge_factors(methods: Sequence[str], width: float = DODGE_WIDTH) -> dict[str, float]:
    """Per method, the factor its x positions are multiplied by (on the log2 token axis), so the
    methods of one budget sit side by side in a fixed order instead of hiding each other's intervals."""
    offsets = np.linspace(-width / 2, width / 2, len(methods)) if len(methods) > 1 else [0.0]
    return {method: float(2.0**offset) for method, offset in zip(methods, offsets)}


def draw(results: list[dict]):
    """The figure: per split a row of two panels, cIoU and gIoU (with intervals) against retained tokens.

    One colour and marker per method (up to 20 told apart) at its budgets (`budget_of`: PyramidDrop at
    64 sits at 64, not at the 4 tokens its last layer keeps), points dodged per method; a method
    without a budget (the unpruned model, PyramidDrop's preset) is a dashed line with its interval as
    a band across the panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    splits = list(dict.fromkeys(row["split"] for row in results))
    methods = list(dict.fromkeys(row["method"] for row in results))
    references = [m for m in methods if all(r["num_tokens"] is None for r in results if r["method"] == m)]
    dodge = dodge_factors([method for method in methods if method not in references])
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10").colors
    style = {method: (colours[index % len(colours)], "osD^v<>ph*"[index % 10]) for index, method in enumerate(methods)}
    budgets = sorted({budget_of(row) for row in results if row["method"] not in references})
    figure, axes = plt.subplots(len(splits), 2, figsize=(13, 4.2 * len(splits)), squeeze=False)
    for axes_row, split in zip(axes, splits):
        rows = [row for row in results if row["split"] == split]
        for axis, (key, label) in zip(axes_row, METRICS):
            for method in methods:
                points = sorted((row for row in rows if row["method"] == method), key=budget_of)
                if not points:
                    continue
                colour, marker = style[method]
                y = np.array([100 * row[key] for row in points])
                low, high = np.array([100 * row[f"{key}_low"] for row in points]), np.array([100 * row[f"{key}_high"] for row in points])
                if method in references:
                    axis.axhline(y[0], linestyle="--", linewidth=1, color=colour, label=method)
                    axis.axhspan(low[0], high[0], color=colour, alpha=0.12, linewidth=0)
                    continue
                x = [budget_of(row) * dodge[method] for row in points]
                error = np.clip(np.stack([y - low, high - y]), 0, None)
                axis.errorbar(x, y, yerr=error, marker=marker, markersize=4, capsize=2, linewidth=1, color=colour, label=method)
            axis.set_xscale("log", base=2)
            axis.xaxis.set_major_locator(FixedLocator(budgets))
            axis.xaxis.set_minor_locator(NullLocator())
            axis.set_xticklabels([f"{budget:g}" for budget in budgets])
            axis.set_title(f"{split}: {label.split()[0]}")
            axis.set_xlabel("visual-token budget (points dodged per method)")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    figure.tight_layout()
    return figure


def plot(results: list[dict], path: Path) -> None:
    """Write `draw(results)` as a PNG."""
    import matplotlib.pyplot as plt

    figure = draw(results)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run folders (each holding records/), or their parent: its latest complete run"
    )
    parser.add_argument("--baseline", help="configuration every other one is compared with, e.g. none")
    parser.add_argument("--labels", nargs="+", help="one label per run, prefixed to its configurations (label:name)")
    parser.add_argument("--paired-run", help="compare each configuration with the same configuration of this labelled run")
    parser.add_argument("--out", type=Path, help="where to write compare.md/.csv/ciou_vs_tokens.png (default: first run)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--no-query-kinds", action="store_true", help="no short/long rows for records with query kinds")
    args = parser.parse_args(argv)
    try:
        if args.paired_run is not None and (args.labels is None or args.baseline is not None):
            raise CompareError("--paired-run needs --labels (to name the runs) and excludes --baseline")
        args.runs = [resolve_run(run, has_records, "records") for run in args.runs]  # a parent: its latest run
        table, knobs = load_runs(args.runs, args.labels)
        table = table if args.no_query_kinds else with_query_kinds(table)
        baseline = args.baseline
        if args.paired_run is not None:
            baseline = paired_baselines(list(dict.fromkeys(table["configuration"].to_pylist())), args.paired_run)
        results = compare(table, knobs, baseline, args.bootstrap, args.seed, args.confidence)
    except LitelvlmError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    out = args.out or args.runs[0]
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(results, args.confidence)
    (out / "compare.md").write_text(markdown + "\n")
    write_csv(results, out / "compare.csv")
    plot(results, out / "ciou_vs_tokens.png")
    print(markdown)
    print(f"written: {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'ciou_vs_tokens.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
