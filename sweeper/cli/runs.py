"""Commands that plan, cost, start and stop runs: plan, calibrate, launch, resume, cancel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sweeper import (
    LaunchReport,
    SpecError,
    Sweep,
    SweepSpec,
    calibrate,
    check_launch,
    cost_rows,
    host_warning,
    load_spec,
    needs_confirmation,
    plan,
)
from sweeper.cli import results_dir, results_option
from sweeper.cli.output import FORMATS, counts_line, emit, err, out
from sweeper.cli.summary import optimum_tables, plan_rows, plan_summary

# Every command accepts --results before or after its name; these two write no sweep directory.
_UNUSED_RESULTS = "Accepted like every command's; this one writes no sweep directory."
_PLAN_COLUMNS = ["id", "kind", "model", "lr", "batch_size", "seed", "steps", "tokens", "flops"]


@click.command("plan")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--runs", "per_run", is_flag=True, help="One line per run instead of per (model, B).")
@click.option(
    "--limit",
    type=int,
    default=50,
    show_default=True,
    help="Runs shown with --runs in a table (0 = all); json/csv list every run.",
)
@click.option("--results", "_results", default=None, help=_UNUSED_RESULTS)
def plan_cmd(spec: str, fmt: str, per_run: bool, limit: int, _results: str | None) -> int:
    """Validate SPEC and show its cost per (model, B): runs, tokens, FLOPs, GPU-hours (with a
    [cost] throughput table); --runs lists every run. Writes nothing.

    \b
    Example:
      sweeper plan sweeps/paper-proxy.toml
      sweeper plan sweeps/demo.toml --runs --format csv > runs.csv
    """
    s = load_spec(spec, host_checks=False)
    warn_host(s)
    runs = plan(s)
    if per_run:
        rows = plan_rows(runs)
        shown = rows if fmt != "table" or limit <= 0 else rows[:limit]
        emit(shown, fmt, f"sweep {s.name}: {len(rows)} runs", _PLAN_COLUMNS)
        if fmt == "table" and len(shown) < len(rows):
            out.print(f"... {len(rows) - len(shown)} more (--limit 0 shows all)")
    else:
        emit(
            cost_rows(runs, s.section("cost")),
            fmt,
            f"sweep {s.name}: cost per (model, B)",
            _COST_COLUMNS,
        )
    if fmt == "table":
        out.print(plan_summary(s, runs))
    return 0


_COST_COLUMNS = ["model", "batch_size", "runs", "tokens", "flops", "gpu_hours", "longest_run_h"]


@click.command("launch")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--backend", default=None, help="local | slurm | ray (default: the spec's).")
@click.option(
    "--max-parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Trials (or jobs) at once (default: the backend config's).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be submitted; write nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before a large launch.")
@results_option
@click.pass_context
def launch_cmd(
    ctx: click.Context,
    spec: str,
    backend: str | None,
    max_parallel: int | None,
    dry_run: bool,
    no_progress: bool,
    yes: bool,
    results_here: str | None,
) -> int:
    """Create (or extend) the sweep of SPEC under --results and start its planned runs.

    Re-launching with an unchanged spec continues the sweep; a changed spec adds only new runs (the
    old spec is kept as spec.<timestamp>.toml). Above [cost] confirm_runs / confirm_gpu_hours it
    asks first (--yes skips; without a terminal it refuses). Exit status 1 if any run failed.

    \b
    Example:
      sweeper launch sweeps/demo.toml --max-parallel 2
      sweeper launch sweeps/slurm.toml --backend slurm --dry-run
    """
    s = load_spec(spec, host_checks=not dry_run)
    if dry_run:
        warn_host(s)
    check_launch(s, backend, max_parallel)  # options and this machine, before anything is written
    if not dry_run and not yes:
        confirm(s)
    sweep = Sweep.create(s, results_dir(ctx, results_here), write=not dry_run, backend=backend)
    if not dry_run:
        err.print(f"sweep {sweep.spec.name} at {sweep.root}: {len(sweep.new_ids)} new runs")
    report = sweep.launch(
        backend, max_parallel=max_parallel, dry_run=dry_run, progress=not no_progress
    )
    return _report(sweep, report)


@click.command("resume")
@click.argument("sweep")
@click.option("--backend", default=None, help="Backend (default: the sweep's).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None)
@click.option("--dry-run", is_flag=True, help="Show the runs that would be re-run.")
@click.option(
    "--restart",
    is_flag=True,
    help="Delete the runs' checkpoints and metrics first (never a completed run's).",
)
@click.option("--diverged", is_flag=True, help="Also re-run diverged runs.")
@click.option("--no-progress", is_flag=True)
@results_option
@click.pass_context
def resume_cmd(
    ctx: click.Context,
    sweep: str,
    backend: str | None,
    max_parallel: int | None,
    dry_run: bool,
    restart: bool,
    diverged: bool,
    no_progress: bool,
    results_here: str | None,
) -> int:
    """Re-run SWEEP's failed, stale, cancelled (and planned) runs from their last checkpoint.

    A completed run is never run again.

    \b
    Example:
      sweeper resume demo --diverged --dry-run
    """
    s = Sweep.open(sweep, results_dir(ctx, results_here))
    check_launch(s.spec, backend, max_parallel)
    report = s.resume(
        restart=restart,
        diverged=diverged,
        dry_run=dry_run,
        backend=backend,
        max_parallel=max_parallel,
        progress=not no_progress,
    )
    return _report(s, report)


def warn_host(spec: SweepSpec) -> None:
    """Say what this machine lacks to run a cluster spec (checked again at a real launch)."""
    why = host_warning(spec)
    if why:
        err.print(f"warning: {why} (checked again when the sweep is launched)")


def confirm(spec: SweepSpec) -> None:
    """Ask before a launch above the spec's [cost] thresholds (non-interactive: refuse)."""
    why = needs_confirmation(plan(spec), spec.section("cost"))
    if why is None:
        return
    if not sys.stdin.isatty():
        raise SpecError(spec.file, None, message=f"launch would start {why}; pass --yes to confirm")
    click.confirm(f"launch {spec.name}: {why}. Continue?", abort=True, err=True)


def _report(sweep: Sweep, report: LaunchReport) -> int:
    if report.dry_run:
        click.echo(report.description)
        err.print(f"dry run: would start {len(report.run_ids)} runs; nothing written")
        return 0
    if not report.states and report.run_ids:
        err.print(
            f"submitted {len(report.run_ids)} runs to {report.backend}; "
            "`sweeper status` follows them"
        )
        return 0
    err.print(f"{sweep.spec.name}: {counts_line(report.states)}")
    if report.run_ids and report.backend == "local":
        sweep.collect()
        for table in optimum_tables(sweep):
            out.print(table)
    return 1 if report.failed else 0


@click.command("cancel")
@click.argument("sweep")
@results_option
@click.pass_context
def cancel_cmd(ctx: click.Context, sweep: str, results_here: str | None) -> int:
    """Stop SWEEP's queued and running runs (trainers checkpoint; runs end cancelled).

    \b
    Example:
      sweeper cancel demo && sweeper resume demo
    """
    sent = Sweep.open(sweep, results_dir(ctx, results_here)).cancel()
    if not sent:
        err.print("nothing to cancel")
    for name, n in sent.items():
        err.print(f"cancel sent to {n} {name} runs")
    return 0


@click.command("calibrate")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "--steps",
    type=click.IntRange(min=3),
    default=20,
    show_default=True,
    help="Steps timed per model.",
)
@click.option(
    "-o",
    "--output",
    default="throughput.json",
    show_default=True,
    help="Where to write the table ([cost] throughput_file reads it).",
)
@click.option("--results", "_results", default=None, help=_UNUSED_RESULTS)
def calibrate_cmd(spec: str, steps: int, output: str, _results: str | None) -> int:
    """Time a few training steps of each model of SPEC on this machine and write tokens/s per
    model, for [cost] throughput_file (run it on a node of the target cluster).

    \b
    Example:
      sweeper calibrate sweeps/paper-proxy.toml --steps 30 -o sweeps/throughput-h200.json
    """
    doc = calibrate(load_spec(spec), steps)
    Path(output).write_text(json.dumps(doc, indent=1) + "\n")
    for model, tps in doc["tokens_per_s"].items():
        out.print(f"{model}: {tps:,.0f} tokens/s at B = {doc['batch_size'][model]}")
    err.print(f"wrote {output}")
    return 0
