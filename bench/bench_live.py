"""``sweeper status`` with the live columns over 10,000 run directories (target <= 1 s a refresh).

    .venv/bin/python bench/bench_live.py [--runs 10000]

Builds a sweep of real records (written through the API) with 1-5 events each, metrics lines for
every started run and a fresh heartbeat for the running ones, then times side by side: the store's
states alone, a cold ``LiveView.refresh()`` (no ``.cache``: every record, event log and metrics
tail read), a new view over the persisted cache (what a new ``status`` command pays with nothing
changed), a warm refresh with nothing changed (what ``status --watch`` pays every interval), a
warm refresh after 100 runs moved on, and the whole CLI ``sweeper status`` in a subprocess (Python
start-up included), in wall and CPU seconds (CPU: this process, or the child's user + system).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sweeper import LiveView, RunState, Sweep
from sweeper.spec import parse_spec_text

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
_STORIES = [[], ["submitted"], ["submitted", "running"], ["submitted", "running", "completed"],
            ["submitted", "running", "failed", "running", "completed"]]  # fmt: skip


def build(root: Path, runs: int) -> Sweep:
    seeds = list(range(-(-runs // 100)))
    spec = parse_spec_text(SPEC.format(seeds=seeds), "bench.toml")
    sweep = Sweep.create(spec, root)
    ids = sweep.store.plan_order()[:runs]
    for i, rid in enumerate(ids):
        story = _STORIES[i % len(_STORIES)]
        for state in story:
            sweep.store.append_event(rid, state, backend="local", host="node1", pid=100 + i)
        if "running" in story:
            _metrics(sweep.store.run_dir(rid), 20)
            (sweep.store.run_dir(rid) / "heartbeat").touch()
    return sweep


def _metrics(rd: Path, n: int, start: int = 0) -> None:
    with open(rd / "metrics.jsonl", "a") as f:
        for step in range(start, start + n):
            line = {"step": step, "tokens": step * 4096, "train_loss": 5.0 - step * 0.01,
                    "output_norm": 1.0 + step * 0.01, "tokens_per_s": 9000.0}  # fmt: skip
            f.write(json.dumps(line) + "\n")


def timed(fn, repeat: int = 3) -> tuple[float, float]:  # noqa: ANN001
    """Best (wall, CPU) seconds of ``fn`` over ``repeat`` calls, by CPU; CPU counts this process
    and its finished children (user + system)."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        c0, t0 = _cpu(), time.perf_counter()
        fn()
        got = (time.perf_counter() - t0, _cpu() - c0)
        best = min(best, got, key=lambda t: t[1])
    return best


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10_000)
    args = p.parse_args()
    sweeper = str(Path(sys.executable).with_name("sweeper"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sweep = build(Path(tmp), args.runs)
        n = len(sweep.store.run_ids())
        print(f"built {n} run directories in {time.perf_counter() - t0:.1f} s; "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        t_states = timed(sweep.store.statuses)

        def cold() -> None:
            shutil.rmtree(sweep.root / ".cache", ignore_errors=True)
            LiveView(sweep).refresh()

        t_cold = timed(cold, repeat=2)
        time.sleep(1.1)  # past the racy window: every row of the next view is persisted
        LiveView(sweep).refresh()
        t_new = timed(lambda: LiveView(sweep).refresh())
        view = LiveView(sweep)
        rows = view.refresh()
        t_warm = timed(view.refresh)
        running = [r.run_id for r in rows if r.state == RunState.RUNNING][:100]

        def moved() -> None:
            for rid in running:
                _metrics(sweep.store.run_dir(rid), 1, start=100)
            view.refresh()

        t_moved = timed(moved)
        cli = [sweeper, "status", str(sweep.root)]
        t_json = timed(lambda: subprocess.run([*cli, "--format", "json"], check=False,
                                              stdout=subprocess.DEVNULL), repeat=2)  # fmt: skip
        t_table = timed(lambda: subprocess.run(cli, check=False, stdout=subprocess.DEVNULL),
                        repeat=2)  # fmt: skip
    running_n = sum(r.state == RunState.RUNNING for r in rows)
    print(f"{'what (' + str(n) + ' runs, ' + str(running_n) + ' running)':52} "
          f"{'wall s':>7} {'CPU s':>6}")  # fmt: skip
    for what, (w, c) in [
        ("SweepStore.statuses() (states only)", t_states),
        ("LiveView.refresh(), cold (no .cache, every file read)", t_cold),
        ("new LiveView().refresh(), persisted cache, no change", t_new),
        ("LiveView.refresh(), warm, nothing changed", t_warm),
        ("LiveView.refresh(), warm, 100 runs moved on", t_moved),
        ("sweeper status --format json (subprocess)", t_json),
        ("sweeper status (table, subprocess)", t_table),
    ]:
        print(f"{what:52} {w:7.3f} {c:6.2f}")


if __name__ == "__main__":
    main()
