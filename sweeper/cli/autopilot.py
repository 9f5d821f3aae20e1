"""``sweeper autopilot SPEC``: waves of runs until every (model, B, D) cell's eta* is identified."""

from __future__ import annotations

import json
from typing import Any

import click

from sweeper import Sweep, load_spec
from sweeper.cli import results_dir, results_option
from sweeper.cli.output import emit, err

_CELL_COLUMNS = ["model", "layout", "batch_size", "tokens", "identified", "log2_lr_star",
                 "log2_lr_star_lo", "log2_lr_star_hi", "y0", "why"]  # fmt: skip


@click.command("autopilot")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--backend", default=None, help="sim | local | slurm | ray (default: the spec's).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None, help="Runs at once.")
@click.option(
    "--max-waves", type=click.IntRange(min=0), default=None, help="Waves after the first."
)
@click.option("--tolerance", type=float, default=None, help="Half-width of eta*'s interval, log2.")
@click.option("--budget-tokens", type=click.IntRange(min=0), default=None, help="0: no budget.")
@click.option("--no-early-stop", is_flag=True, help="Never stop a run early.")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any [autopilot] key (VALUE as JSON), e.g. --set norm_margin_log2=1.5.",
)
@click.option("--quiet", is_flag=True, help="Only the final table.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@results_option
@click.pass_context
def autopilot_cmd(
    ctx: click.Context,
    spec: str,
    backend: str | None,
    max_parallel: int | None,
    max_waves: int | None,
    tolerance: float | None,
    budget_tokens: int | None,
    no_early_stop: bool,
    settings: tuple[str, ...],
    quiet: bool,
    no_progress: bool,
    results_here: str | None,
) -> int:
    """Create (or continue) the sweep of SPEC and run it in waves until every (model, B, D) cell's
    eta* is identified to the tolerance or a budget is spent, stopping runs that cannot be optimal.

    The spec's grid is the first wave; its [autopilot] table sets the rules (docs/autopilot.md).
    Every decision goes to <sweep>/autopilot.jsonl; after a kill, the same command continues
    where it stopped. Exit status 0 when every cell is identified, 1 otherwise.

    \b
    Example:
      sweeper autopilot my-study.toml                  # a spec with a [simulator] table: seconds
      sweeper autopilot sweeps/demo.toml --backend local --max-parallel 2 --max-waves 3
    """
    options = _options(settings)
    for key, value in (("max_waves", max_waves), ("tolerance_log2", tolerance),
                       ("budget_tokens", budget_tokens)):  # fmt: skip
        if value is not None:
            options[key] = value
    if no_early_stop:
        options["early_stop"] = False
    s = load_spec(spec)
    sweep = Sweep.create(s, results_dir(ctx, results_here), backend=backend)
    err.print(f"sweep {sweep.spec.name} at {sweep.root}: {len(sweep.new_ids)} new runs")
    report = sweep.autopilot(
        backend=backend,
        max_parallel=max_parallel,
        progress=not no_progress,
        on_event=None if quiet else _print_event,
        **options,
    )
    rows = report.cells.to_dict("records")
    emit(rows, "table", f"{sweep.spec.name}: eta* per cell", _CELL_COLUMNS)
    err.print(
        f"{report.finished}: {report.identified}/{len(report.cells)} cells identified after "
        f"{report.waves} waves; {report.runs} runs ({report.stopped} stopped early), "
        f"{report.spent_tokens:,} tokens, {report.spent_flops:.3g} FLOPs; log: {report.journal}"
    )
    return 0 if report.finished == "tolerance" else 1


def _options(settings: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--set")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            raise click.BadParameter(f"{item!r}: VALUE is not JSON", param_hint="--set") from None
    return out


def _print_event(rec: dict[str, Any]) -> None:
    """One line per journal record worth a person's attention."""
    ev = rec["event"]
    if ev == "wave":
        n = len(rec.get("proposals", []))
        what = rec.get("note") or f"{n} new runs"
        err.print(f"wave {rec['wave']}: {what} ({rec.get('identified', 0)}/{rec.get('cells', 0)} "
                  "cells identified)")  # fmt: skip
    elif ev == "stop":
        err.print(f"  stop {rec['run_id']} ({rec['rule']}): {rec['reason']}")
    elif ev == "wave_end":
        err.print(f"wave {rec['wave']} done: {rec['spent_tokens']:,} tokens so far, "
                  f"{rec.get('identified', 0)}/{rec.get('cells', 0)} identified")  # fmt: skip
    elif ev == "finish":
        err.print(f"finished: {rec['reason']}")
