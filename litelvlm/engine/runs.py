"""Run folders: the status a run leaves in its folder, and a run named by its parent folder.

A logger makes `SAVE_DIR/NAME/version_N/` per run. Every run writes `status.json` there: `running`
when it starts, `complete` when it ends, `failed` (with the error) when it stops on one,
`interrupted` (with the command that resumes it) when a SIGTERM stopped it; a run that was killed
(SIGKILL) stays `running`. Commands that read a run (compare, `--resume`, `model.finetuned`) also
accept `SAVE_DIR/NAME` and take its latest version that fits, so a README line never goes stale.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

from litelvlm.errors import LitelvlmError

STATUS_FILE = "status.json"
COMPLETE, FAILED, INTERRUPTED, RUNNING = "complete", "failed", "interrupted", "running"
VERSION_PREFIX = "version_"


def write_status(folder: str | Path, status: str, **details) -> Path:
    """`status.json` in a run folder, replaced atomically (a reader sees the old or the new one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, temporary = folder / STATUS_FILE, folder / f".{STATUS_FILE}.tmp"
    temporary.write_text(json.dumps({"status": status, **details}, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def read_status(folder: str | Path) -> str | None:
    """A run folder's status, or None when it has no (readable) status file."""
    try:
        return json.loads((Path(folder) / STATUS_FILE).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def versions(parent: Path) -> list[Path]:
    """The `version_N` run folders under a parent, by N."""
    found = [child for child in parent.glob(f"{VERSION_PREFIX}*") if child.is_dir()]
    numbered = [child for child in found if child.name.removeprefix(VERSION_PREFIX).isdigit()]
    return sorted(numbered, key=lambda child: int(child.name.removeprefix(VERSION_PREFIX)))


def resolve_run(
    path: str | Path, fits: Callable[[Path], bool], what: str, complete: bool = True, flag: str = ""
) -> Path:
    """`path` itself when it is a run folder; for a parent of `version_N` folders, the latest one that
    `fits` (and is complete, unless `complete=False`), announced on stderr. `what` says what is wanted."""
    path = Path(path).expanduser()
    candidates = versions(path) if path.is_dir() else []
    if not candidates:
        return path
    chosen = [run for run in candidates if fits(run) and (not complete or read_status(run) == COMPLETE)]
    if not chosen:
        seen = ", ".join(f"{run.name} {read_status(run) or 'no status'}" for run in candidates[-5:])
        raise LitelvlmError(
            f"{flag + ' ' if flag else ''}{path}: no {'complete ' if complete else ''}run with {what} under it "
            f"({seen}); name a version_N folder"
        )
    print(f"litelvlm: {flag + ' ' if flag else ''}{path} -> {chosen[-1]} (its latest run with {what})", file=sys.stderr)
    return chosen[-1]


def resume_command(args: list[str], run_dir: str | Path) -> str:
    """The command line that resumes `run_dir`: the CLI's arguments with `--resume RUN_DIR` (any earlier one replaced)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["python", "-m", "litelvlm.cli", *kept, "--resume", str(run_dir)])
