"""The configurations one run evaluates: a list of pruners, optionally grown by a strategies x budgets grid.

Each configuration gets a short, unique, readable name (`none`, `fastv@64`, `litelvlm@192`); the
name is its key in the logs, in results.json and in the per-sample records.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from litelvlm.errors import LitelvlmError
from litelvlm.pruners import TokenPruner, build_pruner, resolve_pruner_class
from litelvlm.pruners.base import SCORE_DTYPES


class SweepError(LitelvlmError):
    """A sweep that cannot be built: an empty grid, a strategy without a budget, two equal configurations."""


@dataclass
class SweepGrid:
    """Every strategy at every budget: `strategies: [fastv, litelvlm]`, `budgets: [192, 64]`.

    A strategy is a pruner name (short name, class name or class path) or
    `{class_path: name, init_args: {...}, budgets: [...]}` for knobs other than the budget and, with
    `budgets`, the grid budgets it runs at (a subset: PyramidDrop's stages on a 32-layer LLM allow no
    average below 52 tokens, so the paper grids leave out its 32). `score_dtypes:
    [model, float32]` also builds every scoring strategy once per precision (a strategy without the
    knob, such as `random`, once). Configurations come budget by budget, strategies in the order
    given (the layout of the paper's tables), each in the order of `score_dtypes`.
    """

    strategies: list[str | dict[str, Any]] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    score_dtypes: list[str] | None = None  # None: each strategy's own (default `model`)

    def expand(self) -> list[TokenPruner]:
        if not self.strategies or not self.budgets:
            raise SweepError("model.sweep needs at least one strategy and one budget (strategies: [...], budgets: [...])")
        if self.score_dtypes is not None and (
            not self.score_dtypes or any(d not in SCORE_DTYPES for d in self.score_dtypes)
            or len(set(self.score_dtypes)) != len(self.score_dtypes)
        ):
            raise SweepError(f"model.sweep.score_dtypes must list 'model' and/or 'float32' once each, got {self.score_dtypes!r}")
        specs = [_strategy_spec(strategy, self.budgets) for strategy in self.strategies]
        pruners = []
        for budget in self.budgets:
            for name, init_args, budgets in specs:
                if budget not in budgets:
                    continue
                parameters = inspect.signature(resolve_pruner_class(name)).parameters
                if "num_tokens" not in parameters:
                    raise SweepError(f"sweep strategy '{name}' takes no budget; list it under model.pruners instead")
                if self.score_dtypes is None or "score_dtype" not in parameters:
                    pruners.append(build_pruner(name, **init_args, num_tokens=budget))
                    continue
                if "score_dtype" in init_args:
                    raise SweepError(f"sweep strategy '{name}' sets score_dtype; the grid's score_dtypes set it")
                pruners += [build_pruner(name, **init_args, num_tokens=budget, score_dtype=d) for d in self.score_dtypes]
        return pruners


def _strategy_spec(strategy: str | dict[str, Any], grid_budgets: list[int]) -> tuple[str, dict[str, Any], list[int]]:
    """(name, init_args, the grid budgets it runs at) of one `strategies` entry."""
    if isinstance(strategy, str):
        return strategy, {}, list(grid_budgets)
    if (
        isinstance(strategy, dict) and isinstance(strategy.get("class_path"), str)
        and set(strategy) <= {"class_path", "init_args", "budgets"}
    ):  # fmt: skip
        name = strategy["class_path"]
        init_args = dict(strategy.get("init_args") or {})
        if "num_tokens" in init_args:
            raise SweepError(f"sweep strategy '{name}' sets num_tokens; the grid's budgets set it")
        budgets = strategy.get("budgets", list(grid_budgets))
        if not isinstance(budgets, list) or not budgets or any(budget not in grid_budgets for budget in budgets):
            raise SweepError(
                f"sweep strategy '{name}': budgets must be a non-empty list of the grid's budgets {list(grid_budgets)}, "
                f"got {budgets!r}"
            )
        return name, init_args, budgets
    raise SweepError(
        f"a sweep strategy is a pruner name or {{class_path: ..., init_args: {{...}}, budgets: [...]}}, got {strategy!r}"
    )


def collect_pruners(
    pruner: TokenPruner | None, pruners: list[TokenPruner] | None, sweep: SweepGrid | dict | None
) -> list[TokenPruner] | None:
    """The sweep's pruners (`pruners` then the grid), or None for a single-pruner run."""
    if pruners is None and sweep is None:
        return None
    if pruner is not None:
        raise SweepError("give either model.pruner (one configuration) or model.pruners / model.sweep (a sweep), not both")
    if isinstance(sweep, dict):
        sweep = SweepGrid(**sweep)
    listed = list(pruners or []) + (sweep.expand() if sweep is not None else [])
    if not listed:
        raise SweepError("model.pruners is empty: list at least one pruner")
    return listed


def configuration_names(pruners: list[TokenPruner]) -> list[str]:
    """`name@budget` (`none` unpruned); knobs are added only where two configurations would share a name."""
    names = [_base_name(pruner) for pruner in pruners]
    for base in {name for name in names if names.count(name) > 1}:
        group = [index for index, name in enumerate(names) if name == base]
        knobs = [_knobs(pruners[index]) for index in group]
        differing = sorted({key for k in knobs for key in k if any(other.get(key) != k.get(key) for other in knobs)})
        for index, knob in zip(group, knobs):
            names[index] = f"{base}[{','.join(f'{key}={knob.get(key)}' for key in differing)}]" if differing else base
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise SweepError(
                f"configurations {names.index(name) + 1} and {index + 1} are the same ({name}); "
                "a sweep evaluates each configuration once"
            )
    return names


def _base_name(pruner: TokenPruner) -> str:
    if pruner.num_tokens is None:
        return pruner.name
    return f"{pruner.name}@{pruner.num_tokens}"


def pruner_knobs(pruner: TokenPruner) -> dict[str, str]:
    """Every knob a pruner shows: its hparams, its `extra_repr` (`key=value, ...`) and its public
    scalar attributes (a seed that neither of the others names), as strings."""
    knobs = {key: str(value) for key, value in pruner.hparams().items() if key != "pruner"}
    for key, value in re.findall(r"(\w+)=([^,]+)", pruner.extra_repr()):
        knobs.setdefault(key, value.strip())
    for key, value in vars(pruner).items():
        if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str)):
            knobs.setdefault(key, str(value))
    return dict(sorted(knobs.items()))


def _knobs(pruner: TokenPruner) -> dict[str, str]:
    knobs = pruner_knobs(pruner)
    knobs.pop("num_tokens", None)
    return knobs
