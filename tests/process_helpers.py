"""Run a command in its own process group with a time limit, so a hang (a DDP rank waiting for its
peer, a killed fit's children) is killed with everything it started and reported, not left behind."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_in_session(command: list[str], cwd: Path, timeout_s: float, env: dict | None = None) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        command, cwd=cwd, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{command[:4]} hung for {timeout_s} s:\n{stderr[-4000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
