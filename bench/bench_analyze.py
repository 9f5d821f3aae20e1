"""How long ``sweeper analyze`` takes on a 10,000-run synthetic sweep, split by stage.

The sweep: 5 models x 8 batch sizes (2^3..2^10) x 25 rates (2^-12..2^0, step 2^0.5) x 10 seeds
= 10,000 runs, read at 8 horizons (2^20..2^27 tokens), with a per-step metrics table (~25 logged
points per run). The tables are written as Parquet first; the timed part reads them back and runs
every stage (optima with bootstrap, laws, all figures, report), as ``sweeper analyze`` does.

Usage: python bench/bench_analyze.py [--seeds 10] [--bootstrap 200]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from sweeper.analysis import synthetic
from sweeper.analysis.optimum import FitOptions
from sweeper.analysis.report import initial_loss, run_analysis
from sweeper.analysis.tables import load_horizons, load_metrics


def main() -> None:
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
        h.to_parquet(root / "horizons.parquet")
        m.to_parquet(root / "metrics.parquet")
        print(
            f"runs {n_runs}, horizon rows {len(h)}, metric rows {len(m)} (generated in {gen:.1f} s)"
        )
        t0, c0 = time.perf_counter(), time.process_time()
        df = load_horizons(root / "horizons.parquet")
        metrics = load_metrics(root / "metrics.parquet")
        c, _ = initial_loss(df, metrics)
        load = (time.perf_counter() - t0, time.process_time() - c0)
        res = run_analysis(
            df,
            root / "analysis",
            opts=FitOptions(c_fixed=c, n_boot=args.bootstrap),
            metrics=metrics,
        )
    split = {"load": load} | {k: (v, res.cpu_timings[k]) for k, v in res.timings.items()}
    wall = sum(w for w, _ in split.values())
    cpu = sum(c for _, c in split.values())
    n_slices = len(res.optima)
    print(f"slices {n_slices}, figures {sum(1 for f in res.files if f.suffix == '.png')}")
    print(f"  {'stage':<8} {'wall s':>8} {'cpu s':>8} {'cpu %':>6}")
    for stage, (w, c_) in split.items():
        print(f"  {stage:<8} {w:8.2f} {c_:8.2f} {100 * c_ / cpu:6.1f}")
    print(f"  {'total':<8} {wall:8.2f} {cpu:8.2f}")
    per = res.timings["optima"] / n_slices * 1e3
    print(f"optimum per slice incl. {args.bootstrap} bootstrap resamples: {per:.1f} ms")
    ok = res.optima[res.optima["status"] == "ok"]
    print(f"check: x0 = {ok['x0'].mean():.3f} (planted 7.0), {math.isfinite(c)}")


if __name__ == "__main__":
    main()
