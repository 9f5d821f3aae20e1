"""Scaling laws fitted to the per-slice optima, and the norm-transfer check.

* ``log2 eta* = alpha log2 B + beta log2 D + gamma`` (OLS, statsmodels), per model and pooled;
* ``B*(D) = argmin_B y0(B, D)`` and ``B* = a D^b`` (OLS of log2 B* on log2 D);
* ``eta*(D)`` at ``B*(D)``: the measured optimum of that slice and the law's exponent
  ``alpha b + beta``;
* the norm-transfer check: the spread of the optimal norm x0 across D and across models.

Every fit reports coefficients, standard errors, 95 % intervals, R^2 and the number of points; a fit
with too few points reports why instead of raising.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm

ETA_SOURCES = ("log2_lr_star", "log2_lr_star_interp")


def ols(y: np.ndarray, cols: dict[str, np.ndarray]) -> dict[str, Any]:
    """OLS of ``y`` on named regressors plus an intercept (``const``).

    Returns:
        ``{"n", "r2", "coef": {name: value}, "se": {...}, "ci": {name: [lo, hi]}}``, or
        ``{"n", "error"}`` when there are too few points or the design is singular.
    """
    y = np.asarray(y, dtype=float)
    x = np.column_stack([np.asarray(v, dtype=float) for v in cols.values()])
    ok = np.isfinite(y) & np.isfinite(x).all(axis=1)
    y, x = y[ok], x[ok]
    n, p = len(y), len(cols) + 1
    if n <= p:
        return {"n": n, "error": f"{n} points, need more than {p}"}
    if np.linalg.matrix_rank(np.column_stack([x, np.ones(n)])) < p:
        return {"n": n, "error": "a regressor does not vary"}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # An exact fit (all B* equal, say) makes R^2 0/0; it is reported as null, not warned about.
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit()
        names = ["const", *cols]
        ci = res.conf_int(0.05)
        r2 = float(res.rsquared)
    return {
        "n": int(n),
        "r2": r2 if math.isfinite(r2) else None,
        "coef": {k: float(v) for k, v in zip(names, res.params, strict=True)},
        "se": {k: float(v) for k, v in zip(names, res.bse, strict=True)},
        "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in zip(names, ci, strict=True)},
    }


def lr_law(optima: pd.DataFrame, source: str = "log2_lr_star") -> dict[str, Any]:
    """``log2 eta* = alpha log2 B + beta log2 D + gamma`` over the fitted slices of ``optima``."""
    ok = optima[optima["status"] == "ok"]
    fit = ols(ok[source].to_numpy(), {"alpha": ok["log2_B"], "beta": ok["log2_D"]})
    return _rename_const(fit, "gamma") | {"eta_source": source}


def batch_star(optima: pd.DataFrame) -> pd.DataFrame:
    """B*(D) per (model, layout, D): the argmin over B of y0, with a parabola-refined log2 B*.

    Columns: ``model, layout, tokens, log2_D, batch_size_star, log2_B_star, log2_B_star_interp,
    y0, x0, lr_star, log2_lr_star, log2_lr_star_interp, n_batch, edge_batch``.
    """
    ok = optima[optima["status"] == "ok"]
    rows = []
    for (model, layout, tokens), g in ok.groupby(["model", "layout", "tokens"], sort=True):
        g = g.sort_values("log2_B")
        i = int(np.argmin(g["y0"].to_numpy()))
        best = g.iloc[i]
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
                "lr_star": float(best["lr_star"]),
                "log2_lr_star": float(best["log2_lr_star"]),
                "log2_lr_star_interp": float(best["log2_lr_star_interp"]),
                "n_batch": len(g),
                "edge_batch": i in (0, len(g) - 1),
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


def batch_law(bstar: pd.DataFrame, column: str = "log2_B_star") -> dict[str, Any]:
    """``B* = a D^b``: OLS of log2 B* on log2 D; ``a`` is reported as ``2^intercept``."""
    fit = ols(bstar[column].to_numpy(), {"b": bstar["log2_D"]})
    fit = _rename_const(fit, "log2_a")
    if "coef" in fit:
        fit["a"] = 2.0 ** fit["coef"]["log2_a"]
    return fit | {"b_source": column}


def eta_vs_data(lr: dict[str, Any], bl: dict[str, Any]) -> dict[str, Any]:
    """Exponent of eta*(D) at B*(D): ``alpha b + beta``, with a delta-method standard error.

    The two fits are treated as independent (they share the optima, so the error is approximate).
    """
    if "coef" not in lr or "coef" not in bl:
        return {"error": "needs both the learning-rate law and the batch-size law"}
    al, be, b = lr["coef"]["alpha"], lr["coef"]["beta"], bl["coef"]["b"]
    se = math.sqrt((b * lr["se"]["alpha"]) ** 2 + (al * bl["se"]["b"]) ** 2 + lr["se"]["beta"] ** 2)
    return {"exponent": al * b + be, "se": se}


def norm_transfer(optima: pd.DataFrame, bstar: pd.DataFrame) -> dict[str, Any]:
    """Spread of the optimal log2 norm x0 over all slices, per model, per D, and at B*(D)."""
    ok = optima[optima["status"] == "ok"]

    def stats(v: pd.Series) -> dict[str, Any]:
        v = v.dropna()
        if v.empty:
            return {"n": 0}
        return {
            "n": int(len(v)),
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()),
            "max": float(v.max()),
        }

    return {
        "all": stats(ok["x0"]),
        "at_batch_star": stats(bstar["x0"]) if not bstar.empty else {"n": 0},
        "per_model": {m: stats(g["x0"]) for m, g in ok.groupby("model")},
        "per_model_at_batch_star": {m: stats(g["x0"]) for m, g in bstar.groupby("model")}
        if not bstar.empty
        else {},
        "per_tokens": {str(int(t)): stats(g["x0"]) for t, g in ok.groupby("tokens")},
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


def fit_all(optima: pd.DataFrame, eta_source: str = "log2_lr_star") -> dict[str, Any]:
    """Every law per (model, layout) series and pooled over models (per layout).

    Returns:
        ``{"series", "pooled", "norm_transfer", "layouts", "batch_star"}``. Each series holds
        ``lr_law`` (fitted to ``eta_source``), ``lr_law_alt`` (to the other eta*), ``batch_law``
        (on the argmin B*), ``batch_law_interp`` (on the parabola-refined B*) and
        ``eta_vs_data``; ``batch_star`` is the B*(D) frame.
    """
    bstar = batch_star(optima)
    series = []
    for (model, layout), g in optima.groupby(["model", "layout"], sort=True):
        bs = bstar[(bstar["model"] == model) & (bstar["layout"] == layout)]
        series.append({"model": model, "layout": layout, **_laws(g, bs, eta_source)})
    pooled = []
    for layout, g in optima.groupby("layout", sort=True):
        bs = bstar[bstar["layout"] == layout]
        pooled.append({"model": "*", "layout": layout, **_laws(g, bs, eta_source)})
    return {
        "series": series,
        "pooled": pooled,
        "norm_transfer": norm_transfer(optima, bstar),
        "layouts": layouts_summary(optima),
        "batch_star": bstar,
    }


def _laws(opt: pd.DataFrame, bstar: pd.DataFrame, eta_source: str) -> dict[str, Any]:
    lr = lr_law(opt, eta_source)
    bl = batch_law(bstar, "log2_B_star")
    bli = batch_law(bstar, "log2_B_star_interp")
    other = [src for src in ETA_SOURCES if src != eta_source][0]
    return {
        "n_slices": int((opt["status"] == "ok").sum()),
        "lr_law": lr,
        "lr_law_alt": lr_law(opt, other),
        "batch_law": bl,
        "batch_law_interp": bli,
        "eta_vs_data": eta_vs_data(lr, bl),
    }


def _rename_const(fit: dict[str, Any], name: str) -> dict[str, Any]:
    if "coef" not in fit:
        return fit
    for key in ("coef", "se", "ci"):
        fit[key] = {(name if k == "const" else k): v for k, v in fit[key].items()}
    return fit
