"""Print the final table and write `results.json` beside the logs, so scripts never parse text."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from litelvlm.engine.text_overflow import overflow_line

RANDOM_WEIGHTS_NOTE = (
    "NOTE: this model has random weights (a tiny test preset); its IoU measures nothing about "
    "pruning quality. Use a released checkpoint for meaningful numbers."
)
ENCODERS_ONLY_NOTE = (
    "encoders-only run: no masks were predicted, so there is no cIoU/gIoU and no {filename}; "
    "the studies write their own results beside the logs."
)


def format_results_table(rows: list[dict]) -> str:
    """One line per result row: a split column when rows differ in split, the configuration's name
    when they differ in configuration (a sweep), a skipped column when any skipped; a row with
    results per query kind (ReasonSeg) is followed by one line per kind."""
    show_split = len({row.get("split") for row in rows}) > 1
    show_configuration = len({row.get("configuration") for row in rows}) > 1
    show_skipped = any(row.get("skipped") for row in rows)
    name_width = max([22] + [len(str(row.get("configuration"))) + 2 for row in rows]) if show_configuration else 22
    header = "split".ljust(18) if show_split else ""
    header += ("configuration" if show_configuration else "pruner").ljust(name_width)
    header += f"{'budget':>8}{'cIoU':>10}{'gIoU':>10}{'samples':>10}"
    header += f"{'skipped':>10}" if show_skipped else ""
    lines = [header, "-" * len(header)]
    for row in rows:
        budget = str(row["num_tokens"]) if row["num_tokens"] is not None else "all" if row.get("pruner") == "none" else "-"
        line = str(row.get("split")).ljust(18) if show_split else ""
        line += str(row["configuration"] if show_configuration else row["pruner"]).ljust(name_width)
        line += f"{budget:>8}{100 * row['ciou']:>10.2f}{100 * row['giou']:>10.2f}{row['num_samples']:>10d}"
        line += f"{len(row.get('skipped') or []):>10d}" if show_skipped else ""
        lines.append(line)
        for kind, values in (row.get("by_query_kind") or {}).items():
            line = " " * 18 if show_split else ""
            line += f"  {kind} queries".ljust(name_width) + " " * 8
            line += f"{100 * values['ciou']:>10.2f}{100 * values['giou']:>10.2f}{values['num_samples']:>10d}"
            lines.append(line)
    return "\n".join(lines)


class EvaluationReport(L.Callback):
    """After validate/test: a results table on stdout and the same numbers as JSON in the run folder."""

    def __init__(self, filename: str = "results.json") -> None:
        self.filename = filename

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, self._folder(trainer))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, self._folder(trainer))

    @staticmethod
    def _folder(trainer: L.Trainer) -> Path:
        # `trainer.log_dir` broadcasts under DDP: every rank must ask, not only rank zero.
        return Path(trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        if trainer.sanity_checking:
            return
        if getattr(pl_module, "encoders_only", False):
            print(ENCODERS_ONLY_NOTE.format(filename=self.filename))
            return
        results = getattr(pl_module, "last_results", None)
        if not results:
            return
        rows = results if isinstance(results, list) else [results]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        path.write_text(json.dumps(results, indent=2) + "\n")
        print()
        print(format_results_table(rows))
        finetuned = rows[0].get("finetuned")
        if finetuned:  # the numbers are the fine-tuned model's, not the released weights'
            print(f"weights: {rows[0]['checkpoint']} + fine-tuned tensors ({finetuned})")
        if overflow_line(rows):  # queries longer than CLIP's text window, for the text-guided pruners
            print(overflow_line(rows))
        if any(row.get("random_weights") for row in rows):
            print(RANDOM_WEIGHTS_NOTE)
        print(f"results written to {path}")
