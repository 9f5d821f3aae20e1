#!/usr/bin/env bash
# Create .venv (idempotent) and install the project into it.
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. EXTRAS=dev,slurm,ray (default: none)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
# torch first and pinned: the CPU wheel of 2.13.0 satisfies the project's torch>=2.4, so pip keeps it
# instead of pulling the newest release with gigabytes of CUDA packages.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/pip install -q -e "$spec"
