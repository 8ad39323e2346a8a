"""What README's commands write into the folder they run from is ignored by git, so a user's
`git status` stays clean after following README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_outputs() -> list[str]:
    """Files README's commands are shown writing: `--json FILE`, `--out DIR`, and the runs folder."""
    text = (REPO / "README.md").read_text()
    outputs = re.findall(r"--(?:json|out) ([\w./-]+)", text)
    return sorted(set(outputs)) + ["runs/demo/version_0/results.json", "lightning_logs/version_0/hparams.yaml"]


def test_readme_shows_json_outputs():
    assert {"rows.json", "bench.json"} <= set(readme_outputs())


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_every_readme_output_is_ignored_by_git():
    for output in readme_outputs():
        done = subprocess.run(["git", "check-ignore", "-q", output], cwd=REPO)
        assert done.returncode == 0, f"{output} (written by a README command) is not in .gitignore"
