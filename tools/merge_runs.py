"""Join the parts of an evaluation split across jobs (`--data.shard i/n`) into one run folder.

    python tools/merge_runs.py OUT RUN_DIR...

OUT gets `records/` (every part's scored masks) and `results.json`, equal to what one run over the
whole split writes; parts of different evaluations, overlapping or missing shards are refused in
one line (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import sys

from litelvlm.engine.merge import merge_runs
from litelvlm.engine.callbacks.report import format_results_table
from litelvlm.errors import LitelvlmError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the merged records/ and results.json into (new)")
    parser.add_argument("runs", nargs="+", help="the run folder (version_N) of every part")
    args = parser.parse_args(argv)
    try:
        rows = merge_runs(args.out, args.runs)
    except LitelvlmError as error:
        print(f"merge_runs: error: {error}", file=sys.stderr)
        return 2
    print(format_results_table(rows))
    print(f"merged {len(args.runs)} parts into {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
