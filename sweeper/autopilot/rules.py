"""The early-stopping rules: pure functions of a :class:`~sweeper.autopilot.estimates.Snapshot`.

Two rules, both about the horizons a run has *still to come* (a run already read off at a horizon
keeps that data point whatever happens next):

* **norm** (the norm-transfer observation): under Scion with a constant rate and no weight decay
  the output norm only grows, so a run whose log2 norm is already above the upper confidence limit
  of the optimal-norm band at every horizon still to come, by ``norm_margin_log2``, cannot be the
  optimum there. The band is a weighted line x0(D) = m + s (log2 D - c) through the optimal norms of
  the slices finished so far, with its confidence limits (the scatter between slices included); it
  is used only while it is identified: ``band_min_slices`` slices over at least two horizons, and
  an interval no wider than ``band_max_width_log2`` at the horizon in question.
* **far** (rates far from the optimum): the eta* trend, log2 eta* = a + b (log2 D - c) + g (log2 B
  - cb), fitted the same way through the identified cells; a run whose rate lies outside its
  confidence interval at every horizon still to come by ``rate_margin_log2``, and whose loss at its
  latest horizon is above the best at that batch by ``loss_margin`` of the loss gained so far, is
  stopped.

Every stop carries its evidence (the numbers the decision compared), logged to ``autopilot.jsonl``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sweeper.autopilot.config import AutopilotConfig
from sweeper.autopilot.estimates import Snapshot, finite

SE_FLOOR = 0.05  # log2 units: no cell's estimate is trusted to better than this


@dataclass(frozen=True)
class Line:
    """A weighted linear fit ``y = X beta`` with the scatter ``tau2`` between cells beyond their
    own errors; ``centers`` are subtracted from the regressors first."""

    beta: np.ndarray
    cov: np.ndarray
    tau2: float
    centers: tuple[float, ...]
    n: int
    horizons: tuple[int, ...]

    def predict(self, *regressors: float) -> tuple[float, float]:
        """Mean and standard deviation of a new cell's value at ``regressors``."""
        x = np.array([1.0, *(r - c for r, c in zip(regressors, self.centers, strict=True))])
        mean = float(x @ self.beta)
        return mean, math.sqrt(max(0.0, float(x @ self.cov @ x)) + self.tau2)


def fit_line(columns: list[np.ndarray], y: np.ndarray, se: np.ndarray) -> Line | None:
    """Weighted least squares of ``y`` on an intercept and ``columns`` (centred), weights
    1/(se^2 + tau2) with tau2 estimated from the residuals; None without a residual degree of
    freedom or with a singular design."""
    n, p = len(y), len(columns) + 1
    if n < p + 1:
        return None
    centers = tuple(float(np.mean(c)) for c in columns)
    X = np.column_stack([np.ones(n), *(c - m for c, m in zip(columns, centers, strict=True))])
    se2 = np.maximum(np.asarray(se, dtype=float), SE_FLOOR) ** 2
    tau2 = 0.0
    for _ in range(2):
        w = 1.0 / (se2 + tau2)
        xtwx = X.T @ (X * w[:, None])
        if np.linalg.cond(xtwx) > 1e12:
            return None
        cov = np.linalg.inv(xtwx)
        beta = cov @ (X.T @ (w * y))
        resid = y - X @ beta
        tau2 = max(0.0, float(np.sum(resid**2)) / (n - p) - float(np.mean(se2)))
    w = 1.0 / (se2 + tau2)
    cov = np.linalg.inv(X.T @ (X * w[:, None]))
    beta = cov @ (X.T @ (w * y))
    return Line(beta, cov, tau2, centers, n, ())


# ----------------------------------------------------------------------------------- cells


def sound_slices(snap: Snapshot) -> pd.DataFrame:
    """Slices whose fit can be trusted (optimum inside, convex, bootstrap mostly valid) and which
    are finished: no run of their (model, layout, B) still has to reach their D."""
    o = snap.optima
    if o.empty:
        return o
    ok = (o["status"] == "ok") & (o["edge"] == "") & ~o["vertex_outside"].astype(bool)
    ok &= o["boot_valid"].fillna(0) >= 0.5
    o = o[ok]
    o = o[~unfinished(snap, o)]
    if o.empty:
        return o
    gaps = [_bracket(snap, r) for r in o.itertuples(index=False)]
    o = o.assign(gap_x=[g[0] for g in gaps], gap_lr=[g[1] for g in gaps])
    o = o[np.isfinite(o["gap_x"]) & np.isfinite(o["gap_lr"])]
    # A vertex between points h apart is placed to within a fraction of h only if the well is
    # symmetric: the grid allowance (h / 4) joins each cell's own error.
    return o.assign(
        band_se=np.hypot(o["x0_se"], o["gap_x"] / 4),
        trend_se=np.hypot(o["log2_lr_star_se"], o["gap_lr"] / 4),
    )


def _bracket(snap: Snapshot, r: Any) -> tuple[float, float]:
    """The gaps in x and in log2 rate between the usable points on either side of the vertex."""
    pts = snap.cell_points.get((str(r.model), str(r.layout), int(r.batch_size), int(r.tokens)))
    if pts is None or not finite(r.x0) or not finite(r.log2_lr_star_interp):
        return math.inf, math.inf
    x, lr = pts
    out = []
    for values, at in ((x, r.x0), (lr, r.log2_lr_star_interp)):
        below, above = values[values <= at], values[values >= at]
        out.append(float(above.min() - below.max()) if len(below) and len(above) else math.inf)
    return out[0], out[1]


def unfinished(snap: Snapshot, slices: pd.DataFrame) -> np.ndarray:
    """Per slice: some run of its (model, layout, B) will reach its D but has not yet."""
    keys = ["model", "layout", "batch_size"]
    live = snap.runs[~snap.runs["final"]][[*keys, "max_tokens", "tokens_done"]]
    if live.empty or slices.empty:
        return np.zeros(len(slices), dtype=bool)
    s = slices[[*keys, "tokens"]].reset_index(drop=True).reset_index()
    m = s.merge(live, on=keys, how="inner")
    waiting = (m["max_tokens"].fillna(0) >= m["tokens"]) & (
        m["tokens_done"].fillna(0) < m["tokens"]
    )
    bad = set(m.loc[waiting, "index"])
    return np.array([i in bad for i in range(len(s))], dtype=bool)


def norm_bands(snap: Snapshot, cfg: AutopilotConfig) -> dict[tuple[str, str], Line]:
    """The optimal-norm band x0(log2 D) per (model, layout), where it can be estimated."""
    out: dict[tuple[str, str], Line] = {}
    o = sound_slices(snap)
    if o.empty:
        return out
    o = o[np.isfinite(o["x0"]) & np.isfinite(o["band_se"])]
    for (model, layout), g in o.groupby(["model", "layout"]):
        if len(g) < cfg.band_min_slices or g["tokens"].nunique() < 2:
            continue
        line = fit_line([g["log2_D"].to_numpy()], g["x0"].to_numpy(), g["band_se"].to_numpy())
        if line is not None:
            horizons = tuple(sorted(int(t) for t in g["tokens"].unique()))
            out[(str(model), str(layout))] = dataclasses.replace(line, horizons=horizons)
    return out


def lr_trends(snap: Snapshot, cfg: AutopilotConfig) -> dict[tuple[str, str], Line]:
    """The eta* trend log2 eta*(log2 D, log2 B) per (model, layout), where it can be estimated."""
    out: dict[tuple[str, str], Line] = {}
    o = sound_slices(snap)
    if o.empty:
        return out
    col = "log2_lr_star_interp"
    o = o[np.isfinite(o[col]) & np.isfinite(o["trend_se"])]
    for (model, layout), g in o.groupby(["model", "layout"]):
        if len(g) < 4 or g["tokens"].nunique() < 2 or g["batch_size"].nunique() < 2:
            continue
        cols = [g["log2_D"].to_numpy(), g["log2_B"].to_numpy()]
        line = fit_line(cols, g[col].to_numpy(), g["trend_se"].to_numpy())
        if line is not None:
            horizons = tuple(sorted(int(t) for t in g["tokens"].unique()))
            out[(str(model), str(layout))] = dataclasses.replace(line, horizons=horizons)
    return out


# ------------------------------------------------------------------------------------- stops


@dataclass(frozen=True)
class Stop:
    """A decision to stop one run early: its rule, a one-line reason and the evidence."""

    run_id: str
    rule: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def decide_stops(snap: Snapshot, cfg: AutopilotConfig, already: set[str]) -> list[Stop]:
    """The runs to stop now (none already in ``already``), each with its evidence."""
    if not cfg.early_stop or snap.latest.empty or snap.runs.empty:
        return []
    bands, trends = norm_bands(snap, cfg), lr_trends(snap, cfg)
    if not bands and not trends:
        return []
    live = snap.runs[~snap.runs["final"] & ~snap.runs["run_id"].isin(already)]
    live = live.merge(snap.latest, on="run_id", how="inner")
    stops = []
    for r in live.itertuples(index=False):
        future = sorted(int(d) for d in r.horizons_tokens if int(d) > int(r.tokens))
        if not future:
            continue
        key = (str(r.model), str(r.layout))
        stop = None
        if key in bands:
            stop = norm_stop(r, future, bands[key], cfg)
        if stop is None and key in trends:
            stop = far_stop(r, future, trends[key], snap, cfg)
        if stop is not None:
            stops.append(stop)
    return stops


def norm_stop(r: Any, future: list[int], band: Line, cfg: AutopilotConfig) -> Stop | None:
    """The norm rule for one run (``r``: a runs row merged with its latest point)."""
    if r.schedule != "constant" or (finite(r.weight_decay) and r.weight_decay > 0):
        return None
    if not (r.monotone and finite(r.x)):
        return None
    limits = []
    for d in future:
        mean, sd = band.predict(math.log2(d))
        if 2 * cfg.band_z * sd > cfg.band_max_width_log2:
            return None  # the band is not identified at a horizon this run may still serve
        limits.append(
            {"tokens": d, "center": round(mean, 4), "ucl": round(mean + cfg.band_z * sd, 4)}
        )
    top = max(limits, key=lambda v: v["ucl"])
    if not r.x > top["ucl"] + cfg.norm_margin_log2:
        return None
    evidence = {
        "tokens": int(r.tokens),
        "log2_norm": round(float(r.x), 4),
        "band_ucl_max": top["ucl"],
        "margin": cfg.norm_margin_log2,
        "band": limits,
        "band_slices": band.n,
        "band_horizons": list(band.horizons),
        "band_slope_per_log2_D": round(float(band.beta[1]), 4),
        "monotone": True,
        "schedule": "constant",
    }
    reason = (
        f"log2 output norm {r.x:.2f} at {int(r.tokens)} tokens is above the optimal-norm band's "
        f"upper limit {top['ucl']:.2f} (at D = {top['tokens']}) + margin {cfg.norm_margin_log2:g} "
        f"for every horizon still to come"
    )
    return Stop(str(r.run_id), "norm", reason, evidence)


def far_stop(
    r: Any, future: list[int], trend: Line, snap: Snapshot, cfg: AutopilotConfig
) -> Stop | None:
    """The far rule for one run."""
    lo, hi = math.inf, -math.inf
    for d in future:
        mean, sd = trend.predict(math.log2(d), math.log2(r.batch_size))
        if 2 * cfg.band_z * sd > cfg.band_max_width_log2:
            return None
        lo, hi = min(lo, mean - cfg.band_z * sd), max(hi, mean + cfg.band_z * sd)
    side = "above" if r.log2_lr > hi + cfg.rate_margin_log2 else ""
    side = "below" if r.log2_lr < lo - cfg.rate_margin_log2 else side
    if not side:
        return None
    loss = _loss_gap(r, snap)
    if loss is None or loss["gap"] <= cfg.loss_margin * loss["gained"]:
        return None
    evidence = {
        "log2_lr": round(float(r.log2_lr), 4),
        "side": side,
        "lr_star_interval": [round(lo, 4), round(hi, 4)],
        "margin": cfg.rate_margin_log2,
        "trend_cells": trend.n,
        **loss,
    }
    reason = (
        f"log2 lr {r.log2_lr:.2f} is {side} eta*'s interval [{lo:.2f}, {hi:.2f}] by more than "
        f"{cfg.rate_margin_log2:g} at every horizon still to come, and its loss at "
        f"{loss['tokens']} tokens is {loss['gap']:.3g} above the best"
    )
    return Stop(str(r.run_id), "far", reason, evidence)


def _loss_gap(r: Any, snap: Snapshot) -> dict[str, Any] | None:
    """The run's smoothed loss at its latest horizon against the best of its (model, layout, B)."""
    last = snap.last_points.get(str(r.run_id))
    if last is None:
        return None
    tokens, y = last
    peers = snap.cell_losses.get((str(r.model), str(r.layout), int(r.batch_size), tokens), {})
    best = min(peers.values(), default=math.nan)
    l0 = snap.initial_loss.get(str(r.model), math.nan)
    if not (finite(best) and finite(l0) and finite(y)):
        return None
    return {
        "tokens": tokens,
        "loss": round(y, 5),
        "best": round(best, 5),
        "gap": y - best,
        "gained": l0 - best,
    }
