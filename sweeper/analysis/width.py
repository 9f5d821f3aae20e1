"""Per-layer learning-rate exponents across width (Everett et al. 2024, "Scaling Exponents Across
Parameterizations and Optimizers").

The design is a per-group rate scan (``[grid] group_scan``): at each width, one layer group's rate
(``in``: embedding, ``hidden``: the blocks, ``out``: the readout) is varied while the other two
are held. For each (optimizer, family, width, B, D) slice and group:

1. the scan line is the set of runs whose *other* two group rates are equal; the line with the
   most distinct rates of the group is used (ties: the one holding the slice's lowest loss);
2. the loss (``train_loss_smoothed`` when the table has it, else the column asked for; seeds
   averaged) is fitted by least squares with a parabola in log2 eta_group on the ``k`` points
   nearest the minimum; its vertex is log2 eta*_group. A vertex whose best point is the lowest or
   highest rate of the line, or that lies outside the scanned rates, is *edge* (the optimum is not
   bracketed) and left out of the exponent;
3. per (optimizer, family, B, D, group): OLS of log2 eta*_group on log2 width,
   ``log2 eta* = const - c log2 width``, gives the exponent c with a t-based 95 % interval (n - 2
   degrees of freedom: 4 widths give a wide interval, which is the honest answer).

The rates are the table's absolute per-group rates (``lr_in``, ``lr_hidden``, ``lr_out``), so c is
the exponent of the optimal rate itself, whatever exponents the sweep was planned with. Widths come
from a ``width`` or ``d_model`` column, else from the ``-w<width>`` suffix the planner gives the
members of a ``widths = [...]`` family (the family is the name without it).

The report compares c with the prescriptions (:data:`PRESCRIPTIONS`), in the trainer's
parameterisation (no output multiplier): SP as commonly used (one rate for every group, not scaled
with width), muP for Adam (Yang et al. 2022, Tensor Programs V, table 3: hidden and readout rates
~ 1/width, embedding rate constant), and Scion (Pethick et al. 2025), whose operator-norm LMOs
carry the width factors themselves, so its rates are meant to be width-independent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

GROUPS = ("in", "hidden", "out")
RATE_COLS = {g: f"lr_{g}" for g in GROUPS}
PRESCRIPTIONS: dict[str, tuple[float, float, float]] = {
    "SP": (0.0, 0.0, 0.0),
    "muP (Adam)": (0.0, 1.0, 1.0),
    "Scion": (0.0, 0.0, 0.0),
}
SLICE_KEYS = ("optimizer", "family", "width", "batch_size", "tokens")
FIT_KEYS = ("optimizer", "family", "batch_size", "tokens", "group")
_WIDTH_SUFFIX = re.compile(r"^(.*)-w(\d+)$")


@dataclass(frozen=True, kw_only=True)
class WidthOptions:
    """Options of the width analysis: ``k`` points per parabola, the loss column."""

    k: int = 5
    loss: str = "train_loss"


# ------------------------------------------------------------------------------------- input


def with_widths(h: pd.DataFrame) -> pd.DataFrame | None:
    """The horizons rows with ``family``, ``width`` and ``optimizer`` columns; None when the table
    has no per-group rates or fewer than two widths in every family."""
    if not set(RATE_COLS.values()) <= set(h.columns) or h.empty:
        return None
    df = h.copy()
    names = df["model"].astype(str)
    parsed = names.str.extract(_WIDTH_SUFFIX)
    if "width" in df.columns:
        width = pd.to_numeric(df["width"], errors="coerce")
    elif "d_model" in df.columns:
        width = pd.to_numeric(df["d_model"], errors="coerce")
    else:
        width = pd.to_numeric(parsed[1], errors="coerce")
    df["width"] = width
    df["family"] = df["family"].astype(str) if "family" in df.columns else parsed[0].fillna(names)
    opt = df["optimizer"] if "optimizer" in df.columns else pd.Series("all", index=df.index)
    df["optimizer"] = opt.fillna("all").astype(str)
    df = df.dropna(subset=["width", *RATE_COLS.values()])
    df = df[(df["width"] > 0) & (df[list(RATE_COLS.values())] > 0).all(axis=1)]
    if df.empty or df.groupby(["optimizer", "family"])["width"].nunique().max() < 2:
        return None
    return df


def _loss_col(df: pd.DataFrame, loss: str) -> str:
    smoothed = f"{loss}_smoothed"
    if smoothed in df.columns and df[smoothed].notna().any():
        return smoothed
    return loss


# ---------------------------------------------------------------------------- per-group eta*


def scan_line(s: pd.DataFrame, group: str, loss: str) -> pd.DataFrame:
    """The rows of the slice that vary ``group``'s rate with the other two held, seed-averaged:
    columns ``x`` (log2 rate of the group) and ``y`` (loss), sorted by x."""
    others = [RATE_COLS[g] for g in GROUPS if g != group]
    ok = s[loss].notna().to_numpy()
    if not ok.any():
        return pd.DataFrame(columns=["x", "y", "n"])
    y = s[loss].to_numpy(float)[ok]
    x = np.round(np.log2(s[RATE_COLS[group]].to_numpy(float)[ok]), 6)
    held = np.round(np.log2(s[others].to_numpy(float)[ok]), 4)
    keys, line_of = np.unique(held, axis=0, return_inverse=True)
    line_of = line_of.ravel()
    best = int(np.argmin(y))
    # the line with the most distinct rates of the group; ties: the one with the lowest loss
    scores = [(len(np.unique(x[line_of == i])), line_of[best] == i) for i in range(len(keys))]
    pick = line_of == max(range(len(keys)), key=lambda i: scores[i])
    xs, inv = np.unique(x[pick], return_inverse=True)
    n = np.bincount(inv.ravel(), minlength=len(xs))
    ys = np.bincount(inv.ravel(), weights=y[pick], minlength=len(xs)) / n
    return pd.DataFrame({"x": xs, "y": ys, "n": n})


def vertex_fit(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, Any]:
    """Least-squares parabola in x on the ``k`` points nearest the minimum: its vertex, the
    delta-method standard error of the vertex (NaN with no residual degrees of freedom), and the
    status (``ok``; ``edge``: best point at the end of the line, or vertex outside the scanned
    rates; ``not convex``; ``few points``)."""
    from sweeper.analysis.optimum import select_points

    out: dict[str, Any] = {"x0": math.nan, "x0_se": math.nan, "status": "few points",
                           "n_points": len(x), "x_argmin": math.nan}  # fmt: skip
    if len(x) < 3:
        return out
    i_min = int(np.argmin(y))
    out["x_argmin"] = float(x[i_min])
    sel = select_points(x, y, k)
    xs, ys = x[sel], y[sel]
    design = np.column_stack([xs * xs, xs, np.ones_like(xs)])
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    a, b = float(coef[0]), float(coef[1])
    if a <= 0:
        out["status"] = "not convex"
        return out
    out["x0"] = -b / (2 * a)
    dof = len(xs) - 3
    if dof > 0:
        s2 = float(np.sum((design @ coef - ys) ** 2)) / dof
        cov = s2 * np.linalg.pinv(design.T @ design)
        grad = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])
        out["x0_se"] = float(math.sqrt(max(0.0, float(grad @ cov @ grad))))
    outside = not float(x.min()) <= out["x0"] <= float(x.max())
    out["status"] = "edge" if i_min in (0, len(x) - 1) or outside else "ok"
    return out


def group_optima(df: pd.DataFrame, opts: WidthOptions) -> pd.DataFrame:
    """log2 eta*_group per (optimizer, family, width, B, D, group), from :func:`with_widths`'s
    frame."""
    loss = _loss_col(df, opts.loss)
    rows = []
    for key, s in df.groupby(list(SLICE_KEYS), sort=True):
        for g in GROUPS:
            line = scan_line(s, g, loss)
            fit = vertex_fit(line["x"].to_numpy(float), line["y"].to_numpy(float), opts.k)
            rows.append({**dict(zip(SLICE_KEYS, key, strict=True)), "group": g,
                         "log2_eta_star": fit["x0"], "log2_eta_star_se": fit["x0_se"],
                         "eta_star": 2.0 ** fit["x0"], "log2_eta_argmin": fit["x_argmin"],
                         "status": fit["status"], "n_points": fit["n_points"]})  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- exponents


def fit_exponent(log2_w: np.ndarray, log2_eta: np.ndarray) -> dict[str, Any]:
    """OLS ``log2 eta* = const - c log2 w``: c, its standard error and t-based 95 % interval."""
    n = len(log2_w)
    nan = math.nan
    out: dict[str, Any] = {"c": nan, "c_se": nan, "c_lo": nan, "c_hi": nan, "n_widths": n,
                           "identified": False, "reason": ""}  # fmt: skip
    if n < 3 or np.ptp(log2_w) == 0:
        out["reason"] = f"{n} widths with a bracketed optimum (need 3)"
        return out
    res = stats.linregress(log2_w, log2_eta)
    c, se = -float(res.slope), float(res.stderr)
    t = float(stats.t.ppf(0.975, n - 2))
    out.update(c=c, c_se=se, c_lo=c - t * se, c_hi=c + t * se, identified=True,
               intercept=float(res.intercept))  # fmt: skip
    return out


def exponents(optima: pd.DataFrame) -> pd.DataFrame:
    """One row per (optimizer, family, B, D, group): the exponent c, its interval, and the
    prescriptions (which of them lie inside the interval)."""
    rows = []
    for key, d in optima.groupby(list(FIT_KEYS), sort=True):
        ok = d[(d["status"] == "ok") & np.isfinite(d["log2_eta_star"])]
        fit = fit_exponent(np.log2(ok["width"].to_numpy(float)), ok["log2_eta_star"].to_numpy())
        row = {**dict(zip(FIT_KEYS, key, strict=True)), **fit,
               "widths": ",".join(str(int(w)) for w in sorted(d["width"].unique())),
               "left_out": ",".join(f"{int(w)} ({s})" for w, s in zip(d["width"], d["status"],
                                    strict=True) if s != "ok")}  # fmt: skip
        gi = GROUPS.index(str(key[-1]))
        inside = []
        for name, pres in PRESCRIPTIONS.items():
            row[name] = pres[gi]
            if fit["identified"] and fit["c_lo"] <= pres[gi] <= fit["c_hi"]:
                inside.append(name)
        row["consistent_with"] = ", ".join(inside) if fit["identified"] else "-"
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class WidthAnalysis:
    """Per-group optima across width and their fitted exponents."""

    options: WidthOptions
    optima: pd.DataFrame
    exponents: pd.DataFrame
    warnings: list[str]

    def document(self) -> dict[str, Any]:
        """The ``width`` entry of ``fits.json``."""
        return {
            "law": "log2 eta*_group = const - c_group log2 width (Everett et al. 2024)",
            "options": {"k": self.options.k, "loss": self.options.loss},
            "prescriptions": {k: list(v) for k, v in PRESCRIPTIONS.items()},
            "exponents": self.exponents.to_dict(orient="records"),
            "optima": self.optima.to_dict(orient="records"),
            "warnings": list(self.warnings),
        }


def analyze_width(h: pd.DataFrame, opts: WidthOptions | None = None) -> WidthAnalysis | None:
    """The width analysis of a horizons table; None when it has no width family with per-group
    rates."""
    opts = opts or WidthOptions()
    df = with_widths(h)
    if df is None:
        return None
    optima = group_optima(df, opts)
    if not (optima["n_points"] >= 3).any():
        return None
    exps = exponents(optima)
    warn = []
    for r in exps.itertuples(index=False):
        where = f"width law {r.optimizer} {r.family} B={r.batch_size} D={r.tokens} {r.group}"
        if not r.identified:
            warn.append(f"{where}: exponent not identified ({r.reason})")
        elif r.left_out:
            warn.append(f"{where}: widths left out of the exponent: {r.left_out}")
    return WidthAnalysis(opts, optima, exps, warn)
