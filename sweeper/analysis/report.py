"""The whole analysis of one horizons table: optima, laws, plots, and a self-contained HTML report.

:func:`run_analysis` writes into the output directory (each file atomically):
``optima.parquet``, ``fits.json``, the PNG figures and ``report.html`` (figures embedded as base64,
so the single file can be sent to a colleague).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeper.analysis import laws, optimum, plots
from sweeper.analysis.optimum import FitOptions
from sweeper.analysis.tables import AnalysisError, atomic_write_bytes, atomic_write_parquet


@dataclass
class AnalysisResult:
    """What :func:`run_analysis` produced."""

    out_dir: Path
    optima: pd.DataFrame
    fits: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cpu_timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Wall and process-CPU seconds per stage (the CPU figure is robust to a busy machine)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._w, self._c = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        w, c = time.perf_counter(), time.process_time()
        self.wall[stage], self.cpu[stage] = w - self._w, c - self._c
        self._w, self._c = w, c


def initial_loss(df: pd.DataFrame, metrics: pd.DataFrame | None) -> tuple[float | None, str]:
    """The loss at initialisation (x = 0) to fix the intercept to, and where it came from.

    Looks for step-0 rows of the table (kept aside by the loader), then for the step-0
    ``train_loss`` in the metrics table; their median is taken (every run of a model starts from the
    same loss, ~ln(vocab_size)). See :func:`initial_losses` for the per-model values.
    """
    if "initial_loss" in df.attrs:
        return float(df.attrs["initial_loss"]), "median step-0 loss of the table"
    first = _metrics_step0(df, metrics)
    if first is not None:
        return float(first["value"].median()), "median step-0 train_loss of metrics.parquet"
    return None, "none found: intercept fitted freely"


def initial_losses(df: pd.DataFrame, metrics: pd.DataFrame | None) -> dict[str, float]:
    """Per-model median step-0 loss, from the same sources as :func:`initial_loss`."""
    if "initial_loss_per_model" in df.attrs:
        return dict(df.attrs["initial_loss_per_model"])
    first = _metrics_step0(df, metrics)
    if first is None:
        return {}
    return {str(k): float(v) for k, v in first.groupby("model")["value"].median().items()}


def _metrics_step0(df: pd.DataFrame, metrics: pd.DataFrame | None) -> pd.DataFrame | None:
    """Step-0 ``train_loss`` rows of the metrics table with each run's model, or None."""
    if metrics is None or "step" not in metrics.columns:
        return None
    m = metrics[(metrics["metric"] == "train_loss") & (metrics["step"] == 0)].dropna(
        subset=["value"]
    )
    runs = df[["run_id", "model"]].drop_duplicates("run_id")
    m = m.assign(run_id=m["run_id"].astype(str)).merge(runs, on="run_id", how="inner")
    return None if m.empty else m


def run_analysis(
    df: pd.DataFrame,
    out_dir: Path,
    *,
    opts: FitOptions,
    metrics: pd.DataFrame | None = None,
    eta_source: str = "log2_lr_star",
    make_plots: bool = True,
    title: str = "",
    source: str = "",
    c_origin: str = "",
) -> AnalysisResult:
    """Analyse a normalised horizons table and write the outputs into ``out_dir``.

    Args:
        df: Horizons table (see :func:`sweeper.analysis.tables.normalise`).
        out_dir: Output directory (created).
        opts: Optimum-finder options (``c_fixed`` already resolved).
        metrics: Long per-step metrics table, for the norm-growth figure (optional).
        eta_source: Which eta* the learning-rate law is fitted to: ``log2_lr_star`` (the paper's:
            the rate of the point nearest the vertex) or ``log2_lr_star_interp``.
        make_plots: Draw the figures (the tables and the report are written either way).
        title: Report title (e.g. the sweep name).
        source: Where the table came from, for the report.
        c_origin: How ``opts.c_fixed`` was chosen, for the report.

    Raises:
        AnalysisError: the table has no usable slice.
    """
    if eta_source not in laws.ETA_SOURCES:
        raise AnalysisError(f"eta source = {eta_source!r}: must be one of {laws.ETA_SOURCES}")
    clock = _Clock()
    pts = optimum.slice_points(df, opts)
    optima = optimum.find_optima(df, opts)
    if optima.empty or not (optima["status"] == "ok").any():
        raise AnalysisError(
            f"{source or 'table'}: no (model, D, B) slice has 3 usable points to fit an optimum"
        )
    clock.lap("optima")
    fits = laws.fit_all(optima, eta_source)
    bstar = fits.pop("batch_star")
    clock.lap("laws")
    warnings = _warnings(optima, fits, opts, metrics)
    figures = _figures(pts, optima, bstar, fits, df, metrics) if make_plots else {}
    clock.lap("plots")
    doc = {
        "title": title,
        "source": source,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "options": asdict(opts) | {"eta_source": eta_source, "c_origin": c_origin},
        "warnings": warnings,
        **fits,
        "batch_star": bstar.to_dict(orient="records"),
    }
    doc = _jsonable(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    atomic_write_parquet(out_dir / "optima.parquet", optima)
    atomic_write_bytes(out_dir / "fits.json", json.dumps(doc, indent=1).encode())
    files += [out_dir / "optima.parquet", out_dir / "fits.json"]
    for name, png in figures.items():
        atomic_write_bytes(out_dir / name, png)
        files.append(out_dir / name)
    atomic_write_bytes(out_dir / "report.html", render_html(doc, optima, figures).encode())
    files.append(out_dir / "report.html")
    _remove_stale_figures(out_dir, set(figures))
    clock.lap("write")
    return AnalysisResult(out_dir, optima, doc, files, clock.wall, warnings, clock.cpu)


_FIGURE_PREFIXES = ("loss_surface_", "norm_fit_", "lr_law_", "norm_growth_", "batch_star", "norm_")


def _remove_stale_figures(out_dir: Path, current: set[str]) -> None:
    """Delete figures of an earlier analysis that this one did not redraw (they would mislead)."""
    for p in out_dir.glob("*.png"):
        if p.name not in current and p.name.startswith(_FIGURE_PREFIXES):
            p.unlink(missing_ok=True)


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")


def _figures(
    pts: pd.DataFrame,
    optima: pd.DataFrame,
    bstar: pd.DataFrame,
    fits: dict[str, Any],
    df: pd.DataFrame,
    metrics: pd.DataFrame | None,
) -> dict[str, bytes]:
    """All figures, keyed by file name, in report order."""
    figs: dict[str, bytes] = {}
    multi_layout = optima["layout"].nunique() > 1
    for s in fits["series"]:
        model, layout = s["model"], s["layout"]
        slug = _slug(model, layout) if multi_layout else _slug(model)
        sel = (pts["model"] == model) & (pts["layout"] == layout)
        o = optima[(optima["model"] == model) & (optima["layout"] == layout)]
        b = bstar[(bstar["model"] == model) & (bstar["layout"] == layout)]
        figs[f"loss_surface_{slug}.png"] = plots.loss_surface(pts[sel], o, b, model, layout)
        figs[f"norm_fit_{slug}.png"] = plots.norm_parabolas(pts[sel], o, model, layout)
        figs[f"lr_law_{slug}.png"] = plots.lr_law(o, s["lr_law"], model, layout)
        if metrics is not None and (metrics["metric"] == "output_norm").any():
            runs = df.loc[
                (df["model"] == model) & (df["layout"] == layout), ["run_id", "lr", "batch_size"]
            ].drop_duplicates("run_id")
            x0 = fits["norm_transfer"]["all"].get("mean")
            figs[f"norm_growth_{slug}.png"] = plots.norm_growth(metrics, runs, x0, model, layout)
    figs["batch_star.png"] = plots.batch_star(bstar, fits["series"])
    figs["norm_transfer.png"] = plots.norm_transfer(optima, fits["norm_transfer"])
    return figs


def _warnings(
    optima: pd.DataFrame, fits: dict[str, Any], opts: FitOptions, metrics: pd.DataFrame | None
) -> list[str]:
    out = []
    edge = optima[optima["edge"] != ""]
    if len(edge):
        ex = ", ".join(
            f"{r.model} D={r.tokens} B={r.batch_size} ({r.edge})" for r in edge.head(5).itertuples()
        )
        out.append(
            f"{len(edge)} slice(s) have their best rate on the edge of the rate grid "
            f"(e.g. {ex}); `sweeper refine` proposes the rates beyond"
        )
    for status, why in (
        ("not_convex", "the fitted parabola is not convex"),
        ("too_few_points", "fewer than 3 usable points"),
    ):
        n = int((optima["status"] == status).sum())
        if n:
            out.append(f"{n} slice(s) without an optimum: {why}")
    n_out = int(optima["vertex_outside"].sum())
    if n_out:
        out.append(f"{n_out} slice(s) have the parabola's vertex outside the fitted points")
    # With one model the pooled fit is the per-model fit again: do not warn twice.
    pooled = fits["pooled"] if optima["model"].nunique() > 1 else []
    for s in fits["series"] + pooled:
        for law in ("lr_law", "batch_law"):
            if "error" in s[law]:
                out.append(f"{s['model']} {s['layout']}: no {law} ({s[law]['error']})")
    if opts.c_fixed is None:
        out.append("intercept c fitted freely, not at the initial loss (--free-c or no step 0)")
    if metrics is None:
        out.append("no metrics.parquet: the norm-growth figure is missing")
    return out


def _jsonable(v: Any) -> Any:
    """NaN/inf to null, numpy scalars to Python, recursively."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:0.5em 1em}
code{background:#f3f3f3;padding:0 3px}
"""


_ETA_TEXT = {
    "log2_lr_star": "the rate of the point nearest the vertex (the paper's)",
    "log2_lr_star_interp": "the rate interpolated at the optimal norm",
}


def _pm(fit: dict[str, Any], name: str, digits: int = 3) -> str:
    if "coef" not in fit:
        return html.escape(fit.get("error", "-"))
    c, s = fit["coef"].get(name), fit["se"].get(name)
    if c is None:
        return "-"
    return f"{c:.{digits}f} &plusmn; {s:.{digits}f}"


def _r2(fit: dict[str, Any]) -> str:
    r2 = fit.get("r2")
    return "-" if r2 is None else f"{r2:.3f}"


def _laws_table(doc: dict[str, Any]) -> str:
    head = (
        "<tr><th>model</th><th>layout</th><th>slices</th><th>alpha</th><th>beta</th>"
        "<th>gamma</th><th>R&sup2;</th><th>b (B*=aD^b)</th><th>log2 a</th><th>R&sup2;</th>"
        "<th>b (refined B*)</th><th>eta*(D) exponent</th></tr>"
    )
    rows = []
    for s in doc["series"] + doc["pooled"]:
        lr, bl, bi, ev = s["lr_law"], s["batch_law"], s["batch_law_interp"], s["eta_vs_data"]
        ev_s = f"{ev['exponent']:.3f} &plusmn; {ev['se']:.3f}" if "exponent" in ev else "-"
        rows.append(
            f"<tr><td>{html.escape(s['model'])}</td><td>{html.escape(s['layout'])}</td>"
            f"<td>{s['n_slices']}</td><td>{_pm(lr, 'alpha')}</td><td>{_pm(lr, 'beta')}</td>"
            f"<td>{_pm(lr, 'gamma', 2)}</td><td>{_r2(lr)}</td>"
            f"<td>{_pm(bl, 'b')}</td><td>{_pm(bl, 'log2_a', 2)}</td>"
            f"<td>{_r2(bl)}</td><td>{_pm(bi, 'b')}</td><td>{ev_s}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _nt_table(nt: dict[str, Any]) -> str:
    rows = []

    def row(label: str, st: dict[str, Any]) -> None:
        if st.get("n"):
            rows.append(
                f"<tr><td>{html.escape(label)}</td><td>{st['n']}</td><td>{st['mean']:.3f}</td>"
                f"<td>{st['std']:.3f}</td><td>{st['min']:.3f}</td><td>{st['max']:.3f}</td></tr>"
            )

    row("all slices", nt["all"])
    row("at B*(D)", nt["at_batch_star"])
    for m, st in nt["per_model"].items():
        row(f"model {m}", st)
    for d, st in nt["per_tokens"].items():
        row(f"D = 2^{math.log2(int(d)):g}", st)
    head = "<tr><th></th><th>n</th><th>mean x0</th><th>std</th><th>min</th><th>max</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(doc: dict[str, Any], optima: pd.DataFrame, figures: dict[str, bytes]) -> str:
    """The self-contained report (figures embedded as base64 PNG)."""
    title = html.escape(doc.get("title") or "sweep")
    opts = doc["options"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Scaling analysis: {title}</title>",
        f"<style>{_CSS}</style></head><body><h1>Scaling analysis: {title}</h1>",
        f"<p>Source <code>{html.escape(str(doc.get('source', '')))}</code>, made "
        f"{html.escape(doc['created'])}. Optimum per (model, D, B): weighted quadratic fit of loss "
        f"against log2 output norm on the k = {opts['k']} points nearest the minimum; intercept "
        f"c = {'free' if opts['c_fixed'] is None else format(opts['c_fixed'], '.4g')} "
        f"({html.escape(opts.get('c_origin') or '')}); "
        f"laws fitted to eta* = {_ETA_TEXT[opts['eta_source']]}; "
        f"{opts['n_boot']} bootstrap resamples.</p>",
    ]
    if doc["warnings"]:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in doc["warnings"])
        parts.append(f"<div class='warn'><b>Warnings</b><ul>{items}</ul></div>")
    parts += ["<h2>Scaling laws</h2>", _laws_table(doc)]
    parts += [
        "<h2>Norm transfer (optimal log2 output norm x0)</h2>",
        _nt_table(doc["norm_transfer"]),
    ]
    if doc.get("layouts"):
        wins = ", ".join(f"{html.escape(k)}: {v}" for k, v in doc["layouts"]["wins"].items())
        parts.append(
            "<h2>Per-group learning-rate layouts</h2><p>Best layout (lowest y0) per "
            f"(model, D, B) slice, count of wins: {wins}. Per-slice y0 of every layout: "
            "<code>fits.json</code>, key <code>layouts</code>.</p>"
        )
    bs = pd.DataFrame(doc["batch_star"])
    if not bs.empty:
        cols = ["model", "layout", "tokens", "batch_size_star", "lr_star", "y0", "x0"]
        parts += [
            "<h2>B*(D) and eta* at B*</h2>",
            bs[cols].to_html(index=False, float_format="%.4g"),
        ]
    parts.append("<h2>Figures</h2>")
    for name, png in figures.items():
        b64 = base64.b64encode(png).decode()
        parts.append(
            f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' "
            f"src='data:image/png;base64,{b64}'>"
        )
    cols = [
        "model",
        "layout",
        "tokens",
        "batch_size",
        "status",
        "x0",
        "x0_lo",
        "x0_hi",
        "y0",
        "lr_star",
        "lr_star_interp",
        "lr_argmin",
        "lr_quad",
        "edge",
        "n_valid",
        "boot_valid",
    ]
    shown = optima[[c for c in cols if c in optima.columns]]
    note = "" if len(shown) <= 300 else f" (first 300 of {len(shown)}; all in optima.parquet)"
    parts += [
        f"<h2>Optima per slice{note}</h2>",
        shown.head(300).to_html(index=False, float_format="%.4g", na_rep="-"),
        "</body></html>",
    ]
    return "\n".join(parts)
