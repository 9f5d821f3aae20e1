"""The autopilot against the full grid, on simulated surfaces and on the real trainer.

Simulated (default): over ``--surfaces`` surfaces (different laws, noise, optimal norms and their
drift, asymmetric wells, divergence boundaries, and every fifth one with its optimum 2 to 3 octaves
off the range the autopilot's first grid covers), each surface is run twice with the same noise:
the full grid (rates at 2^0.5 spacing over every cell's eta* +- 2 octaves, every batch size, every
run to the largest horizon) and the autopilot (wave 0 a coarse grid at 2^2 spacing). Reported per
surface and in total: tokens and FLOPs spent, the share of (B, D) cells whose eta* (log2,
``log2_lr_star_interp``) is within one grid step (0.5) of the full grid's (cells where the full
grid has a sound optimum), and early-stopped runs that were the full grid's optimum at a horizon
they did not reach (violations; the target is none)::

    .venv/bin/python bench/bench_autopilot.py --surfaces 20

Real trainer (``--real``): the demo study (``sweeps/demo.toml``) through the autopilot on the
local backend, started from the demo's grid at 2-octave spacing, beside the full demo grid (run
first, or read from ``--full-results``)::

    .venv/bin/python bench/bench_autopilot.py --real --root results/bench-autopilot-real

Results go under ``--root`` (default: a fresh directory on tmpfs when there is one: the run store
fsyncs every event, about 7 ms each on a disk and 0.03 ms on tmpfs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeper import Sweep
from sweeper.autopilot import estimates
from sweeper.autopilot.journal import Journal

REPO = Path(__file__).resolve().parent.parent

STEP = 0.5  # the full grid's spacing in log2 lr
COARSE = 2.0  # the autopilot's wave 0 spacing
HORIZONS = list(range(15, 20))  # log2 D
BATCHES = [4, 8, 16]
MID_B, MID_D = 3.0, 17.0  # log2 B and log2 D where each surface's eta* is anchored
# The autopilot's settings in the bench beyond the defaults (--option overrides): no batch sizes
# beyond the spec's (the full grid has only those: like with like), and no rates finer than the
# full grid's (on noisy surfaces finer rates cost runs to the largest horizon without narrowing
# the interval; a seed would).
OPTIONS: dict[str, Any] = {
    "n_boot": 40,
    "max_waves": 5,
    "batch_proposals": False,
    "min_step_log2": STEP,
}

SPEC = """name = "{name}"
[[models]]
preset = "cpu-tiny"
[grid]
lr = {{log2_from = {lo}, log2_to = {hi}, log2_step = {step}}}
batch_size = {batches}
log2_horizons = {horizons}
[train]
log_every = 4
checkpoint_every = 1024
[backend]
name = "sim"
[backend.sim]
rounds_per_octave = 1
[simulator]
{surface}
"""


# ------------------------------------------------------------------------------------ surfaces


def surfaces(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` surfaces: laws, noise, norms and their drift, asymmetry and divergence varied; every
    fifth one has its optimum shifted 2 to 3 octaves away from the guess the autopilot's wave 0
    is centred on (:func:`guess`)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s: dict[str, Any] = {
            "seed": 1000 + i,
            "lr_b": round(float(rng.uniform(0.35, 0.7)), 3),
            "lr_d": round(float(rng.uniform(-0.6, -0.3)), 3),
            "batch_d": round(float(rng.uniform(0.3, 0.55)), 3),
            "x0": round(float(rng.uniform(5.0, 8.0)), 2),
            "noise": float(rng.choice([0.05, 0.1, 0.2, 0.3])),
            "curvature_high": float(rng.choice([1.0, 1.0, 1.5, 2.0])),
            "loss_floor": round(float(rng.uniform(1.0, 2.0)), 2),
        }
        if i % 4 == 3:
            s["x0_drift"] = float(rng.choice([-0.1, 0.1, 0.15]))
        # eta*(B = 2^MID_B, D = 2^MID_D) at log2 -4 +- 1
        anchor = -4 + float(rng.uniform(-1, 1))
        s["lr_c"] = round(anchor - s["lr_b"] * MID_B - s["lr_d"] * MID_D, 3)
        s["batch_c"] = round(MID_B + 1 - s["batch_d"] * MID_D + float(rng.uniform(-1, 1)), 3)
        if i % 5 == 2:  # a divergence boundary 1.5 to 2.5 octaves above eta* at the smallest D
            lo_b = math.log2(BATCHES[0])
            lo_star = s["lr_b"] * lo_b + s["lr_d"] * HORIZONS[0] + s["lr_c"]
            s["diverge_b"] = s["lr_b"]
            s["diverge_c"] = round(lo_star - s["lr_b"] * lo_b + float(rng.uniform(1.5, 2.5)), 3)
            s["diverge_log2_tokens"] = 14.0
        if i % 5 == 4:  # the optimum off the autopilot's initial grid
            s["lr_c"] = round(s["lr_c"] + float(rng.choice([-1, 1])) * rng.uniform(2.0, 3.0), 3)
            s["guess_lr_c"] = anchor - s["lr_b"] * MID_B - s["lr_d"] * MID_D
        out.append(s)
    return out


def star_range(s: dict[str, Any], lr_c: float | None = None) -> tuple[float, float]:
    """The lowest and highest log2 eta* over the bench's cells (with another intercept)."""
    c = s["lr_c"] if lr_c is None else lr_c
    b = [math.log2(x) for x in BATCHES]
    vals = [s["lr_b"] * lb + s["lr_d"] * d + c for lb in b for d in HORIZONS]
    return min(vals), max(vals)


def guess(s: dict[str, Any]) -> tuple[float, float]:
    """The rate range the autopilot's wave 0 covers: the surface's eta* range +-1 octave, or for
    a shifted surface the range it had before the shift (a wrong prior)."""
    lo, hi = star_range(s, s.get("guess_lr_c"))
    return lo - 1, hi + 1


def specs(name: str, s: dict[str, Any]) -> tuple[str, str]:
    """The full grid's spec and the autopilot's (coarse) spec of a surface."""
    lo, hi = star_range(s)
    full_lo, full_hi = math.floor(2 * (lo - 2)) / 2, math.ceil(2 * (hi + 2)) / 2
    surface = "\n".join(f"{k} = {v!r}" for k, v in s.items() if k != "guess_lr_c")
    common = {"batches": BATCHES, "horizons": HORIZONS, "surface": surface}
    full = SPEC.format(name=f"{name}-full", lo=full_lo, hi=full_hi, step=STEP, **common)
    g_lo, g_hi = guess(s)
    c_lo = math.floor(g_lo / COARSE) * COARSE
    c_hi = c_lo + math.ceil((g_hi - c_lo) / COARSE) * COARSE
    auto = SPEC.format(name=f"{name}-auto", lo=c_lo, hi=c_hi, step=COARSE, **common)
    return full, auto


# ------------------------------------------------------------------------------------ one pair


def cells_of(sweep: Sweep) -> pd.DataFrame:
    """Per (B, D): the analysis's eta* (interp and nearest point), status and edge."""
    sweep.collect()
    o = estimates.take(sweep.root, 200).optima
    cols = ["batch_size", "tokens", "status", "edge", "log2_lr_star", "log2_lr_star_interp"]
    return o[cols].copy() if len(o) else pd.DataFrame(columns=cols)


def spent(sweep: Sweep) -> tuple[int, float]:
    snap = estimates.take(sweep.root, 20)
    return snap.spent_tokens, snap.spent_flops


def run_pair(root: Path, i: int, s: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Full grid and autopilot on surface ``i``; the comparison row."""
    full_text, auto_text = specs(f"s{i:02d}", s)
    (root / "specs").mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, text in (("full", full_text), ("auto", auto_text)):
        p = root / "specs" / f"s{i:02d}-{kind}.toml"
        p.write_text(text)
        paths.append(p)
    t0 = time.perf_counter()
    full = Sweep.create(paths[0], root / "sweeps")
    full.launch(backend="sim")
    full_cells = cells_of(full)
    t1 = time.perf_counter()
    auto = Sweep.create(paths[1], root / "sweeps")
    report = auto.autopilot(**options)
    auto_cells = cells_of(auto)
    t2 = time.perf_counter()
    row = compare(s, full_cells, auto_cells)
    row.update(violations(auto, full_cells))
    (ft, ff), (at, af) = spent(full), spent(auto)
    row.update(
        surface=i,
        full_tokens=ft,
        auto_tokens=at,
        full_flops=ff,
        auto_flops=af,
        tokens_ratio=at / ft,
        flops_ratio=af / ff,
        full_runs=len(full.store.run_ids()),
        auto_runs=len(auto.store.run_ids()),
        stopped=report.stopped,
        waves=report.waves,
        finished=report.finished,
        identified=f"{report.identified}/{len(report.cells)}",
        full_s=round(t1 - t0, 1),
        auto_s=round(t2 - t1, 1),
    )
    return row


def compare(s: dict[str, Any], full: pd.DataFrame, auto: pd.DataFrame) -> dict[str, Any]:
    """Cells right (within one grid step of the full grid's eta*), and both against the truth."""
    m = full.merge(auto, on=["batch_size", "tokens"], how="left", suffixes=("_full", "_auto"))
    ok = (m["status_full"] == "ok") & (m["edge_full"] == "")
    ok &= np.isfinite(m["log2_lr_star_interp_full"])
    m = m[ok]
    truth = s["lr_b"] * np.log2(m["batch_size"]) + s["lr_d"] * np.log2(m["tokens"]) + s["lr_c"]
    diff = (m["log2_lr_star_interp_auto"] - m["log2_lr_star_interp_full"]).abs()
    right = diff <= STEP + 1e-9
    return {
        "cells": len(m),
        "right": int(right.sum()),
        "right_share": float(right.mean()) if len(m) else math.nan,
        "full_err": float((m["log2_lr_star_interp_full"] - truth).abs().median()),
        "auto_err": float((m["log2_lr_star_interp_auto"] - truth).abs().median()),
    }


def violations(auto: Sweep, full: pd.DataFrame) -> dict[str, Any]:
    """Stopped runs whose rate was the full grid's optimal rate at a horizon they did not reach."""
    best = {(int(r.batch_size), int(r.tokens)): r.log2_lr_star for r in full.itertuples()}
    bad = []
    for rec in Journal(auto.root).records():
        if rec["event"] != "stop":
            continue
        record = auto.store.load_record(rec["run_id"])
        at = int(rec["evidence"].get("tokens") or 0)
        if not at:
            metrics = auto.store.run_dir(rec["run_id"]) / "summary.json"
            at = json.loads(metrics.read_text()).get("tokens", 0) if metrics.exists() else 0
        for d in record.horizons_tokens:
            opt = best.get((record.batch_size, d))
            if d > at and opt is not None and abs(math.log2(record.lr) - opt) < STEP / 2:
                bad.append(f"{rec['run_id']}@{d}")
    return {"violations": len(bad), "violating": ";".join(bad[:3])}


# ----------------------------------------------------------------------------------- the table


def markdown(df: pd.DataFrame) -> str:
    cols = ["surface", "full_runs", "auto_runs", "stopped", "waves", "finished", "identified",
            "tokens_ratio", "flops_ratio", "right", "cells", "right_share", "violations",
            "full_err", "auto_err"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[cols].itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def totals(df: pd.DataFrame) -> str:
    tok = df["auto_tokens"].sum() / df["full_tokens"].sum()
    flops = df["auto_flops"].sum() / df["full_flops"].sum()
    right = df["right"].sum() / df["cells"].sum()
    ratios = df["tokens_ratio"]
    return (
        f"total: {len(df)} surfaces; autopilot / full grid: tokens {tok:.3f}, FLOPs {flops:.3f} "
        f"(tokens per surface: median {ratios.median():.3f}, worst {ratios.max():.3f}); "
        f"cells within one grid step {df['right'].sum()}/{df['cells'].sum()} = {right:.3f}; "
        f"violations {int(df['violations'].sum())}; median |log2 eta* - truth|: full grid "
        f"{df['full_err'].median():.3f}, autopilot {df['auto_err'].median():.3f}"
    )


def real(root: Path, options: dict[str, Any], full_root: Path | None, demo: Path) -> int:
    """The demo study on the real trainer (local backend): the full demo grid (run here, or read
    from ``full_root``) beside the autopilot started from the same grid at 2-octave spacing."""
    text = demo.read_text()
    auto_text = re.sub(r'^name = "[^"]*"', 'name = "demo-autopilot"', text, count=1, flags=re.M)
    auto_text = re.sub(r"log2_step = [0-9.]+", f"log2_step = {COARSE:g}", auto_text, count=1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo-autopilot.toml").write_text(auto_text)
    t0 = time.perf_counter()
    if full_root is None:
        full = Sweep.create(demo, root)
        full.launch(backend="local")
    else:
        full = Sweep.open(full_root)
    t1 = time.perf_counter()
    auto = Sweep.create(root / "demo-autopilot.toml", root)
    report = auto.autopilot(backend="local", progress=False, **{"n_boot": 200, **options})
    t2 = time.perf_counter()
    m = cells_of(full).merge(
        cells_of(auto), on=["batch_size", "tokens"], suffixes=("_full", "_auto")
    )
    print("| B | D | log2 eta* full grid | log2 eta* autopilot | difference | full edge |")
    print("|---|---|---|---|---|---|")
    for r in m.itertuples(index=False):
        full_star, auto_star = r.log2_lr_star_interp_full, r.log2_lr_star_interp_auto
        cells = [r.batch_size, f"2^{math.log2(r.tokens):g}", f"{full_star:.2f}"]
        cells += [f"{auto_star:.2f}", f"{auto_star - full_star:+.2f}", r.edge_full or "-"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    (ft, ff), (at, af) = spent(full), spent(auto)
    print(
        f"full grid: {len(full.store.run_ids())} runs, {ft:,} tokens, {ff:.3g} FLOPs"
        f" ({t1 - t0:.0f} s); autopilot: {report.runs} runs ({report.stopped} stopped early), "
        f"{report.waves} waves, {report.finished}, {at:,} tokens ({at / ft:.3f} of the grid), "
        f"{af:.3g} FLOPs ({af / ff:.3f}) ({t2 - t1:.0f} s)"
    )
    return 0


def default_root() -> Path:
    """A fresh directory on tmpfs when there is one (the store fsyncs every event)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="bench-autopilot-", dir=base))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--surfaces", type=int, default=20)
    p.add_argument("--only", type=int, nargs="*", default=None, help="surface indices to run")
    p.add_argument("--root", type=Path, default=None, help="results (default: a fresh temp dir)")
    p.add_argument("--real", action="store_true", help="the demo study on the real trainer")
    p.add_argument("--full-results", type=Path, default=None,
                   help="--real: an already-run full demo sweep directory")  # fmt: skip
    p.add_argument("--real-spec", type=Path, default=REPO / "sweeps" / "demo.toml",
                   help="--real: the study (its grid's first log2_step is made 2)")  # fmt: skip
    p.add_argument("--option", action="append", default=[], help="autopilot option k=v (JSON v)")
    args = p.parse_args(argv)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    root = args.root or default_root()
    if args.real:
        return real(root, options, args.full_results, args.real_spec)
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    t0 = time.perf_counter()
    for i, s in enumerate(surfaces(args.surfaces)):
        if args.only is not None and i not in args.only:
            continue
        row = run_pair(root, i, s, {**OPTIONS, **options})
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(root / "bench_autopilot.csv", index=False)
    print(markdown(df))
    print(totals(df))
    print(f"{time.perf_counter() - t0:.0f} s in all; results in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
