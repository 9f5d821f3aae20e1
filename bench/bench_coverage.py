"""How often the laws' 95 % intervals cover the planted exponents, over many noise seeds.

Each seed draws a synthetic sweep (sweeper/analysis/synthetic.py: one model, B = 8..512,
D = 2^20..2^26, eta on a 2^0.5 grid, planted alpha = 0.5, beta = -0.5, b = 0.45, optimal log2 norm
7), analyses it with the default options (no bootstrap: the law intervals are the OLS fits' HC3
intervals) and checks whether each law's 95 % interval contains the planted value. Printed per law
and coefficient: the share of seeds covered with a Wilson 95 % interval on that share, the mean
estimate and the mean interval width. Also: how many slices were censored, and how often the
fit-quality flag (vertex below the data) fired on this surface, where the parabola is the true
model (so every flag is a false alarm).

Usage: python bench/bench_coverage.py [--seeds 100] [--noise 0.01]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from sweeper.analysis import synthetic
from sweeper.analysis.api import AnalysisOptions, analyze_tables

LAWS = (
    ("lr_law", "alpha", "eta* law, interpolated eta* (headline)"),
    ("lr_law", "beta", "eta* law, interpolated eta* (headline)"),
    ("lr_law_alt", "alpha", "eta* law, grid-rounded eta* (paper's)"),
    ("lr_law_alt", "beta", "eta* law, grid-rounded eta* (paper's)"),
    ("batch_law", "b", "B* law, refined B* (headline)"),
    ("batch_law_alt", "b", "B* law, argmin B* (paper's)"),
)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial share k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    """Run the coverage study and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100, help="noise seeds (at least 50)")
    ap.add_argument("--noise", type=float, default=0.01, help="per-step loss noise at B = 64")
    args = ap.parse_args()
    surface = synthetic.Surface(gamma=4.3, noise=args.noise)
    planted = {"alpha": surface.alpha, "beta": surface.beta, "b": surface.b}
    hits: dict[tuple[str, str], list[bool]] = {(law, c): [] for law, c, _ in LAWS}
    est: dict[tuple[str, str], list[float]] = {(law, c): [] for law, c, _ in LAWS}
    width: dict[tuple[str, str], list[float]] = {(law, c): [] for law, c, _ in LAWS}
    flags, slices, censored = 0, 0, 0
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        h, m = synthetic.generate(surface, rng_seed=seed)
        res = analyze_tables(h, AnalysisOptions(n_boot=0, plots=False), metrics=m)
        s = res.laws["series"][0]
        for law, coef, _ in LAWS:
            fit = s[law]
            lo, hi = fit["ci"][coef]
            hits[(law, coef)].append(bool(fit["identified"] and lo <= planted[coef] <= hi))
            est[(law, coef)].append(fit["coef"][coef])
            width[(law, coef)].append(hi - lo)
        ok = res.optima[res.optima["status"] == "ok"]
        flags += int(ok["below_data"].sum())
        slices += len(ok)
        censored += len(res.censored)
    wall = time.perf_counter() - t0
    print(f"{args.seeds} seeds, noise {args.noise}, {wall:.1f} s")
    print(f"{'law':<40} {'coef':<6} {'planted':>7} {'covered':>8} {'95% CI of share':>16} "
          f"{'mean est':>9} {'mean width':>10}")  # fmt: skip
    for law, coef, label in LAWS:
        k, n = sum(hits[(law, coef)]), len(hits[(law, coef)])
        lo, hi = wilson(k, n)
        print(
            f"{label:<40} {coef:<6} {planted[coef]:>7.3f} {k / n:>8.1%} "
            f"{f'{lo:.1%}..{hi:.1%}':>16} {np.nanmean(est[(law, coef)]):>9.4f} "
            f"{np.nanmean(width[(law, coef)]):>10.4f}"
        )
    share = flags / max(slices, 1)
    print(
        f"slices with an optimum {slices}, censored {censored}, fit-quality flags {flags} "
        f"({share:.2%} of slices; all false alarms on this surface)"
    )


if __name__ == "__main__":
    main()
