"""The report's figures (matplotlib, Agg backend). Each function returns PNG bytes.

Figures per (model, layout) series: the loss over (log2 eta, log2 B) per D with the optima marked;
loss against log2 output norm per B with the fitted parabolas, per D; eta* against B and D with the
fitted law; output norm against tokens (needs the per-step metrics). Across series: B* against D
with the fitted law, and the optimal norm x0 against D (the norm-transfer check).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

_DPI = 90


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # The figures use constrained layout; bbox_inches="tight" would draw everything a second time.
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    return buf.getvalue()


def _panels(n: int, ncols: int = 3, size: float = 3.6) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size * ncols, size * 0.85 * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted cell centres (half-way between neighbours)."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def _title(model: str, layout: str) -> str:
    return model if layout == "1:1:1" else f"{model} (layout {layout})"


def loss_surface(
    pts: pd.DataFrame, optima: pd.DataFrame, bstar: pd.DataFrame, model: str, layout: str
) -> bytes:
    """Loss above the best at each D over (log2 eta, log2 B), one panel per D.

    Marks eta* per B (x) and the best (B, eta) (star). Showing the excess over each D's best loss
    lets all panels share one colour scale.
    """
    tokens = sorted(pts["tokens"].unique())
    fig, axes = _panels(len(tokens))
    excess = pts["y"] - pts.groupby("tokens")["y"].transform("min")
    vmax = float(np.nanpercentile(excess, 50)) if excess.notna().any() else 1.0
    sc = None
    for ax, d in zip(axes, tokens, strict=True):
        p = pts[pts["tokens"] == d].assign(excess=excess)
        grid = p.pivot_table(index="batch_size", columns="log2_lr", values="excess", aggfunc="mean")
        sc = ax.pcolormesh(
            _edges(grid.columns.to_numpy(dtype=float)),
            _edges(np.log2(grid.index.to_numpy(dtype=float))),
            np.ma.masked_invalid(grid.to_numpy(dtype=float)),
            cmap="viridis_r",
            vmin=0.0,
            vmax=max(vmax, 1e-6),
        )
        o = optima[(optima["tokens"] == d) & (optima["status"] == "ok")]
        ax.plot(o["log2_lr_star"], o["log2_B"], "wx", ms=7, mew=2, label="eta* per B")
        b = bstar[bstar["tokens"] == d]
        if not b.empty:
            ax.plot(b["log2_lr_star"], b["log2_B_star"], "r*", ms=14, label="best (B, eta)")
        ax.set_title(f"D = 2^{math.log2(d):g}")
        ax.set_xlabel("log2 eta")
        ax.set_ylabel("log2 B")
    axes[0].legend(loc="upper left", fontsize=7)
    if sc is not None:
        fig.colorbar(sc, ax=axes, shrink=0.6, label="loss - best loss at D")
    fig.suptitle(f"{_title(model, layout)}: loss over (eta, B)")
    return _png(fig)


def norm_parabolas(pts: pd.DataFrame, optima: pd.DataFrame, model: str, layout: str) -> bytes:
    """Loss against log2 output norm per B (colour), fitted parabola and vertex, one panel per D."""
    tokens = sorted(pts["tokens"].unique())
    batches = sorted(pts["batch_size"].unique())
    cmap = plt.get_cmap("plasma")
    # stop short of plasma's pale yellow end, which is unreadable on white
    colours = [cmap(0.85 * j / max(len(batches) - 1, 1)) for j in range(len(batches))]
    fig, axes = _panels(len(tokens))
    for ax, d in zip(axes, tokens, strict=True):
        vertices = []
        for j, bsz in enumerate(batches):
            p = pts[(pts["tokens"] == d) & (pts["batch_size"] == bsz)]
            if p.empty:
                continue
            col = colours[j]
            ax.plot(p["x"], p["y"], "o", ms=3, color=col, alpha=0.6, label=f"B={bsz}")
            o = optima[(optima["tokens"] == d) & (optima["batch_size"] == bsz)]
            if o.empty or o["status"].iloc[0] != "ok":
                continue
            r = o.iloc[0]
            xs = np.linspace(r["x_fit_lo"], r["x_fit_hi"], 50)
            ax.plot(xs, r["a"] * xs**2 + r["b"] * xs + r["c"], "-", color=col, lw=1.2)
            ax.plot([r["x0"]], [r["y0"]], "k+", ms=8)
            vertices.append(float(r["y0"]))
        fin = pts[(pts["tokens"] == d)]["y"]
        if fin.notna().any():
            # keep every vertex in view: with c fixed the vertex can sit below all the points
            lo = min([float(fin.min()), *[v for v in vertices if math.isfinite(v)]])
            ax.set_ylim(lo - 0.05 * abs(lo), lo + max(0.6, 0.25 * abs(lo)))
        ax.set_title(f"D = 2^{math.log2(d):g}")
        ax.set_xlabel("log2 ||W_out||_(RMS->inf)")
        ax.set_ylabel("loss")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{_title(model, layout)}: loss against output norm, fitted parabolas (+ vertex)")
    return _png(fig)


def lr_law(optima: pd.DataFrame, fit: dict[str, Any], model: str, layout: str) -> bytes:
    """eta* against B (one line per D) and against D (one line per B), with the fitted law.

    Censored slices (eta* not bracketed) are drawn hollow: the law leaves them out by default.
    """
    ok = optima[optima["status"] == "ok"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    coef = fit["coef"] if fit.get("identified") else None
    src = fit.get("eta_source", "log2_lr_star_interp")
    for ax, (col, other, xlab) in zip(
        (a1, a2), (("log2_B", "log2_D", "log2 B"), ("log2_D", "log2_B", "log2 D")), strict=True
    ):
        groups = sorted(ok[other].unique())
        cmap = plt.get_cmap("viridis", max(len(groups), 2))
        for j, v in enumerate(groups):
            g = ok[ok[other] == v].sort_values(col)
            used = g["censored"] == ""
            ax.plot(g.loc[used, col], g.loc[used, src], "o", color=cmap(j), ms=4,
                    label=f"{other[5:]}=2^{v:g}")  # fmt: skip
            ax.plot(g.loc[~used, col], g.loc[~used, src], "o", mfc="none", color=cmap(j), ms=5)
            ax.errorbar(g[col], g[src], yerr=_yerr(g, src), fmt="none", ecolor=cmap(j), alpha=0.5)
            if coef:
                xs = np.array([g[col].min(), g[col].max()])
                ys = coef["gamma"] + (
                    coef["alpha"] * xs + coef["beta"] * v
                    if col == "log2_B"
                    else coef["alpha"] * v + coef["beta"] * xs
                )
                ax.plot(xs, ys, "-", color=cmap(j), lw=1)
        ax.set_xlabel(xlab)
        ax.set_ylabel("log2 eta*")
        ax.legend(fontsize=6, ncol=2)
    if coef:
        se = fit["se"]
        fig.suptitle(
            f"{_title(model, layout)}: log2 eta* = {coef['alpha']:.3f}({se['alpha']:.3f}) log2 B "
            f"{coef['beta']:+.3f}({se['beta']:.3f}) log2 D {coef['gamma']:+.2f} "
            "(hollow: censored)"
        )
    else:
        fig.suptitle(f"{_title(model, layout)}: eta* (law not identified: {fit.get('reason')})")
    return _png(fig)


def _yerr(g: pd.DataFrame, src: str) -> np.ndarray | None:
    if "log2_lr_star_lo" not in g or g["log2_lr_star_lo"].isna().all():
        return None
    lo = (g[src] - g["log2_lr_star_lo"]).clip(lower=0).fillna(0)
    hi = (g["log2_lr_star_hi"] - g[src]).clip(lower=0).fillna(0)
    return np.vstack([lo, hi])


def batch_star(bstar: pd.DataFrame, series: Sequence[dict[str, Any]]) -> bytes:
    """B*(D) per series (argmin and parabola-refined) with the fitted law B* = a D^b."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for j, s in enumerate(series):
        b = bstar[(bstar["model"] == s["model"]) & (bstar["layout"] == s["layout"])]
        if b.empty:
            continue
        col = cmap(j % 10)
        lab = _title(s["model"], s["layout"])
        edge = b["edge_batch"] != ""
        ax.plot(b["log2_D"], b["log2_B_star"], "o", color=col, label=f"{lab}: argmin")
        ax.plot(b.loc[edge, "log2_D"], b.loc[edge, "log2_B_star"], "s", mfc="none", color="r", ms=9)
        ax.plot(b["log2_D"], b["log2_B_star_interp"], "x", color=col, alpha=0.7)
        fit = s["batch_law"]
        if fit["identified"]:
            xs = np.array([b["log2_D"].min(), b["log2_D"].max()])
            ax.plot(
                xs,
                fit["coef"]["log2_a"] + fit["coef"]["b"] * xs,
                "-",
                color=col,
                label=f"b = {fit['coef']['b']:.3f} +- {fit['se']['b']:.3f}",
            )
    ax.set_xlabel("log2 D (tokens)")
    ax.set_ylabel("log2 B*")
    ax.set_title("Optimal batch size B*(D): o argmin, x refined, red square on the grid's edge")
    ax.legend(fontsize=7)
    return _png(fig)


def norm_transfer(optima: pd.DataFrame, nt: dict[str, Any]) -> bytes:
    """Optimal norm x0 against D, per model and B, with the mean +- std band of ``nt``."""
    ok = optima[(optima["status"] == "ok") & (optima["censored"] == "")]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for j, (model, g) in enumerate(ok.groupby("model")):
        jitter = (g["log2_B"] - g["log2_B"].mean()) * 0.03
        ax.errorbar(
            g["log2_D"] + jitter,
            g["x0"],
            yerr=np.vstack(
                [(g["x0"] - g["x0_lo"]).clip(lower=0), (g["x0_hi"] - g["x0"]).clip(lower=0)]
            )
            if g["x0_lo"].notna().any()
            else None,
            fmt="o",
            ms=3,
            color=cmap(j % 10),
            alpha=0.7,
            label=model,
        )
    a = nt.get("all", {})
    if a.get("n"):
        ax.axhline(a["mean"], color="k", lw=1)
        ax.axhspan(a["mean"] - a["std"], a["mean"] + a["std"], color="k", alpha=0.1)
        ax.set_title(f"Norm transfer: x0 = {a['mean']:.2f} +- {a['std']:.2f} (n = {a['n']})")
    ax.set_xlabel("log2 D (tokens)")
    ax.set_ylabel("optimal log2 ||W_out||")
    ax.legend(fontsize=7)
    return _png(fig)


def norm_growth(
    metrics: pd.DataFrame, runs: pd.DataFrame, x0: float | None, model: str, layout: str
) -> bytes:
    """Output norm against tokens, one panel per B, one curve per run coloured by log2 eta."""
    m = metrics[metrics["metric"] == "output_norm"].merge(runs, on="run_id", how="inner")
    m = m[(m["tokens"] > 0) & (m["value"] > 0)]
    batches = sorted(m["batch_size"].unique())
    if len(batches) > 6:  # keep the figure readable: spread six batch sizes over the range
        batches = [batches[i] for i in np.linspace(0, len(batches) - 1, 6).round().astype(int)]
    fig, axes = _panels(max(len(batches), 1))
    lo, hi = (np.log2(m["lr"].min()), np.log2(m["lr"].max())) if len(m) else (0, 1)
    norm = Normalize(lo, hi)
    for ax, bsz in zip(axes, batches, strict=False):
        g = m[m["batch_size"] == bsz].sort_values(["run_id", "tokens"])
        segs, cols = [], []
        for _, r in g.groupby("run_id", sort=False):
            segs.append(np.column_stack([np.log2(r["tokens"]), np.log2(r["value"])]))
            cols.append(np.log2(r["lr"].iloc[0]))
        lc = LineCollection(segs, array=np.asarray(cols), cmap="coolwarm", norm=norm, lw=0.8)
        ax.add_collection(lc)
        ax.autoscale()
        if x0 is not None and math.isfinite(x0):
            ax.axhline(x0, color="k", ls="--", lw=1)
        ax.set_title(f"B = {bsz}")
        ax.set_xlabel("log2 tokens")
        ax.set_ylabel("log2 ||W_out||")
        fig.colorbar(lc, ax=ax, shrink=0.8, label="log2 eta")
    fig.suptitle(f"{_title(model, layout)}: output norm growth (dashed: optimal norm)")
    return _png(fig)


def _batch_colours(batches: Sequence[Any]) -> list[Any]:
    cmap = plt.get_cmap("plasma")
    # stop short of plasma's pale yellow end, which is unreadable on white
    return [cmap(0.85 * j / max(len(batches) - 1, 1)) for j in range(len(batches))]


def loss_vs_lr(
    pts: pd.DataFrame, optima: pd.DataFrame, eta_col: str, model: str, layout: str
) -> bytes:
    """Loss against log2 eta, one panel per D and one line per B, the optimum of each marked.

    The star is the fitted optimum (``eta_col``, y0); a hollow star marks a censored slice, whose
    optimum is not bracketed by its rates.
    """
    tokens = sorted(pts["tokens"].unique())
    batches = sorted(pts["batch_size"].unique())
    colours = _batch_colours(batches)
    fig, axes = _panels(len(tokens))
    for ax, d in zip(axes, tokens, strict=True):
        lows: list[float] = []
        curve_lows: list[float] = []
        for j, bsz in enumerate(batches):
            p = pts[(pts["tokens"] == d) & (pts["batch_size"] == bsz)].sort_values("log2_lr")
            p = p[np.isfinite(p["y"])]
            if p.empty:
                continue
            ax.plot(p["log2_lr"], p["y"], "o-", ms=3, lw=1, color=colours[j], label=f"B={bsz}")
            lows.append(float(p["y"].min()))
            curve_lows.append(float(p["y"].min()))
            o = optima[(optima["tokens"] == d) & (optima["batch_size"] == bsz)]
            if o.empty or o["status"].iloc[0] != "ok":
                continue
            r = o.iloc[0]
            hollow = r["censored"] != ""
            ax.plot([r[eta_col]], [r["y0"]], "*", ms=12, color=colours[j], mec="k",
                    mfc="none" if hollow else colours[j])  # fmt: skip
            lows.append(float(r["y0"]))
        if lows:
            # every curve's valley and every star in view, with half a unit of loss above
            lo, top = min(lows), max(curve_lows)
            ax.set_ylim(lo - 0.03 * abs(lo), top + max(0.5, 0.2 * abs(top)))
        ax.set_title(f"D = 2^{math.log2(d):g} tokens")
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel("loss")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"{_title(model, layout)}: loss against learning rate per batch size "
        "(star: fitted optimum; hollow: censored)"
    )
    return _png(fig)


def fit_quality(optima: pd.DataFrame, model: str, layout: str, gap_sigmas: float = 3.0) -> bytes:
    """Per slice: how far the vertex lies below the lowest fitted loss, and the residual scale.

    One panel per D, against log2 B: the gap y_min - y0 (o; red where flagged), the flag's
    threshold (grid allowance + ``gap_sigmas`` x noise, dashed), the residual RMS of the fit (x)
    and the noise scale of the points (+).
    """
    ok = optima[optima["status"] == "ok"]
    tokens = sorted(ok["tokens"].unique()) or sorted(optima["tokens"].unique())
    fig, axes = _panels(max(len(tokens), 1))
    for ax, d in zip(axes, tokens, strict=False):
        g = ok[ok["tokens"] == d].sort_values("log2_B")
        thr = g["gap_allowance"] + gap_sigmas * g["noise"]
        ax.plot(g["log2_B"], g["gap"], "o", color="tab:blue", label="lowest loss - y0")
        bad = g["below_data"].astype(bool)
        ax.plot(g.loc[bad, "log2_B"], g.loc[bad, "gap"], "o", color="tab:red", label="flagged")
        ax.plot(
            g["log2_B"], thr, "--", color="0.4", lw=1, label=f"allowance + {gap_sigmas:g} noise"
        )
        ax.plot(g["log2_B"], g["resid_rms"], "x", color="tab:green", label="residual RMS")
        ax.plot(g["log2_B"], g["noise"], "+", color="tab:purple", label="noise of the points")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"D = 2^{math.log2(d):g} tokens")
        ax.set_xlabel("log2 B")
        ax.set_ylabel("loss")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{_title(model, layout)}: fit quality per slice")
    return _png(fig)
