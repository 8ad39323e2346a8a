"""How many queries were longer than CLIP's text window, so a user sees when `text_overflow` matters.

A text-guided pruner (LiteLVLM and its ablations, CDPruner) sends its queries through CLIP's text
tower, whose window is 77 tokens; a longer query is truncated or cut into chunks (`text_overflow`,
docs/pruners.md). The run counts, per split and text source, the queries it embedded and those
over the window (lengths in CLIP tokens, [SOS] and [EOS] included), summed over processes; a
resumed run adds the recorded queries' lengths (records `question_clip_tokens` / `query_clip_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from litelvlm.models.processor import query_lengths as token_counts
from litelvlm.pruners.base import Signal, TokenPruner


class TextOverflowCount(Metric):
    """Queries seen, queries longer than `window` CLIP tokens, and the longest, over a split."""

    full_state_update = False

    def __init__(self, window: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.window = int(window)
        for name, reduce in (("queries", "sum"), ("overflowed", "sum"), ("longest", "max")):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx=reduce)

    def update(self, lengths: Sequence[int]) -> None:
        lengths = torch.as_tensor(list(lengths), dtype=torch.int64, device=self.device)
        self.queries += lengths.numel()
        self.overflowed += (lengths > self.window).sum()
        if lengths.numel():
            self.longest = torch.maximum(self.longest, lengths.max())

    def compute(self) -> dict:
        return {"window": self.window, "queries": int(self.queries), "overflowed": int(self.overflowed),
                "longest": int(self.longest)}


def text_source(pruner: TokenPruner) -> str | None:
    """The text a pruner sends through CLIP (`question` unless it has the knob), None if it reads none."""
    if Signal.TEXT_EMBEDS not in pruner.required_signals:
        return None
    return getattr(pruner, "text_source", "question")


def query_lengths(clip_tokenizer, texts: list[list[str]]) -> list[int]:
    """Every query's length in CLIP tokens, untruncated."""
    return token_counts(clip_tokenizer, [text for sample in texts for text in sample], special_tokens=True)


def overflow_line(rows: list[dict]) -> str | None:
    """One console line: per split and text source, how many queries overflowed and how each configuration handled them."""
    counted = [row for row in rows if row.get("clip_text_overflow")]
    if not counted:
        return None
    parts, handling = {}, {}
    for row in counted:
        count = row["clip_text_overflow"]
        where = f"{row['split']} {count['text_source']}s"
        parts[where] = f"{where}: {count['overflowed']} of {count['queries']} (longest {count['longest']})"
        handling.setdefault(row.get("text_overflow", "truncate"), []).append(row["configuration"])
    window = counted[0]["clip_text_overflow"]["window"]
    how = "; ".join(f"{mode}: {', '.join(dict.fromkeys(names))}" for mode, names in handling.items())
    return f"queries longer than CLIP's {window}-token text window: {'; '.join(parts.values())} [text_overflow {how}]"
