"""Are the named packages installed at versions inside pyproject.toml's ranges? One line each, and
exit status 1 if not: a script about to build a 7B model on a lent GPU fails in a second instead.

    python experiments/check_env.py torch transformers lightning

The device tool's image ships its own torch/transformers/Lightning, which may be older than the
project's tested ranges; docs/efficiency.md says how to carry the right ones as wheels.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project_requirements() -> dict[str, Requirement]:
    import tomllib  # Python 3.11+; `main` skips the check on 3.10

    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, dependencies)}


def problems(names: list[str]) -> list[str]:
    """One line per named package that is missing, outside its range, or not a project dependency."""
    requirements = project_requirements()
    found = []
    for name in names:
        requirement = requirements.get(canonicalize_name(name))
        if requirement is None:
            found.append(f"{name}: not a dependency in {PYPROJECT.name}")
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            found.append(f"{name}: not installed (the project needs {requirement})")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            found.append(f"{name} {installed} is outside the project's tested range {requirement}")
    return found


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        print("note: no tomllib before Python 3.11; package versions not checked", file=sys.stderr)
        return 0
    found = problems(argv)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
