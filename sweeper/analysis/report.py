"""Writing an :class:`~sweeper.analysis.api.Analysis`: tables, figures, and one self-contained HTML
report.

:func:`write_outputs` writes into the output directory (each file atomically): ``optima.parquet``,
``fits.json``, the PNG figures and ``report.html`` (figures embedded as base64, so the single file
can be sent to a colleague). The report opens with the warnings, then the laws with their 95 %
intervals and what was censored, then the figures under headings in words, loss against learning
rate first.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sweeper import fsutil

if TYPE_CHECKING:
    from sweeper.analysis.api import Analysis


@dataclass(frozen=True)
class Figure:
    """One figure: its file name, its heading in words, and the PNG bytes."""

    name: str
    heading: str
    png: bytes


_FIGURE_PREFIXES = (
    "loss_vs_lr_",
    "loss_surface_",
    "norm_fit_",
    "fit_quality_",
    "lr_law_",
    "norm_growth_",
    "batch_star",
    "norm_",
    "width_",
    "schedule_law_",
)


def document(a: Analysis) -> dict[str, Any]:
    """The content of ``fits.json``: options, intercept, warnings, laws, B*(D), censored slices."""
    opts = asdict(a.options) | {
        "c_fixed": a.intercept.c_fixed,
        "c_origin": a.intercept.origin,
        "eta_source": a.eta_source,
    }
    doc = {
        "title": a.options.title or a.tables.title,
        "source": a.tables.source,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "options": opts,
        "warnings": list(a.warnings),
        **a.laws,
        "batch_star": a.batch_star.to_dict(orient="records"),
        "censored": a.censored.to_dict(orient="records"),
    }
    for name in ("width", "schedule_law"):  # sweeper.analysis.width, .schedule_law
        if getattr(a, name, None) is not None:
            doc[name] = getattr(a, name).document()
    return dict(_jsonable(doc))


def _jsonable(v: Any) -> Any:
    """NaN/inf to null, numpy scalars to Python, tuples to lists, recursively."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")


def figures(a: Analysis) -> list[Figure]:
    """All figures of the analysis, in report order (loss against learning rate first)."""
    from sweeper.analysis import plots

    figs: list[Figure] = []
    multi = a.optima["layout"].nunique() > 1
    for s in a.laws["series"]:
        model, layout = s["model"], s["layout"]
        slug = _slug(model, layout) if multi else _slug(model)
        who = model if layout == "1:1:1" else f"{model}, layout {layout}"
        sel = (a.points["model"] == model) & (a.points["layout"] == layout)
        p = a.points[sel]
        o = a.optima[(a.optima["model"] == model) & (a.optima["layout"] == layout)]
        b = a.batch_star[(a.batch_star["model"] == model) & (a.batch_star["layout"] == layout)]
        add = figs.append
        add(Figure(f"loss_vs_lr_{slug}.png",
                   f"Loss against learning rate, one line per batch size ({who})",
                   plots.loss_vs_lr(p, o, a.eta_source, model, layout)))  # fmt: skip
        add(Figure(f"norm_fit_{slug}.png",
                   f"Loss against output norm, with the fitted parabolas ({who})",
                   plots.norm_parabolas(p, o, model, layout)))  # fmt: skip
        add(Figure(f"fit_quality_{slug}.png",
                   f"Fit quality per slice: vertex against the lowest loss, residual scale ({who})",
                   plots.fit_quality(o, model, layout, a.options.gap_sigmas)))  # fmt: skip
        add(Figure(f"loss_surface_{slug}.png",
                   f"Loss over learning rate and batch size ({who})",
                   plots.loss_surface(p, o, b, model, layout)))  # fmt: skip
        add(Figure(f"lr_law_{slug}.png",
                   f"Optimal learning rate against batch size and horizon, with the law ({who})",
                   plots.lr_law(o, s["lr_law"], model, layout)))  # fmt: skip
        growth = _norm_growth(a, model, layout)
        if growth is not None:
            add(Figure(f"norm_growth_{slug}.png", f"Output norm during training ({who})", growth))
    if not (a.optima["status"] == "ok").any():  # a sweep with only width or schedule data
        return figs + _extra_figures(a)
    figs.append(Figure("batch_star.png", "Optimal batch size against horizon",
                       plots.batch_star(a.batch_star, a.laws["series"])))  # fmt: skip
    figs.append(Figure("norm_transfer.png", "Optimal output norm against horizon (norm transfer)",
                       plots.norm_transfer(a.optima, a.laws["norm_transfer"])))  # fmt: skip
    return figs + _extra_figures(a)


def _extra_figures(a: Analysis) -> list[Figure]:
    """The width and schedule-law figures (when those analyses ran)."""
    from sweeper.analysis import law_report

    out = []
    if a.width is not None:
        out += [Figure(*f) for f in law_report.width_figures(a.width)]
    if a.schedule_law is not None:
        out += [Figure(*f) for f in law_report.schedule_figures(a.schedule_law)]
    return out


def _norm_growth(a: Analysis, model: str, layout: str) -> bytes | None:
    from sweeper.analysis import plots

    metrics = a.tables.metrics
    if metrics is None or not (metrics["metric"] == "output_norm").any():
        return None
    h = a.tables.horizons
    runs = h.loc[(h["model"] == model) & (h["layout"] == layout), ["run_id", "lr", "batch_size"]]
    x0 = a.laws["norm_transfer"]["all"].get("mean")
    return plots.norm_growth(metrics, runs.drop_duplicates("run_id"), x0, model, layout)


def write_outputs(a: Analysis, out_dir: Path) -> list[Path]:
    """Write ``optima.parquet``, ``fits.json``, the figures and ``report.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = document(a)
    figs = figures(a) if a.options.plots else []
    buf = io.BytesIO()
    a.optima.to_parquet(buf, index=False)
    files = [out_dir / "optima.parquet", out_dir / "fits.json"]
    fsutil.write_bytes_atomic(files[0], buf.getvalue())
    fsutil.write_bytes_atomic(files[1], (json.dumps(doc, indent=1) + "\n").encode())
    for f in figs:
        fsutil.write_bytes_atomic(out_dir / f.name, f.png)
        files.append(out_dir / f.name)
    fsutil.write_text_atomic(out_dir / "report.html", render_html(doc, a.optima, figs))
    files.append(out_dir / "report.html")
    _remove_stale_figures(out_dir, {f.name for f in figs})
    return files


def _remove_stale_figures(out_dir: Path, current: set[str]) -> None:
    """Delete figures of an earlier analysis that this one did not redraw (they would mislead)."""
    for p in out_dir.glob("*.png"):
        if p.name not in current and p.name.startswith(_FIGURE_PREFIXES):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:0.5em 1em}
.warn ul{max-height:24em;overflow-y:auto}
code{background:#f3f3f3;padding:0 3px}
"""

_ETA_TEXT = {
    "log2_lr_star": "the grid point nearest the vertex (the paper's rule)",
    "log2_lr_star_interp": "interpolated at the optimal norm (between grid points)",
}
_B_TEXT = {
    "log2_B_star": "argmin over the batch grid (the paper's rule)",
    "log2_B_star_interp": "refined by a parabola through the argmin and its neighbours",
}


def _coef(fit: dict[str, Any], name: str, digits: int = 3) -> str:
    if not fit.get("identified"):
        return "-"
    c, s = fit["coef"][name], fit["se"][name]
    lo, hi = fit["ci"][name]
    return (
        f"{c:.{digits}f} &plusmn; {s:.{digits}f} <small>[{lo:.{digits}f}, {hi:.{digits}f}]</small>"
    )


def _law_row(kind: str, fit: dict[str, Any], names: list[str], headline: bool) -> str:
    source = fit.get("eta_source") or fit.get("b_source") or ""
    label = f"{'<b>' if headline else ''}{kind}{'</b>' if headline else ''}"
    what = html.escape(_ETA_TEXT.get(source) or _B_TEXT.get(source, source))
    if not fit.get("identified"):
        cells = "<td colspan='4' style='text-align:left'>not identified: " + (
            f"{html.escape(str(fit.get('reason')))}</td>"
        )
    else:
        r2 = "-" if fit.get("r2") is None else f"{fit['r2']:.3f}"
        coefs = [f"<td>{name} = {_coef(fit, name)}</td>" for name in names]
        cells = "".join(coefs + ["<td></td>"] * (3 - len(names))) + f"<td>{r2}</td>"
    return (
        f"<tr><td style='text-align:left'>{label}</td><td style='text-align:left'>{what}</td>"
        f"{cells}<td>{fit.get('n', 0)}</td><td>{fit.get('n_censored', 0)}</td></tr>"
    )


def _laws_section(doc: dict[str, Any]) -> str:
    parts = []
    series = doc["series"] + (doc["pooled"] if len(doc["series"]) > 1 else [])
    for s in series:
        who = "all models" if s["model"] == "*" else s["model"]
        lay = "" if s["layout"] == "1:1:1" else f", layout {s['layout']}"
        head = (
            "<tr><th>law</th><th>fitted to</th><th colspan='3'>coefficients &plusmn; se "
            "[95 % interval]</th><th>R&sup2;</th><th>n</th><th>censored</th></tr>"
        )
        rows = [
            _law_row(
                "log2 eta* = alpha log2 B + beta log2 D + gamma",
                s["lr_law"],
                ["alpha", "beta", "gamma"],
                True,
            ),  # fmt: skip
            _law_row("(beside it)", s["lr_law_alt"], ["alpha", "beta", "gamma"], False),
            _law_row("log2 B* = b log2 D + log2 a", s["batch_law"], ["b", "log2_a"], True),
            _law_row("(beside it)", s["batch_law_alt"], ["b", "log2_a"], False),
        ]
        ev = s["eta_vs_data"]
        ev_text = (
            f"{ev['exponent']:.3f} &plusmn; {ev['se']:.3f}"
            if ev.get("identified")
            else f"not identified: {html.escape(str(ev.get('reason')))}"
        )
        parts.append(
            f"<h3>{html.escape(who + lay)}: {s['n_slices']} slices with an optimum</h3>"
            f"<table>{head}{''.join(rows)}</table>"
            f"<p>eta*(D) at B*(D) grows as D to the power alpha b + beta = {ev_text}.</p>"
        )
    return "".join(parts)


def _censored_section(doc: dict[str, Any]) -> str:
    cens = doc["censored"]
    bcens = [r for r in doc["batch_star"] if r.get("censored")]
    if not cens and not bcens:
        return "<p>Nothing censored: every optimum is bracketed by the rates and batch sizes.</p>"
    items = [
        f"<li>{html.escape(r['model'])} D=2^{math.log2(r['tokens']):g} B={r['batch_size']}: "
        f"{html.escape(r['censored'])}</li>"
        for r in cens
    ] + [
        f"<li>{html.escape(r['model'])} D=2^{math.log2(r['tokens']):g}: "
        f"{html.escape(r['censored'])}</li>"
        for r in bcens
    ]
    return (
        f"<p>{len(cens)} slice(s) left out of the eta* laws and {len(bcens)} horizon(s) left out "
        f"of the B* laws (<code>--include-censored</code> fits them too):</p><ul>{''.join(items)}"
        "</ul>"
    )


def _nt_table(nt: dict[str, Any]) -> str:
    rows = []

    def row(label: str, st: dict[str, Any]) -> None:
        if st.get("n"):
            std = "-" if st["std"] is None else f"{st['std']:.3f}"
            rows.append(
                f"<tr><td>{html.escape(label)}</td><td>{st['n']}</td><td>{st['mean']:.3f}</td>"
                f"<td>{std}</td><td>{st['min']:.3f}</td><td>{st['max']:.3f}</td></tr>"
            )

    row("all slices", nt["all"])
    row("at B*(D)", nt["at_batch_star"])
    for m, st in nt["per_model"].items():
        row(f"model {m}", st)
    for d, st in nt["per_tokens"].items():
        row(f"D = 2^{math.log2(int(d)):g}", st)
    head = "<tr><th></th><th>n</th><th>mean x0</th><th>std</th><th>min</th><th>max</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _intro(doc: dict[str, Any]) -> str:
    o = doc["options"]
    c = "fitted freely" if o["c_fixed"] is None else f"fixed at {o['c_fixed']:.4g}"
    smooth = (
        f"averaged over logged points {o['smooth_from']}..{o['smooth_to']} around D"
        if o["smooth"]
        else "not smoothed"
    )
    return (
        f"<p>Source <code>{html.escape(str(doc.get('source', '')))}</code>, made "
        f"{html.escape(doc['created'])}. Optimum per (model, D, B): weighted quadratic fit of loss "
        f"against log2 output norm on the k = {o['k']} points nearest the minimum, points "
        f"{smooth}; intercept c {c} ({html.escape(o.get('c_origin') or '')}); "
        f"{o['n_boot']} bootstrap resamples. The headline laws are fitted to eta* "
        f"{html.escape(_ETA_TEXT[o['eta_source']])}, "
        f"{'including' if o['include_censored'] else 'leaving out'} censored slices.</p>"
    )


def render_html(doc: dict[str, Any], optima: pd.DataFrame, figs: list[Figure]) -> str:
    """The self-contained report (figures embedded as base64 PNG)."""
    title = html.escape(doc.get("title") or "sweep")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Scaling analysis: {title}</title>",
        f"<style>{_CSS}</style></head><body><h1>Scaling analysis: {title}</h1>",
        _intro(doc),
    ]
    if doc["warnings"]:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in doc["warnings"])
        parts.append(
            f"<div class='warn'><b>Warnings ({len(doc['warnings'])})</b><ul>{items}</ul></div>"
        )
    else:
        parts.append("<p>No warnings.</p>")
    parts += ["<h2>Scaling laws</h2>", _laws_section(doc)]
    parts += ["<h2>Censored</h2>", _censored_section(doc)]
    parts += [
        "<h2>Norm transfer: optimal log2 output norm x0</h2>",
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
        cols = ["model", "layout", "tokens", "batch_size_star", "lr_star", "y0", "x0", "censored"]
        parts += ["<h2>Optimal batch size B*(D)</h2>", bs[cols].to_html(index=False,
                  float_format="%.4g", na_rep="-")]  # fmt: skip
    parts += _extra_sections(doc)
    parts.append("<h2>Figures</h2>")
    for f in figs:
        b64 = base64.b64encode(f.png).decode()
        parts.append(
            f"<h3>{html.escape(f.heading)}</h3><img alt='{html.escape(f.heading)}' "
            f"src='data:image/png;base64,{b64}'>"
        )
    parts.append(_optima_table(optima))
    parts.append("</body></html>")
    return "\n".join(parts)


def _extra_sections(doc: dict[str, Any]) -> list[str]:
    from sweeper.analysis import law_report

    out = []
    if "width" in doc:
        out.append(law_report.width_section(doc["width"]))
    if "schedule_law" in doc:
        out.append(law_report.schedule_section(doc["schedule_law"]))
    return out


def _optima_table(optima: pd.DataFrame) -> str:
    cols = [
        *("model", "layout", "tokens", "batch_size", "status", "x0", "x0_lo", "x0_hi", "y0"),
        *("lr_star", "lr_star_interp", "lr_argmin", "edge", "censored", "gap", "noise"),
        *("n_valid", "boot_valid"),
    ]
    shown = optima[[c for c in cols if c in optima.columns]]
    note = "" if len(shown) <= 300 else f" (first 300 of {len(shown)}; all in optima.parquet)"
    table = str(shown.head(300).to_html(index=False, float_format="%.4g", na_rep="-"))
    return f"<h2>Optima per slice{note}</h2>" + table
