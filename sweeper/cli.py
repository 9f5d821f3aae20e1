"""The ``sweeper`` command line (click). Every command is a thin layer over the library; any
:class:`~sweeper.errors.SweepError` becomes ``error: <one line>`` on stderr and exit status 2."""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sweeper.backends import Backend, LaunchOptions, load_backend
from sweeper.errors import SpecError, StoreError, SweepError
from sweeper.store import RunState, RunStatus, SweepStore

FORMATS = click.Choice(["table", "json", "csv"])
# Piped output (tests, `| less`) should not be wrapped at 80 columns.
_out = Console(width=None if sys.stdout.isatty() else 240)
_err = Console(stderr=True, width=None if sys.stderr.isatty() else 240)


# ---------------------------------------------------------------------------------------- utilities


def _results(ctx: click.Context) -> Path:
    return Path(ctx.find_root().params.get("results") or "results")


def resolve_sweep(ctx: click.Context, sweep: str) -> SweepStore:
    """A sweep given as a directory or as a name under ``--results``."""
    for cand in (Path(sweep), _results(ctx) / sweep):
        if (cand / "plan.json").is_file():
            return SweepStore(cand)
    raise StoreError(f"sweep {sweep!r}: no sweep directory there nor at {_results(ctx) / sweep}")


def _emit(rows: list[dict[str, Any]], fmt: str, title: str, columns: list[str]) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(buf.getvalue(), nl=False)
    elif len(rows) > _RICH_MAX_ROWS:
        _plain_table(rows, title, columns)
    else:
        table = Table(title=title)
        for c in columns:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*("" if r.get(c) is None else _cell(r.get(c)) for c in columns))
        _out.print(table)


_RICH_MAX_ROWS = 500  # rich lays out every cell; beyond this a plain aligned table is much faster


def _plain_table(rows: list[dict[str, Any]], title: str, columns: list[str]) -> None:
    cells = [[_cell(r.get(c)) if r.get(c) is not None else "" for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    click.echo("\n".join(line.rstrip() for line in lines))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _state_counts(statuses: dict[str, RunStatus]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for st in statuses.values():
        counts[st.state.value] = counts.get(st.state.value, 0) + 1
    return counts


def _counts_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"


# ---------------------------------------------------------------------------------------- the group

# Commands defined elsewhere, imported on first use (the analysis imports pandas; status must not).
_LAZY = {
    "analyze": "sweeper.analysis.commands:analyze",
    "refine": "sweeper.analysis.commands:refine",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY and name not in self.commands:
            module, attr = _LAZY[name].split(":")
            try:
                self.add_command(getattr(importlib.import_module(module), attr), name)
            except (ImportError, AttributeError):
                return None
        return super().get_command(ctx, name)


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--results",
    type=click.Path(file_okay=False),
    default="results",
    show_default=True,
    help="Directory holding the sweeps (SWEEP may be a name under it).",
)
@click.version_option(package_name="sweeper")
def cli(results: str) -> None:
    """Plan, run and collect (lr, B, D) sweeps of Scion-trained LMs.

    \b
    Example:
      sweeper plan sweeps/demo.toml
      sweeper launch sweeps/demo.toml --max-parallel 2
      sweeper status demo
    """


@cli.command("plan")
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
    from sweeper.plan import plan_sweep
    from sweeper.spec import load_spec

    s = load_spec(spec)
    plan = plan_sweep(s)
    rows = [_plan_row(r) for r in plan.runs]
    cols = [
        "id",
        "kind",
        "model",
        "lr",
        "batch_size",
        "seed",
        "steps",
        "tokens",
        "horizons",
        "flops",
    ]
    if fmt == "table":
        shown = rows if limit <= 0 else rows[:limit]
        _emit(shown, fmt, f"sweep {s.name}: {len(rows)} runs", cols)
        if len(shown) < len(rows):
            _out.print(f"... {len(rows) - len(shown)} more (--limit 0 shows all)")
        _out.print(plan_summary(plan))
    else:
        _emit(rows, fmt, "", cols)
    return 0


def _plan_row(r: Any) -> dict[str, Any]:
    d = r.derived
    return {
        "id": r.id,
        "kind": r.kind,
        "model": r.model_name,
        "lr": d["lr"],
        "batch_size": d["batch_size"],
        "seed": d["seed"],
        "steps": d["steps"],
        "tokens": d["trained_tokens"],
        "horizons": d["horizons_tokens"],
        "flops": d["flops"],
    }


def plan_summary(plan: Any) -> str:
    from sweeper.launch import plan_summary as summary

    return summary(plan)


@cli.command("launch")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "--backend", default=None, help="local | slurm | ray (default: the spec's [backend] name)."
)
@click.option(
    "--max-parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Trials at once (default: the spec's backend.max_parallel).",
)
@click.option("--dry-run", is_flag=True, help="List the runs that would start; write nothing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster (backend ray; default: backend.ray_address, else $RAY_ADDRESS).",
)
@click.pass_context
def launch_cmd(
    ctx: click.Context,
    spec: str,
    backend: str | None,
    max_parallel: int | None,
    dry_run: bool,
    no_progress: bool,
    ray_address: str | None,
) -> int:
    """Create (or extend) the sweep of SPEC under --results and run its planned runs.

    Re-launching with an unchanged spec continues the sweep; a changed spec adds only new runs (the
    old spec is kept as spec.<timestamp>.toml). Exit status 1 if any run failed.

    \b
    Example:
      sweeper launch sweeps/demo.toml --max-parallel 2
    """
    from sweeper.launch import prepare_sweep, select_runs, sweep_dir_for
    from sweeper.plan import plan_sweep
    from sweeper.spec import load_spec

    if dry_run:
        s = load_spec(spec)
        plan = plan_sweep(s)
        store = SweepStore(sweep_dir_for(s, _results(ctx)))
        ids = [r.id for r in plan.runs]
        if store.exists():
            have = set(store.run_ids())
            known = [i for i in ids if i in have]
            ids = [i for i in ids if i not in have] + select_runs(store, run_ids=known)
        _emit([{"run_id": i} for i in ids], "table", f"would start {len(ids)} runs", ["run_id"])
        _out.print(plan_summary(plan))
        return 0
    name = backend or load_spec(spec).backend.name
    backend_obj = load_backend(name)  # fails (e.g. no sbatch) before anything is written
    prep = prepare_sweep(Path(spec), _results(ctx))
    _err.print(
        f"sweep {prep.spec.name} at {prep.store.root}: {plan_summary(prep.plan)}; "
        f"{len(prep.new_ids)} new runs" + (" (spec changed)" if prep.spec_changed else "")
    )
    parallel = _parallel(max_parallel, name, prep.spec.backend.max_parallel)
    return _run(prep.store, name, backend_obj, parallel, resume=False, diverged=False,
                progress=not no_progress, ray_address=ray_address)  # fmt: skip


@cli.command("resume")
@click.argument("sweep")
@click.option("--backend", default=None, help="Backend (default: the sweep's).")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None)
@click.option("--dry-run", is_flag=True, help="List the runs that would be re-run.")
@click.option(
    "--restart",
    is_flag=True,
    help="Delete the runs' checkpoints and metrics first (never a completed run's).",
)
@click.option("--diverged", is_flag=True, help="Also re-run diverged runs.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option("--no-progress", is_flag=True)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster (backend ray; default: backend.ray_address, else $RAY_ADDRESS).",
)
@click.pass_context
def resume_cmd(
    ctx: click.Context,
    sweep: str,
    backend: str | None,
    max_parallel: int | None,
    dry_run: bool,
    restart: bool,
    diverged: bool,
    fmt: str,
    no_progress: bool,
    ray_address: str | None,
) -> int:
    """Re-run SWEEP's failed, stale, cancelled (and planned) runs from their last checkpoint.

    A completed run is never run again.

    \b
    Example:
      sweeper resume demo --diverged --dry-run
    """
    from sweeper.launch import load_sweep_spec, select_runs

    store = resolve_sweep(ctx, sweep)
    spec = load_sweep_spec(store)
    name = backend or spec.backend.name
    if dry_run:
        statuses = store.statuses(select_runs(store, resume=True, diverged=diverged))
        _emit(
            [st.to_dict() for st in statuses.values()],
            fmt,
            f"would re-run {len(statuses)} runs",
            ["run_id", "state", "attempt", "reason"],
        )
        return 0
    return _run(
        store,
        name,
        load_backend(name),
        _parallel(max_parallel, name, spec.backend.max_parallel),
        resume=True,
        diverged=diverged,
        progress=not no_progress,
        restart=restart,
        ray_address=ray_address,
    )


def _parallel(given: int | None, backend: str, spec_value: int) -> int:
    """Trials at once: the option, else the spec's (local) or 0 = the backend's own default."""
    return given or (spec_value if backend == "local" else 0)


def _run(
    store: SweepStore,
    backend_name: str,
    backend: Backend,
    max_parallel: int,
    *,
    resume: bool,
    diverged: bool,
    progress: bool,
    restart: bool = False,
    ray_address: str | None = None,
) -> int:
    """Select and claim runs under the sweep lock, then hand them to the backend."""
    from sweeper.launch import claim, restart_run, select_runs

    extra = {"ray_address": ray_address} if ray_address else {}
    opts = LaunchOptions(max_parallel=max_parallel, progress=progress, extra=extra)
    with store.lock():
        backend.reconcile(store)
        ids = select_runs(store, resume=resume, diverged=diverged)
        if restart:
            for rid in ids:
                restart_run(store, rid)
        if backend_name == "local":
            claim(store, ids, backend_name)
        else:
            # Cluster backends only submit; doing it under the lock keeps submissions unique.
            backend.launch(store, ids, opts)
    if backend_name == "local":
        backend.launch(store, ids, opts)
        _err.print(f"ran {len(ids)} runs")
        return _after_local(store, ids)
    _err.print(f"submitted {len(ids)} runs to {backend_name}; `sweeper status` follows them")
    return 0


def _after_local(store: SweepStore, ids: list[str]) -> int:
    statuses = store.statuses(ids)
    counts = _state_counts(statuses)
    _err.print(f"{store.root.name}: {_counts_line(counts)}")
    try:
        from sweeper.collect import collect_sweep
    except ImportError:
        _err.print("collect: sweeper.collect is not available")
    else:
        collect_sweep(store.root)
        _print_optimum_table(store.root)
    return 1 if counts.get("failed") else 0


def _print_optimum_table(sweep_dir: Path) -> None:
    """Final train loss per (lr, B) for every (model, horizon); the best lr per B is starred."""
    path = sweep_dir / "horizons.parquet"
    if not path.exists():
        return
    import pyarrow.parquet as pq

    cols = ["model", "lr", "batch_size", "tokens", "train_loss"]
    df = pq.read_table(path, columns=cols).to_pandas()
    df = df[df["train_loss"].notna()]
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
        _out.print(table)


@cli.command("status")
@click.argument("sweep")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in RunState]),
    help="Only runs in these states.",
)
@click.option("--refresh", is_flag=True, help="Ask the backend (scheduler) for news first.")
@click.pass_context
def status_cmd(
    ctx: click.Context, sweep: str, fmt: str, states: tuple[str, ...], refresh: bool
) -> int:
    """Show the state of every run of SWEEP. Exit status 1 if any run failed.

    \b
    Example:
      sweeper status demo --state failed --format json
    """
    store = resolve_sweep(ctx, sweep)
    if refresh:
        from sweeper.launch import load_sweep_spec

        names = {load_sweep_spec(store).backend.name}
        names |= {st.last_event.get("backend") for st in store.statuses().values()}
        with store.lock():
            for backend_name in sorted(n for n in names if n):
                load_backend(backend_name).reconcile(store)
    statuses = store.statuses()
    counts = _state_counts(statuses)
    rows = [st.to_dict() for st in statuses.values() if not states or st.state.value in states]
    cols = ["run_id", "state", "attempt", "backend", "job_id", "host", "pid", "exit_code", "reason"]
    _emit(rows, fmt, f"{store.root.name}: {_counts_line(counts)}", cols)
    return 1 if counts.get("failed") else 0


@cli.command("cancel")
@click.argument("sweep")
@click.pass_context
def cancel_cmd(ctx: click.Context, sweep: str) -> int:
    """Stop SWEEP's queued and running runs (trainers checkpoint; runs end cancelled).

    \b
    Example:
      sweeper cancel demo && sweeper resume demo
    """
    from sweeper.launch import load_sweep_spec

    store = resolve_sweep(ctx, sweep)
    default = load_sweep_spec(store).backend.name
    by_backend: dict[str, list[str]] = {}
    for rid, st in store.statuses().items():
        if st.state.is_active() or st.state == RunState.STALE:
            by_backend.setdefault(st.last_event.get("backend") or default, []).append(rid)
    if not by_backend:
        _err.print("nothing to cancel")
    for name, ids in by_backend.items():
        backend = load_backend(name)
        backend.cancel(store, ids)
        _err.print(f"cancel sent to {len(ids)} {name} runs")
    return 0


@cli.command("collect")
@click.argument("sweep")
@click.option("--full", is_flag=True, help="Re-read every run, ignoring the incremental cache.")
@click.pass_context
def collect_cmd(ctx: click.Context, sweep: str, full: bool) -> int:
    """Read every run's files into runs/horizons/metrics Parquet tables in the sweep directory.

    Incremental: only runs whose files changed since the last collect are read again.

    \b
    Example:
      sweeper collect demo
      sweeper collect demo --full
    """
    from sweeper.collect import collect_sweep

    store = resolve_sweep(ctx, sweep)
    result = collect_sweep(store.root, full=full)
    if result is not None:
        _err.print(str(result))
    return 0


@cli.command("export")
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
    type=click.Path(dir_okay=False),
    default=None,
    help="Output file (default: stdout; parquet needs a file).",
)
@click.option("--columns", default=None, help="Comma-separated columns to keep, in order.")
@click.pass_context
def export_cmd(
    ctx: click.Context, sweep: str, table: str, fmt: str, output: str | None, columns: str | None
) -> int:
    """Write one of SWEEP's tables as CSV, Parquet, JSON lines or Markdown.

    \b
    Example:
      sweeper export demo --table horizons --format csv -o horizons.csv
      sweeper export demo --table optima --format markdown --columns tokens,batch_size,lr_star,y0
    """
    from sweeper.export import export_table

    store = resolve_sweep(ctx, sweep)
    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    export_table(store.root, table, fmt, Path(output) if output else None, cols)
    return 0


# ---------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning errors into one-line messages."""
    from trainer.config import ConfigError

    try:
        code = cli.main(args=argv, prog_name="sweeper", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.exceptions.UsageError as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code if e.exit_code != 1 else 2)
    except (SweepError, ConfigError) as e:
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: {e.filename or ''}: {e.strerror or e}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


__all__ = ["cli", "main", "resolve_sweep", "SpecError"]


if __name__ == "__main__":
    main()
