"""Commands over the collected tables: collect and export."""

from __future__ import annotations

from pathlib import Path

import click

from sweeper import SpecError, Sweep
from sweeper.cli import results_dir, results_option
from sweeper.cli.output import err


@click.command("collect")
@click.argument("sweep")
@click.option("--full", is_flag=True, help="Re-read every run, ignoring the incremental cache.")
@results_option
@click.pass_context
def collect_cmd(ctx: click.Context, sweep: str, full: bool, results_here: str | None) -> int:
    """Read every run's files into runs/horizons/metrics Parquet tables in the sweep directory.

    Incremental: only runs whose files changed since the last collect are read again.

    \b
    Example:
      sweeper collect demo
      sweeper collect demo --full
    """
    result = Sweep.open(sweep, results_dir(ctx, results_here)).collect(full=full)
    if result is not None:
        err.print(str(result))
    return 0


@click.command("export")
@click.argument("sweep")
@click.option(
    "--table", "table", required=True, type=click.Choice(["runs", "horizons", "metrics", "optima"])
)
@click.option(
    "--format",
    "fmt",
    default="csv",
    show_default=True,
    type=click.Choice(["csv", "parquet", "jsonl", "markdown"]),
)
@click.option(
    "-o",
    "--output",
    default=None,
    help="Output file (default or '-': stdout; parquet needs a file).",
)
@click.option("--columns", default=None, help="Comma-separated columns to keep, in order.")
@results_option
@click.pass_context
def export_cmd(
    ctx: click.Context,
    sweep: str,
    table: str,
    fmt: str,
    output: str | None,
    columns: str | None,
    results_here: str | None,
) -> int:
    """Write one of SWEEP's tables as CSV, Parquet, JSON lines or Markdown.

    \b
    Example:
      sweeper export demo --table horizons --format csv -o horizons.csv
      sweeper export demo --table optima --format markdown --columns tokens,batch_size,lr_star,y0
    """
    target = None if output in (None, "-") else _output_path(output)
    s = Sweep.open(sweep, results_dir(ctx, results_here))
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    s.export(table, fmt, target, cols)
    return 0


def _output_path(output: str) -> Path:
    """``-o``, refused before anything is read or collected unless it can be written."""
    path = Path(output)
    if path.is_dir():
        raise SpecError("<cli>", "-o", output, "is a directory")
    if not path.parent.is_dir():
        raise SpecError("<cli>", "-o", output, f"directory {path.parent} does not exist")
    return path
