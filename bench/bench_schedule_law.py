"""The schedule law (Tissue et al. 2024) on the CPU trainer: fit on constant + WSD 20 %, predict
WSD 50 % and cosine.

Plans ``sweeps/schedules-cpu.toml`` (cpu-tiny, Scion, one rate and batch size; constant, wsd0.2,
wsd0.5 and cosine read at 2^16, 2^17, 2^18 tokens, every step logged), trains every run with the
real trainer (in this process, as ``bench/bench_width.py`` does, to save the trainer's start-up on
a shared 2-core machine), collects the tables and runs ``analyze --schedules --fit-schedules
constant,wsd0.2``. Prints the fitted law with its 95 % intervals, the final-loss prediction error of
every run (held-out ones marked), the rank agreement per horizon, the candidate ranking, and writes
the figure.

Usage: .venv/bin/python bench/bench_schedule_law.py [--out results]
       [--figure docs/img/schedule_law_cpu.png]
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_width import REPO, run_sweep  # noqa: E402


def main() -> None:
    import logging

    from sweeper.analysis.api import AnalysisOptions, analyze_tables
    from sweeper.analysis.law_report import schedule_figure
    from sweeper.analysis.schedule_law import PARAMS
    from sweeper.analysis.tables import load_sweep

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results", help="results directory for the sweep")
    ap.add_argument("--figure", default="docs/img/schedule_law_cpu.png")
    ap.add_argument("--fit", default="constant,wsd0.2", help="schedules the law is fitted on")
    ap.add_argument("--bootstrap", type=int, default=100)
    args = ap.parse_args()
    logging.getLogger("trainer").setLevel(logging.WARNING)
    raw = tomllib.loads((REPO / "sweeps" / "schedules-cpu.toml").read_text())
    sweep, _ = run_sweep(raw, raw["name"], Path(args.out))
    tables = load_sweep(sweep.root)  # type: ignore[attr-defined]
    opts = AnalysisOptions(schedules=True, fit_schedules=tuple(args.fit.split(",")),
                           n_boot=args.bootstrap, plots=False)  # fmt: skip
    law = analyze_tables(tables, opts).schedule_law
    assert law is not None
    for g in law.groups:
        print(f"\n{g.key}: lam = {g.lam:g}, {g.n_points} points, rmse {g.rmse:.4f}")
        for p in PARAMS:
            lo, hi = g.ci[p]
            print(f"  {p:5s} = {g.coef[p]:.4g}  [{lo:.4g}, {hi:.4g}]  (curve_fit se {g.se[p]:.2g})")
    pred = law.predictions.sort_values(["fitted", "final_step", "schedule"])
    print("\n| schedule | steps | fitted | final loss | predicted [95 % CI] | error |")
    print("|---|---|---|---|---|---|")
    for r in pred.itertuples(index=False):
        print(f"| {r.schedule} | {r.final_step} | {'yes' if r.fitted else 'held out'} | "
              f"{r.final_obs:.4f} | {r.final_pred:.4f} [{r.final_pred_lo:.4f}, "
              f"{r.final_pred_hi:.4f}] | {100 * r.rel_error:+.2f} % |")  # fmt: skip
    held = law.held_out()
    if len(held):
        print(f"\nheld out: mean |error| {100 * held['rel_error'].abs().mean():.2f} %, max "
              f"{100 * held['rel_error'].abs().max():.2f} %")  # fmt: skip
    print("\nrank agreement per horizon:")
    cols = ["final_step", "n_runs", "kendall_tau", "best_agrees", "order_obs", "order_pred"]
    print(law.agreement[cols].to_string(index=False))
    print("\ncandidates at the longest horizon:")
    print(law.ranking[["rank", "schedule", "steps", "final_pred"]].to_string(index=False))
    for w in law.warnings:
        print("warning:", w)
    Path(args.figure).write_bytes(schedule_figure(law.groups[0]))
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
