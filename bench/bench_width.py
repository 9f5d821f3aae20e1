"""Per-group learning-rate exponents across width on the CPU trainer (Everett et al. 2024).

Plans ``sweeps/width-cpu.toml`` (a cpu-tiny family at d_model 32, 64, 96, 128; a group scan of
2^-4..2^2 around the base rates, one layer group at a time) once per optimizer, trains every run
with the real trainer, collects the tables with ``sweeper collect`` and runs the width analysis
(``sweeper analyze``). Prints the fitted exponent c of each (optimizer, group) with its 95 %
interval, beside the SP, muP (Adam) and Scion prescriptions, and writes the figure.

The runs are trained one after the other in this process (``trainer.train.train`` on the worker's
``trial.json``, with the worker's events), not by ``sweeper launch``: the 2.7 s of CPU that each
trainer process spends importing torch would cost more than the training itself on a shared
2-core machine. Everything else (plan, run directories, collect, analysis) is the sweeper's.

Usage: .venv/bin/python bench/bench_width.py [--out results] [--figure docs/img/width_cpu.png]

The exponents are printed twice: on the validation loss at the horizon (the same 2048 held-out
tokens for every run, the headline and the figure) and on the smoothed train loss (3 logged
batches of 512 tokens each, much noisier at this batch size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASE_LR = {"scion": 0.125, "adamw": 2.0**-7}


def train_in_process(sweep: object) -> dict[str, int]:
    """Train every planned run of ``sweep`` (a :class:`sweeper.Sweep`) in plan order (trunks
    before branches), recording the worker's ``running`` and final events. Returns state counts."""
    from sweeper.records import RunState
    from sweeper.store import hostname
    from sweeper.worker import _write_trial
    from trainer.__main__ import load_run_config
    from trainer.schema import Status
    from trainer.train import train

    store = sweep.store  # type: ignore[attr-defined]
    counts: dict[str, int] = {}
    final = {Status.COMPLETED: RunState.COMPLETED, Status.DIVERGED: RunState.DIVERGED}
    for rid in store.plan_order():
        if store.status(rid).state in (RunState.COMPLETED, RunState.DIVERGED):
            counts["kept"] = counts.get("kept", 0) + 1
            continue
        record = store.load_record(rid)
        run_dir = store.run_dir(rid)
        trial = _write_trial(store, run_dir, record, None)
        started = store.append_event(
            rid, RunState.RUNNING, backend="in-process", host=hostname(), pid=os.getpid()
        )
        summary = train(load_run_config(trial), run_dir)
        state = final.get(Status(summary["status"]), RunState.FAILED)
        store.append_event(rid, state, exit_code=0 if state == RunState.COMPLETED else 3,
                           attempt=started.attempt, backend="in-process")  # fmt: skip
        counts[state.value] = counts.get(state.value, 0) + 1
    return counts


def run_sweep(spec_raw: dict, name: str, results: Path) -> tuple[object, float]:
    """Create (or reopen) the sweep of a spec dict, train what is left, collect; CPU seconds."""
    from sweeper import Sweep
    from sweeper.spec import parse_spec

    spec = parse_spec({**spec_raw, "name": name}, f"{name}.toml")
    sweep = Sweep.create(spec, results)
    t0 = time.process_time()
    counts = train_in_process(sweep)
    cpu = time.process_time() - t0
    sweep.collect()
    print(f"{name}: {counts}, {cpu:.0f} s CPU training", flush=True)
    return sweep, cpu


def main() -> None:
    import logging

    import pandas as pd

    from sweeper.analysis.api import AnalysisOptions, analyze_tables
    from sweeper.analysis.law_report import width_figure
    from sweeper.analysis.tables import load_sweep

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results", help="results directory for the sweeps")
    ap.add_argument("--figure", default="docs/img/width_cpu.png")
    ap.add_argument("--optimizers", default="scion,adamw")
    args = ap.parse_args()
    logging.getLogger("trainer").setLevel(logging.WARNING)
    raw = tomllib.loads((REPO / "sweeps" / "width-cpu.toml").read_text())
    frames, total_cpu = [], 0.0
    for opt in args.optimizers.split(","):
        spec = {**raw, "optim": {**raw["optim"], "name": opt}}
        spec["grid"] = {**raw["grid"], "lr": [BASE_LR[opt]]}
        sweep, cpu = run_sweep(spec, f"width-cpu-{opt}", Path(args.out))
        total_cpu += cpu
        frames.append(load_sweep(sweep.root).horizons)  # type: ignore[attr-defined]
    both = pd.concat(frames, ignore_index=True)
    print(f"\ntraining: {total_cpu:.0f} s CPU in total")
    w = None
    for loss in ("val_loss", "train_loss"):  # val: the same 2048 held-out tokens for every run
        res = analyze_tables(both, AnalysisOptions(n_boot=0, plots=False, loss=loss))
        if res.width is None:
            sys.exit("no width design found in the tables")
        w = w or res.width
        _print_exponents(res.width, loss)
    assert w is not None
    b, d = int(w.optima["batch_size"].iloc[0]), int(w.optima["tokens"].iloc[0])
    Path(args.figure).write_bytes(width_figure(w, b, d))
    print(f"figure: {args.figure}")


def _print_exponents(w: Any, loss: str) -> None:
    from sweeper.analysis.width import PRESCRIPTIONS

    print(f"\nloss: {loss}\n")
    print("| optimizer | group | widths | c | 95 % CI | SP | muP (Adam) | Scion | inside the CI |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in w.exponents.to_dict(orient="records"):
        ok = r["identified"]
        c = f"{r['c']:.2f}" if ok else "-"
        ci = f"[{r['c_lo']:.2f}, {r['c_hi']:.2f}]" if ok else f"not identified ({r['reason']})"
        pres = " | ".join(f"{r[k]:g}" for k in PRESCRIPTIONS)
        print(f"| {r['optimizer']} | {r['group']} | {r['widths']} | {c} | {ci} | {pres} | "
              f"{r['consistent_with']} |")  # fmt: skip
    print("\nper-width optima (log2 eta*_group; status):")
    cols = ["optimizer", "group", "width", "log2_eta_star", "log2_eta_argmin", "status"]
    print(w.optima[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    for msg in w.warnings:
        print("warning:", msg)


if __name__ == "__main__":
    main()
