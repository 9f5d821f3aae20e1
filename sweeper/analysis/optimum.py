"""The optimum of each (model, layout, D, B) slice, by the norm-transfer toolkit's procedure.

For each slice the points are x = log2 ||W_out||_{RMS->inf} at D and y = loss at D (one point
per learning rate; seeds at the same rate are averaged). The ``k`` points nearest the empirical
minimum in x, swapped so that they bracket it, are fitted by weighted least squares (weights
1/sigma^2 of the smoothed loss) with ``y = a x^2 + b x + c``, ``c`` optionally fixed to the loss at
initialisation (where the norm is 1, x = 0). The vertex gives the optimal norm x0 and loss y0; eta*
is the rate of the point nearest the vertex in (x, y). The fit is linear loss against log2 norm, as
in the toolkit's code (the paper's text says log loss; the code is followed).

Alongside: the plain argmin over eta, a free quadratic in log2 eta, eta interpolated at x0 along the
slice's (x, log2 eta) curve, an edge flag, and percentile bootstrap intervals (pairs bootstrap over
the k fitted points).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

GROUP_KEYS = ("model", "layout", "tokens", "batch_size")


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """Options of the optimum finder.

    Attributes:
        k: Points fitted per slice (the toolkit's ``FIT_K``).
        c_fixed: Loss at initialisation to fix the parabola's intercept to; None fits it freely.
        c_per_model: Per-model initial losses overriding ``c_fixed`` (models differ in vocabulary).
        max_loss: Points with loss at or above this are dropped (default: ``c_fixed``).
        smooth: Use ``train_loss_smoothed`` (and 1/std^2 weights) where the table has it.
        loss: Loss column: ``train_loss`` (the paper's) or ``val_loss``.
        n_boot: Bootstrap resamples per slice (0: no intervals).
        seed: Seed of the bootstrap generator.
    """

    k: int = 7
    c_fixed: float | None = None
    c_per_model: dict[str, float] = field(default_factory=dict)
    max_loss: float | None = None
    smooth: bool = True
    loss: str = "train_loss"
    n_boot: int = 200
    seed: int = 0


# ----------------------------------------------------------------------------------- fitting core


def select_points(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` points nearest the empirical minimum in x, bracketing it if possible.

    If all chosen points lie on one side of the minimum's x, the farthest of them is swapped for the
    nearest unchosen point on the other side (the toolkit's bracketing rule).
    """
    n = len(x)
    i_min = int(np.argmin(y))
    order = np.argsort(np.abs(x - x[i_min]), kind="stable")
    if n <= k:
        return np.sort(order)
    sel = list(order[:k])
    rest = list(order[k:])
    xm = x[i_min]
    for side in (-1.0, 1.0):
        if not any(np.sign(x[i] - xm) == side for i in sel):
            cand = [i for i in rest if np.sign(x[i] - xm) == side]
            if cand:
                far = max(
                    (i for i in sel if i != i_min), key=lambda i: (abs(x[i] - xm), i), default=None
                )
                if far is not None:
                    sel[sel.index(far)] = cand[0]
                    rest.remove(cand[0])
    return np.sort(np.asarray(sel))


def fit_quadratic_batch(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, c_fixed: float | None
) -> np.ndarray:
    """Weighted least-squares ``y = a x^2 + b x + c`` for a batch of point sets.

    Solved through the SVD pseudo-inverse of the sqrt(w)-scaled design matrix, batched over the
    leading axis (the bootstrap calls this with thousands of resamples at once).

    Args:
        x, y, w: Arrays of shape ``(n_sets, n_points)`` (or ``(n_points,)`` for one set).
        c_fixed: If given, ``c`` is fixed to it and only ``a, b`` are fitted.

    Returns:
        ``(n_sets, 3)`` coefficients ``a, b, c`` (or ``(3,)`` for one set).
    """
    single = np.ndim(x) == 1
    x, y, w = (np.atleast_2d(np.asarray(v, dtype=float)) for v in (x, y, w))
    sw = np.sqrt(w)
    cols = [x * x, x] if c_fixed is not None else [x * x, x, np.ones_like(x)]
    design = np.stack(cols, axis=-1) * sw[..., None]
    target = (y - c_fixed if c_fixed is not None else y) * sw
    coef = np.einsum("npk,nk->np", np.linalg.pinv(design), target)
    if c_fixed is not None:
        coef = np.concatenate([coef, np.full((len(coef), 1), c_fixed)], axis=1)
    return coef[0] if single else coef


def vertex(coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertex ``(x0, y0)`` of ``a x^2 + b x + c``; NaN where the parabola is not convex (a <= 0)."""
    coef = np.asarray(coef, dtype=float)
    a, b, c = coef[..., 0], coef[..., 1], coef[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        x0 = np.where(a > 0, -b / (2 * a), np.nan)
        y0 = np.where(a > 0, c - b * b / (4 * a), np.nan)
    return x0, y0


def nearest_point(x: np.ndarray, y: np.ndarray, x0: float, y0: float) -> int:
    """Index of the point nearest ``(x0, y0)`` in the (x, y) plane."""
    return int(np.argmin((x - x0) ** 2 + (y - y0) ** 2))


def weights_from_std(std: np.ndarray) -> np.ndarray:
    """1/sigma^2 weights, normalised to mean 1; uniform where sigma is unknown.

    A floor of 10 % of the median sigma keeps a point with an accidentally tiny spread from taking
    all the weight.
    """
    std = np.asarray(std, dtype=float)
    ok = np.isfinite(std) & (std > 0)
    if not ok.any():
        return np.ones_like(std)
    med = float(np.median(std[ok]))
    s = np.where(ok, np.maximum(std, 0.1 * med), med)
    w = 1.0 / s**2
    return w / w.mean()


# -------------------------------------------------------------------------------- one slice


@dataclass(frozen=True)
class Slice:
    """The points of one (model, layout, D, B) slice, one per learning rate, sorted by rate."""

    log2_lr: np.ndarray
    x: np.ndarray
    y: np.ndarray
    std: np.ndarray
    n_seeds: np.ndarray


def slice_optimum(
    s: Slice,
    opts: FitOptions,
    rng: np.random.Generator,
    grid_lo: float,
    grid_hi: float,
) -> dict[str, Any]:
    """The optimum of one slice (all columns of ``optima.parquet`` but the keys).

    Args:
        s: The slice's points.
        opts: Fit options.
        rng: Bootstrap generator.
        grid_lo, grid_hi: log2 of the smallest and largest rate tried at this (model, layout, B), to
            flag an optimum on the grid's edge.
    """
    out: dict[str, Any] = {"n_points": len(s.x), "status": "ok"}
    max_loss = opts.max_loss if opts.max_loss is not None else opts.c_fixed
    ok = np.isfinite(s.x) & np.isfinite(s.y)
    if max_loss is not None:
        ok &= s.y < max_loss
    le, x, y, std = s.log2_lr[ok], s.x[ok], s.y[ok], s.std[ok]
    out["n_valid"] = int(ok.sum())
    if len(x) == 0:
        return {**out, "status": "no_points", **_nan_fit()}
    i_min = int(np.argmin(y))
    out["log2_lr_argmin"] = float(le[i_min])
    out["loss_argmin"] = float(y[i_min])
    out["edge"] = (
        "low" if le[i_min] <= grid_lo + 1e-9 else "high" if le[i_min] >= grid_hi - 1e-9 else ""
    )
    out["log2_lr_quad"] = _quad_in_lr(le, y, opts.k)
    if len(x) < 3:
        return {**out, "status": "too_few_points", **_nan_fit()}
    sel = select_points(x, y, opts.k)
    w = weights_from_std(std[sel])
    coef = fit_quadratic_batch(x[sel], y[sel], w, opts.c_fixed)
    x0, y0 = (float(v) for v in vertex(coef))
    out.update(n_fit=len(sel), a=coef[0], b=coef[1], c=coef[2], x0=x0, y0=y0)
    out["x_fit_lo"], out["x_fit_hi"] = float(x[sel].min()), float(x[sel].max())
    if not np.isfinite(x0):
        out.update(status="not_convex", log2_lr_star=np.nan, log2_lr_star_interp=np.nan)
        out.update(_nan_boot())
        return out
    out["log2_lr_star"] = float(le[nearest_point(x, y, x0, y0)])
    out["log2_lr_star_interp"] = _interp_lr(x, le, x0)
    out["vertex_outside"] = bool(x0 < x[sel].min() or x0 > x[sel].max())
    out.update(_bootstrap(x[sel], y[sel], w, le[sel], opts, rng))
    return out


def _interp_lr(x: np.ndarray, le: np.ndarray, x0: float | np.ndarray) -> Any:
    """log2 eta at norm x0, linear along the slice's points sorted by norm."""
    order = np.argsort(x, kind="stable")
    return np.interp(x0, x[order], le[order])


def _quad_in_lr(le: np.ndarray, y: np.ndarray, k: int) -> float:
    """Vertex of a free quadratic in log2 eta over the k points nearest the argmin in log2 eta."""
    if len(le) < 3:
        return float("nan")
    sel = select_points(le, y, k)
    coef = fit_quadratic_batch(le[sel], y[sel], np.ones(len(sel)), None)
    x0, _ = vertex(coef)
    return float(x0)


def _bootstrap(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, le: np.ndarray, opts: FitOptions, rng: Any
) -> dict[str, Any]:
    if opts.n_boot <= 0:
        return _nan_boot()
    k = len(x)
    idx = rng.integers(0, k, size=(opts.n_boot, k))
    coef = fit_quadratic_batch(x[idx], y[idx], w[idx], opts.c_fixed)
    sidx = np.sort(idx, axis=1)
    distinct = 1 + (np.diff(sidx, axis=1) != 0).sum(axis=1)
    x0, y0 = vertex(coef)
    need = 2 if opts.c_fixed is not None else 3
    valid = (distinct >= need) & np.isfinite(x0)
    # Resamples whose vertex lands far outside the fitted range are degenerate near-linear fits.
    span = x.max() - x.min()
    valid &= (x0 > x.min() - span) & (x0 < x.max() + span)
    res = {"boot_valid": float(valid.mean())}
    if valid.sum() < 10:
        return {**_nan_boot(), **res}
    x0v, y0v = x0[valid], y0[valid]
    lev = _interp_lr(x, le, x0v)
    for name, v in (("x0", x0v), ("y0", y0v), ("log2_lr_star", lev)):
        lo, hi = np.percentile(v, [2.5, 97.5])
        res[f"{name}_lo"], res[f"{name}_hi"] = float(lo), float(hi)
    res["x0_se"] = float(np.std(x0v, ddof=1))
    res["log2_lr_star_se"] = float(np.std(lev, ddof=1))
    return res


def _nan_fit() -> dict[str, Any]:
    keys = ("a", "b", "c", "x0", "y0", "log2_lr_star", "log2_lr_star_interp")
    return {k: np.nan for k in keys} | _nan_boot()


def _nan_boot() -> dict[str, Any]:
    keys = ("x0_lo", "x0_hi", "y0_lo", "y0_hi", "log2_lr_star_lo", "log2_lr_star_hi")
    return {k: np.nan for k in keys} | {"x0_se": np.nan, "log2_lr_star_se": np.nan}


# ------------------------------------------------------------------------------------ the table


def slice_points(df: pd.DataFrame, opts: FitOptions) -> pd.DataFrame:
    """One point per (slice, lr): x = log2 norm, y = loss, std; seeds at one rate are averaged."""
    y = df[opts.loss].astype(float)
    norm = df["output_norm"].astype(float)
    std = pd.Series(np.nan, index=df.index)
    if opts.smooth and opts.loss == "train_loss" and df["train_loss_smoothed"].notna().any():
        y = df["train_loss_smoothed"].where(df["train_loss_smoothed"].notna(), y)
        std = df["train_loss_std"]
        if "output_norm_smoothed" in df.columns:
            # the toolkit averages x over the same window, in log space (geometric mean)
            norm = df["output_norm_smoothed"].where(df["output_norm_smoothed"].notna(), norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log2(norm.where(norm > 0))
    pts = pd.DataFrame({k: df[k] for k in GROUP_KEYS})
    pts["log2_lr"] = np.log2(df["lr"])
    pts["x"], pts["y"], pts["var"] = x, y, std**2
    g = pts.groupby([*GROUP_KEYS, "log2_lr"], sort=True, dropna=False)
    agg = g.agg(x=("x", "mean"), y=("y", "mean"), var=("var", "mean"), n_seeds=("y", "size"))
    agg["std"] = np.sqrt(agg["var"] / agg["n_seeds"])
    return agg.drop(columns="var").reset_index()


def find_optima(df: pd.DataFrame, opts: FitOptions) -> pd.DataFrame:
    """The optimum of every (model, layout, D, B) slice of a normalised horizons table.

    Returns:
        One row per slice: the keys, ``log2_D``, ``log2_B`` and the columns of
        :func:`slice_optimum` (``x0, y0, log2_lr_star, ..., edge, status``).
    """
    pts = slice_points(df, opts)
    grid = df.assign(log2_lr=np.log2(df["lr"])).groupby(["model", "layout", "batch_size"])
    lo, hi = grid["log2_lr"].min(), grid["log2_lr"].max()
    rng = np.random.default_rng(opts.seed)
    rows = []
    for key, g in pts.groupby(list(GROUP_KEYS), sort=True):
        s = Slice(
            log2_lr=g["log2_lr"].to_numpy(),
            x=g["x"].to_numpy(),
            y=g["y"].to_numpy(),
            std=g["std"].to_numpy(),
            n_seeds=g["n_seeds"].to_numpy(),
        )
        gk = (key[0], key[1], key[3])
        row = dict(zip(GROUP_KEYS, key, strict=True))
        o = replace(opts, c_fixed=opts.c_per_model.get(str(key[0]), opts.c_fixed))
        row.update(slice_optimum(s, o, rng, float(lo[gk]), float(hi[gk])))
        row["c_fixed"] = np.nan if o.c_fixed is None else o.c_fixed
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["log2_D"] = np.log2(out["tokens"].astype(float))
    out["log2_B"] = np.log2(out["batch_size"].astype(float))
    for col in ("log2_lr_star", "log2_lr_star_interp", "log2_lr_argmin", "log2_lr_quad"):
        out[col.replace("log2_", "")] = np.exp2(out[col])
    out["edge"] = out["edge"].fillna("")
    out["vertex_outside"] = out.get("vertex_outside", False)
    out["vertex_outside"] = out["vertex_outside"].fillna(False).astype(bool)
    first = [*GROUP_KEYS, "log2_D", "log2_B", "status", "x0", "y0", "lr_star", "edge"]
    return out[first + [c for c in out.columns if c not in first]]
