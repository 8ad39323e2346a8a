"""The strategies an efficiency comparison runs: one definition for the FLOPs table and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from litelvlm.pruners import TokenPruner, build_pruner


@dataclass(frozen=True)
class Strategy:
    """One row: a registered pruner, its budget and (FastV) its variant."""

    pruner: str
    num_tokens: int | None = None
    mode: str | None = None

    @property
    def label(self) -> str:
        return f"{self.pruner}-{self.mode}" if self.mode else self.pruner

    def build(self) -> TokenPruner:
        if self.pruner == "none":
            return build_pruner("none")
        kwargs = {"mode": self.mode} if self.mode else {}
        return build_pruner(self.pruner, num_tokens=self.num_tokens, **kwargs)


def efficiency_strategies(budgets, baseline_tokens: int | None = None) -> list[Strategy]:
    """No pruning, then FastV (both variants), VisPruner, LiteLVLM, the pre-LLM baselines FasterVLM,
    DivPrune, CDPruner and VisionZip, and the in-LLM baselines PyramidDrop, DART and SparseVLM at every budget."""
    rows = [Strategy("none", baseline_tokens)]
    for budget in budgets:
        rows += [
            Strategy("fastv", budget, "inplace"),
            Strategy("fastv", budget, "mask"),
            Strategy("vispruner", budget),
            Strategy("litelvlm", budget),
            Strategy("fastervlm", budget),
            Strategy("divprune", budget),
            Strategy("cdpruner", budget),
            Strategy("visionzip", budget),
            Strategy("pdrop", budget),
            Strategy("dart", budget),
            Strategy("sparsevlm", budget),
        ]
    return rows
