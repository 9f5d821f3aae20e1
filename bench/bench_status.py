"""``sweeper status`` over 10,000 synthetic run directories (target < 3 s).

    .venv/bin/python bench/bench_status.py [--runs 10000]

Builds a sweep whose runs carry realistic records and 1-4 events each (some running with a
heartbeat), then times, side by side: ``SweepStore.statuses()`` in-process, and the full CLI
``sweeper status SWEEP --format json`` / ``--format table`` in a subprocess (Python start-up
included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweeper.fsutil import write_text_atomic
from sweeper.plan import plan_sweep
from sweeper.spec import parse_spec_text
from sweeper.store import SweepStore

SPEC = """
name = "bench"
[[models]]
preset = "cpu-tiny"
[grid]
lr = {{log2_from = -12, log2_to = 0, log2_step = 0.5}}
batch_size = [8, 16, 32, 64]
log2_horizons = [20, 21]
seeds = {seeds}
"""
_STORIES = [["submitted"], ["submitted", "running"], ["submitted", "running", "completed"],
            ["submitted", "running", "failed", "running", "completed"]]  # fmt: skip


def build(root: Path, runs: int) -> SweepStore:
    seeds = list(range(-(-runs // 100)))
    spec = parse_spec_text(SPEC.format(seeds=seeds), "bench.toml")
    plan = plan_sweep(spec)
    plan.runs = plan.runs[:runs]
    store = SweepStore(root / "bench")
    with store.lock():  # what Sweep.create writes, for the first ``runs`` runs of the plan only
        write_text_atomic(store.root / "spec.toml", spec.text)
        for record in plan.runs:
            store.write_record(record)
        store.write_plan(plan.to_dict(spec))
    for i, rid in enumerate(store.run_ids()):
        for state in _STORIES[i % len(_STORIES)]:
            store.append_event(rid, state, backend="local", host="node1", pid=100 + i)
        if i % len(_STORIES) == 1:
            (store.run_dir(rid) / "heartbeat").touch()
    return store


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10_000)
    args = p.parse_args()
    sweeper = str(Path(sys.executable).with_name("sweeper"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build(Path(tmp), args.runs)
        print(f"built {len(store.run_ids())} run directories in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        statuses = store.statuses()
        t_lib = time.perf_counter() - t0
        t_json = timed([sweeper, "status", str(store.root), "--format", "json"])
        t_table = timed([sweeper, "status", str(store.root), "--format", "table"])
        t_help = timed([sweeper, "--help"])
    print(f"{'what':42} {'seconds':>8}")
    print(f"{'SweepStore.statuses() (' + str(len(statuses)) + ' runs)':42} {t_lib:8.3f}")
    print(f"{'sweeper status --format json':42} {t_json:8.3f}")
    print(f"{'sweeper status --format table':42} {t_table:8.3f}")
    print(f"{'sweeper --help (start-up only)':42} {t_help:8.3f}")


if __name__ == "__main__":
    main()
