"""``sweeper status`` over 10,000 synthetic run directories (issue 8's target: <= 1 s), side by
side with the code of another git revision.

    .venv/bin/python bench/bench_status.py [--runs 10000] [--reps 3] [--baseline c145a05]

Builds a sweep whose runs carry realistic records and 1-4 events each (some running with a
heartbeat), then times, each in a fresh interpreter: ``SweepStore.statuses()`` (imports not
counted), and the whole command ``sweeper status SWEEP --format json`` / ``--format table``
(Python start-up included; the JSON one first with no ``.cache``, then as a status with
nothing changed since the last one), and ``sweeper --help`` (start-up only), each in wall and
CPU seconds (user + system of the child: what a loaded machine distorts least). With
``--baseline``, the same is timed with that revision's code, in a temporary ``git worktree``
outside the repository (removed at the end), on a sweep made by that revision's own
:func:`build`; the variants alternate, the best of ``--reps`` (by CPU) counts, and the ratio
columns compare with the baseline.
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

from bench_collect import add_worktree, remove_worktree

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
ROOT = Path(__file__).resolve().parents[1]
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


# Each runs in a fresh interpreter whose working directory is the code to use (this tree or the
# baseline's worktree).
_PRELUDE = "import os, sys; sys.path.insert(0, os.getcwd()); "
_BUILD = (
    _PRELUDE + "sys.path.insert(0, 'bench'); from pathlib import Path; from bench_status import "
    "build; build(Path(sys.argv[1]), int(sys.argv[2]))"
)
_LIB = (
    _PRELUDE + "import json, time; from sweeper.store import SweepStore; "
    "store = SweepStore(sys.argv[1]); t = time.perf_counter(); n = len(store.statuses()); "
    "print(json.dumps({'runs': n, 's': time.perf_counter() - t}))"
)
_CLI = _PRELUDE + "from sweeper.cli import main; main()"
TARGET_S = 1.0


def _run(code: Path, args: list[str], stdout: int | None = subprocess.PIPE) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", *args], cwd=code, env=env, stdout=stdout, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"{args[0][:60]}... with the code in {code} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout or ""


def timed(code: Path, args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the child) of one command."""
    before = os.times()
    t0 = time.perf_counter()
    _run(code, args, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = os.times()
    return wall, (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )


def measure(code: Path, sweep: Path) -> dict[str, tuple[float, float]]:
    before = os.times()
    lib = json.loads(_run(code, [_LIB, str(sweep)]).strip().splitlines()[-1])
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    status = [_CLI, "status", str(sweep)]
    shutil.rmtree(sweep / ".cache", ignore_errors=True)  # a first status: nothing cached
    cold = timed(code, [*status, "--format", "json"])
    return {
        "SweepStore.statuses() (CPU: process)": (lib["s"], cpu),
        "status --format json, no cache": cold,
        "status --format json": timed(code, [*status, "--format", "json"]),
        "status --format table": timed(code, [*status, "--format", "table"]),
        "sweeper --help (start-up only)": timed(code, [_CLI, "--help"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", default=None, help="git revision to time side by side")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-status-"))
    variants = {"current": ROOT}
    try:
        if args.baseline:
            variants = {f"baseline {args.baseline}": add_worktree(args.baseline, tmp / "wt")}
            variants["current"] = ROOT
        sweeps = {}
        for label, code in variants.items():
            t0 = time.perf_counter()
            _run(code, [_BUILD, str(tmp / label.replace(" ", "-")), str(args.runs)])
            sweeps[label] = tmp / label.replace(" ", "-") / "bench"
            print(f"{label}: built {args.runs} run directories in {time.perf_counter() - t0:.1f} s")
        best: dict[str, dict[str, tuple[float, float]]] = {}
        for _ in range(args.reps):  # alternate the variants: both see the same load
            for label, code in variants.items():
                got = measure(code, sweeps[label])
                old = best.setdefault(label, got)
                best[label] = {k: min(v, old[k], key=lambda t: t[1]) for k, v in got.items()}
        print(f"load average {os.getloadavg()[0]:.1f}; best of {args.reps} (by CPU)")
        ref = next(iter(best.values()))
        print(f"{'what':38} {'code':18} {'wall s':>7} {'CPU s':>6} {'ratio':>6} {'CPU ratio':>9}")
        for what in ref:
            for label, got in best.items():
                (w, c), (rw, rc) = got[what], ref[what]
                print(f"{what:38} {label:18} {w:7.3f} {c:6.2f} {w / rw:6.2f} {c / rc:9.2f}")
        wall, cpu = best["current"]["status --format json"]
        verdict = "not judged" if args.runs < 10_000 else ("ok" if cpu <= TARGET_S else "MISSED")
        print(f"target: sweeper status of 10,000 runs <= {TARGET_S} s (CPU, nothing changed): "
              f"{cpu:.2f} s CPU ({wall:.2f} s wall), {verdict}")  # fmt: skip
    finally:
        if args.baseline:
            remove_worktree(tmp / "wt")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
