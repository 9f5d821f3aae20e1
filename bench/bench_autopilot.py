"""The autopilot against the full grid, on simulated surfaces and on the real trainer.

Simulated (default): over ``--surfaces`` surfaces (different laws, noise, optimal norms and their
drift, asymmetric wells, divergence boundaries, optima off the autopilot's initial grid), each
surface is run twice with the same noise: the full grid (rates at 2^0.5 spacing over the whole
range, every batch size, every run to the largest horizon) and the autopilot (the same spec with a
coarse grid at 2^2 spacing as wave 0). Reported per surface and in total: tokens and FLOPs spent,
the share of (B, D) cells whose eta* (log2, ``log2_lr_star_interp``) is within one grid step (0.5)
of the full grid's, and early-stopped runs that were the full grid's optimum at a horizon they did
not reach (violations; the target is none)::

    .venv/bin/python bench/bench_autopilot.py --surfaces 20 --root /dev/shm/bench-autopilot

Real trainer (``--real``): the demo study (``sweeps/demo.toml``) through the autopilot on the
local backend, beside the full demo grid (run first, or read from ``--full-results``)::

    .venv/bin/python bench/bench_autopilot.py --real --root results/bench-autopilot-real

Results go under ``--root`` (tmpfs recommended for the simulated bench: the run store fsyncs every
event, about 7 ms each on a disk and 0.03 ms on tmpfs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeper import Sweep
from sweeper.autopilot import estimates
from sweeper.autopilot.journal import Journal

STEP = 0.5  # the full grid's spacing in log2 lr
HORIZONS = list(range(16, 23))  # log2 D
BATCHES = [8, 16, 32, 64]

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
[simulator]
{surface}
"""


# ------------------------------------------------------------------------------------ surfaces


def surfaces(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` surfaces: laws, noise, norms and their drift, asymmetry and divergence varied."""
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
        # eta*(B=16, D=2^19) at log2 -4 +- 1 (so the grids below cover every cell's optimum)
        s["lr_c"] = round(-4 + float(rng.uniform(-1, 1)) - s["lr_b"] * 4 - s["lr_d"] * 19, 3)
        s["batch_c"] = round(4 - s["batch_d"] * 19 + float(rng.uniform(-1, 1)), 3)
        if i % 5 == 2:  # a divergence boundary 1.5 to 2.5 octaves above eta* at the smallest D
            lo_star = s["lr_b"] * 3 + s["lr_d"] * HORIZONS[0] + s["lr_c"]
            s["diverge_b"] = s["lr_b"]
            s["diverge_c"] = round(lo_star - s["lr_b"] * 3 + float(rng.uniform(1.5, 2.5)), 3)
            s["diverge_log2_tokens"] = 15.0
        if i % 5 == 4:  # the optimum off the initial grid: shift every eta* by 1 to 1.5 octaves
            s["lr_c"] = round(s["lr_c"] + float(rng.choice([-1, 1])) * rng.uniform(1.0, 1.5), 3)
        out.append(s)
    return out


def star_range(s: dict[str, Any]) -> tuple[float, float]:
    """The lowest and highest log2 eta* over the bench's cells."""
    vals = [
        s["lr_b"] * math.log2(b) + s["lr_d"] * d + s["lr_c"] for b in BATCHES for d in HORIZONS
    ]
    return min(vals), max(vals)


def specs(name: str, s: dict[str, Any]) -> tuple[str, str]:
    """The full grid's spec and the autopilot's (coarse) spec of a surface."""
    lo, hi = star_range(s)
    full_lo, full_hi = math.floor(2 * (lo - 2)) / 2, math.ceil(2 * (hi + 2)) / 2
    surface = "\n".join(f"{k} = {v!r}" for k, v in s.items())
    common = {"batches": BATCHES, "horizons": HORIZONS, "surface": surface}
    full = SPEC.format(name=f"{name}-full", lo=full_lo, hi=full_hi, step=STEP, **common)
    # the autopilot's wave 0: a coarse grid over the same range, or centred on a guess that
    # misses the optimum (surfaces whose eta* was shifted off it)
    c_lo, c_hi = math.floor(full_lo), math.ceil(full_hi)
    auto = SPEC.format(name=f"{name}-auto", lo=c_lo, hi=c_hi, step=2.0, **common)
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
    right = df["right"].sum() / df["cells"].sum()
    return (
        f"total: {len(df)} surfaces, autopilot tokens / full grid = {tok:.3f} "
        f"(median per surface {df['tokens_ratio'].median():.3f}, worst {df['tokens_ratio'].max():.3f}); "
        f"FLOPs ratio {df['flops_ratio'].median():.3f} median; cells right "
        f"{df['right'].sum()}/{df['cells'].sum()} = {right:.3f}; "
        f"violations {int(df['violations'].sum())}; "
        f"median |eta* - truth|: full {df['full_err'].median():.3f}, autopilot {df['auto_err'].median():.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--surfaces", type=int, default=20)
    p.add_argument("--only", type=int, nargs="*", default=None, help="surface indices to run")
    p.add_argument("--root", type=Path, default=Path("/dev/shm/bench-autopilot"))
    p.add_argument("--real", action="store_true", help="the demo study on the real trainer")
    p.add_argument("--option", action="append", default=[], help="autopilot option k=v (JSON v)")
    args = p.parse_args(argv)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.real:
        from bench_autopilot_real import main as real  # noqa: PLC0415

        return int(real(args.root, options))
    shutil.rmtree(args.root, ignore_errors=True)
    rows = []
    for i, s in enumerate(surfaces(args.surfaces)):
        if args.only is not None and i not in args.only:
            continue
        row = run_pair(args.root, i, s, options)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.root / "bench_autopilot.csv", index=False)
    print(markdown(df))
    print(totals(df))
    return 0


if __name__ == "__main__":
    sys.exit(main())
