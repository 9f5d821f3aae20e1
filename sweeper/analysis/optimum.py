"""The optimum of each (model, layout, D, B) slice, by the norm-transfer toolkit's procedure.

For each slice the points are x = log2 ||W_out||_{RMS->inf} at D and y = loss at D (one point per
learning rate; seeds at the same rate are averaged), smoothed by :mod:`sweeper.analysis.smoothing`.
The ``k`` points nearest the empirical minimum in x, swapped so that they bracket it, are fitted by
weighted least squares (weights 1/sigma^2 of the smoothed loss) with ``y = a x^2 + b x + c``, ``c``
optionally fixed to the loss at initialisation (where the norm is 1, x = 0). The vertex gives the
optimal norm x0 and loss y0; eta* is the rate of the point nearest the vertex in (x, y). The fit is
linear loss against log2 norm, as in the toolkit's code (the paper's text says log loss).

Alongside: the plain argmin over eta, a free quadratic in log2 eta, eta interpolated at x0 along the
slice's (x, log2 eta) curve, percentile bootstrap intervals (pairs bootstrap over the k fitted
points), the slice's own edge flag (its best rate is its lowest or highest usable rate), and the fit
quality (residual scale, the noise of the points, how far the vertex lies below the lowest point).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from sweeper.analysis.smoothing import D2_COL, N_COL, STD_COL, X_COL, Y_COL

GROUP_KEYS = ("model", "layout", "tokens", "batch_size")


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """Options of the optimum finder.

    Attributes:
        k: Points fitted per slice (the toolkit's ``FIT_K``).
        c_fixed: Loss at initialisation to fix the parabola's intercept to; None fits it freely.
        c_per_model: Per-model initial losses overriding ``c_fixed`` (models differ in vocabulary).
        max_loss: Points with loss at or above this are dropped (default: ``c_fixed``).
        weight_floor: The smallest sigma used in a weight, as a fraction of the slice's median sigma
            (a sigma estimated from 3 points can be near 0 by chance and take all the weight). 0 is
            the toolkit's rule exactly.
        gap_sigmas: The fit-quality flag: the vertex lies below the lowest fitted point by more than
            the grid allowance plus this many noise scales.
        n_boot: Bootstrap resamples per slice (0: no intervals).
        seed: Seed of the bootstrap generator.
    """

    k: int = 7
    c_fixed: float | None = None
    c_per_model: dict[str, float] = field(default_factory=dict)
    max_loss: float | None = None
    weight_floor: float = 0.1
    gap_sigmas: float = 3.0
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
        x: Abscissae, shape ``(n_sets, n_points)`` (or ``(n_points,)`` for one set).
        y: Ordinates, same shape.
        w: Weights, same shape.
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
    return np.asarray(coef[0] if single else coef)


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


def weights_from_std(std: np.ndarray, floor: float = 0.1) -> np.ndarray:
    """1/sigma^2 weights, normalised to mean 1; uniform where sigma is unknown.

    Sigmas below ``floor`` times the median sigma are raised to it; ``floor = 0`` keeps them (the
    toolkit's rule, up to its 1e-12 guard on the variance).
    """
    std = np.asarray(std, dtype=float)
    ok = np.isfinite(std)
    if not ok.any() or not (std[ok] > 0).any():
        return np.ones_like(std)
    med = float(np.median(std[ok]))
    s = np.where(ok, np.maximum(std, floor * med), med)
    w = 1.0 / np.maximum(s**2, 1e-12)
    return np.asarray(w / w.mean())


# -------------------------------------------------------------------------------- one slice


@dataclass(frozen=True)
class Slice:
    """The points of one (model, layout, D, B) slice, one per learning rate, sorted by rate.

    ``se`` is the standard error of each point's loss (from the window's spread, or the spread
    over seeds), NaN when unknown. ``x_raw`` is log2 of the norm at D itself (``x`` may be averaged
    over a window): eta is interpolated at the optimal norm along it. ``d2`` is the second
    difference of the logged loss around D and ``n_window`` the points each loss averages: together
    they give the noise of a point (see :func:`fit_quality`).
    """

    log2_lr: np.ndarray
    x: np.ndarray
    y: np.ndarray
    std: np.ndarray
    n_seeds: np.ndarray
    se: np.ndarray | None = None
    x_raw: np.ndarray | None = None
    d2: np.ndarray | None = None
    n_window: np.ndarray | None = None


def slice_optimum(s: Slice, opts: FitOptions, rng: np.random.Generator) -> dict[str, Any]:
    """The optimum of one slice (all columns of ``optima.parquet`` but the keys).

    Args:
        s: The slice's points.
        opts: Fit options.
        rng: Bootstrap generator.
    """
    out: dict[str, Any] = {"n_points": len(s.x), "status": "ok", **_nan_fit()}
    max_loss = opts.max_loss if opts.max_loss is not None else opts.c_fixed
    ok = np.isfinite(s.x) & np.isfinite(s.y)
    if max_loss is not None:
        ok &= s.y < max_loss
    le, x, y, std = s.log2_lr[ok], s.x[ok], s.y[ok], s.std[ok]
    se = s.se[ok] if s.se is not None else np.full(len(x), np.nan)
    x_raw = s.x_raw[ok] if s.x_raw is not None else x
    x_raw = np.where(np.isfinite(x_raw), x_raw, x)
    d2 = s.d2[ok] if s.d2 is not None else np.full(len(x), np.nan)
    nw = s.n_window[ok] if s.n_window is not None else np.ones(len(x))
    out["n_valid"] = int(ok.sum())
    if len(x) == 0:
        return {**out, "status": "no_points"}
    i_min = int(np.argmin(y))
    out["log2_lr_argmin"], out["loss_argmin"] = float(le[i_min]), float(y[i_min])
    out["log2_lr_lo"], out["log2_lr_hi"] = float(le.min()), float(le.max())
    # The edge is the slice's own: its best usable rate is its lowest or highest usable rate.
    out["edge"] = "low" if i_min == int(np.argmin(le)) else ""
    out["edge"] = "high" if i_min == int(np.argmax(le)) else out["edge"]
    out["log2_lr_quad"] = _quad_in_lr(le, y, opts.k)
    if len(x) < 3:
        return {**out, "status": "too_few_points"}
    sel = select_points(x, y, opts.k)
    w = weights_from_std(std[sel], opts.weight_floor)
    coef = fit_quadratic_batch(x[sel], y[sel], w, opts.c_fixed)
    x0, y0 = (float(v) for v in vertex(coef))
    out.update(n_fit=len(sel), a=coef[0], b=coef[1], c=coef[2], x0=x0, y0=y0)
    out["x_fit_lo"], out["x_fit_hi"] = float(x[sel].min()), float(x[sel].max())
    noise = point_noise(d2[sel], nw[sel], se[sel])
    out["point_noise"] = noise
    out.update(fit_quality(x[sel], y[sel], noise, coef, opts.gap_sigmas))
    if not np.isfinite(x0):
        return {**out, "status": "not_convex"}
    out["log2_lr_star"] = float(le[nearest_point(x, y, x0, y0)])
    # Along the norm at D itself: a window that ends at D (the run's last horizon) averages over
    # smaller norms, and interpolating along it would put eta* too high.
    out["log2_lr_star_interp"] = float(_interp_lr(x_raw, le, x0))
    out["vertex_outside"] = bool(x0 < x[sel].min() or x0 > x[sel].max())
    out.update(_bootstrap(x[sel], y[sel], w, (x_raw, le), opts, rng))
    return out


def point_noise(d2: np.ndarray, n_window: np.ndarray, se: np.ndarray) -> float:
    """The noise (standard error) of a slice's points, from the logged losses around D.

    The noise of one logged loss is estimated robustly from the second differences around D
    (median |d2| / 0.6745 / sqrt(6)), which the loss's trend over the window does not inflate, and
    divided by sqrt of the points each loss averages. Without a per-step log: the median standard
    error from the windows' spread (the table's ``train_loss_std``), or NaN.
    """
    d2 = d2[np.isfinite(d2)]
    if len(d2) >= 3:
        sigma = float(np.median(np.abs(d2))) / 0.6745 / np.sqrt(6.0)
        n = float(np.nanmedian(n_window)) if np.isfinite(n_window).any() else 1.0
        return float(sigma / np.sqrt(max(n, 1.0)))
    return float(np.nanmedian(se)) if np.isfinite(se).any() else float("nan")


def fit_quality(
    x: np.ndarray, y: np.ndarray, noise: float, coef: np.ndarray, gap_sigmas: float
) -> dict[str, Any]:
    """How well the parabola fits the points it was fitted to.

    Args:
        x: The fitted points' log2 norms.
        y: Their losses.
        noise: The noise (standard error) of one point from the per-step log
            (:func:`point_noise`); used only when fewer than 5 points leave a free quadratic
            under 2 degrees of freedom.
        coef: The fit's ``a, b, c``.
        gap_sigmas: Noise scales beyond the grid allowance before ``below_data``.

    Returns:
        ``resid_rms`` (unweighted residual RMS of the fit), ``noise`` (the scatter of the points
        about a free quadratic through them, ``sqrt(SSR / (n - 3))``: the rate-to-rate noise the
        comparison of a fitted curve with the points is about; a loss offset shared by every rate
        of the slice, such as a hard batch at that step, does not enter it), ``gap`` (lowest fitted
        loss minus the vertex loss y0; > 0 when the vertex lies below every point),
        ``gap_allowance`` (a x (h/2)^2 for the median spacing h of the points: how far a true
        optimum between two grid points lies below both), and ``below_data`` (gap > allowance +
        ``gap_sigmas`` x noise).
    """
    a, b, c = (float(v) for v in coef)
    resid = y - (a * x * x + b * x + c)
    if len(x) >= 5:
        free = fit_quadratic_batch(x, y, np.ones_like(x), None)
        r = y - (free[0] * x * x + free[1] * x + free[2])
        noise = float(np.sqrt(np.sum(r**2) / (len(x) - 3)))
    _, y0 = vertex(coef)
    h = float(np.median(np.diff(np.sort(x)))) if len(x) > 1 else 0.0
    gap = float(y.min() - y0) if np.isfinite(y0) else np.nan
    allowance = max(a, 0.0) * (h / 2) ** 2
    below = bool(np.isfinite(gap) and np.isfinite(noise) and gap > allowance + gap_sigmas * noise)
    return {
        "resid_rms": float(np.sqrt(np.mean(resid**2))),
        "noise": noise,
        "gap": gap,
        "gap_allowance": allowance,
        "below_data": below,
    }


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
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    curve: tuple[np.ndarray, np.ndarray],
    opts: FitOptions,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Percentile intervals of x0, y0 and the interpolated log2 eta* over pairs resamples.

    ``curve`` is the slice's (raw log2 norm, log2 eta) curve along which eta* is interpolated.
    """
    if opts.n_boot <= 0:
        return {}
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
    res: dict[str, Any] = {"boot_valid": float(valid.mean())}
    if valid.sum() < 10:
        return res
    x0v, y0v = x0[valid], y0[valid]
    lev = _interp_lr(curve[0], curve[1], x0v)
    for name, v in (("x0", x0v), ("y0", y0v), ("log2_lr_star", lev)):
        lo, hi = np.percentile(v, [2.5, 97.5])
        res[f"{name}_lo"], res[f"{name}_hi"] = float(lo), float(hi)
    res["x0_se"] = float(np.std(x0v, ddof=1))
    res["log2_lr_star_se"] = float(np.std(lev, ddof=1))
    return res


def _nan_fit() -> dict[str, Any]:
    keys = (
        *("a", "b", "c", "x0", "y0", "log2_lr_star", "log2_lr_star_interp", "x_fit_lo"),
        *("x_fit_hi", "resid_rms", "noise", "gap", "gap_allowance", "boot_valid"),
        *("x0_lo", "x0_hi", "y0_lo", "y0_hi", "log2_lr_star_lo", "log2_lr_star_hi"),
        *("x0_se", "log2_lr_star_se", "log2_lr_argmin", "loss_argmin", "log2_lr_quad"),
        *("log2_lr_lo", "log2_lr_hi", "point_noise"),
    )
    return {k: np.nan for k in keys} | {
        "n_fit": 0,
        "edge": "",
        "vertex_outside": False,
        "below_data": False,
    }


# ------------------------------------------------------------------------------------ the table


def slice_points(df: pd.DataFrame) -> pd.DataFrame:
    """One point per (slice, lr): x = log2 norm, y = loss, std, se; seeds at one rate averaged.

    ``df`` is a horizons table with the columns of :func:`sweeper.analysis.smoothing.smooth_points`.
    """
    norm, raw = df[X_COL].astype(float), df["output_norm"].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log2(norm.where(norm > 0))
        x_raw = np.log2(raw.where(raw > 0))
    pts = pd.DataFrame({k: df[k] for k in GROUP_KEYS})
    pts["log2_lr"] = np.log2(df["lr"])
    pts["x"], pts["y"], pts["var"] = x, df[Y_COL].astype(float), df[STD_COL].astype(float) ** 2
    pts["x_raw"] = x_raw
    pts["d2"], pts["n_window"] = df[D2_COL].astype(float), df[N_COL].astype(float)
    # The standard error of a window mean: population variance / (n - 1) (the unbiased sample
    # variance over n); a window of one point says nothing about the noise.
    n_window = df[N_COL].astype(float)
    pts["se2"] = pts["var"] / (n_window - 1).where(n_window > 1)
    g = pts.groupby([*GROUP_KEYS, "log2_lr"], sort=True, dropna=False)
    agg = g.agg(
        x=("x", "mean"),
        x_raw=("x_raw", "mean"),
        y=("y", "mean"),
        var=("var", "mean"),
        se2=("se2", "mean"),
        y_sd=("y", "std"),
        d2=("d2", "mean"),
        n_window=("n_window", "mean"),
        n_seeds=("y", "size"),
    )
    agg["std"] = np.sqrt(agg["var"] / agg["n_seeds"])
    # The noise of a point: its window's standard error, or the spread over seeds.
    se = np.sqrt(agg["se2"] / agg["n_seeds"])
    agg["se"] = se.where(se.notna() & (se > 0), agg["y_sd"] / np.sqrt(agg["n_seeds"]))
    return agg.drop(columns=["var", "se2", "y_sd"]).reset_index()


def find_optima(df: pd.DataFrame, opts: FitOptions) -> pd.DataFrame:
    """The optimum of every (model, layout, D, B) slice of a smoothed horizons table.

    ``df`` has the columns of :func:`sweeper.analysis.smoothing.smooth_points`; the result is that
    of :func:`optima_from_points`.
    """
    return optima_from_points(slice_points(df), opts)


def optima_from_points(pts: pd.DataFrame, opts: FitOptions) -> pd.DataFrame:
    """The optimum of every slice of :func:`slice_points`'s points.

    Returns:
        One row per slice: the keys, ``log2_D``, ``log2_B``, the columns of :func:`slice_optimum`
        (``x0, y0, log2_lr_star, ..., edge, status``) and ``censored`` (why the slice's eta* is
        left out of the laws; empty when it is used).
    """
    rng = np.random.default_rng(opts.seed)
    rows = []
    for key, g in pts.groupby(list(GROUP_KEYS), sort=True):
        s = Slice(
            log2_lr=g["log2_lr"].to_numpy(),
            x=g["x"].to_numpy(),
            y=g["y"].to_numpy(),
            std=g["std"].to_numpy(),
            n_seeds=g["n_seeds"].to_numpy(),
            se=g["se"].to_numpy(),
            x_raw=g["x_raw"].to_numpy(),
            d2=g["d2"].to_numpy(),
            n_window=g["n_window"].to_numpy() * g["n_seeds"].to_numpy(),
        )
        row = dict(zip(GROUP_KEYS, key, strict=True))
        o = replace(opts, c_fixed=opts.c_per_model.get(str(key[0]), opts.c_fixed))
        row.update(slice_optimum(s, o, rng))
        row["c_fixed"] = np.nan if o.c_fixed is None else o.c_fixed
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["log2_D"] = np.log2(out["tokens"].astype(float))
    out["log2_B"] = np.log2(out["batch_size"].astype(float))
    for col in ("log2_lr_star", "log2_lr_star_interp", "log2_lr_argmin", "log2_lr_quad"):
        out[col.replace("log2_", "")] = np.exp2(out[col])
    out["censored"] = censor_reasons(out)
    first = [*GROUP_KEYS, "log2_D", "log2_B", "status", "x0", "y0", "lr_star", "edge", "censored"]
    return out[first + [c for c in out.columns if c not in first]]


def censor_reasons(optima: pd.DataFrame) -> pd.Series:
    """Why each slice's eta* is left out of the laws by default ("" when it is used)."""

    def why(r: Any) -> str:
        if r.status != "ok":
            return str(r.status).replace("_", " ")
        if r.edge:
            return f"best rate is the slice's {'highest' if r.edge == 'high' else 'lowest'} rate"
        if r.vertex_outside:
            return "vertex outside the fitted points"
        return ""

    return pd.Series([why(r) for r in optima.itertuples()], index=optima.index, dtype=object)
