"""The studies' results per query kind: ReasonSeg's short queries (`is_sentence` false) and long ones (true).

LISA's paper reports ReasonSeg for all queries, short and long; the studies do the same, so a
reader sees whether the similarity reversal or the attention sink differs on long sentences, which
is where text-guided pruning is most at risk (docs/studies.md, "Per query kind").
"""

from __future__ import annotations

from collections.abc import Callable

from litelvlm.engine.scores import QUERY_KINDS


def query_kind(batch, sample: int, sentence: int) -> str | None:
    """`short` / `long` for the batch's query (ReasonSeg's `is_sentence`), None where the data has no kinds."""
    flags = getattr(batch, "is_sentence", None)
    if not flags or sample >= len(flags) or flags[sample] is None:
        return None
    return "long" if flags[sample][sentence] else "short"


def by_query_kind(rows: list[dict], summarise: Callable[[list[dict]], dict]) -> dict | None:
    """{kind: the summary of the rows of that kind, without its rows}; None when no row has a kind."""
    if not any(row.get("query_kind") for row in rows):
        return None
    summaries = {}
    for kind in QUERY_KINDS:
        summary = summarise([row for row in rows if row.get("query_kind") == kind])
        summaries[kind] = {key: value for key, value in summary.items() if key != "rows"}
    return summaries
