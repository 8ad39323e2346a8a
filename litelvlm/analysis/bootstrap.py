"""Seeded bootstrap confidence intervals for study means, resampling whole images (clusters).

Sentences of one image are not independent (same picture, same patches), so the interval comes from
resampling images with replacement and taking the mean over every row of the drawn images.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


def bootstrap_mean(
    values: Sequence[float],
    groups: Sequence[Hashable] | None = None,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """{"mean", "low", "high", "n", "groups"} of `values`; NaN/None values are left out.

    `groups` names the image of each value (None: every value its own group). With fewer than two
    groups the interval is the mean itself.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    groups = list(range(len(values))) if groups is None else list(groups)
    if len(groups) != len(values):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    kept = [(g, float(v)) for g, v in zip(groups, values) if v is not None and not math.isnan(float(v))]
    if not kept:
        return {"mean": None, "low": None, "high": None, "n": 0, "groups": 0}
    labels = sorted({g for g, _ in kept}, key=repr)
    index_of = {g: i for i, g in enumerate(labels)}
    sums = np.zeros(len(labels))
    counts = np.zeros(len(labels))
    for g, v in kept:
        sums[index_of[g]] += v
        counts[index_of[g]] += 1
    mean = float(sums.sum() / counts.sum())
    if len(labels) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": len(kept), "groups": len(labels)}
    draws = np.random.default_rng(seed).integers(0, len(labels), size=(num_resamples, len(labels)))
    resampled = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return {"mean": mean, "low": float(low), "high": float(high), "n": len(kept), "groups": len(labels)}
