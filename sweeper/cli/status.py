"""``status`` (once, or live with ``--watch``) and ``logs``: what a sweep's runs are doing."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sweeper import (
    LiveView,
    RunProgress,
    RunState,
    StoreError,
    Sweep,
    filter_rows,
    format_seconds,
    natural_key,
)
from sweeper.cli import results_dir, results_option
from sweeper.cli.output import FORMATS, cell, emit, out

COLUMNS = ["run_id", "state", "progress", "tokens", "train_loss", "output_norm", "tokens_per_s",
           "eta", "attempt", "reason"]  # fmt: skip
_STYLE = {"completed": "green", "failed": "red", "error": "red", "running": "cyan",
          "diverged": "magenta", "stale": "yellow", "cancelled": "yellow"}  # fmt: skip


@click.command("status")
@click.argument("sweep")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in RunState]),
    help="Only runs in these states (repeatable).",
)
@click.option("--model", "models", multiple=True, help="Only runs of these models (repeatable).")
@click.option("--batch-size", "batch_sizes", multiple=True, type=int, help="Only these B.")
@click.option(
    "--lr-range",
    nargs=2,
    type=float,
    default=None,
    metavar="LO HI",
    help="Only runs with LO <= lr <= HI.",
)
@click.option(
    "--where",
    default=None,
    help='A pandas query over the columns, e.g. "train_loss < 3 and lr > 0.01".',
)
@click.option("--refresh", is_flag=True, help="Ask the backends (schedulers) for news first.")
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@results_option
@click.pass_context
def status_cmd(
    ctx: click.Context,
    sweep: str,
    fmt: str,
    states: tuple[str, ...],
    models: tuple[str, ...],
    batch_sizes: tuple[int, ...],
    lr_range: tuple[float, float] | None,
    where: str | None,
    refresh: bool,
    watch: bool,
    interval: float,
    results_here: str | None,
) -> int:
    """Show every run of SWEEP: state, step/total, tokens, latest loss and output norm, tokens/s,
    ETA, attempt and the failure reason, under a summary of the sweep. Exit status 1 if a run
    failed or its directory is damaged.

    \b
    Example:
      sweeper status demo --state failed --format json
      sweeper status demo --watch --where "train_loss < 3"
    """
    s = Sweep.open(sweep, results_dir(ctx, results_here))
    if refresh:
        s.status(refresh=True)
    view = LiveView(s)

    def select(rows: list[RunProgress]) -> list[RunProgress]:
        kept = filter_rows(
            rows,
            states=states,
            models=models,
            batch_sizes=batch_sizes,
            lr_range=lr_range,
            where=where,
        )
        return sorted(kept, key=natural_key)

    if watch:
        watch_view(view, select, interval, s.root.name)
        return 0
    rows = view.refresh()
    shown = select(rows)
    title = f"{s.root.name}: {view.summary(rows).line()}"
    if fmt == "table":
        out.print(render(title, shown))
    else:
        emit(
            [r.to_dict() for r in shown],
            fmt,
            title,
            [c for c in COLUMNS if c != "eta"]
            + ["eta_s", "model", "lr", "batch_size", "seed", "backend", "job_id"],
        )
    for line in view.strays:  # entries of runs/ that are not runs: said, never fatal
        click.echo(f"warning: {line}", err=True)
    bad = sum(r.state in (RunState.FAILED, RunState.ERROR) for r in rows)
    return 1 if bad else 0


def render(title: str, rows: list[RunProgress], limit: int = 500) -> Table | Group:
    """The status table (the first ``limit`` rows; the title always counts every run): a rich
    table up to :data:`_RICH_ROWS` rows, aligned lines beyond (rich lays out every cell: 500
    rows cost 0.7 s, more than the rest of a ``status`` of 10,000 runs)."""
    cells = []
    for r in rows[:limit]:
        d = r.to_dict()
        d["eta"] = format_seconds(r.eta_s) if r.eta_s is not None else None
        cells.append([cell(d.get(c)) for c in COLUMNS])
    styles = [_STYLE.get(r.state.value) for r in rows[:limit]]
    shown: Table | Group = (
        _table(title, cells, styles) if len(cells) <= _RICH_ROWS else _lines(title, cells, styles)
    )
    if len(rows) > limit:
        return Group(shown, f"... {len(rows) - limit} more runs (filter with --state/--where)")
    return shown


_RICH_ROWS = 100
_LEFT = ("run_id", "state", "reason")


def _table(title: str, cells: list[list[str]], styles: list[str | None]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in COLUMNS:
        table.add_column(c, overflow="fold", justify="left" if c in _LEFT else "right")
    for row, style in zip(cells, styles, strict=True):
        table.add_row(*(Text(v) for v in row), style=style)  # never markup
    return table


def _lines(title: str, cells: list[list[str]], styles: list[str | None]) -> Group:
    """Aligned columns, one styled line a run, cut at the console's width (never wrapped)."""
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(COLUMNS)]

    def line(values: list[str]) -> str:
        parts = (v.ljust(w) if c in _LEFT else v.rjust(w)
                 for c, v, w in zip(COLUMNS, values, widths, strict=True))  # fmt: skip
        return "  ".join(parts).rstrip()

    lines = [Text(line(row), style=style or "", no_wrap=True, overflow="ellipsis")
             for row, style in zip(cells, styles, strict=True)]  # fmt: skip
    header = Text(line(list(COLUMNS)), style="bold", no_wrap=True, overflow="ellipsis")
    return Group(Text(title), header, *lines)


def watch_view(
    view: LiveView,
    select: object,
    interval: float,
    name: str,
    console: Console | None = None,
    max_refreshes: int | None = None,
) -> None:
    """Refresh the status table in place (rich Live), re-reading only what changed."""
    pick = select  # a callable filtering and sorting rows
    with Live(console=console or out, auto_refresh=False, transient=False) as live:
        n = 0
        while max_refreshes is None or n < max_refreshes:
            t0 = time.perf_counter()
            rows = view.refresh()
            title = (
                f"{name}: {view.summary(rows).line()}  (refreshed in "
                f"{time.perf_counter() - t0:.2f} s, {view.reads} runs read; Ctrl-C to stop)"
            )
            live.update(render(title, pick(rows)), refresh=True)  # type: ignore[operator]
            n += 1
            if max_refreshes is None or n < max_refreshes:
                time.sleep(interval)


@click.command("logs")
@click.argument("run")
@click.option(
    "--sweep",
    "sweep_name",
    default=None,
    help="The sweep holding RUN (default: search every sweep under --results).",
)
@click.option(
    "--stderr",
    "which",
    flag_value="stderr.log",
    default=None,
    help="Show stderr.log instead of stdout.log.",
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing what is appended (Ctrl-C).")
@click.option("--lines", "-n", type=click.IntRange(min=0), default=40, show_default=True)
@results_option
@click.pass_context
def logs_cmd(
    ctx: click.Context,
    run: str,
    sweep_name: str | None,
    which: str | None,
    follow: bool,
    lines: int,
    results_here: str | None,
) -> int:
    """Print the last lines of RUN's trainer output (a run id, or a unique prefix of one).

    \b
    Example:
      sweeper logs cpu-tiny_lr2^-6_B8_s30 --stderr
      sweeper logs cpu-tiny_lr2^-6_B8_s30-d5a8f223 --sweep demo --follow
    """
    results = results_dir(ctx, results_here)
    run_dir = find_run(results, run, sweep_name)
    path = run_dir / (which or "stdout.log")
    if not path.exists():
        click.echo(f"{path}: nothing written yet", err=True)
        if not follow:
            return 0
    tail(path, lines, follow)
    return 0


def find_run(results: Path, run: str, sweep: str | None) -> Path:
    """The run directory of ``run`` (an id or a unique id prefix) under ``results``."""
    sweeps = (
        [Sweep.open(sweep, results).store]
        if sweep
        else [
            Sweep.open(d, results).store
            for d in sorted(results.iterdir())
            if (d / "plan.json").is_file()
        ]
        if results.is_dir()
        else []
    )
    found = [(st, rid) for st in sweeps for rid in st.run_ids() if rid == run]
    if not found:
        found = [(st, rid) for st in sweeps for rid in st.run_ids() if rid.startswith(run)]
    if len(found) != 1:
        what = "no run" if not found else f"{len(found)} runs"
        raise StoreError(f"run {run!r}: {what} under {results} match (give the full id or --sweep)")
    st, rid = found[0]
    return st.run_dir(rid)


def tail(path: Path, lines: int, follow: bool) -> None:
    """Print the last ``lines`` lines of ``path``; with ``follow``, then what is appended."""
    pos = 0
    if os.path.lexists(path):
        data, pos = read_log(path, 0)
        text = data.decode("utf-8", "replace").splitlines()
        for line in text[-lines:] if lines else []:
            click.echo(line)
    while follow:
        time.sleep(0.5)
        try:
            size = os.lstat(path).st_size
        except OSError:
            continue
        if size < pos:
            pos = 0  # truncated or replaced
        if size > pos:
            chunk, pos = read_log(path, pos)
            click.echo(chunk.decode("utf-8", "replace"), nl=False)


MAX_LOG_BYTES = 8 << 20  # what one read of a log shows at most (its end)
_LOG_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_log(path: Path, pos: int) -> tuple[bytes, int]:
    """A run log's bytes from ``pos`` (at most its last 8 MiB) and its new end. A symlink, FIFO or
    device is refused (StoreError), never followed, waited on or read without end."""
    try:
        fd = os.open(path, _LOG_FLAGS)
    except OSError as e:
        why = "a symlink; refused" if e.errno == errno.ELOOP else f"cannot read ({e.strerror})"
        raise StoreError(f"{path}: {why}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path}: not a regular file; refused")
        start = max(pos, st.st_size - MAX_LOG_BYTES)
        f.seek(start)
        data = f.read(st.st_size - start)
    return data, start + len(data)
