"""Click commands ``analyze`` and ``refine``, wired into the ``sweeper`` group by sweeper/cli.py.

Both take a sweep as a directory path or a name under the group's ``--results`` root (default
``results/``). Errors are one line, exit status 2, no traceback.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sweeper.errors import SweepError

if TYPE_CHECKING:  # pandas is imported by the commands themselves, not at CLI start-up
    import pandas as pd


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


def _results_root() -> Path:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root().params.get("results") if ctx is not None else None
    return Path(root) if root else Path("results")


def resolve_sweep(sweep: str) -> Path:
    """A sweep directory from a path or a name under the results root (default ``results/``)."""
    p = Path(sweep)
    if p.is_dir():
        return p
    cand = _results_root() / sweep
    if cand.is_dir():
        return cand
    raise _UsageError(f"sweep {sweep!r}: no such directory (looked for {p} and {cand})")


def _parse_horizons(text: str | None) -> list[int] | None:
    """``"2^20,2^21,4194304"`` -> token counts."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(2 ** int(part[2:]) if part.startswith("2^") else int(float(part)))
        except ValueError:
            raise _UsageError(f"--horizons: {part!r} is not a token count or 2^k") from None
    return out


def _load(
    sweep: str | None,
    from_file: str | None,
    horizons: str | None,
    smooth_window: int,
    metrics_file: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame | None, Path, str, str]:
    """(table, metrics, default output dir, title, source) for a sweep or a file."""
    from sweeper.analysis.tables import AnalysisError, load_horizons, load_metrics

    if (sweep is None) == (from_file is None):
        raise _UsageError("give either SWEEP or --from FILE (not both)")
    if metrics_file is not None and from_file is None:
        raise _UsageError("--metrics goes with --from (a sweep's own metrics.parquet is used)")
    if from_file is not None:
        f = Path(from_file)
        df = load_horizons(f, horizons=_parse_horizons(horizons), smooth_window=smooth_window)
        metrics = None
        if metrics_file is not None:
            metrics = load_metrics(metrics_file)
            if metrics is None:
                raise AnalysisError(f"{metrics_file}: no such file")
        return df, metrics, f.parent / f"{f.stem}-analysis", f.stem, str(f)
    sdir = resolve_sweep(str(sweep))
    table = sdir / "horizons.parquet"
    if not table.is_file():
        raise _UsageError(f"{table}: no such file (run `sweeper collect {sdir.name}` first)")
    df = load_horizons(table)
    return df, load_metrics(sdir / "metrics.parquet"), sdir / "analysis", sdir.name, str(table)


def _fit_options(
    df: pd.DataFrame,
    metrics: pd.DataFrame | None,
    *,
    k: int,
    c_fixed: float | None,
    free_c: bool,
    smooth: bool,
    loss: str,
    n_boot: int,
    seed: int,
) -> tuple[Any, str]:
    from sweeper.analysis.optimum import FitOptions
    from sweeper.analysis.report import initial_loss, initial_losses

    if k < 3:
        raise _UsageError(f"--k = {k}: need at least 3 points for a quadratic")
    if loss not in df.columns or df[loss].isna().all():
        raise _UsageError(f"--loss = {loss}: the table has no values in column {loss}")
    if free_c and c_fixed is not None:
        raise _UsageError("--c-fixed and --free-c: give one or the other")
    per_model: dict[str, float] = {}
    if free_c:
        c, origin = None, "fitted freely (--free-c)"
    elif c_fixed is not None:
        c, origin = c_fixed, "--c-fixed"
    else:
        c, origin = initial_loss(df, metrics)
        per_model = initial_losses(df, metrics)
        if len(set(per_model.values())) > 1:
            origin += (
                " (per model: " + ", ".join(f"{m} {v:.4g}" for m, v in per_model.items()) + ")"
            )
    opts = FitOptions(
        k=k, c_fixed=c, c_per_model=per_model, smooth=smooth, loss=loss, n_boot=n_boot, seed=seed
    )
    return opts, origin


def _common_fit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--k", default=7, show_default=True, help="Points fitted per (D, B) slice."),
        click.option(
            "--c-fixed",
            type=float,
            default=None,
            help="Loss at initialisation to fix the intercept to [default: the step-0 loss].",
        ),
        click.option("--free-c", is_flag=True, help="Fit the intercept instead of fixing it."),
        click.option(
            "--smooth/--no-smooth",
            default=True,
            show_default=True,
            help="Use the loss smoothed over neighbouring logged points, weighted 1/std^2.",
        ),
        click.option(
            "--loss",
            type=click.Choice(["train_loss", "val_loss"]),
            default="train_loss",
            show_default=True,
        ),
        click.option(
            "--horizons",
            default=None,
            help="With --from on a per-step CSV: token budgets, e.g. '2^20,2^22' "
            "[default: the powers of two present].",
        ),
        click.option(
            "--smooth-window",
            default=1,
            show_default=True,
            help="With --from on a per-step CSV: logged points averaged either side of D.",
        ),
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
@click.option(
    "--metrics",
    "metrics_file",
    type=click.Path(dir_okay=False),
    help="With --from: the long per-step metrics table (run_id, step, tokens, metric, value).",
)
@_common_fit_options
@click.option("--bootstrap", "n_boot", default=200, show_default=True, help="Resamples per slice.")
@click.option(
    "--eta",
    "eta_source",
    type=click.Choice(["point", "interp"]),
    default="point",
    show_default=True,
    help="eta* for the laws: the rate of the point nearest the vertex (the paper's), or the rate "
    "interpolated at the optimal norm.",
)
@click.option("--no-plots", is_flag=True, help="Tables and report only.")
@click.option("--seed", default=0, show_default=True, help="Bootstrap seed.")
@_one_line_errors
def analyze(
    sweep: str | None,
    from_file: str | None,
    out: str | None,
    metrics_file: str | None,
    k: int,
    c_fixed: float | None,
    free_c: bool,
    smooth: bool,
    loss: str,
    horizons: str | None,
    smooth_window: int,
    n_boot: int,
    eta_source: str,
    no_plots: bool,
    seed: int,
) -> None:
    """Optima, scaling laws, norm transfer, plots and an HTML report for SWEEP (or --from FILE).

    Writes optima.parquet, fits.json, PNG figures and report.html into SWEEP/analysis/ (or --out).

    \b
    Example:
      sweeper analyze demo
      sweeper analyze --from lr-bs-scan-base-momentum-1.0-preprocessed-seed-30.csv --out nt/
    """
    from sweeper.analysis.report import run_analysis

    df, metrics, default_out, title, source = _load(
        sweep, from_file, horizons, smooth_window, metrics_file
    )
    opts, origin = _fit_options(
        df, metrics, k=k, c_fixed=c_fixed, free_c=free_c, smooth=smooth, loss=loss,
        n_boot=n_boot, seed=seed,
    )  # fmt: skip
    out_dir = Path(out) if out else default_out
    res = run_analysis(
        df,
        out_dir,
        opts=opts,
        metrics=metrics,
        eta_source="log2_lr_star" if eta_source == "point" else "log2_lr_star_interp",
        make_plots=not no_plots,
        title=title,
        source=source,
        c_origin=origin,
    )
    _print_summary(res)


def _fmt(fit: dict[str, Any], name: str) -> str:
    if "coef" not in fit:
        return f"n/a ({fit.get('error', '')})"
    return f"{fit['coef'][name]:.3f} +- {fit['se'][name]:.3f}"


def _print_summary(res: Any) -> None:
    doc = res.fits
    n_ok = int((res.optima["status"] == "ok").sum())
    c = doc["options"]["c_fixed"]
    c_text = "free" if c is None else f"{c:.4g} ({doc['options']['c_origin']})"
    click.echo(f"{len(res.optima)} slices, {n_ok} with an optimum; c = {c_text}")
    for s in doc["series"] + doc["pooled"]:
        lr, bl = s["lr_law"], s["batch_law"]
        r2 = f"{lr['r2']:.3f}" if lr.get("r2") is not None else "-"
        click.echo(
            f"  {s['model']} [{s['layout']}]: alpha {_fmt(lr, 'alpha')}, beta {_fmt(lr, 'beta')}, "
            f"R2 {r2}; B* = a D^b, b {_fmt(bl, 'b')}"
        )
    nt = doc["norm_transfer"]["all"]
    if nt.get("n"):
        click.echo(
            f"  optimal log2 output norm x0 = {nt['mean']:.3f} +- {nt['std']:.3f} (n={nt['n']})"
        )
    for w in res.warnings:
        click.echo(f"warning: {w}")
    click.echo(
        f"wrote {len(res.files)} files to {res.out_dir} (report: {res.out_dir / 'report.html'})"
    )


@click.command("refine")
@click.argument("sweep")
@click.option("--apply", "apply_", is_flag=True, help="Add the proposals to the sweep.")
@click.option("--extend", default=2, show_default=True, help="Rates added beyond an edge optimum.")
@click.option("--no-densify", is_flag=True, help="Do not propose half-steps around each eta*.")
@click.option("--no-untried", is_flag=True, help="Do not propose rates for untried (B, D).")
@click.option("--optuna", "optuna_trials", default=0, show_default=True, help="TPE asks per D.")
@click.option("--seed", default=0, show_default=True, help="Sampler seed.")
@_one_line_errors
def refine(
    sweep: str,
    apply_: bool,
    extend: int,
    no_densify: bool,
    no_untried: bool,
    optuna_trials: int,
    seed: int,
) -> None:
    """Propose new runs for SWEEP; with --apply add them to SWEEP/extra_points.json and plan them.

    Proposals: extend eta past an optimum on the grid's edge, densify eta around each optimum, the
    eta predicted to reach the optimal output norm at an untried (B, D), and optionally Optuna TPE.

    \b
    Example:
      sweeper refine demo
      sweeper refine demo --apply && sweeper resume demo
    """
    from sweeper.analysis import refine as rf
    from sweeper.analysis.optimum import find_optima

    sdir = resolve_sweep(sweep)
    df, metrics, *_ = _load(str(sdir), None, None, 1)
    opts, _ = _fit_options(
        df, metrics, k=7, c_fixed=None, free_c=False, smooth=True, loss="train_loss", n_boot=0,
        seed=seed,
    )  # fmt: skip
    optima = find_optima(df, opts)
    extra_path = sdir / "extra_points.json"
    existing = {rf.point_key(d) for d in rf.read_extra_points(extra_path)}
    existing |= set(_planned_keys(sdir))
    ropts = rf.RefineOptions(
        extend=extend,
        densify=not no_densify,
        untried=not no_untried,
        optuna_trials=optuna_trials,
        seed=seed,
    )
    props = _spec_filter(sdir, rf.propose(df, optima, ropts, existing=existing))
    _print_proposals(props)
    if not apply_:
        if props:
            click.echo("(dry run: --apply adds them to the sweep)")
        return
    added = rf.apply_proposals(extra_path, props)
    click.echo(f"added {len(added)} point(s) to {extra_path}")
    try:
        from sweeper.launch import replan
    except ImportError:
        raise _UsageError(
            f"{extra_path} was updated, but sweeper.launch.replan is missing: the runs are not "
            "planned yet"
        ) from None
    new_ids = replan(sdir)
    click.echo(f"{len(new_ids)} new run(s): {' '.join(new_ids)}" if new_ids else "no new runs")


def _spec_filter(sdir: Path, props: list[Any]) -> list[Any]:
    """Drop proposals the sweep's spec rejects (a batch not dividing a horizon, world size...)."""
    spec_path = sdir / "spec.toml"
    if not spec_path.is_file():
        return props
    from sweeper.plan import extra_point
    from sweeper.spec import parse_spec_text

    spec = parse_spec_text(spec_path.read_text(encoding="utf-8"), str(spec_path))
    kept, dropped = [], []
    for p in props:
        try:
            extra_point(p.to_point(), spec, "proposal")
        except SweepError as e:
            dropped.append(str(e))
            continue
        kept.append(p)
    if dropped:
        click.echo(f"left out {len(dropped)} proposal(s) the spec rejects, e.g. {dropped[0]}")
    return kept


def _planned_keys(sdir: Path) -> list[tuple[str, str, int, float]]:
    """Keys of the runs in ``runs.parquet`` (planned or not yet collected), if it has them."""
    from sweeper.analysis.refine import run_keys
    from sweeper.analysis.tables import layout_labels, read_table

    p = sdir / "runs.parquet"
    if not p.is_file():
        return []
    runs = read_table(p)
    if not {"model", "lr", "batch_size"} <= set(runs.columns):
        return []
    runs = runs.dropna(subset=["lr", "batch_size"]).assign(layout=layout_labels)
    runs = runs[runs["lr"] > 0]
    return run_keys(runs.assign(model=runs["model"].astype(str)))


def _print_proposals(props: list[Any]) -> None:
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
