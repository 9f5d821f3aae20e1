"""Planning speed: validate a spec and expand it into 100,000 runs (target < 2 s).

    .venv/bin/python bench/bench_plan.py [--runs-per-model 50000]

Prints the time to parse+validate the spec, to expand it, and per-run cost, for the constant (one
run per point) and wsd (a trunk plus one branch per horizon) schedules side by side.
"""

from __future__ import annotations

import argparse
import os
import time
import timeit

from sweeper.plan import plan_sweep
from sweeper.spec import parse_spec_text

SPEC = """
name = "bench"
[[models]]
preset = "cpu-tiny"
[[models]]
name = "wide"
preset = "cpu-small"
[grid]
lr = {{log2_from = -12, log2_to = 0, log2_step = 0.5}}
batch_size = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
log2_horizons = [{horizons}]
seeds = {seeds}
[schedule]
kind = "{schedule}"
"""


def bench(schedule: str, seeds: int, horizons: str) -> tuple[int, float, float]:
    text = SPEC.format(schedule=schedule, seeds=list(range(seeds)), horizons=horizons)
    t0 = time.perf_counter()
    spec = parse_spec_text(text, "bench.toml")
    t1 = time.perf_counter()
    plan = plan_sweep(spec)
    t2 = time.perf_counter()
    return len(plan.runs), t1 - t0, t2 - t1


def reference_us() -> float:
    """Microseconds of ``sum(range(1000))`` here and now: how busy the machine is."""
    return min(timeit.repeat("sum(range(1000))", number=200, repeat=5)) / 200 * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    # 2 models x 25 lr x 10 B x 200 seeds = 100,000 points
    cases = [("constant", 200, "22, 23, 24"), ("wsd", 50, "22, 23, 24")]
    print(f"load average {os.getloadavg()[0]:.1f}; reference loop {reference_us():.1f} us")
    print(f"{'schedule':10} {'runs':>8} {'validate s':>11} {'expand s':>9} {'us/run':>7}")
    for schedule, seeds, horizons in cases:
        best = min((bench(schedule, seeds, horizons) for _ in range(args.repeat)),
                   key=lambda r: r[1] + r[2])  # fmt: skip
        n, tv, te = best
        print(f"{schedule:10} {n:8d} {tv:11.3f} {te:9.3f} {1e6 * (tv + te) / n:7.1f}")
    print(f"reference loop after: {reference_us():.1f} us")


if __name__ == "__main__":
    main()
