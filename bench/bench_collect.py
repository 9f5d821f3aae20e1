"""Benchmark ``sweeper collect`` on a synthetic sweep of many run directories, side by side with
the collect of another git revision.

Generates ``--runs`` completed run directories in the current formats (``run.json`` from
``RunRecord.to_dict()``, the trainer's ``config.json``, ``provenance.json``, ``events.jsonl``, a
``metrics.jsonl`` of 20-50 lines with 3 horizons, ``summary.json`` from ``Summary.to_dict()``), then
times, each in a fresh Python process (imports not counted):

1. with ``--parsers``: the ways of reading the metrics files into Arrow (``orjson`` plus
   ``trainer.schema.parse_metrics_line`` per line, ``pyarrow.json`` per file, and the reader
   collect uses);
2. first collects, interleaved ``--reps`` times: the code of git revision ``--baseline`` (in a
   temporary ``git worktree``, on a sweep made by that revision's own generator, since run.json
   formats differ between the two) and the current code;
3. for each: a collect with nothing changed and one after touching 10 runs.

Usage: ``python bench/bench_collect.py [--runs 10000] [--baseline REV] [--reps 3] [--parsers]
[--dir DIR --keep]``; issue 8's comparison is ``--baseline c145a05`` (the code before it). The
worktree is made in the work directory (a temporary one by default, outside the repository) and
removed at the end; the main work tree is not touched. It ends with the targets, met or missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from sweeper.records import RunKind, RunRecord
from trainer.config import SCHEMA_VERSION, TrainConfig
from trainer.schema import Status, Summary

ROOT = Path(__file__).resolve().parents[1]
HORIZONS = (2**16, 2**17, 2**18)


def _metrics_lines(cfg: TrainConfig, lr: float, n_lines: int, rng: random.Random) -> list[str]:
    """The metrics lines of one run (the same random draws as the generator before issue 8, so
    that the two revisions' sweeps hold the same numbers)."""
    tps, total = cfg.tokens_per_step, cfg.total_steps
    log_every = cfg.log_every
    horizon_steps = set(cfg.horizon_steps)
    lines = []
    for s in sorted(set(range(0, total + 1, log_every)) | horizon_steps):
        loss = 5.5 * math.exp(-s / (total + 1)) + 2.0 + rng.gauss(0, 0.02)
        line = {
            "step": s,
            "tokens": s * tps,
            "train_loss": loss,
            "lr_in": lr,
            "lr_hidden": lr,
            "lr_out": lr,
            "output_norm": 1.0 + s * lr,
            "output_norm_rms": 0.5 + s * lr,
            "input_norm": 1.0,
            "hidden_norm": 1.0 + s * lr / 2,
            "update_norm_in": lr,
            "update_norm_hidden": lr,
            "update_norm_out": lr,
            "grad_norm": rng.random(),
            "tokens_per_s": 1e5 + rng.random(),
            "step_time_s": 0.01 + rng.random() / 100,
            "horizon": s in horizon_steps,
        }
        if s in horizon_steps:
            line["val_loss"] = loss + 0.05
        lines.append(json.dumps(line))
    return lines


def run_files(i: int, rng: random.Random, sweep: str) -> dict[str, bytes]:
    """The files of one synthetic completed run."""
    batch = 2 ** rng.randint(2, 4)
    lr = 2.0 ** -rng.randint(3, 10)
    n_lines = rng.randint(20, 50)
    total_steps = HORIZONS[-1] // (batch * 64)
    train = {
        "model": {"preset": "cpu-tiny"},
        "optim": {"lr": lr},
        "batch_size": batch,
        "horizons_tokens": list(HORIZONS),
        "log_every": max(1, total_steps // (n_lines - 1)),
        "seed": 30,
        "data": {"kind": "synthetic"},
    }
    cfg = TrainConfig.from_dict(train)
    rid = f"r{i:05d}"
    record = RunRecord(
        id=rid,
        slug=f"lr{lr:g}-b{batch}",
        kind=RunKind.SINGLE,
        parent=None,
        sweep=sweep,
        model="cpu-tiny",
        train=cfg,
    )
    lines = _metrics_lines(cfg, lr, n_lines, rng)
    last = json.loads(lines[-1])
    t0 = 1.7e9 + i
    events = [
        {"ts": t0, "state": "submitted", "attempt": 1, "backend": "local"},
        {"ts": t0 + 1, "state": "running", "attempt": 1, "host": "node1", "pid": 100 + i},
        {"ts": t0 + 60, "state": "completed", "attempt": 1, "exit_code": 0},
    ]
    summary = Summary(
        status=Status.COMPLETED,
        step=cfg.total_steps,
        tokens=cfg.total_steps * cfg.tokens_per_step,
        final_loss=last["train_loss"],
        final_output_norm=1.0 + cfg.total_steps * lr,
        wall_time_s=59.0,
    )
    prov = {"git_sha": "0" * 40, "git_dirty": False, "python": "3.11.2", "torch": "2.13.0",
            "device": "cpu", "world_size": 1, "hostname": "node1", "start_time": t0}  # fmt: skip
    return {
        "run.json": orjson.dumps(record.to_dict(), option=orjson.OPT_INDENT_2),
        "config.json": orjson.dumps({**cfg.to_dict(), "schema_version": SCHEMA_VERSION}),
        "provenance.json": orjson.dumps(prov),
        "events.jsonl": b"".join(orjson.dumps(e) + b"\n" for e in events),
        "metrics.jsonl": ("\n".join(lines) + "\n").encode(),
        "summary.json": orjson.dumps(summary.to_dict()),
    }


def make_sweep(sweep_dir: Path, n_runs: int, seed: int = 0) -> None:
    """Write ``n_runs`` synthetic completed runs and a ``plan.json`` under ``sweep_dir``."""
    rng = random.Random(seed)
    (sweep_dir / "runs").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_runs):
        files = run_files(i, rng, sweep_dir.name)
        run_dir = sweep_dir / "runs" / f"r{i:05d}"
        run_dir.mkdir(exist_ok=True)
        for name, data in files.items():
            (run_dir / name).write_bytes(data)
        (run_dir / "heartbeat").touch()
        ids.append(run_dir.name)
    (sweep_dir / "plan.json").write_text(json.dumps({"sweep": sweep_dir.name, "runs": ids}))


# ------------------------------------------------------------------------------ timing, isolated

# Runs in a fresh interpreter whose working directory is the code to time (this tree or the
# baseline worktree): prints {"wall": s, "cpu": s, "what": str(result)} for each collect asked.
_TIMER = """
import json, os, resource, sys, time
sys.path.insert(0, os.getcwd())
import pandas  # pyarrow's numpy interop imports it; not part of a collect
from sweeper.collect import collect_sweep
import sweeper.collect
assert sweeper.collect.__file__.startswith(os.getcwd()), sweeper.collect.__file__
def cpu():  # this process and its finished children (the baseline may fork a reader)
    use = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in use)
sweep = sys.argv[1]
for step in sys.argv[2:]:
    if step == "touch":
        runs = sorted(os.listdir(os.path.join(sweep, "runs")))[:10]
        for r in runs:
            os.utime(os.path.join(sweep, "runs", r, "metrics.jsonl"))
            os.utime(os.path.join(sweep, "runs", r, "summary.json"))
        continue
    t, c = time.perf_counter(), cpu()
    result = collect_sweep(sweep)
    print(json.dumps({"step": step, "wall": time.perf_counter() - t,
                      "cpu": cpu() - c, "what": str(result)}), flush=True)
"""


def timed_collects(code_dir: Path, sweep_dir: Path, steps: list[str]) -> list[dict[str, object]]:
    """Run collects of ``sweep_dir`` with the code in ``code_dir`` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", _TIMER, str(sweep_dir), *steps],
        cwd=code_dir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def fresh(sweep_dir: Path) -> None:
    """Remove the collect cache and the tables, so that the next collect is a first one."""
    shutil.rmtree(sweep_dir / ".collect", ignore_errors=True)
    for name in ("runs", "horizons", "metrics"):
        (sweep_dir / f"{name}.parquet").unlink(missing_ok=True)


def add_worktree(rev: str, where: Path) -> Path:
    """A detached ``git worktree`` of ``rev`` (removed by :func:`remove_worktree`)."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return where


def remove_worktree(where: Path) -> None:
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True
    )


def make_baseline_sweep(worktree: Path, sweep_dir: Path, n_runs: int) -> None:
    """The baseline's own fixture, made by the baseline revision's generator."""
    code = (
        "import sys; sys.path.insert(0, '.'); sys.path.insert(0, 'bench');"
        "from pathlib import Path; from bench_collect import make_sweep;"
        "make_sweep(Path(sys.argv[1]), int(sys.argv[2]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", code, str(sweep_dir), str(n_runs)], cwd=worktree, env=env, check=True
    )


# ----------------------------------------------------------------------------------------- parsers

_PARSERS = """
import glob, sys, time
import orjson, pyarrow as pa, pyarrow.json as pj
from trainer.schema import parse_metrics_line
from sweeper.collect.metrics import read_metrics
paths = sorted(glob.glob(sys.argv[1] + "/runs/*/metrics.jsonl"))
blobs = [open(p, "rb").read() for p in paths]

def orjson_lines():
    n = 0
    for b in blobs:
        rows = [parse_metrics_line(orjson.loads(x)) for x in b.splitlines() if x.strip()]
        n += len(pa.Table.from_pylist(rows))
    return n

def arrow_per_file():
    return sum(pj.read_json(pa.BufferReader(b)).num_rows for b in blobs)

def collect_reader():
    return read_metrics(blobs).table.num_rows

for fn in (orjson_lines, arrow_per_file, collect_reader):
    t, c = time.perf_counter(), time.process_time()
    n = fn()
    print(f"  {fn.__name__:16s} wall {time.perf_counter() - t:6.2f} s  "
          f"cpu {time.process_time() - c:6.2f} s  ({n} rows)", flush=True)
"""


def bench_parsers(sweep_dir: Path) -> None:
    print(f"metrics.jsonl -> Arrow, {len(list((sweep_dir / 'runs').iterdir()))} files:")
    subprocess.run([sys.executable, "-c", _PARSERS, str(sweep_dir)], cwd=ROOT, check=True)


# ------------------------------------------------------------------------------------------- main


def _median(rows: list[dict[str, object]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)  # type: ignore[arg-type]


def bench_first(
    variants: dict[str, tuple[Path, Path]], reps: int
) -> tuple[dict[str, list[dict]], dict[str, dict[str, dict]]]:
    """First collects, interleaved; then a collect with nothing changed and one after touching
    10 runs, per variant. Returns the first collects and the later ones by step, per variant."""
    firsts: dict[str, list[dict]] = {k: [] for k in variants}
    laters: dict[str, dict[str, dict]] = {k: {} for k in variants}
    for rep in range(reps):
        for label, (code, sweep) in variants.items():
            fresh(sweep)
            steps = ["first"] if rep < reps - 1 else ["first", "unchanged", "touch", "touched"]
            got = timed_collects(code, sweep, steps)
            firsts[label].append(got[0])
            load = os.getloadavg()[0]
            print(f"  rep {rep + 1} {label:24s} first {got[0]['wall']:6.2f} s  load {load:.1f}")
            for later in got[1:]:
                wall, cpu = later["wall"], later["cpu"]
                print(f"      {later['step']:9s} wall {wall:6.3f} s  cpu {cpu:.3f} s")
                laters[label][str(later["step"])] = later
            print(f"      {got[-1]['what']}")
    return firsts, laters


# Issue 8's targets (bench/README.md): first collect of 10,000 runs, its ratio to the baseline,
# and a collect with nothing changed.
TARGET_FIRST_S, TARGET_RATIO, TARGET_UNCHANGED_S = 3.0, 1.3, 0.5


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--baseline", default=None, help="git revision to time side by side")
    ap.add_argument("--reps", type=int, default=3, help="first collects per variant")
    ap.add_argument("--parsers", action="store_true", help="also time the metrics readers")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated sweeps")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-collect-"))
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    worktree = None
    try:
        current = root / "current" / "bench"
        if not (current / "runs").is_dir():
            t0 = time.perf_counter()
            make_sweep(current, args.runs)
            print(f"generated {args.runs} runs in {time.perf_counter() - t0:.1f} s")
        variants = {"current": (ROOT, current)}
        if args.baseline:
            worktree = add_worktree(args.baseline, root / f"worktree-{os.getpid()}")
            old = root / "baseline" / "bench"
            if not (old / "runs").is_dir():
                make_baseline_sweep(worktree, old, args.runs)
            variants = {f"baseline {args.baseline}": (worktree, old), **variants}
        if args.parsers:
            bench_parsers(current)
        firsts, laters = bench_first(variants, args.reps)
        ref = _median(next(iter(firsts.values())), "wall")
        ref_cpu = _median(next(iter(firsts.values())), "cpu")
        print(f"first collect, median of {args.reps} (ratios to the first line):")
        for label, rows in firsts.items():
            wall, cpu = _median(rows, "wall"), _median(rows, "cpu")
            print(
                f"  {label:24s} wall {wall:6.2f} s ({wall / ref:4.2f}x)  "
                f"cpu {cpu:6.2f} s ({cpu / ref_cpu:4.2f}x)"
            )
        wall = _median(firsts["current"], "wall")
        unchanged = float(laters["current"]["unchanged"]["wall"])
        print(f"targets ({args.runs} runs; issue 8 sets them for 10,000):")
        print(
            f"  first collect {wall:.2f} s <= {TARGET_FIRST_S} s: {verdict(wall <= TARGET_FIRST_S)}"
        )
        if args.baseline:
            ratio = wall / ref
            print(f"  ratio to {args.baseline} {ratio:.2f} <= {TARGET_RATIO}: "
                  f"{verdict(ratio <= TARGET_RATIO)}")  # fmt: skip
        print(f"  nothing changed {unchanged:.3f} s <= {TARGET_UNCHANGED_S} s: "
              f"{verdict(unchanged <= TARGET_UNCHANGED_S)}")  # fmt: skip
    finally:
        if worktree is not None:
            remove_worktree(worktree)
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
