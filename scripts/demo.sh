#!/usr/bin/env bash
# Set up and run the demo sweep (sweeps/demo.toml) on the local backend, then analyse it and print the
# result table. A few minutes on 2 CPU cores. Results land in results/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
sweeper launch sweeps/demo.toml --max-parallel "${MAX_PARALLEL:-2}"
sweeper analyze demo
sweeper export demo --table optima --format markdown --columns model,tokens,batch_size,lr_star,x0,y0,edge
echo "report: results/demo/analysis/report.html"
