"""How long ``sweeper analyze`` takes on a 10,000-run synthetic sweep, split by stage.

The sweep: 5 models x 8 batch sizes (2^3..2^10) x 25 rates (2^-12..2^0, step 2^0.5) x 10 seeds
= 10,000 runs, read at 8 horizons (2^20..2^27 tokens), with a per-step metrics table (step 0 and
the logged points around each horizon). The tables are written as ``sweeper collect`` writes them;
the timed part reads them back and runs every stage (smoothing, optima with bootstrap, laws, all
figures, report), as ``sweeper analyze`` does.

Usage: python bench/bench_analyze.py [--seeds 10] [--bootstrap 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sweeper.analysis import synthetic
from sweeper.analysis.api import AnalysisOptions, analyze_tables
from sweeper.analysis.tables import load_sweep


def main() -> None:
    """Generate the sweep, analyse it, print the stage timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds per point (10 -> 10,000 runs)")
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args()
    models = [f"m{i}" for i in range(5)]
    batches = [2**i for i in range(3, 11)]
    lrs = synthetic.default_lrs(-12, 0, 0.5)
    seeds = list(range(args.seeds))
    n_runs = len(models) * len(batches) * len(lrs) * len(seeds)
    t0 = time.perf_counter()
    h, m = synthetic.generate(
        synthetic.Surface(gamma=4.3, noise=0.01),
        models=models,
        lrs=lrs,
        batch_sizes=batches,
        horizons=[2**d for d in range(20, 28)],
        seeds=seeds,
    )
    gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic.write_sweep_tables(root, h, m)
        print(
            f"runs {n_runs}, horizon rows {len(h)}, metric rows {len(m)} (generated in {gen:.1f} s)"
        )
        split: dict[str, tuple[float, float]] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        tables = load_sweep(root)
        split["load"] = (time.perf_counter() - t0, time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        res = analyze_tables(tables, AnalysisOptions(n_boot=args.bootstrap))
        split["analyze"] = (time.perf_counter() - t0, time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        files = res.write(root / "analysis")
        split["write"] = (time.perf_counter() - t0, time.process_time() - c0)
    wall = sum(w for w, _ in split.values())
    cpu = sum(c for _, c in split.values())
    n_slices = len(res.optima)
    print(f"slices {n_slices}, figures {sum(1 for f in files if f.suffix == '.png')}")
    print(f"  {'stage':<8} {'wall s':>8} {'cpu s':>8} {'cpu %':>6}")
    for stage, (w, c_) in split.items():
        print(f"  {stage:<8} {w:8.2f} {c_:8.2f} {100 * c_ / cpu:6.1f}")
    print(f"  {'total':<8} {wall:8.2f} {cpu:8.2f}")
    print("  within analyze (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    per = res.timings["optima"] / n_slices * 1e3
    print(f"optimum per slice incl. {args.bootstrap} bootstrap resamples: {per:.1f} ms")
    ok = res.optima[res.optima["status"] == "ok"]
    print(f"check: x0 = {ok['x0'].mean():.3f} (planted 7.0), c = {res.intercept.c_fixed}")


if __name__ == "__main__":
    main()
