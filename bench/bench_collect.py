"""Benchmark ``sweeper collect`` on a synthetic sweep of many run directories.

Generates ``--runs`` run directories in the documented formats (run.json, config.json,
provenance.json, events.jsonl, metrics.jsonl with 20-50 lines and a few horizons, summary.json),
then times

1. the JSON parsing alternatives on the metrics files (json per line, pyarrow.json per file,
   pyarrow.json over the concatenated files, a process pool of json over 2 workers),
2. first collects side by side, interleaved ``--reps`` times: the ``collect.py`` of git revision
   ``--baseline`` (if given), and the current one reading in one process and in two; the tables
   of each variant are compared with the first variant's,
3. a first ``collect``, a second one with nothing changed, and one after touching 10 runs.

Usage: ``python bench/bench_collect.py [--runs 10000] [--dir DIR] [--keep] [--baseline REV]
[--reps 3] [--skip-parsers]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from trainer.config import SCHEMA_VERSION, TrainConfig

HORIZONS = (2**16, 2**17, 2**18)


def _run_files(i: int, rng: random.Random) -> dict[str, str]:
    """The files of one synthetic completed run, as text."""
    batch = 2 ** rng.randint(2, 4)
    lr = 2.0 ** -rng.randint(3, 10)
    n_lines = rng.randint(20, 50)
    seq = 64
    tps = batch * seq
    total_steps = HORIZONS[-1] // tps
    log_every = max(1, total_steps // (n_lines - 1))
    train = {
        "model": {"preset": "cpu-tiny"},
        "optim": {"lr": lr},
        "batch_size": batch,
        "horizons_tokens": list(HORIZONS),
        "log_every": log_every,
        "seed": 30,
        "data": {"kind": "synthetic"},
    }
    cfg = TrainConfig.from_dict(train)
    rid = f"r{i:05d}"
    record = {
        "id": rid,
        "slug": f"lr{lr:g}-b{batch}",
        "kind": "single",
        "parent": None,
        "model_name": "cpu-tiny",
        "train": train,
        "derived": {},
        "resources": {},
    }
    horizon_steps = set(cfg.horizon_steps)
    steps = sorted(set(range(0, total_steps + 1, log_every)) | horizon_steps)
    lines = []
    for s in steps:
        loss = 5.5 * math.exp(-s / (total_steps + 1)) + 2.0 + rng.gauss(0, 0.02)
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
    t0 = 1.7e9 + i
    events = [
        {"ts": t0, "state": "submitted", "attempt": 1, "backend": "local"},
        {"ts": t0 + 1, "state": "running", "attempt": 1, "host": "node1", "pid": 100 + i},
        {"ts": t0 + 60, "state": "completed", "attempt": 1, "exit_code": 0},
    ]
    summary = {
        "status": "completed",
        "step": total_steps,
        "tokens": total_steps * tps,
        "final_loss": loss,
        "final_output_norm": 1.0 + total_steps * lr,
        "wall_time_s": 59.0,
        "diverged_step": None,
        "reason": None,
    }
    prov = {
        "git_sha": "0" * 40,
        "git_dirty": False,
        "python": "3.11.2",
        "torch": "2.13.0+cpu",
        "device": "cpu",
        "world_size": 1,
        "hostname": "node1",
        "start_time": t0 + 1,
    }
    return {
        "run.json": json.dumps(record),
        "config.json": json.dumps({**cfg.to_dict(), "schema_version": SCHEMA_VERSION}),
        "provenance.json": json.dumps(prov),
        "events.jsonl": "".join(json.dumps(e) + "\n" for e in events),
        "metrics.jsonl": "\n".join(lines) + "\n",
        "summary.json": json.dumps(summary),
    }


def make_sweep(sweep_dir: Path, n_runs: int, seed: int = 0) -> None:
    """Write ``n_runs`` synthetic completed runs under ``sweep_dir/runs/``."""
    rng = random.Random(seed)
    (sweep_dir / "runs").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_runs):
        files = _run_files(i, rng)
        run_dir = sweep_dir / "runs" / f"r{i:05d}"
        run_dir.mkdir(exist_ok=True)
        for name, text in files.items():
            (run_dir / name).write_text(text)
        (run_dir / "heartbeat").touch()
        ids.append(f"r{i:05d}")
    (sweep_dir / "plan.json").write_text(json.dumps({"sweep": sweep_dir.name, "runs": ids}))


# ------------------------------------------------------------------------------- parse alternatives


def _parse_json_file(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def _parse_json_many(paths: list[str]) -> int:
    return sum(len(_parse_json_file(p)) for p in paths)


def parse_json(paths: list[str]) -> int:
    """json.loads per line, one process."""
    return _parse_json_many(paths)


def parse_arrow_per_file(paths: list[str]) -> int:
    """pyarrow.json.read_json once per file."""
    return sum(pj.read_json(p).num_rows for p in paths)


def parse_arrow_concat(paths: list[str]) -> int:
    """Read every file's bytes, then one pyarrow.json.read_json over the concatenation."""
    chunks = []
    for p in paths:
        with open(p, "rb") as f:
            chunks.append(f.read())
    return pj.read_json(pa.BufferReader(b"".join(chunks))).num_rows


def parse_collect(paths: list[str]) -> int:
    """What collect does: the concatenation with an explicit schema, per-file fallback on errors."""
    from sweeper.collect import parse_metrics

    chunks = []
    for p in paths:
        with open(p, "rb") as f:
            chunks.append(f.read())
    return parse_metrics(chunks)[0].num_rows


def parse_pool(paths: list[str]) -> int:
    """json.loads per line in a pool of 2 processes."""
    half = len(paths) // 2
    with ProcessPoolExecutor(2) as pool:
        return sum(pool.map(_parse_json_many, [paths[:half], paths[half:]]))


def _cpu() -> float:
    """CPU seconds of this process and its finished children (all threads)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _time(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and CPU seconds of ``fn()``; on a shared machine the CPU time is the steadier figure."""
    t, c = time.perf_counter(), _cpu()
    out = fn()
    return time.perf_counter() - t, _cpu() - c, out


def bench_parsers(sweep_dir: Path) -> None:
    paths = sorted(str(p) for p in (sweep_dir / "runs").glob("*/metrics.jsonl"))
    base = None
    print(f"parse {len(paths)} metrics.jsonl files:")
    for fn in (parse_json, parse_arrow_per_file, parse_arrow_concat, parse_collect, parse_pool):
        dt, cpu, n = _time(lambda fn=fn: fn(paths))
        base = base or dt
        print(
            f"  {fn.__name__:22s} wall {dt:7.3f} s ({base / dt:5.2f}x vs json)  cpu {cpu:7.3f} s"
            f"  ({n} lines)"
        )


def _report(label: str, dt: float, cpu: float, result: object) -> None:
    print(f"{label:24s} wall {dt:7.3f} s  cpu {cpu:7.3f} s  ({result})")


def _fresh(sweep_dir: Path) -> None:
    """Remove the collect cache and the tables, so that the next collect is a first one."""
    shutil.rmtree(sweep_dir / ".collect", ignore_errors=True)
    for name in ("runs", "horizons", "metrics"):
        (sweep_dir / f"{name}.parquet").unlink(missing_ok=True)


def load_baseline(rev: str) -> ModuleType:
    """``sweeper/collect.py`` as of git revision ``rev``, imported as a separate module."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:sweeper/collect.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = ModuleType("collect_baseline")
    module.__file__ = f"collect.py@{rev}"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _tables(sweep_dir: Path) -> dict[str, pa.Table]:
    return {n: pq.read_table(sweep_dir / f"{n}.parquet") for n in ("runs", "horizons", "metrics")}


def _same_tables(a: dict[str, pa.Table], b: dict[str, pa.Table]) -> bool:
    """Equal contents, row order included (metadata aside; dictionaries compared as values)."""
    for name in a:
        x, y = a[name].replace_schema_metadata(None), b[name].replace_schema_metadata(None)
        if name == "metrics":
            x, y = (
                t.cast(
                    pa.schema(
                        [
                            f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
                            for f in t.schema
                        ]
                    )
                )
                for t in (x, y)
            )
        if not x.equals(y):
            return False
    return True


def bench_first(sweep_dir: Path, baseline: str | None, reps: int) -> None:
    """First collects side by side, interleaved: the baseline revision and the current code with
    the reading in one process and in two."""
    from sweeper import collect

    variants: dict[str, Callable[[], object]] = {}
    if baseline:
        old = load_baseline(baseline)
        variants[f"baseline {baseline}"] = lambda: old.collect_sweep(sweep_dir)
    variants["one process"] = lambda: collect.collect_sweep(sweep_dir, parallel=False)
    variants["two processes"] = lambda: collect.collect_sweep(sweep_dir, parallel=True)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    results: dict[str, dict[str, pa.Table]] = {}
    for rep in range(reps):
        for label, fn in variants.items():
            _fresh(sweep_dir)
            dt, cpu, result = _time(fn)
            times[label].append((dt, cpu))
            print(
                f"  rep {rep + 1} {label:22s} wall {dt:7.3f} s  cpu {cpu:7.3f} s  load "
                f"{os.getloadavg()[0]:.1f}"
            )
            if rep == 0:
                results[label] = _tables(sweep_dir)
    ref = next(iter(results.values()))
    first_wall = statistics.median(w for w, _ in next(iter(times.values())))
    print(f"first collect, median of {reps}:")
    for label, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        same = "same tables" if _same_tables(ref, results[label]) else "TABLES DIFFER"
        print(
            f"  {label:22s} wall {wall:7.3f} s ({first_wall / wall:4.2f}x)  cpu {cpu:7.3f} s"
            f"  {same}"
        )


def bench_collect(sweep_dir: Path) -> None:
    from sweeper.collect import collect_sweep

    _fresh(sweep_dir)
    _report("first collect:", *_time(lambda: collect_sweep(sweep_dir)))
    _report("second, nothing changed:", *_time(lambda: collect_sweep(sweep_dir)))
    for p in sorted((sweep_dir / "runs").iterdir())[:10]:
        os.utime(p / "metrics.jsonl")
        os.utime(p / "summary.json", ns=(time.time_ns(), time.time_ns() + 1))
    _report("after touching 10 runs:", *_time(lambda: collect_sweep(sweep_dir)))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--dir", type=Path, default=None, help="sweep dir (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated sweep")
    ap.add_argument("--skip-parsers", action="store_true")
    ap.add_argument(
        "--baseline", default=None, help="git revision whose collect.py to time side by side"
    )
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the first collects")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    sweep_dir = args.dir or root / "bench"
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    import pandas  # noqa: F401 - pyarrow's numpy interop imports it; time it apart from collect

    print(f"import pandas (once per process): {time.perf_counter() - t0:.2f} s")
    try:
        if not (sweep_dir / "runs").is_dir():
            dt, _, _ = _time(lambda: make_sweep(sweep_dir, args.runs))
            print(f"generated {args.runs} runs in {dt:.1f} s")
        if not args.skip_parsers:
            bench_parsers(sweep_dir)
        bench_first(sweep_dir, args.baseline, args.reps)
        bench_collect(sweep_dir)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
