"""Text attention sink study: where does CLIP's text [EOS] token look?

The projected [EOS] state is the sentence embedding LiteLVLM compares patches with. For each question
and every layer and head of the CLIP text tower this takes the [EOS] query's attention row and
measures its share on [SOS], on the content tokens between them, on itself, and its entropy
(docs/studies.md, "Text attention sink"). Only the text tower's attention is read, from an
eager-attention copy of it (sdpa returns no probabilities); the LLM is never asked for attention. That pass is the
study's own: the model's encodings hold no attention probabilities, so it asks the module for none
(`required_signals` / `required_text` are empty) and runs the same under `model.encoders_only`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from litelvlm.analysis.bootstrap import bootstrap_mean
from litelvlm.analysis.query_kinds import by_query_kind, query_kind
from litelvlm.analysis.reversal import (
    StudyError,
    _pyplot,
    gather_objects,
    percent,
    split_name,
    study_folder,
    tensorboard_writers,
    unique_sorted,
)
from litelvlm.models.batch import GroundingBatch
from litelvlm.models.processor import query_lengths

MEASURES = ("sos", "content", "self", "entropy")


def eager_copy(text_tower: nn.Module) -> nn.Module:
    """A copy of the text tower that returns attention probabilities (eager attention)."""
    tower = copy.deepcopy(text_tower)
    tower.set_attn_implementation("eager")
    return tower.eval()


def eos_attention_shares(attentions: Sequence[Tensor], eos_positions: Tensor) -> dict[str, Tensor]:
    """{measure: [Q, layers, heads]} from per-layer attentions [Q, H, S, S] and each [EOS] position.

    sos: probability on position 0; content: on positions 1..eos-1; self: on eos; entropy (nats) of
    the row over positions 0..eos (the causal mask gives later positions no probability).
    """
    stacked = torch.stack([a.double() for a in attentions], dim=1)  # [Q, L, H, S, S]
    rows = stacked[torch.arange(len(eos_positions)), :, :, eos_positions]  # [Q, L, H, S]
    positions = torch.arange(rows.shape[-1], device=rows.device)
    eos = eos_positions.to(rows.device).view(-1, 1, 1, 1)
    content = ((positions > 0) & (positions < eos)).to(rows.dtype)
    return {
        "sos": rows[..., 0],
        "content": (rows * content).sum(-1),
        "self": rows.gather(-1, eos.expand(*rows.shape[:-1], 1)).squeeze(-1),
        "entropy": -torch.special.xlogy(rows, rows).sum(-1),
    }


def sos_is_largest(attentions: Sequence[Tensor], eos_positions: Tensor) -> tuple[Tensor, Tensor]:
    """Whether the [EOS] row's largest weight is on [SOS] (ties count for [SOS]): bool [Q, layers, heads]
    per head, and bool [Q, layers] for the head-averaged row (the row the project page draws)."""
    stacked = torch.stack([a.double() for a in attentions], dim=1)  # [Q, L, H, S, S]
    rows = stacked[torch.arange(len(eos_positions)), :, :, eos_positions]  # [Q, L, H, S]
    head_mean = rows.mean(dim=2)  # [Q, L, S]
    largest = lambda r: r[..., 0] >= r.max(dim=-1).values  # noqa: E731
    return largest(rows), largest(head_mean)


@torch.no_grad()
def measure_questions(eager_tower: nn.Module, clip_tokenizer, questions: list[str], max_length: int = 77) -> dict:
    """Shares, tokens and the last layer's head-mean [EOS] row of every question (one tower pass).

    Right padding cannot change the [EOS] row: the text tower is causal, so [EOS] never sees it.
    """
    encoded = clip_tokenizer(questions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    device = next(eager_tower.parameters()).device
    out = eager_tower(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
                      output_attentions=True)
    if not out.attentions:
        raise StudyError("the CLIP text tower returned no attentions; it must run with eager attention")
    eos_positions = encoded["attention_mask"].sum(-1) - 1  # the last real token: CLIP's pooled [EOS]
    shares = eos_attention_shares(out.attentions, eos_positions.to(device))
    per_head, head_mean = sos_is_largest(out.attentions, eos_positions.to(device))
    last = out.attentions[-1].double().mean(dim=1)  # [Q, S, S] head mean
    tokens, last_rows = [], []
    for q, eos in enumerate(eos_positions.tolist()):
        tokens.append(clip_tokenizer.convert_ids_to_tokens(encoded["input_ids"][q, : eos + 1].tolist()))
        last_rows.append(last[q, eos, : eos + 1].cpu().tolist())
    return {"shares": {m: v.cpu() for m, v in shares.items()}, "tokens": tokens, "last_layer_eos_row": last_rows,
            "eos_positions": eos_positions.tolist(), "sos_is_largest": per_head.cpu(),
            "sos_is_largest_head_mean": head_mean.cpu()}


class TextAttentionSinkStudy(L.Callback):
    """Measures the [EOS] attention sink over a split during `validate` / `test`.

    Writes `attention_sink.json` (per-question rows and per layer x head mean/std), a heatmap of the
    mean share on [SOS], and per-token bar charts for the first `num_examples` questions.

    Args:
        num_examples: questions (in sample-id order) that get a per-token bar chart.
        text_source: `question` (what LiteLVLM encodes) or `expression`.
        seed: seed of the bootstrap.
        bootstrap_resamples: resamples (over samples, i.e. images) of each 95% interval.
        filename: name of the JSON written beside the logs.
    """

    # Nothing from the module's encoder passes (see the module docstring): the eager pass is the study's own.
    required_signals: frozenset = frozenset()
    required_text: frozenset = frozenset()

    def __init__(self, num_examples: int = 3, text_source: str = "question", seed: int = 0,
                 bootstrap_resamples: int = 1000, filename: str = "attention_sink.json"):
        super().__init__()
        if text_source not in ("question", "expression"):
            raise StudyError(f"text_source must be 'question' or 'expression', got {text_source!r}")
        if isinstance(bootstrap_resamples, bool) or not isinstance(bootstrap_resamples, int) or bootstrap_resamples < 1:
            raise StudyError(f"bootstrap_resamples must be a positive integer, got {bootstrap_resamples!r}")
        self.num_examples, self.text_source, self.filename = int(num_examples), text_source, filename
        self.seed, self.bootstrap_resamples = seed, bootstrap_resamples
        self.rows: list[dict] = []
        self.summary: dict | None = None
        self._tower: nn.Module | None = None

    def _reset(self, trainer, pl_module) -> None:
        self.rows, self.summary = [], None

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def _measure_batch(self, trainer, pl_module, batch, dataloader_idx: int) -> None:
        if trainer.sanity_checking or not isinstance(batch, GroundingBatch):  # a list: nothing of it was evaluated
            return
        lvlm = pl_module.lvlm
        if lvlm.text_tower is None or lvlm.clip_tokenizer is None:
            raise StudyError("TextAttentionSinkStudy needs a model with a CLIP text tower and tokenizer")
        if self._tower is None:
            self._tower = eager_copy(lvlm.text_tower)
        texts = batch.questions if self.text_source == "question" else batch.expressions
        flat = [(b, t, text) for b, sample in enumerate(texts) for t, text in enumerate(sample)]
        if not flat:
            return
        measured = measure_questions(self._tower, lvlm.clip_tokenizer, [text for _, _, text in flat],
                                     lvlm.config.text.max_length)
        split = split_name(trainer, dataloader_idx)
        # A query over CLIP's window is measured as LiteLVLM's reference embeds it: truncated, [EOS] at 77.
        lengths = query_lengths(lvlm.clip_tokenizer, [text for _, _, text in flat], special_tokens=True)
        for q, (b, t, text) in enumerate(flat):
            self.rows.append({
                "split": split, "sample_id": int(batch.sample_ids[b]), "sentence": t, "text": text,
                "query_kind": query_kind(batch, b, t), "clip_tokens": lengths[q],
                "tokens": measured["tokens"][q], "eos_position": measured["eos_positions"][q],
                "shares": {m: measured["shares"][m][q].tolist() for m in MEASURES},  # [layers][heads]
                "last_layer_eos_row": measured["last_layer_eos_row"][q],
                "sos_is_largest": measured["sos_is_largest"][q].tolist(),  # [layers][heads]
                "sos_is_largest_head_mean": measured["sos_is_largest_head_mean"][q].tolist(),  # [layers]
            })

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._measure_batch(trainer, pl_module, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._measure_batch(trainer, pl_module, batch, dataloader_idx)

    def _finish(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        rows = unique_sorted(gather_objects(self.rows), key=lambda r: (r["split"], r["sample_id"], r["sentence"]))
        self._tower = None  # a fresh copy next run: the weights may have changed
        folder = study_folder(trainer)
        self.summary = summarise(rows, self.bootstrap_resamples, self.seed)
        kinds = by_query_kind(rows, lambda subset: summarise(subset, self.bootstrap_resamples, self.seed))
        if kinds is not None:  # ReasonSeg: the same summary for short and for long queries
            self.summary["by_query_kind"] = kinds
        self._write(trainer, folder, self.summary)

    on_validation_epoch_end = _finish
    on_test_epoch_end = _finish

    @rank_zero_only
    def _write(self, trainer, folder: Path, summary: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.filename).write_text(json.dumps(summary, indent=2) + "\n")
        if summary["num_questions"]:
            plot_sos_heatmap(np.asarray(summary["mean"]["sos"]), folder / "attention_sink_sos_heatmap.png")
            for index, row in enumerate(summary["rows"][: self.num_examples]):
                plot_eos_row(row, folder / f"attention_sink_example_{index}.png")
        for writer in tensorboard_writers(trainer):
            for measure in MEASURES:
                for layer, values in enumerate(summary["mean"].get(measure, [])):
                    writer.add_scalar(f"attention_sink/{measure}/head_mean", float(np.mean(values)), layer)
            for layer, stats in enumerate(summary.get("sos_largest_rate", {}).get("head_mean", [])):
                writer.add_scalar("attention_sink/sos_largest_rate/head_mean", stats["mean"], layer)
            if summary["num_questions"]:
                sos = np.asarray([row["shares"]["sos"] for row in summary["rows"]])
                writer.add_histogram("attention_sink/sos_share_last_layer", sos[:, -1].ravel(), 0)
            writer.flush()
        for line in summary_lines(summary):
            print(line)
        print(f"text attention sink written to {folder / self.filename}")


def summarise(rows: list[dict], bootstrap_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean and std (over questions) of every measure per layer x head; the share of questions whose
    [EOS] row puts its largest weight on [SOS] (per layer x head, and per layer for the head-averaged
    row) and the last layer's head-mean [SOS] share, with 95% intervals resampling samples (images,
    whose sentences are related); plus the rows."""
    summary = {"measures": list(MEASURES), "num_questions": len(rows), "mean": {}, "std": {}, "rows": rows}
    if not rows:
        return summary
    for measure in MEASURES:
        values = np.asarray([row["shares"][measure] for row in rows])  # [Q, L, H]
        summary["mean"][measure] = values.mean(axis=0).tolist()
        summary["std"][measure] = values.std(axis=0).tolist()
    groups = [(row["split"], row["sample_id"]) for row in rows]

    def ci(values) -> dict:
        return bootstrap_mean([float(v) for v in values], groups, bootstrap_resamples, 0.95, seed)

    per_head = np.asarray([row["sos_is_largest"] for row in rows])  # [Q, L, H]
    head_mean = np.asarray([row["sos_is_largest_head_mean"] for row in rows])  # [Q, L]
    cells = [[ci(per_head[:, layer, head]) for head in range(per_head.shape[2])] for layer in range(per_head.shape[1])]
    summary["sos_largest_rate"] = {
        "head_mean": [ci(head_mean[:, layer]) for layer in range(head_mean.shape[1])],
        "per_head": {key: [[cell[key] for cell in layer] for layer in cells] for key in ("mean", "low", "high")},
    }
    sos_last = np.asarray([row["shares"]["sos"][-1] for row in rows]).mean(axis=1)  # head mean = that row's share
    summary["sos_share_last_layer_head_mean"] = ci(sos_last)
    summary["num_samples"] = len(set(groups))
    summary["settings"] = {"bootstrap_resamples": bootstrap_resamples, "seed": seed, "confidence": 0.95}
    return summary


def summary_lines(summary: dict) -> list[str]:
    """The console summary: how often [EOS]'s largest weight is on [SOS], last layer and per layer."""
    if not summary["num_questions"]:
        return ["text attention sink: no questions measured"]
    by_layer = summary["sos_largest_rate"]["head_mean"]
    share = summary["sos_share_last_layer_head_mean"]
    lines = [
        f"text attention sink: {summary['num_questions']} questions over {summary['num_samples']} samples",
        f"  last layer, head-averaged [EOS] row: largest weight on [SOS] for {percent(by_layer[-1])}",
        f"  last layer, head-averaged [EOS] share on [SOS]: {share['mean']:.2f} "
        f"(95% CI {share['low']:.2f}-{share['high']:.2f})",
        "  largest weight on [SOS] by layer (head-averaged row): "
        + ", ".join(f"{layer}: {100 * stats['mean']:.0f}%" for layer, stats in enumerate(by_layer)),
    ]
    for kind, part in (summary.get("by_query_kind") or {}).items():
        if not part["num_questions"]:
            lines.append(f"  {kind} queries: none measured")
            continue
        kind_share = part["sos_share_last_layer_head_mean"]
        lines.append(f"  {kind} queries ({part['num_questions']}): last layer [EOS] share on [SOS] "
                     f"{kind_share['mean']:.2f} (95% CI {kind_share['low']:.2f}-{kind_share['high']:.2f}), "
                     f"largest on [SOS] for {percent(part['sos_largest_rate']['head_mean'][-1])}")
    return lines


def plot_sos_heatmap(mean_sos: np.ndarray, path: Path) -> None:
    """Layer x head map of the mean [EOS] -> [SOS] share: bright cells are sink heads."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * mean_sos.shape[1], 1 + 0.4 * mean_sos.shape[0]))
    image = ax.imshow(mean_sos, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(mean_sos.shape[1]))
    ax.set_yticks(range(mean_sos.shape[0]))
    ax.set_title("[EOS] attention on [SOS] (mean)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_eos_row(row: dict, path: Path) -> None:
    """Bar per token: the last layer's head-mean [EOS] attention over the question's tokens."""
    plt = _pyplot()
    tokens = [token.replace("</w>", "") for token in row["tokens"]]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(tokens)), 3.5))
    ax.bar(range(len(tokens)), row["last_layer_eos_row"], color="tab:purple")
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(tokens, rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("attention of [EOS]")
    ax.set_ylim(0, 1)
    ax.set_title(row["text"], fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
