"""Similarity reversal study: is CLIP image-text similarity LOWER on the patches of the referred object?

Per sample and sentence (docs/studies.md, "Similarity reversal"): the ground-truth mask's patch coverage
through the CLIP geometry, the LiteLVLM step-1 similarities, their means inside vs outside the
object, the AUROC of low similarity as a predictor of inside, and the referent recall of every
selection rule at each budget. The rules are the registered pruners, run with the sentence alone as
text (T = 1), so the study measures exactly what the pruners do.

The study reads the batch's CLIP signals and sentence embeddings from the model's own encoder pass
(`EvaluatedBatch.shared`: the module computes what `required_signals` / `required_text` declare, so
CLIP runs once per batch; with `model.encoders_only` nothing else runs). Under a module that hands
over no encodings it runs the CLIP pass itself, under no_grad.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from litelvlm.analysis.bootstrap import bootstrap_mean
from litelvlm.analysis.query_kinds import by_query_kind, query_kind
from litelvlm.errors import LitelvlmError
from litelvlm.models.batch import GroundingBatch
from litelvlm.models.image_processing import mask_to_clip_patch_coverage
from litelvlm.pruners.base import Signal, TokenPruner, VisualSignals, top_k_indices
from litelvlm.pruners.litelvlm import text_similarity
from litelvlm.pruners.registry import build_pruner

# Each rule of docs/studies.md ("Similarity reversal") and the registered pruner that implements
# it. With one sentence (T = 1) `similarity-only` keeps exactly the R lowest-similarity patches and
# `reversed-similarity` exactly the R highest (its per-sentence budget R // 1 = R fills the whole
# budget, no context top-up).
RULE_PRUNERS = {
    "lowest-similarity": "similarity-only",
    "highest-similarity": "reversed-similarity",
    "context-only": "context-only",
    "litelvlm": "litelvlm",
    "vispruner": "vispruner",
    "random": "random",
}
# Rules run as the model runs them, with ALL of the image's sentences as text (LiteLVLM: R // T
# lowest per sentence, then the context fill); recall is then measured per sentence on that one set.
# The other text rules see one sentence alone (T = 1): that is their definition.
IMAGE_RULES = frozenset({"litelvlm"})
HISTOGRAM_EDGES = np.linspace(-5.0, 5.0, 51)  # similarity in units of the sentence's std, centred
SCALARS = ("auroc", "mean_inside", "mean_outside", "standardized_difference", "inside_share_lowest_k",
           "inside_share_highest_k", "inside_share_all")
# The claims as per-referent yes/no outcomes; their mean over referents is the share that agrees.
RATES = ("mean_inside_below_outside", "auroc_above_half")
SKIP_SMALL, SKIP_CROPPED, SKIP_NO_OUTSIDE = "small or thin", "outside the CLIP crop", "no outside patch"


class StudyError(LitelvlmError):
    """A study was configured or fed with something it cannot measure."""


def patch_coverage(mask: Tensor, image_size: int, patch_size: int) -> Tensor:
    """float32 [N]: the share of each CLIP patch (raster order) that the mask covers."""
    return mask_to_clip_patch_coverage(mask, image_size, patch_size).flatten()


def mid_ranks(values: Tensor) -> Tensor:
    """float64 ranks 1..n of `values`, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the highest rank of each distinct value
    return (last - (counts.double() - 1) / 2)[inverse]


def low_similarity_auroc(similarity: Tensor, inside: Tensor) -> float:
    """AUROC of -s predicting inside, over inside and outside patches only (0.5 = no signal).

    Exact at any magnitude: the Mann-Whitney U of the ranks of -s (ties count one half), divided by
    n_inside * n_outside. No sigmoid, so raw dot products of tens do not saturate into ties.
    """
    if similarity.shape != inside.shape or similarity.dim() != 1:
        raise StudyError(f"similarity {tuple(similarity.shape)} and inside {tuple(inside.shape)} "
                         "must be equal 1-d shapes")
    inside = inside.bool()
    num_inside, num_outside = int(inside.sum()), int((~inside).sum())
    if num_inside == 0 or num_outside == 0:
        raise StudyError(f"the AUROC needs inside and outside patches, got {num_inside} inside, {num_outside} outside")
    ranks = mid_ranks(-similarity.double())
    u = float(ranks[inside].sum()) - num_inside * (num_inside + 1) / 2
    return u / (num_inside * num_outside)


def referent_recall(kept: Tensor, inside: Tensor) -> float:
    """Share of the inside patches that `kept` (patch indices) retains."""
    kept_mask = torch.zeros_like(inside, dtype=torch.bool)
    kept_mask[kept.long()] = True
    return float((kept_mask & inside).sum() / inside.sum())


def sample_signals(signals: VisualSignals, b: int) -> VisualSignals:
    """The signals of sample `b` alone, as a batch of one."""
    one = lambda x: None if x is None else x[b : b + 1]  # noqa: E731
    return VisualSignals(
        patch_features=one(signals.patch_features),
        patch_embeds=one(signals.patch_embeds),
        text_embeds=one(signals.text_embeds),
        cls_attention=one(signals.cls_attention),
        last_qkv=None if signals.last_qkv is None else tuple(x[b : b + 1] for x in signals.last_qkv),
        text_mask=one(signals.text_mask),
        grid=signals.grid,
        num_patches=signals.num_patches,
        batch_size=1,
        sample_ids=one(signals.sample_ids),
    )


def measure_sample(
    signals: VisualSignals,
    coverage: Tensor,
    selectors: dict[str, dict[int, TokenPruner]],
    inside_threshold: float = 0.5,
    k: int = 64,
    cosine: bool = False,
    ignored: Tensor | None = None,
) -> tuple[list[dict], list[np.ndarray]]:
    """Rows (one per sentence) and standardised inside/outside similarities of ONE sample.

    `signals` holds one sample (batch of one) with `text_embeds` [1, T, P] and whatever the selectors
    need; `coverage` is [T, N]. A sentence with no inside or no outside patch gets a row with
    `skipped` set (`SKIP_SMALL`: some patch covered, none by `inside_threshold`; `SKIP_CROPPED`: no
    patch covered at all; `SKIP_NO_OUTSIDE`) and no measurements; every row keeps `area` (the share
    of the crop the referent covers) and `max_coverage`, so the skipped referents can be described.
    Rules in `IMAGE_RULES` select once with all T sentences; the others with each sentence alone.
    `ignored` [T, N]: each patch's coverage by the sentence's ignore region (ReasonSeg's 255 pixels);
    a patch it touches is neither inside nor outside.
    Returns (rows, [z_inside, z_outside] per measured sentence).
    """
    patch_embeds = signals.require(Signal.PATCH_EMBEDS).float()
    text_embeds = signals.require(Signal.TEXT_EMBEDS).float()
    if cosine:  # the rules then rank by the same cosine the study measures
        patch_embeds, text_embeds = F.normalize(patch_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    similarity = text_similarity(patch_embeds, text_embeds)[0]  # [T, N]
    if coverage.shape != similarity.shape:
        raise StudyError(f"coverage {tuple(coverage.shape)} does not match the similarities {tuple(similarity.shape)}")
    rows, z_values = [], []
    per_image: dict[tuple[str, int], Tensor] = {}  # selections that do not depend on the sentence, made once
    every_sentence = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
    image = VisualSignals(**{**vars(signals), "patch_embeds": patch_embeds, "text_embeds": text_embeds,
                             "text_mask": every_sentence})
    for t in range(similarity.shape[0]):
        s, cov = similarity[t], coverage[t].to(similarity.device)
        inside, outside = cov >= inside_threshold, cov == 0
        if ignored is not None:
            outside &= ignored[t].to(similarity.device) == 0
        row = {"sentence": t, "num_inside": int(inside.sum()), "num_outside": int(outside.sum()),
               "num_patches": int(s.numel()), "area": float(cov.mean()), "max_coverage": float(cov.max())}
        if row["num_inside"] == 0 or row["num_outside"] == 0:
            reason = SKIP_NO_OUTSIDE if row["num_inside"] else SKIP_SMALL if row["max_coverage"] > 0 else SKIP_CROPPED
            rows.append({**row, "skipped": reason})
            continue
        std = float(s.std())
        z = (s - s.mean()) / std if std > 0 else torch.zeros_like(s)
        lowest, highest = top_k_indices(s, k, largest=False), top_k_indices(s, k, largest=True)
        sentence = VisualSignals(**{**vars(signals), "patch_embeds": patch_embeds,
                                    "text_embeds": text_embeds[:, t : t + 1],
                                    "text_mask": torch.ones(1, 1, dtype=torch.bool, device=s.device)})
        recall = {}
        for rule, by_budget in selectors.items():
            recall[rule] = {}
            for budget, pruner in by_budget.items():
                if Signal.TEXT_EMBEDS in pruner.required_signals and rule not in IMAGE_RULES:
                    kept = pruner.select(sentence)[0]
                else:  # the same set for every sentence of the image
                    if (rule, budget) not in per_image:
                        per_image[rule, budget] = pruner.select(image)[0]
                    kept = per_image[rule, budget]
                recall[rule][str(budget)] = referent_recall(kept, inside)
        labelled = inside | outside
        mean_inside, mean_outside = float(s[inside].mean()), float(s[outside].mean())
        auroc = low_similarity_auroc(s[labelled], inside[labelled])
        row.update(
            skipped=None,
            mean_inside=mean_inside,
            mean_outside=mean_outside,
            std=std,
            standardized_difference=float((s[inside].mean() - s[outside].mean()) / std) if std > 0 else 0.0,
            auroc=auroc,
            mean_inside_below_outside=mean_inside < mean_outside,
            auroc_above_half=auroc > 0.5,
            inside_share_lowest_k=float(inside[lowest].float().mean()),
            inside_share_highest_k=float(inside[highest].float().mean()),
            inside_share_all=float(inside.float().mean()),
            recall=recall,
        )
        rows.append(row)
        z_values.append([z[inside].cpu().numpy(), z[outside].cpu().numpy()])
    return rows, z_values


def gather_objects(items: list) -> list:
    """Every rank's list concatenated under DDP (a collective: call on every rank); local otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, items)
        return [item for rank_items in gathered for item in rank_items]
    return list(items)


def unique_sorted(rows: list[dict], key) -> list[dict]:
    """Rows sorted by `key`, each key once (a sample seen by two ranks counts once)."""
    unique = {}
    for row in rows:
        unique.setdefault(key(row), row)
    return [unique[k] for k in sorted(unique)]


def split_name(trainer, dataloader_idx: int) -> str:
    names = getattr(trainer.datamodule, "split_names", None) if trainer.datamodule is not None else None
    return names[dataloader_idx] if names and dataloader_idx < len(names) else str(dataloader_idx)


def study_folder(trainer) -> Path:
    # `trainer.log_dir` broadcasts under DDP: every rank must ask, only rank zero writes.
    return Path(trainer.log_dir or trainer.default_root_dir)


def tensorboard_writers(trainer) -> list:
    """The loggers' experiment objects that can take histograms (TensorBoard's SummaryWriter)."""
    return [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_histogram")]


class SimilarityReversalStudy(L.Callback):
    """Measures the similarity reversal during `validate` / `test` and writes `reversal.json` + figures.

    Args:
        budgets: R values at which referent recall is measured.
        rules: which selection rules to compare (keys of `RULE_PRUNERS`).
        inside_threshold: a patch is inside when the mask covers at least this share of it; a
            referent with no such patch is skipped (counted as small or thin).
        k: size of the lowest-/highest-similarity sets whose inside share is reported.
        cosine: cosine similarity instead of the reference's unnormalised dot product.
        text_source: `question` (the full question, as LiteLVLM) or `expression`.
        seed: seed of the random rule and of the bootstrap.
        bootstrap_resamples: resamples (over images) of each 95% interval.
        filename: name of the JSON written beside the logs.
    """

    def __init__(
        self,
        budgets: Sequence[int] = (64, 128, 192),
        rules: Sequence[str] = tuple(RULE_PRUNERS),
        inside_threshold: float = 0.5,
        k: int = 64,
        cosine: bool = False,
        text_source: str = "question",
        seed: int = 0,
        bootstrap_resamples: int = 1000,
        filename: str = "reversal.json",
    ) -> None:
        super().__init__()
        unknown = [rule for rule in rules if rule not in RULE_PRUNERS]
        if unknown:
            raise StudyError(f"unknown rules {unknown}; choose from {list(RULE_PRUNERS)}")
        if not budgets or any(int(b) < 1 for b in budgets):
            raise StudyError(f"budgets must be positive integers, got {list(budgets)}")
        if not 0.0 < inside_threshold <= 1.0:
            raise StudyError(f"inside_threshold must be in (0, 1], got {inside_threshold}")
        if text_source not in ("question", "expression"):
            raise StudyError(f"text_source must be 'question' or 'expression', got {text_source!r}")
        self.budgets = sorted(int(b) for b in budgets)
        self.rules = list(rules)
        self.inside_threshold, self.k, self.cosine = inside_threshold, int(k), cosine
        self.text_source, self.seed, self.bootstrap_resamples = text_source, seed, bootstrap_resamples
        self.filename = filename
        # The rules score in float32, the precision of the similarities the study measures (and ranks by).
        self.selectors = {
            rule: {b: build_pruner(RULE_PRUNERS[rule], num_tokens=b,
                                   **({"seed": seed} if rule == "random" else {"score_dtype": "float32"}))
                   for b in self.budgets}
            for rule in self.rules
        }
        self.rows: list[dict] = []
        self.z_values: list[list[np.ndarray]] = []
        self.summary: dict | None = None

    @property
    def required_signals(self) -> frozenset[Signal]:
        """The union of the vision signals the rules read, plus the patch embeddings the study itself needs."""
        needs = {Signal.PATCH_EMBEDS}
        for by_budget in self.selectors.values():
            for pruner in by_budget.values():
                needs |= pruner.required_signals
        return frozenset(needs - {Signal.TEXT_EMBEDS})

    @property
    def required_text(self) -> frozenset[tuple[str, str, str]]:
        """The sentence embeddings compared with the patches: CLIP's projected [EOS] of `text_source`,
        truncated to CLIP's window (one embedding per sentence, as LiteLVLM's reference)."""
        return frozenset({(self.text_source, "eos", "truncate")})

    def batch_signals(self, lvlm, outputs, batch: GroundingBatch) -> VisualSignals:
        """The batch's signals with the sentence embeddings: the module's (`outputs.shared`) when it
        computed all of them, else from a CLIP pass of the study's own."""
        shared = getattr(outputs, "shared", None)
        (key,) = self.required_text
        if (
            shared is not None
            and key in shared.text_embeds
            and all(getattr(shared.signals, signal.value) is not None for signal in self.required_signals)
        ):
            signals = replace(shared.signals)  # the text fields are this study's, not the shared object's
            signals.text_embeds, signals.text_mask = shared.text_embeds[key]
            return signals
        _, signals = lvlm.encode_image(batch.clip_pixel_values, self.required_signals)
        signals.text_embeds, signals.text_mask = lvlm.encode_text(self._texts(batch), key[1], key[2])
        signals.sample_ids = batch.sample_ids
        return signals

    def _texts(self, batch: GroundingBatch) -> list[list[str]]:
        return batch.questions if self.text_source == "question" else batch.expressions

    # ------------------------------------------------------------------ collect
    def _reset(self, trainer, pl_module) -> None:
        self.rows, self.z_values, self.summary = [], [], None

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    @torch.no_grad()
    def _measure_batch(self, trainer, pl_module, outputs, batch, dataloader_idx: int) -> None:
        if trainer.sanity_checking or not isinstance(batch, GroundingBatch):  # a list: nothing of it was evaluated
            return
        lvlm = pl_module.lvlm
        vision = lvlm.config.vision
        num_patches = lvlm.num_patches
        too_big = [b for b in self.budgets if b > num_patches]
        if too_big or self.k > num_patches:
            raise StudyError(f"budgets {too_big} / k={self.k} exceed the model's {num_patches} patches")
        signals = self.batch_signals(lvlm, outputs, batch)
        texts = self._texts(batch)
        split = split_name(trainer, dataloader_idx)
        for b in range(len(texts)):
            count = len(texts[b])
            one = sample_signals(signals, b)
            one.text_embeds, one.text_mask = one.text_embeds[:, :count], one.text_mask[:, :count]
            coverage = torch.stack([patch_coverage(m, vision.image_size, vision.patch_size) for m in batch.gt_masks[b]])
            ignore = batch.ignore_masks[b] if getattr(batch, "ignore_masks", None) else None
            ignored = None if ignore is None else torch.stack(
                [patch_coverage(m, vision.image_size, vision.patch_size) for m in ignore])
            rows, z_values = measure_sample(one, coverage, self.selectors, self.inside_threshold, self.k, self.cosine,
                                            ignored)
            sample_id = int(batch.sample_ids[b])
            image_id = batch.image_ids[b] if batch.image_ids else str(sample_id)
            for row in rows:
                t = row["sentence"]
                ids = batch.sentence_ids[b] if batch.sentence_ids else []
                row.update(split=split, sample_id=sample_id, image_id=image_id, text=texts[b][t],
                           sentence_id=ids[t] if t < len(ids) else None, query_kind=query_kind(batch, b, t))
            self.rows.extend(rows)
            measured = [row for row in rows if row["skipped"] is None]
            for row, z in zip(measured, z_values):
                self.z_values.append((row["split"], row["sample_id"], row["sentence"], z))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._measure_batch(trainer, pl_module, outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._measure_batch(trainer, pl_module, outputs, batch, dataloader_idx)

    # ------------------------------------------------------------------ report
    def _finish(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        key = lambda row: (row["split"], row["sample_id"], row["sentence"])  # noqa: E731
        rows = unique_sorted(gather_objects(self.rows), key)
        z_values = unique_sorted(gather_objects(self.z_values), key=lambda item: item[:3])
        folder = study_folder(trainer)
        self.summary = self.summarise(rows, [item[3] for item in z_values])
        z_of = {item[:3]: item[3] for item in z_values}  # ReasonSeg: the same summary per query kind
        kinds = by_query_kind(rows, lambda subset: self.summarise(
            subset, [z_of[key(row)] for row in subset if row["skipped"] is None]))
        if kinds is not None:
            self.summary["by_query_kind"] = kinds
        self._write(trainer, folder, self.summary, [item[3] for item in z_values])

    on_validation_epoch_end = _finish
    on_test_epoch_end = _finish

    def summarise(self, rows: list[dict], z_values: list) -> dict:
        """The JSON document: settings, aggregates with bootstrap intervals, histograms, rows."""
        measured = [row for row in rows if row["skipped"] is None]
        groups = [row["image_id"] for row in measured]
        ci = lambda values: bootstrap_mean(values, groups, self.bootstrap_resamples, 0.95, self.seed)  # noqa: E731
        area = lambda subset: bootstrap_mean([r["area"] for r in subset], [r["image_id"] for r in subset],  # noqa: E731
                                             self.bootstrap_resamples, 0.95, self.seed)
        aggregates = {name: ci([row[name] for row in measured]) for name in SCALARS}
        aggregates["rates"] = {name: ci([float(row[name]) for row in measured]) for name in RATES}
        aggregates["referent_recall"] = {
            rule: {str(b): ci([row["recall"][rule][str(b)] for row in measured]) for b in self.budgets}
            for rule in self.rules
        }
        inside = np.concatenate([z[0] for z in z_values]) if z_values else np.zeros(0)
        outside = np.concatenate([z[1] for z in z_values]) if z_values else np.zeros(0)
        clip = lambda x: np.clip(x, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])  # noqa: E731
        return {
            "settings": {"budgets": self.budgets, "rules": {r: RULE_PRUNERS[r] for r in self.rules},
                         "rules_with_all_sentences": sorted(IMAGE_RULES & set(self.rules)),
                         "inside_threshold": self.inside_threshold, "k": self.k, "cosine": self.cosine,
                         "text_source": self.text_source, "seed": self.seed,
                         "bootstrap_resamples": self.bootstrap_resamples, "confidence": 0.95},
            "num_sentences": len(rows),
            "num_measured": len(measured),
            "num_skipped": len(rows) - len(measured),
            "num_skipped_by_reason": {reason: sum(row["skipped"] == reason for row in rows)
                                      for reason in (SKIP_SMALL, SKIP_CROPPED, SKIP_NO_OUTSIDE)},
            # The skip's bias: the referents left out are the small ones (area = share of the crop).
            "referent_area": {"measured": area(measured),
                              "skipped": area([row for row in rows if row["skipped"] is not None])},
            "num_images": len(set(groups)),
            "aggregates": aggregates,
            "histogram": {"edges": HISTOGRAM_EDGES.tolist(),
                          "inside": np.histogram(clip(inside), HISTOGRAM_EDGES)[0].tolist(),
                          "outside": np.histogram(clip(outside), HISTOGRAM_EDGES)[0].tolist()},
            "rows": rows,
        }

    @rank_zero_only
    def _write(self, trainer, folder: Path, summary: dict, z_values: list) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.filename).write_text(json.dumps(summary, indent=2) + "\n")
        plot_similarity_histograms(summary["histogram"], folder / "reversal_similarity_histograms.png")
        plot_recall_vs_budget(summary["aggregates"]["referent_recall"], folder / "reversal_referent_recall.png")
        aggregates = summary["aggregates"]
        for writer in tensorboard_writers(trainer):
            for name in SCALARS:
                if aggregates[name]["mean"] is not None:
                    writer.add_scalar(f"reversal/{name}", aggregates[name]["mean"], 0)
            for name, stats in aggregates["rates"].items():
                if stats["mean"] is not None:
                    writer.add_scalar(f"reversal/rate/{name}", stats["mean"], 0)
            for rule, by_budget in aggregates["referent_recall"].items():
                for budget, stats in by_budget.items():
                    if stats["mean"] is not None:  # the x axis (step) is the budget
                        writer.add_scalar(f"reversal/referent_recall/{rule}", stats["mean"], int(budget))
            if z_values:
                writer.add_histogram("reversal/similarity_z/inside", np.concatenate([z[0] for z in z_values]), 0)
                writer.add_histogram("reversal/similarity_z/outside", np.concatenate([z[1] for z in z_values]), 0)
            writer.flush()
        for line in summary_lines(summary):
            print(line)
        print(f"similarity reversal written to {folder / self.filename}")


def percent(stats: dict) -> str:
    """`57% (95% CI 50-64%)` of a bootstrap_mean of 0/1 outcomes."""
    return f"{100 * stats['mean']:.0f}% (95% CI {100 * stats['low']:.0f}-{100 * stats['high']:.0f}%)"


def summary_lines(summary: dict) -> list[str]:
    """The console summary: the two reversal rates and how many referents were skipped, and why."""
    rates, measured = summary["aggregates"]["rates"], summary["num_measured"]
    threshold = summary["settings"]["inside_threshold"]
    lines = [f"similarity reversal: {measured} referents measured over {summary['num_images']} images"]
    if measured:
        lines += [f"  mean similarity inside < outside: {percent(rates['mean_inside_below_outside'])}",
                  f"  AUROC of low similarity > 0.5:     {percent(rates['auroc_above_half'])}"]
    by_reason = summary["num_skipped_by_reason"]
    lines.append(f"  skipped {summary['num_skipped']}: {by_reason[SKIP_SMALL]} small or thin (no patch covered "
                 f">= {threshold}), {by_reason[SKIP_CROPPED]} outside the CLIP crop, "
                 f"{by_reason[SKIP_NO_OUTSIDE]} with no outside patch")
    for kind, part in (summary.get("by_query_kind") or {}).items():
        kind_rates = part["aggregates"]["rates"]
        measured_rates = (f": mean inside < outside {percent(kind_rates['mean_inside_below_outside'])}, "
                          f"AUROC > 0.5 {percent(kind_rates['auroc_above_half'])}") if part["num_measured"] else ""
        lines.append(f"  {kind} queries, {part['num_measured']} measured{measured_rates}")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity_histograms(histogram: dict, path: Path) -> None:
    """Density of the standardised similarity inside vs outside the object: reversal = inside to the left."""
    plt = _pyplot()
    edges = np.asarray(histogram["edges"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in (("inside", "tab:red"), ("outside", "tab:blue")):
        counts = np.asarray(histogram[name], dtype=float)
        density = counts / (counts.sum() * np.diff(edges)) if counts.sum() else counts
        label = f"{name} ({int(counts.sum())} patches)"
        ax.stairs(density, edges, label=label, color=colour, fill=True, alpha=0.4)
    ax.set_xlabel("similarity to the sentence, (s - mean) / std per sentence")
    ax.set_ylabel("density")
    ax.set_title("CLIP image-text similarity: inside vs outside the referred object")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_recall_vs_budget(recall: dict, path: Path) -> None:
    """Referent recall (share of the object's patches kept) against the budget R, one line per rule."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, by_budget in recall.items():
        points = [(int(b), s) for b, s in by_budget.items() if s["mean"] is not None]
        if not points:
            continue
        budgets = [b for b, _ in points]
        line = ax.plot(budgets, [s["mean"] for _, s in points], marker="o", label=rule)[0]
        ax.fill_between(budgets, [s["low"] for _, s in points], [s["high"] for _, s in points],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("visual tokens kept (R)")
    ax.set_ylabel("referent recall")
    ax.set_ylim(0, 1)
    ax.set_title("Share of the referred object's patches kept (95% CI)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
