#!/usr/bin/env bash
# Set up everything and run the whole test suite: lint, a real single-node SLURM (started here and
# stopped on exit), a local Ray cluster (started and stopped by the tests), torch training on the CPU.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,slurm,ray,tracking
.venv/bin/ruff check sweeper trainer tests bench
.venv/bin/ruff format --check -q sweeper trainer tests bench
.venv/bin/mypy
started_slurm=0
if [ "$(id -u)" = 0 ] && [ "${SWEEPER_TEST_SLURM:-1}" = 1 ]; then
  bash scripts/slurm-cluster.sh start
  started_slurm=1
fi
cleanup() { [ $started_slurm = 1 ] && bash scripts/slurm-cluster.sh stop || true; }
trap cleanup EXIT
set +e
.venv/bin/python -m pytest -q --timeout=900 --durations=30 "$@"
rc=$?
set -e
[ $rc = 5 ] && { echo "no tests were collected"; exit 1; }
exit $rc
