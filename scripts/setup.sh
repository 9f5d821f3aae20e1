#!/usr/bin/env bash
# Create .venv (idempotent) and install the project into it.
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. bash scripts/setup.sh dev,slurm,ray
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python3}
# pip warns once per package about unusable index locations some machines configure; keep the rest.
pip_install() { .venv/bin/pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
[ -x .venv/bin/python ] || "$py" -m venv .venv
# torch first and pinned: the CPU wheel of 2.13.0 satisfies the project's torch>=2.4, so pip keeps it
# instead of pulling the newest release with gigabytes of CUDA packages.
.venv/bin/python -c "import torch" 2>/dev/null || pip_install torch==2.13.0
spec="."
[ -n "$extras" ] && spec=".[$extras]"
pip_install -e "$spec"
