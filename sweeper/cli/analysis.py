"""``analyze`` and ``refine``: thin adapters over the analysis API (``sweeper.analyze_tables``,
``Sweep.propose``/``Sweep.apply``).

Both take a sweep as a directory path or a name under ``--results`` (default ``results/``);
``analyze --from FILE`` reads a table made elsewhere. Errors are one line, exit status 2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

import sweeper
from sweeper import Sweep, SweepError
from sweeper.cli import results_dir, results_option

if TYPE_CHECKING:  # pandas is imported by the commands themselves, not at CLI start-up
    from sweeper import Analysis, AnalysisOptions, Proposal, Tables

_MAX_WARNINGS_PRINTED = 20


class _UsageError(click.ClickException):
    """A one-line error with the sweeper's exit status for bad input (2)."""

    exit_code = 2


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SweepError as e:
            raise _UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


def resolve_sweep(sweep: str, results_here: str | None = None) -> Path:
    """A sweep directory from a path or a name under ``--results`` (default ``results/``)."""
    p = Path(sweep)
    if p.is_dir():
        return p
    cand = results_dir(click.get_current_context(), results_here) / sweep
    if cand.is_dir():
        return cand
    raise _UsageError(f"sweep {sweep!r}: no such directory (looked for {p} and {cand})")


def _tokens(part: str, option: str) -> int:
    part = part.strip()
    try:
        return 2 ** int(part[2:]) if part.startswith("2^") else int(float(part))
    except ValueError:
        raise _UsageError(f"{option}: {part!r} is not a number or 2^k") from None


def parse_int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """``"2^20,2^21,4194304"`` or ``"2^33..2^37"`` (the powers of two in between) -> ints."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        if ".." in part:
            lo, hi = (_tokens(v, option) for v in part.split("..", 1))
            if lo <= 0 or hi < lo or lo & (lo - 1) or hi & (hi - 1):
                raise _UsageError(f"{option}: {part!r} must be a range of powers of two, low..high")
            out += [2**k for k in range(lo.bit_length() - 1, hi.bit_length())]
        else:
            out.append(_tokens(part, option))
    return tuple(out)


def parse_window(text: str) -> tuple[int, int]:
    """``"1"`` -> (-1, 1); ``"-2:1"`` -> (-2, 1): logged points before and after D."""
    try:
        if ":" in text:
            lo, hi = (int(v) for v in text.split(":", 1))
            return lo, hi
        n = int(text)
    except ValueError:
        raise _UsageError(f"--smooth-window: {text!r} is not N or FROM:TO") from None
    return -n, n


def _load(
    sweep: str | None,
    from_file: str | None,
    horizons: str | None,
    metrics_file: str | None,
    results_here: str | None,
) -> tuple[Tables, Path]:
    """The tables of a sweep or a file, and the default output directory."""
    load_file, load_sweep = sweeper.load_tables_file, sweeper.load_sweep_tables

    if (sweep is None) == (from_file is None):
        raise _UsageError("give either SWEEP or --from FILE (not both)")
    if metrics_file is not None and from_file is None:
        raise _UsageError("--metrics goes with --from (a sweep's own metrics.parquet is used)")
    if from_file is not None:
        f = Path(from_file)
        hz = parse_int_list(horizons, "--horizons")
        return load_file(f, horizons=hz, metrics_path=metrics_file), f.parent / f"{f.stem}-analysis"
    sdir = resolve_sweep(str(sweep), results_here)
    return load_sweep(sdir), sdir / "analysis"


def _options(**kw: Any) -> AnalysisOptions:
    lo, hi = parse_window(kw.pop("smooth_window"))
    return sweeper.AnalysisOptions(
        smooth_from=lo,
        smooth_to=hi,
        average_tokens=parse_int_list(kw.pop("average_h"), "--average-h"),
        average_batch=parse_int_list(kw.pop("average_bs"), "--average-bs"),
        **kw,
    )


def _fit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--k", default=7, show_default=True, help="Points fitted per (D, B) slice."),
        click.option(
            "--c-fixed",
            type=float,
            default=None,
            help="Loss at initialisation to fix the intercept to [default: the step-0 loss].",
        ),  # fmt: skip
        click.option("--free-c", is_flag=True, help="Fit the intercept instead of fixing it."),
        click.option(
            "--smooth/--no-smooth",
            default=True,
            show_default=True,
            help="Average each point over neighbouring logged points (loss mean, 1/std^2 "
            "weights, geometric-mean norm); --no-smooth: raw loss and raw norm.",
        ),  # fmt: skip
        click.option(
            "--smooth-window",
            default="1",
            show_default=True,
            help="Logged points averaged: N either side of D, or FROM:TO (the toolkit's "
            "AVG_REL_FROM/TO).",
        ),  # fmt: skip
        click.option(
            "--average-h",
            default=None,
            help="Horizons where the window applies, e.g. '2^33..2^37' (the toolkit's "
            "AVERAGE_H) [default: all].",
        ),  # fmt: skip
        click.option(
            "--average-bs",
            default=None,
            help="Batch sizes where the window applies, e.g. '8..128' (AVERAGE_BS) [default: all].",
        ),  # fmt: skip
        click.option(
            "--weight-floor",
            default=0.1,
            show_default=True,
            help="Smallest std in a weight, as a fraction of the slice's median; 0 is the "
            "toolkit's rule.",
        ),  # fmt: skip
        click.option(
            "--loss",
            type=click.Choice(["train_loss", "val_loss"]),
            default="train_loss",
            show_default=True,
        ),  # fmt: skip
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@click.command("analyze")
@click.argument("sweep", required=False)
@click.option(
    "--from", "from_file", type=click.Path(dir_okay=False), help="Horizons table made elsewhere."
)
@click.option("--out", type=click.Path(file_okay=False), help="Output directory.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False),
              help="With --from: the long per-step metrics table (run_id, step, tokens, metric, "
              "value).")  # fmt: skip
@click.option("--horizons", default=None,
              help="With --from on a per-step CSV: token budgets, e.g. '2^20,2^22' [default: the "
              "powers of two present].")  # fmt: skip
@_fit_options
@click.option("--bootstrap", "n_boot", default=200, show_default=True, help="Resamples per slice.")
@click.option("--eta", type=click.Choice(["interp", "point"]), default="interp", show_default=True,
              help="Headline eta* (and B*) of the laws: interpolated between grid points, or "
              "the grid point nearest the vertex (the paper's); the other is shown beside "
              "it.")  # fmt: skip
@click.option("--include-censored", is_flag=True,
              help="Fit the laws on slices whose optimum is not bracketed too.")  # fmt: skip
@click.option("--no-plots", is_flag=True, help="Tables and report only.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@click.option("--schedules", is_flag=True,
              help="Fit the schedule law L = L0 + A S1^-alpha - C S2 (Tissue et al. 2024) to every "
              "logged step, predict held-out runs, rank candidate schedules.")  # fmt: skip
@click.option("--fit-schedules", default=None,
              help="With --schedules: schedules fitted, e.g. 'constant,wsd0.2' (labels or kinds); "
              "the others are held out and predicted [default: all fitted].")  # fmt: skip
@results_option
@_one_line_errors
def analyze(
    sweep: str | None,
    from_file: str | None,
    out: str | None,
    metrics_file: str | None,
    horizons: str | None,
    no_plots: bool,
    results_here: str | None,
    **kw: Any,
) -> None:
    """Optima, scaling laws, norm transfer, plots and an HTML report for SWEEP (or --from FILE).

    Writes optima.parquet, fits.json, PNG figures and report.html into SWEEP/analysis/ (or --out).

    \b
    Example:
      sweeper analyze demo
      sweeper analyze --from lr-bs-scan-base-momentum-1.0-preprocessed-seed-30.csv \\
          --c-fixed 11.765 --average-h 2^33..2^37 --average-bs 8..128
    """
    tables, default_out = _load(sweep, from_file, horizons, metrics_file, results_here)
    fit = kw.pop("fit_schedules")
    if fit is not None and not kw["schedules"]:
        raise _UsageError("--fit-schedules goes with --schedules")
    kw["fit_schedules"] = tuple(v.strip() for v in fit.split(",") if v.strip()) if fit else None
    result = sweeper.analyze_tables(tables, _options(plots=not no_plots, **kw))
    out_dir = Path(out) if out else default_out
    files = result.write(out_dir)
    _print_summary(result)
    click.echo(f"wrote {len(files)} files to {out_dir} (report: {out_dir / 'report.html'})")


def _fmt(fit: dict[str, Any], name: str) -> str:
    if not fit["identified"]:
        return f"not identified ({fit['reason']})"
    lo, hi = fit["ci"][name]
    return f"{fit['coef'][name]:.3f} +- {fit['se'][name]:.3f} [{lo:.3f}, {hi:.3f}]"


def _print_summary(res: Analysis) -> None:
    n_ok = int((res.optima["status"] == "ok").sum())
    click.echo(
        f"{len(res.optima)} slices, {n_ok} with an optimum, {len(res.censored)} censored; "
        f"{res.intercept.text()}"
    )
    series = res.laws["series"] + (res.laws["pooled"] if len(res.laws["series"]) > 1 else [])
    for s in series:
        lr, bl = s["lr_law"], s["batch_law"]
        alpha = _fmt(lr, "alpha")
        beta = "" if not lr["identified"] else f", beta {_fmt(lr, 'beta')}"
        click.echo(f"  {s['model']} [{s['layout']}]: eta* law alpha {alpha}{beta}")
        click.echo(f"  {s['model']} [{s['layout']}]: B* = a D^b, b {_fmt(bl, 'b')}")
    _print_extra(res)
    nt = res.laws["norm_transfer"]["all"]
    if nt.get("n"):
        std = "" if math.isnan(nt["std"]) else f" +- {nt['std']:.3f}"
        click.echo(f"  optimal log2 output norm x0 = {nt['mean']:.3f}{std} (n={nt['n']})")
    for w in res.warnings[:_MAX_WARNINGS_PRINTED]:
        click.echo(f"warning: {w}")
    if len(res.warnings) > _MAX_WARNINGS_PRINTED:
        more = len(res.warnings) - _MAX_WARNINGS_PRINTED
        click.echo(f"warning: ... and {more} more (all in fits.json and report.html)")


def _print_extra(res: Analysis) -> None:
    """One line per width exponent and per schedule-law fit."""
    if res.width is not None:
        for r in res.width.exponents.itertuples(index=False):
            c = f"{r.c:.3f} [{r.c_lo:.3f}, {r.c_hi:.3f}]" if r.identified else "not identified"
            click.echo(f"  width law {r.optimizer} {r.family} B={r.batch_size} D={r.tokens} "
                       f"{r.group}: c = {c}")  # fmt: skip
    if res.schedule_law is not None:
        for g in res.schedule_law.groups:
            k = g.key
            fit = g.note
            if g.identified:
                fit = ", ".join(f"{p} {g.coef[p]:.4g} [{g.ci[p][0]:.4g}, {g.ci[p][1]:.4g}]"
                                for p in ("L0", "A", "alpha", "C"))  # fmt: skip
            click.echo(f"  schedule law {k['model']} B={k['batch_size']} lr={k['lr']:.4g}: {fit}")
        held = res.schedule_law.held_out()
        for r in held.itertuples(index=False):
            click.echo(f"  held out {r.schedule} T={r.final_step}: final loss {r.final_obs:.4f}, "
                       f"predicted {r.final_pred:.4f} ({100 * r.rel_error:+.2f} %)")  # fmt: skip


@click.command("refine")
@click.argument("sweep")
@click.option("--apply", "apply_", is_flag=True, help="Add the proposals to the sweep.")
@click.option("--extend", default=2, show_default=True, help="Rates added beyond an edge optimum.")
@click.option("--no-densify", is_flag=True, help="Do not propose half-steps around each eta*.")
@click.option("--no-untried", is_flag=True, help="Do not propose rates for untried (B, D).")
@click.option("--optuna", "optuna_trials", default=0, show_default=True, help="TPE asks per D.")
@click.option("--seed", default=0, show_default=True, help="Sampler seed.")
@results_option
@_one_line_errors
def refine(
    sweep: str,
    apply_: bool,
    extend: int,
    no_densify: bool,
    no_untried: bool,
    optuna_trials: int,
    seed: int,
    results_here: str | None,
) -> None:
    """Propose new runs for SWEEP; with --apply add them to SWEEP/extra_points.json and plan them.

    Proposals: extend eta past an optimum on the slice's edge, densify eta around each optimum, the
    eta predicted to reach the optimal output norm at an untried (B, D), and optionally Optuna TPE.

    \b
    Example:
      sweeper refine demo
      sweeper refine demo --apply && sweeper resume demo
    """
    s = Sweep.open(resolve_sweep(sweep, results_here))
    props, dropped = s.propose(
        seed=seed,
        extend=extend,
        densify=not no_densify,
        untried=not no_untried,
        optuna_trials=optuna_trials,
    )
    if dropped:
        click.echo(f"left out {len(dropped)} proposal(s) the spec rejects, e.g. {dropped[0]}")
    _print_proposals(props)
    if not apply_:
        if props:
            click.echo("(dry run: --apply adds them to the sweep)")
        return
    new_ids = s.apply([p.to_point() for p in props])
    click.echo(f"added {len(props)} point(s) to {s.root / 'extra_points.json'}")
    click.echo(f"{len(new_ids)} new run(s): {' '.join(new_ids)}" if new_ids else "no new runs")


def _print_proposals(props: list[Proposal]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not props:
        click.echo("no proposals: every optimum is bracketed and the grid is dense enough")
        return
    t = Table(title=f"{len(props)} proposed run(s)")
    for col in ("model", "layout", "batch_size", "lr", "log2 lr", "why"):
        t.add_column(col)
    for p in props:
        t.add_row(
            p.model, p.layout, str(p.batch_size), f"{p.lr:.6g}", f"{math.log2(p.lr):.2f}", p.source
        )
    Console(width=160).print(t)
