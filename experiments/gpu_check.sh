#!/usr/bin/env bash
# The efficiency table measured on one CUDA GPU (random-weight GLaMM-7B, bf16), or `--smoke` on CPU.
# Runs from a plain checkout, nothing installed: the repository goes on PYTHONPATH. Wheels in .whl/
# (ignored by git; carried to the device tool's machine, whose transformers is older than the
# project's) are installed into a temporary folder first. Arguments go to experiments/gpu_check.py
# (--smoke, --out PATH, --budgets, --warmup, --repeats, --time-limit). Output: the table on stdout,
# the rows as JSON in $OUT/gpu_check.json when OUT is set (the device tool), else runs/gpu_check.json.
# How to run it on a lent GPU: docs/efficiency.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d "${TMPDIR:-/tmp}/litelvlm-gpu-check-site.XXXXXX")"
    trap 'rm -rf "$site"' EXIT
    PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    export PYTHONPATH="$repo:$site${PYTHONPATH#"$repo"}"
fi
"$python" experiments/check_env.py torch transformers lightning
"$python" experiments/gpu_check.py "$@"
