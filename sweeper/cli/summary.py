"""What the run commands print besides tables of runs: the plan's totals and the optimum table."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from rich.table import Table

from sweeper import RunRecord, Sweep, SweepSpec, cost_rows


def plan_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per run of a plan."""
    return [
        {
            "id": r.id,
            "kind": r.kind.value,
            "model": r.model,
            "lr": r.lr,
            "batch_size": r.batch_size,
            "seed": r.seed,
            "steps": r.steps - r.start_step,
            "tokens": r.trained_tokens,
            "horizons": list(r.horizons_tokens),
            "flops": r.flops,
        }
        for r in runs
    ]


def plan_summary(spec: SweepSpec, runs: list[RunRecord]) -> str:
    """One line: runs by kind and their compute (GPU-hours with a [cost] throughput)."""
    kinds = Counter(r.kind.value for r in runs)
    total = cost_rows(runs, spec.section("cost"))[-1]
    gpu = "" if total["gpu_hours"] is None else f", {total['gpu_hours']:.3g} GPU-hours"
    return (
        f"{len(runs)} runs ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
        f"{total['flops']:.3g} FLOPs, {total['tokens']:.3g} tokens{gpu}"
    )


def optimum_tables(sweep: Sweep) -> list[Table]:
    """Final train loss per (lr, B) for every (model, horizon); the best lr per B is starred."""
    try:
        df = sweep.table("horizons")
    except Exception:  # noqa: BLE001 - nothing collected yet: nothing to show
        return []
    df = df[df["train_loss"].notna()]
    tables = []
    for (model, tokens), g in df.groupby(["model", "tokens"], sort=True):
        piv = g.pivot_table(index="lr", columns="batch_size", values="train_loss", aggfunc="mean")
        table = Table(title=f"{model}, D = {tokens} tokens: train loss (* = best lr per B)")
        table.add_column("lr")
        for b in piv.columns:
            table.add_column(f"B={b}", justify="right")
        best = piv.idxmin()
        for lr, row in piv.iterrows():
            cells = []
            for b, v in row.items():
                cells.append("" if math.isnan(v) else f"{v:.4f}{'*' if best[b] == lr else ''}")
            table.add_row(f"{lr:.4g}", *cells)
        tables.append(table)
    return tables
