"""Local backend overhead per run, with a trainer that exits at once (target < 0.3 s per run).

    .venv/bin/python bench/bench_local.py [--runs 40]

``backend.command`` points at a tiny shell script that writes ``summary.json`` and exits 0, so the
measured time is the sweeper's own: claiming, the run lock, events, trial.json, heartbeat thread,
process start (including the parent-death shim) and recording. Printed side by side with the cost
of spawning the same script directly, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweeper.launch import claim, prepare_sweep, select_runs

from sweeper.backends import LaunchOptions
from sweeper.backends.local import LocalBackend

SCRIPT = """#!/bin/sh
# usage: fake --run RUN.json --out DIR
printf '{"status": "completed", "final_loss": 1.0}' > "$4/summary.json"
"""


def make_sweep(root: Path, runs: int, name: str) -> Path:
    script = root / "instant.sh"
    lrs = ", ".join(repr(2.0**-i) for i in range(1, runs + 1))
    spec = root / f"{name}.toml"
    spec.write_text(
        f'name = "{name}"\n[[models]]\npreset = "test-micro"\n[grid]\nlr = [{lrs}]\n'
        f"batch_size = [4]\nhorizons_tokens = [1024]\n[backend]\n"
        f'command = ["sh", {json.dumps(str(script))}]\n'
    )
    return spec


def run_local(root: Path, runs: int, parallel: int) -> float:
    store = prepare_sweep(make_sweep(root, runs, f"p{parallel}"), root / "results").store
    t0 = time.perf_counter()
    with store.lock():
        ids = select_runs(store)
        claim(store, ids, "local")
    LocalBackend().launch(store, ids, LaunchOptions(max_parallel=parallel, progress=False))
    wall = time.perf_counter() - t0
    states = {st.state.value for st in store.statuses().values()}
    assert states == {"completed"}, states
    return wall


def run_direct(root: Path, runs: int) -> float:
    script = root / "instant.sh"
    out = root / "direct"
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for _ in range(runs):
        subprocess.run(["sh", str(script), "--run", "x", "--out", str(out)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args()
    n = args.runs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "instant.sh").write_text(SCRIPT)
        direct = run_direct(root, n)
        serial = run_local(root, n, 1)
        parallel = run_local(root, n, 2)
    print(f"{n} runs; python {sys.version.split()[0]}")
    print(f"{'what':38} {'wall s':>8} {'per run s':>10} {'overhead/run s':>15}")
    print(f"{'spawn the script directly':38} {direct:8.2f} {direct / n:10.3f} {'-':>15}")
    for label, wall, par in (("local backend, max_parallel=1", serial, 1),
                             ("local backend, max_parallel=2", parallel, 2)):  # fmt: skip
        per = wall / n
        print(f"{label:38} {wall:8.2f} {per:10.3f} {per - direct / n / par:15.3f}")


if __name__ == "__main__":
    main()
