"""Scaling laws fitted to the per-slice optima, and the norm-transfer check.

* ``log2 eta* = alpha log2 B + beta log2 D + gamma`` (OLS, statsmodels), per model and pooled;
* ``B*(D) = argmin_B y0(B, D)`` and ``B* = a D^b`` (OLS of log2 B* on log2 D);
* ``eta*(D)`` at ``B*(D)``: the law's exponent ``alpha b + beta``;
* the norm-transfer check: the spread of the optimal norm x0 across D and across models.

Each law is fitted twice: to the optima interpolated between grid points (the headline by default:
its intervals cover the planted exponents, see ``docs/analysis.md``) and to the grid-rounded optima
(the paper's rule), side by side. Slices whose optimum is not bracketed (eta* at the slice's own
edge, or the vertex outside its points) and horizons whose B* is on the edge of the batch grid are
censored: left out of the laws by default and listed. A law the data cannot identify (too few
points, a regressor that does not vary, fewer than two distinct interior B*, zero residual
variance) is reported as not identified, with NaN coefficients and the reason, never as +- 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm

ETA_SOURCES = ("log2_lr_star", "log2_lr_star_interp")
B_SOURCES = {"log2_lr_star": "log2_B_star", "log2_lr_star_interp": "log2_B_star_interp"}
_WHAT_VARIES = {
    "alpha": "log2 B (a single batch size)",
    "beta": "log2 D (a single horizon)",
    "b": "log2 D (a single horizon)",
}


def not_identified(n: int, names: list[str], reason: str) -> dict[str, Any]:
    """A law the data cannot identify: NaN coefficients and the reason."""
    nan = float("nan")
    return {
        "n": int(n),
        "identified": False,
        "reason": reason,
        "r2": None,
        "coef": {k: nan for k in names},
        "se": {k: nan for k in names},
        "ci": {k: [nan, nan] for k in names},
    }


def ols(y: np.ndarray, cols: dict[str, np.ndarray], const: str = "const") -> dict[str, Any]:
    """OLS of ``y`` on named regressors plus an intercept (named ``const``).

    Returns:
        ``{"n", "identified", "reason", "se_type", "r2", "coef": {name: value}, "se": {...},
        "ci": {name: [lo, hi]}}``: OLS coefficients (the paper's fit) with HC3 standard errors and
        t-based 95 % intervals; not identified (NaN, with the reason) when there are no more points
        than coefficients, a regressor does not vary, or the residual variance is zero.
    """
    names = [*cols, const]
    y = np.asarray(y, dtype=float)
    x = np.column_stack([np.asarray(v, dtype=float) for v in cols.values()])
    ok = np.isfinite(y) & np.isfinite(x).all(axis=1)
    y, x = y[ok], x[ok]
    n, p = len(y), len(cols) + 1
    for j, name in enumerate(cols):
        if n and np.ptp(x[:, j]) == 0:
            what = _WHAT_VARIES.get(name, name)
            return not_identified(n, names, f"{what} does not vary")
    if n <= p:
        return not_identified(n, names, f"{n} points for {p} coefficients")
    design = np.column_stack([x, np.ones(n)])
    if np.linalg.matrix_rank(design) < p:
        return not_identified(n, names, "the regressors are collinear")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sm.OLS(y, design).fit()
        scale = math.sqrt(max(float(res.ssr), 0.0) / (n - p))
        if scale <= 1e-9 * max(1.0, float(np.abs(y).max())):
            return not_identified(
                n, names, "zero residual variance: the points lie exactly on the law (grid values?)"
            )
        # HC3 (heteroscedasticity-robust) errors: the optima's noise differs between slices (it
        # falls with B); a point of leverage 1 leaves HC3 undefined, and plain OLS errors are used.
        se_type = "HC3" if float(res.get_influence().hat_matrix_diag.max()) < 1 - 1e-9 else "OLS"
        if se_type == "HC3":
            res = sm.OLS(y, design).fit(cov_type="HC3", use_t=True)
        ci = res.conf_int(0.05)
    r2 = float(res.rsquared)
    return {
        "n": int(n),
        "identified": True,
        "reason": None,
        "se_type": se_type,
        "r2": r2 if math.isfinite(r2) else None,
        "coef": {k: float(v) for k, v in zip(names, res.params, strict=True)},
        "se": {k: float(v) for k, v in zip(names, res.bse, strict=True)},
        "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in zip(names, ci, strict=True)},
    }


def usable(optima: pd.DataFrame, include_censored: bool = False) -> pd.DataFrame:
    """The slices the laws are fitted on: status ``ok`` and, by default, not censored."""
    ok = optima[optima["status"] == "ok"]
    return ok if include_censored else ok[ok["censored"] == ""]


def lr_law(
    optima: pd.DataFrame, source: str = "log2_lr_star_interp", include_censored: bool = False
) -> dict[str, Any]:
    """``log2 eta* = alpha log2 B + beta log2 D + gamma`` over the usable slices of ``optima``."""
    ok = usable(optima, include_censored)
    fit = ols(ok[source].to_numpy(), {"alpha": ok["log2_B"], "beta": ok["log2_D"]}, "gamma")
    n_cens = int((optima["status"] == "ok").sum()) - len(ok)
    return fit | {"eta_source": source, "n_censored": n_cens}


def batch_star(optima: pd.DataFrame) -> pd.DataFrame:
    """B*(D) per (model, layout, D): the argmin over B of y0, with a parabola-refined log2 B*.

    Columns: ``model, layout, tokens, log2_D, batch_size_star, log2_B_star, log2_B_star_interp,
    y0, x0, lr_star, log2_lr_star, log2_lr_star_interp, n_batch, edge_batch, censored``.
    ``edge_batch`` is ``low``/``high`` when B* is the smallest/largest batch size with an optimum at
    that D; such a B* (and one from a single batch size) is censored.
    """
    ok = optima[optima["status"] == "ok"]
    rows = []
    for (model, layout, tokens), g in ok.groupby(["model", "layout", "tokens"], sort=True):
        g = g.sort_values("log2_B")
        i = int(np.argmin(g["y0"].to_numpy()))
        best = g.iloc[i]
        edge = "" if len(g) == 1 else "low" if i == 0 else "high" if i == len(g) - 1 else ""
        bmin, bmax = int(g["batch_size"].iloc[0]), int(g["batch_size"].iloc[-1])
        censored = (
            "a single batch size"
            if len(g) == 1
            else f"B* = {int(best['batch_size'])} is the "
            + ("smallest" if edge == "low" else "largest")
            + f" batch size tried ({bmin}..{bmax})"
            if edge
            else ""
        )
        rows.append(
            {
                "model": model,
                "layout": layout,
                "tokens": int(tokens),
                "log2_D": float(best["log2_D"]),
                "batch_size_star": int(best["batch_size"]),
                "log2_B_star": float(best["log2_B"]),
                "log2_B_star_interp": _refine_argmin(g["log2_B"].to_numpy(), g["y0"].to_numpy(), i),
                "y0": float(best["y0"]),
                "x0": float(best["x0"]),
                **{c: float(best[c]) for c in ("lr_star", *ETA_SOURCES)},
                "n_batch": len(g),
                "edge_batch": edge,
                "censored": censored,
            }
        )
    return pd.DataFrame(rows)


def _refine_argmin(x: np.ndarray, y: np.ndarray, i: int) -> float:
    """Vertex of the parabola through the argmin and its two neighbours (the argmin at an edge)."""
    if i == 0 or i == len(x) - 1 or len(x) < 3:
        return float(x[i])
    xs, ys = x[i - 1 : i + 2], y[i - 1 : i + 2]
    a, b, _ = np.polyfit(xs, ys, 2)
    if a <= 0:
        return float(x[i])
    return float(np.clip(-b / (2 * a), xs[0], xs[-1]))


def batch_law(
    bstar: pd.DataFrame, column: str = "log2_B_star_interp", include_censored: bool = False
) -> dict[str, Any]:
    """``B* = a D^b``: OLS of log2 B* on log2 D; ``a`` is reported as ``2^log2_a``.

    Not identified with a single batch size, or fewer than 2 distinct interior B* (a B* on the edge
    of the batch grid says only that the optimum lies beyond it).
    """
    names = ["b", "log2_a"]
    extra = {"b_source": column, "n_censored": 0}
    if bstar.empty:
        return not_identified(0, names, "no horizon has an optimum") | extra
    if (bstar["n_batch"] <= 1).all():
        return not_identified(len(bstar), names, "a single batch size: B* is not measured") | extra
    use = bstar if include_censored else bstar[bstar["censored"] == ""]
    extra["n_censored"] = len(bstar) - len(use)
    interior = bstar[bstar["edge_batch"] == ""]
    distinct = interior[column].round(9).nunique()
    if distinct < 2 and not include_censored:
        n_edge = int((bstar["edge_batch"] != "").sum())
        why = (
            f"fewer than 2 distinct interior B* ({distinct}); B* is on the edge of the batch "
            f"grid at {n_edge} of {len(bstar)} horizons"
        )
        return not_identified(len(use), names, why) | extra
    fit = ols(use[column].to_numpy(), {"b": use["log2_D"].to_numpy()}, "log2_a")
    fit["a"] = 2.0 ** fit["coef"]["log2_a"]
    return fit | extra


def eta_vs_data(lr: dict[str, Any], bl: dict[str, Any]) -> dict[str, Any]:
    """Exponent of eta*(D) at B*(D): ``alpha b + beta``, with a delta-method standard error.

    The two fits are treated as independent (they share the optima, so the error is approximate).
    """
    if not lr["identified"] or not bl["identified"]:
        which = "the learning-rate law" if not lr["identified"] else "the batch-size law"
        return {"identified": False, "reason": f"{which} is not identified"}
    al, be, b = lr["coef"]["alpha"], lr["coef"]["beta"], bl["coef"]["b"]
    se = math.sqrt((b * lr["se"]["alpha"]) ** 2 + (al * bl["se"]["b"]) ** 2 + lr["se"]["beta"] ** 2)
    return {"identified": True, "exponent": al * b + be, "se": se}


def _stats(v: pd.Series) -> dict[str, Any]:
    v = v.dropna()
    if v.empty:
        return {"n": 0}
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def norm_transfer(optima: pd.DataFrame, bstar: pd.DataFrame) -> dict[str, Any]:
    """Spread of the optimal log2 norm x0 over the slices given, per model, per D, and at B*(D)."""
    return {
        "all": _stats(optima["x0"]),
        "at_batch_star": _stats(bstar["x0"]) if not bstar.empty else {"n": 0},
        "per_model": {str(m): _stats(g["x0"]) for m, g in optima.groupby("model")},
        "per_model_at_batch_star": {str(m): _stats(g["x0"]) for m, g in bstar.groupby("model")}
        if not bstar.empty
        else {},
        "per_tokens": {str(int(t)): _stats(g["x0"]) for t, g in optima.groupby("tokens")},
    }


def layouts_summary(optima: pd.DataFrame) -> dict[str, Any]:
    """Per-group LR layouts: best y0 of each layout per (model, D, B), and how often each wins."""
    ok = optima[optima["status"] == "ok"]
    if ok["layout"].nunique() < 2:
        return {}
    out: dict[str, Any] = {"slices": [], "wins": {}}
    for (model, tokens, batch), g in ok.groupby(["model", "tokens", "batch_size"]):
        g = g.sort_values("y0")
        out["slices"].append(
            {
                "model": model,
                "tokens": int(tokens),
                "batch_size": int(batch),
                "best_layout": g["layout"].iloc[0],
                "y0": {lay: float(v) for lay, v in zip(g["layout"], g["y0"], strict=True)},
            }
        )
        out["wins"][g["layout"].iloc[0]] = out["wins"].get(g["layout"].iloc[0], 0) + 1
    return out


def fit_all(
    optima: pd.DataFrame, eta_source: str = "log2_lr_star_interp", include_censored: bool = False
) -> dict[str, Any]:
    """Every law per (model, layout) series and pooled over models (per layout).

    Returns:
        ``{"series", "pooled", "norm_transfer", "layouts", "batch_star"}``. Each series holds
        ``lr_law`` (fitted to ``eta_source``, the headline), ``lr_law_alt`` (to the other eta*),
        ``batch_law`` (on the B* matching ``eta_source``: parabola-refined for the interpolated
        eta*, the argmin for the grid one), ``batch_law_alt`` (the other B*) and ``eta_vs_data``;
        ``batch_star`` is the B*(D) frame.
    """
    bstar = batch_star(optima)
    series, pooled = [], []
    for (model, layout), g in optima.groupby(["model", "layout"], sort=True):
        bs = bstar[(bstar["model"] == model) & (bstar["layout"] == layout)]
        laws = _laws(g, bs, eta_source, include_censored)
        series.append({"model": model, "layout": layout, **laws})
    for layout, g in optima.groupby("layout", sort=True):
        bs = bstar[bstar["layout"] == layout]
        laws = _laws(g, bs, eta_source, include_censored)
        pooled.append({"model": "*", "layout": layout, **laws})
    nt_slices = usable(optima, include_censored)
    nt_bstar = bstar if include_censored or bstar.empty else bstar[bstar["censored"] == ""]
    return {
        "series": series,
        "pooled": pooled,
        "norm_transfer": norm_transfer(nt_slices, nt_bstar),
        "layouts": layouts_summary(optima),
        "batch_star": bstar,
    }


def _laws(
    opt: pd.DataFrame, bstar: pd.DataFrame, eta_source: str, include_censored: bool
) -> dict[str, Any]:
    other = [src for src in ETA_SOURCES if src != eta_source][0]
    lr = lr_law(opt, eta_source, include_censored)
    bl = batch_law(bstar, B_SOURCES[eta_source], include_censored)
    return {
        "n_slices": int((opt["status"] == "ok").sum()),
        "lr_law": lr,
        "lr_law_alt": lr_law(opt, other, include_censored),
        "batch_law": bl,
        "batch_law_alt": batch_law(bstar, B_SOURCES[other], include_censored),
        "eta_vs_data": eta_vs_data(lr, bl),
    }
