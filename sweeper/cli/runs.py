"""Commands that plan, start, follow and stop runs: plan, launch, resume, status, cancel."""

from __future__ import annotations

import click

from sweeper import LaunchReport, Sweep, load_spec, plan
from sweeper.cli import results_dir, results_option
from sweeper.cli.output import FORMATS, counts_line, emit, err, out
from sweeper.cli.summary import optimum_tables, plan_rows, plan_summary

_PLAN_COLUMNS = ["id", "kind", "model", "lr", "batch_size", "seed", "steps", "tokens", "flops"]


@click.command("plan")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option(
    "--limit",
    type=int,
    default=50,
    show_default=True,
    help="Runs shown in the table (0 = all); json/csv list every run.",
)
def plan_cmd(spec: str, fmt: str, limit: int) -> int:
    """Validate SPEC and show its runs and total compute; writes nothing.

    \b
    Example:
      sweeper plan sweeps/demo.toml --format csv > runs.csv
    """
    s = load_spec(spec)
    runs = plan(s)
    rows = plan_rows(runs)
    shown = rows if fmt != "table" or limit <= 0 else rows[:limit]
    emit(shown, fmt, f"sweep {s.name}: {len(rows)} runs", _PLAN_COLUMNS)
    if fmt == "table":
        if len(shown) < len(rows):
            out.print(f"... {len(rows) - len(shown)} more (--limit 0 shows all)")
        out.print(plan_summary(s, runs))
    return 0


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
@results_option
@click.pass_context
def launch_cmd(
    ctx: click.Context,
    spec: str,
    backend: str | None,
    max_parallel: int | None,
    dry_run: bool,
    no_progress: bool,
    results_here: str | None,
) -> int:
    """Create (or extend) the sweep of SPEC under --results and start its planned runs.

    Re-launching with an unchanged spec continues the sweep; a changed spec adds only new runs (the
    old spec is kept as spec.<timestamp>.toml). Exit status 1 if any run failed.

    \b
    Example:
      sweeper launch sweeps/demo.toml --max-parallel 2
      sweeper launch sweeps/slurm.toml --backend slurm --dry-run
    """
    sweep = Sweep.create(spec, results_dir(ctx, results_here), write=not dry_run, backend=backend)
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
    report = s.resume(
        restart=restart,
        diverged=diverged,
        dry_run=dry_run,
        backend=backend,
        max_parallel=max_parallel,
        progress=not no_progress,
    )
    return _report(s, report)


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
