"""Loss along training as a function of the learning-rate schedule: the annealing law of Tissue et
al. (2024), "Scaling Law with Learning Rate Annealing".

The law, fitted per (model, layout, B, peak rate) to every logged step of the sweep's runs::

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)
    S1(s) = sum_{i<=s} eta_i                          (forward area: the rates so far)
    S2(s) = sum_{i<=s} m_i,  m_i = lam * m_{i-1} + (eta_{i-1} - eta_i)   (annealing area)

``eta_i`` is the rate of the update that produced step ``i`` (the trainer logs it at step ``i`` as
``lr_hidden``; ``lr_in``/``lr_out`` are used when the table has no ``lr_hidden``), and ``lam`` the
momentum-like decay of the annealing term. Assumptions, stated where they matter:

* One peak rate per fit: the law has no optimum in the rate (a larger S1 always helps), so runs of
  different peak rates, batch sizes or models are fitted separately.
* Warmup is not annealing: the increments before the rate first reaches its peak are left out of
  S2 (they still count in S1). After the peak, increments keep their sign (a re-warming schedule
  raises the loss).
* Rates between logged steps are linearly interpolated (exact with ``log_every = 1``; with a coarser
  cadence the start of a decay is known to within one logging interval).
* A decay branch (``kind = branch``) continues its trunk (``parent``): its rates and areas start
  from the trunk's history; only its own steps are fitted, so no step is counted twice.
* Steps before ``fit_from`` x the group's longest run are left out (the law describes the
  power-law phase, not the first steps).
* ``lam`` is chosen on a grid by least squares (profile); ``alpha`` is profiled on a fine grid and
  then fitted jointly with ``L0, A, C`` by ``scipy.optimize.curve_fit``. The 95 % interval of a
  coefficient is the union of the percentile interval of a moving-block residual bootstrap within
  each run (blocks of about sqrt(n) steps, since per-step residuals are correlated) and +-1.96
  curve_fit standard errors, both conditional on the chosen ``lam``.

From the fit: the predicted loss curve of any schedule (:func:`predict_schedule`, with
:func:`trainer.schedule.lr_multiplier`), the predictions against held-out runs (schedules left
out of the fit with ``fit_schedules``), the rank agreement of predicted and observed final losses
at each horizon, and a ranking of candidate schedules.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, signal, stats

from sweeper.analysis.tables import AnalysisError, Tables
from trainer.config import ScheduleConfig
from trainer.schedule import lr_multiplier

PARAMS = ("L0", "A", "alpha", "C")
DEFAULT_LAMBDAS = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
LR_METRICS = ("lr_hidden", "lr_in", "lr_out", "lr")
GROUP_KEYS = ("model", "layout", "batch_size", "lr")
_ALPHAS = np.geomspace(0.02, 4.0, 160)
_FINAL_WINDOW = 3  # logged points averaged for a run's final loss


@dataclass(frozen=True, kw_only=True)
class LawOptions:
    """Options of the schedule-law fit.

    Attributes:
        fit_schedules: Schedule labels (``constant``, ``wsd0.2``, ``cosine``, ``cosine-w50``) or
            kinds (``wsd``) whose runs are fitted; the other runs are held out and predicted.
            None: every run is fitted (and nothing is held out).
        lambdas: Grid of the annealing decay ``lam``.
        fit_from: Steps before this fraction of the group's longest run are left out.
        n_boot: Bootstrap resamples (0: curve_fit covariance intervals only).
        seed: Bootstrap seed.
        loss: Metric fitted (``train_loss``).
    """

    fit_schedules: tuple[str, ...] | None = None
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    fit_from: float = 0.05
    n_boot: int = 100
    seed: int = 0
    loss: str = "train_loss"


@dataclass
class Curve:
    """One run's trajectory: its own logged steps and losses, and the rate of every step."""

    run_id: str
    label: str
    steps: np.ndarray  # logged steps of this run (>= 1) with a loss
    loss: np.ndarray
    eta: np.ndarray  # eta[s]: rate of the update that produced step s, s = 0..final step
    fitted: bool = True

    @property
    def final_step(self) -> int:
        return len(self.eta) - 1


@dataclass
class GroupFit:
    """The law of one (model, layout, B, peak rate) group."""

    key: dict[str, Any]
    curves: list[Curve]
    lam: float = float("nan")
    coef: dict[str, float] = field(default_factory=dict)
    se: dict[str, float] = field(default_factory=dict)
    ci: dict[str, list[float]] = field(default_factory=dict)
    boot: np.ndarray | None = None  # (n_boot, 4) coefficient draws
    rmse: float = float("nan")
    n_points: int = 0
    lam_profile: dict[float, float] = field(default_factory=dict)
    note: str = ""

    @property
    def identified(self) -> bool:
        return bool(self.coef) and all(math.isfinite(v) for v in self.coef.values())


# --------------------------------------------------------------------------- the law itself


def areas(eta: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``S1(s)`` and ``S2(s)`` for s = 0..T from per-step rates (``eta[0]`` is not an update)."""
    e = np.asarray(eta, dtype=float).copy()
    if len(e) == 0:
        return e, e
    e[0] = 0.0
    s1 = np.cumsum(e)
    delta = np.zeros_like(e)
    if len(e) > 2:
        delta[2:] = e[1:-1] - e[2:]
        peak = int(np.argmax(e[1:])) + 1  # first step at the peak rate: warmup ends there
        delta[: peak + 1] = 0.0
    m = signal.lfilter([1.0], [1.0, -lam], delta)
    return s1, np.cumsum(m)


def law(s1: np.ndarray, s2: np.ndarray, L0: float, A: float, alpha: float, C: float) -> np.ndarray:  # noqa: N803
    """``L0 + A S1^-alpha - C S2``."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.asarray(L0 + A * np.power(s1, -alpha) - C * s2)


def schedule_rates(cfg: ScheduleConfig, total_steps: int, peak: float) -> np.ndarray:
    """Per-step rates ``eta[0..T]`` of a schedule, as the trainer logs them (step s: update s-1)."""
    return np.array(
        [peak * lr_multiplier(cfg, max(0, s - 1), total_steps) for s in range(total_steps + 1)]
    )


def predict_curve(coef: dict[str, float], lam: float, eta: np.ndarray) -> np.ndarray:
    """Predicted loss at every step 0..T for the per-step rates ``eta`` (NaN at step 0)."""
    s1, s2 = areas(eta, lam)
    out = law(s1, s2, *(coef[p] for p in PARAMS))
    out[s1 <= 0] = np.nan
    return out


def predict_schedule(g: GroupFit, cfg: ScheduleConfig, total_steps: int) -> np.ndarray:
    """The predicted loss curve of a schedule at this group's peak rate."""
    return predict_curve(g.coef, g.lam, schedule_rates(cfg, total_steps, float(g.key["lr"])))


# ------------------------------------------------------------------------------------- data


def _lr_metric(metrics: pd.DataFrame) -> str:
    present = set(metrics["metric"].unique())
    for name in LR_METRICS:
        if name in present:
            return name
    raise AnalysisError(
        "--schedules: the metrics table has no per-step learning rate (lr_hidden, lr_in or "
        "lr_out); the schedule law needs it"
    )


def _label(kind: str, eta: np.ndarray) -> str:
    """``constant``, ``wsd0.2``, ``cosine`` (+ ``-w<N>`` for N warmup steps), from the rates."""
    peak = float(np.max(eta[1:])) if len(eta) > 1 else 0.0
    at_peak = np.flatnonzero(eta[1:] >= peak * (1 - 1e-6)) + 1
    warm = int(at_peak[0]) if len(at_peak) and eta[1] < peak * (1 - 1e-6) else 0
    total = len(eta) - 1
    decays = bool(len(at_peak)) and eta[-1] < peak * (1 - 1e-6)
    if kind in ("", "nan", "None"):
        kind = "decay" if decays else "constant"
    tag = kind
    if kind == "wsd" and decays and total > 0:
        start = int(at_peak[-1]) - 1  # the last update at the peak rate is the decay's step 0
        tag = f"wsd{(total - start) / total:.2g}"
    return tag + (f"-w{warm}" if warm else "")


def _matches(label: str, wanted: tuple[str, ...] | None) -> bool:
    if wanted is None:
        return True
    base = label.split("-w")[0]
    kind = re.sub(r"[0-9.]+$", "", base)
    return any(w in (label, base, kind) for w in wanted)


def build_curves(tables: Tables, opts: LawOptions) -> dict[tuple[Any, ...], list[Curve]]:
    """Every run's curve, grouped by (model, layout, B, peak rate)."""
    m = tables.metrics
    if m is None or m.empty:
        raise AnalysisError("--schedules: needs the per-step metrics table (metrics.parquet)")
    lr_name = _lr_metric(m)
    m = m[m["metric"].isin([opts.loss, lr_name])]
    wide = m.pivot_table(
        index=["run_id", "step"], columns="metric", values="value", aggfunc="last"
    ).reset_index()
    traj = {str(k): g.sort_values("step") for k, g in wide.groupby("run_id", sort=False)}
    h = tables.horizons.drop_duplicates("run_id")
    out: dict[tuple[Any, ...], list[Curve]] = {}
    for row in h.itertuples(index=False):
        c = _curve(row, traj, opts, lr_name)
        if c is None:
            continue
        key = (row.model, str(row.layout).split(" ")[0], int(row.batch_size), float(row.lr))
        out.setdefault(key, []).append(c)
    if not out:
        raise AnalysisError("--schedules: no run has logged steps with a loss and a rate")
    return out


def _curve(row: Any, traj: dict[str, pd.DataFrame], opts: LawOptions, lr_name: str) -> Curve | None:
    own = traj.get(str(row.run_id))
    if own is None or opts.loss not in own.columns or lr_name not in own.columns:
        return None
    full = own
    parent = str(getattr(row, "parent", "") or "")
    if parent and parent in traj and own["step"].min() > 0:
        prefix = traj[parent]
        full = pd.concat([prefix[prefix["step"] < own["step"].min()], own])
    rates = full.dropna(subset=[lr_name])
    if rates.empty:
        return None
    final = int(own["step"].max())
    eta = np.interp(np.arange(final + 1), rates["step"].to_numpy(float), rates[lr_name].to_numpy())
    pts = own.dropna(subset=[opts.loss])
    pts = pts[pts["step"] >= 1]
    if len(pts) < 3:
        return None
    kind = str(getattr(row, "schedule", "") or "")
    label = _label(kind, eta)
    steps = pts["step"].to_numpy(dtype=np.int64)
    return Curve(str(row.run_id), label, steps, pts[opts.loss].to_numpy(float), eta,
                 fitted=_matches(label, opts.fit_schedules))  # fmt: skip


# -------------------------------------------------------------------------------------- fit


def _stack(
    curves: list[Curve], lam: float, min_step: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """S1, S2 and loss of every fitted point, and the point indices of each curve."""
    s1s, s2s, ys, idx, n = [], [], [], [], 0
    for c in curves:
        s1, s2 = areas(c.eta, lam)
        keep = c.steps >= min_step
        st = c.steps[keep]
        s1s.append(s1[st])
        s2s.append(s2[st])
        ys.append(c.loss[keep])
        idx.append(np.arange(n, n + len(st)))
        n += len(st)
    return np.concatenate(s1s), np.concatenate(s2s), np.concatenate(ys), idx


def _profile(s1: np.ndarray, s2: np.ndarray, y: np.ndarray, with_c: bool) -> tuple[float, ...]:
    """Best (rss, alpha, L0, A, C) over the alpha grid, L0/A/C by linear least squares."""
    best: tuple[float, ...] = (math.inf, math.nan, math.nan, math.nan, math.nan)
    for a in _ALPHAS:
        cols = [np.ones_like(s1), s1**-a] + ([-s2] if with_c else [])
        x = np.column_stack(cols)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        rss = float(np.sum((x @ coef - y) ** 2))
        if rss < best[0]:
            c = float(coef[2]) if with_c else 0.0
            best = (rss, float(a), float(coef[0]), float(coef[1]), c)
    return best


def _refine(
    s1: np.ndarray, s2: np.ndarray, y: np.ndarray, p0: list[float], with_c: bool
) -> tuple[np.ndarray, np.ndarray]:
    """curve_fit of (L0, A, alpha[, C]) from ``p0``; returns (params, covariance)."""

    def f(x: np.ndarray, *p: float) -> np.ndarray:
        return law(x[0], x[1], p[0], p[1], p[2], p[3] if with_c else 0.0)

    start = p0 if with_c else p0[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p, cov = optimize.curve_fit(f, np.vstack([s1, s2]), y, p0=start, maxfev=4000,
                                        ftol=1e-12, xtol=1e-12)  # fmt: skip
        except (RuntimeError, ValueError):
            p, cov = np.asarray(start, float), np.full((len(start), len(start)), np.nan)
    if not with_c:
        p = np.append(p, 0.0)
        cov = np.pad(cov, ((0, 1), (0, 1)), constant_values=np.nan)
    return np.asarray(p, float), np.asarray(cov, float)


def fit_group(key: dict[str, Any], curves: list[Curve], opts: LawOptions) -> GroupFit:
    """Fit the law to the group's fitted curves (``Curve.fitted``)."""
    g = GroupFit(key=key, curves=curves)
    fitted = [c for c in curves if c.fitted]
    if not fitted:
        g.note = "no run of the fitted schedules"
        return g
    min_step = max(1.0, opts.fit_from * max(c.final_step for c in fitted))
    anneals = any(np.ptp(c.eta[1:]) > 0 for c in fitted)
    with_c = anneals
    best: tuple[float, ...] | None = None
    for lam in opts.lambdas if anneals else (opts.lambdas[-1],):
        s1, s2, y, _ = _stack(fitted, lam, min_step)
        prof = _profile(s1, s2, y, with_c)
        g.lam_profile[float(lam)] = prof[0]
        if best is None or prof[0] < best[0]:
            best, g.lam = prof, float(lam)
    assert best is not None
    s1, s2, y, idx = _stack(fitted, g.lam, min_step)
    g.n_points = len(y)
    if len(y) < 6:
        g.note = f"{len(y)} points: too few to fit"
        return g
    p, cov = _refine(s1, s2, y, [best[2], best[3], best[1], best[4]], with_c)
    resid = y - law(s1, s2, *p)
    g.rmse = float(np.sqrt(np.mean(resid**2)))
    g.coef = dict(zip(PARAMS, map(float, p), strict=True))
    g.se = dict(zip(PARAMS, map(float, np.sqrt(np.abs(np.diag(cov)))), strict=True))
    if not with_c:
        g.note = "no annealing in the fitted runs: C and lam are not identified"
        g.se["C"] = math.nan
    g.boot = _bootstrap(s1, s2, y, p, resid, idx, opts, with_c)
    g.ci = _intervals(g, with_c)
    return g


def _bootstrap(
    s1: np.ndarray,
    s2: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    resid: np.ndarray,
    idx: list[np.ndarray],
    opts: LawOptions,
    with_c: bool,
) -> np.ndarray | None:
    """Moving-block residual bootstrap within each run; ``lam`` held at its fitted value."""
    if opts.n_boot <= 0:
        return None
    rng = np.random.default_rng(opts.seed)
    yhat = y - resid
    draws = []
    for _ in range(opts.n_boot):
        r_star = np.empty_like(resid)
        for ix in idx:
            r = resid[ix]
            b = max(1, int(round(math.sqrt(len(r)))))
            starts = rng.integers(0, max(1, len(r) - b + 1), size=math.ceil(len(r) / b))
            r_star[ix] = np.concatenate([r[s : s + b] for s in starts])[: len(r)]
        q, _ = _refine(s1, s2, yhat + r_star, list(p), with_c)
        draws.append(q)
    return np.asarray(draws)


def _intervals(g: GroupFit, with_c: bool) -> dict[str, list[float]]:
    """95 % intervals: the wider of the bootstrap percentile interval and the curve_fit one.

    On planted curves with independent noise the percentile interval alone covered 78-90 % of the
    time, the covariance one 90-98 %; on real curves the residuals are correlated and the block
    bootstrap is the wider. Taking the union keeps both failure modes covered.
    """
    out = {}
    for j, name in enumerate(PARAMS):
        if name == "C" and not with_c:
            out[name] = [math.nan, math.nan]
            continue
        lo, hi = g.coef[name] - 1.96 * g.se[name], g.coef[name] + 1.96 * g.se[name]
        if g.boot is not None and len(g.boot) >= 20:
            v = g.boot[:, j][np.isfinite(g.boot[:, j])]
            lo = float(np.nanmin([lo, np.percentile(v, 2.5)]))
            hi = float(np.nanmax([hi, np.percentile(v, 97.5)]))
        out[name] = [lo, hi]
    return out


# ------------------------------------------------------------------- predictions and ranking


def _final(values: np.ndarray) -> float:
    return float(np.mean(values[-_FINAL_WINDOW:]))


def predictions(g: GroupFit) -> pd.DataFrame:
    """One row per run: observed and predicted final loss (mean of the last logged points), with
    the bootstrap interval of the prediction, and the RMSE along the run."""
    rows = []
    for c in g.curves:
        pred = predict_curve(g.coef, g.lam, c.eta)[c.steps] if g.identified else c.loss * np.nan
        lo = hi = math.nan
        if g.boot is not None and g.identified:
            tail = c.steps[-_FINAL_WINDOW:]
            s1, s2 = areas(c.eta, g.lam)
            finals = [float(np.mean(law(s1[tail], s2[tail], *b))) for b in g.boot]
            lo, hi = (float(v) for v in np.nanpercentile(finals, [2.5, 97.5]))
        ok = np.isfinite(pred)
        obs, fin = _final(c.loss), _final(pred)
        rows.append({**g.key, "run_id": c.run_id, "schedule": c.label, "fitted": c.fitted,
                     "final_step": c.final_step, "final_obs": obs, "final_pred": fin,
                     "final_pred_lo": lo, "final_pred_hi": hi, "error": fin - obs,
                     "rel_error": (fin - obs) / obs,
                     "rmse": float(np.sqrt(np.mean((pred[ok] - c.loss[ok]) ** 2)))
                     if ok.any() else math.nan})  # fmt: skip
    return pd.DataFrame(rows)


def rank_agreement(pred: pd.DataFrame) -> pd.DataFrame:
    """Per group and horizon with 2+ runs: Kendall's tau of predicted against observed final
    losses, and whether the predicted best schedule is the observed best."""
    rows = []
    for key, d in pred.groupby([*GROUP_KEYS, "final_step"], sort=True):
        if len(d) < 2:
            continue
        tau = stats.kendalltau(d["final_pred"], d["final_obs"]).statistic if len(d) > 2 else (
            1.0 if (np.argmin(d["final_pred"]) == np.argmin(d["final_obs"])) else -1.0)  # fmt: skip
        best_pred = d.loc[d["final_pred"].idxmin(), "schedule"]
        best_obs = d.loc[d["final_obs"].idxmin(), "schedule"]
        rows.append({**dict(zip([*GROUP_KEYS, "final_step"], key, strict=True)),
                     "n_runs": len(d), "kendall_tau": float(tau),
                     "order_pred": " < ".join(d.sort_values("final_pred")["schedule"]),
                     "order_obs": " < ".join(d.sort_values("final_obs")["schedule"]),
                     "best_agrees": bool(best_pred == best_obs)})  # fmt: skip
    return pd.DataFrame(rows)


def default_candidates(warmup: int) -> list[ScheduleConfig]:
    """Constant, WSD with 10-50 % decay, and cosine to 0 and to 10 %, all with ``warmup``."""
    w = {"warmup_steps": warmup}
    return [
        ScheduleConfig(kind="constant", **w),
        *(ScheduleConfig(kind="wsd", decay_fraction=f, **w) for f in (0.1, 0.2, 0.3, 0.5)),
        ScheduleConfig(kind="cosine", **w),
        ScheduleConfig(kind="cosine", min_lr_ratio=0.1, **w),
    ]


def rank_schedules(
    g: GroupFit, total_steps: int, candidates: list[ScheduleConfig] | None = None
) -> pd.DataFrame:
    """Candidate schedules at this group's peak rate, ranked by predicted final loss."""
    if not g.identified:
        return pd.DataFrame()
    warm = 0
    for c in g.curves:
        found = re.search(r"-w(\d+)$", c.label)
        warm = int(found.group(1)) if found else warm
    rows = []
    for cfg in candidates or default_candidates(warm):
        eta = schedule_rates(cfg, total_steps, float(g.key["lr"]))
        curve = predict_curve(g.coef, g.lam, eta)
        tail = np.arange(max(1, total_steps - _FINAL_WINDOW + 1), total_steps + 1)
        name = f"wsd{cfg.decay_fraction:g}" if cfg.kind == "wsd" else cfg.kind
        name += f" (to {cfg.min_lr_ratio:g})" if cfg.min_lr_ratio and cfg.kind != "constant" else ""
        name += f"-w{cfg.warmup_steps}" if cfg.warmup_steps else ""
        rows.append({**g.key, "schedule": name, "steps": total_steps,
                     "final_pred": float(np.mean(curve[tail]))})  # fmt: skip
    out = pd.DataFrame(rows).sort_values("final_pred", kind="stable").reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


# ------------------------------------------------------------------------------ the result


@dataclass
class ScheduleLaw:
    """The schedule law of a sweep: one fit per group, predictions, rank agreement, ranking."""

    options: LawOptions
    groups: list[GroupFit]
    predictions: pd.DataFrame
    agreement: pd.DataFrame
    ranking: pd.DataFrame
    warnings: list[str]

    def fits(self) -> pd.DataFrame:
        """One row per group: coefficients with their 95 % intervals and standard errors."""
        rows = []
        for g in self.groups:
            row: dict[str, Any] = {**g.key, "lam": g.lam, "n_points": g.n_points,
                                   "n_fitted_runs": sum(c.fitted for c in g.curves),
                                   "n_held_out": sum(not c.fitted for c in g.curves),
                                   "rmse": g.rmse, "note": g.note}  # fmt: skip
            for p in PARAMS:
                lo, hi = g.ci.get(p, [math.nan, math.nan])
                row |= {p: g.coef.get(p, math.nan), f"{p}_lo": lo, f"{p}_hi": hi,
                        f"{p}_se": g.se.get(p, math.nan)}  # fmt: skip
            row["fitted_schedules"] = ", ".join(sorted({c.label for c in g.curves if c.fitted}))
            rows.append(row)
        return pd.DataFrame(rows)

    def held_out(self) -> pd.DataFrame:
        """The predictions of runs left out of the fit."""
        p = self.predictions
        return p[~p["fitted"]] if not p.empty else p

    def document(self) -> dict[str, Any]:
        """The ``schedule_law`` entry of ``fits.json``."""
        from dataclasses import asdict

        held = self.held_out()
        summary = {
            "held_out_runs": len(held),
            "mean_abs_rel_error": float(held["rel_error"].abs().mean()) if len(held) else None,
            "max_abs_rel_error": float(held["rel_error"].abs().max()) if len(held) else None,
        }
        return {
            "law": "L(s) = L0 + A S1(s)^-alpha - C S2(s) (Tissue et al. 2024)",
            "options": asdict(self.options),
            "fits": self.fits().to_dict(orient="records"),
            "predictions": self.predictions.to_dict(orient="records"),
            "held_out_summary": summary,
            "rank_agreement": self.agreement.to_dict(orient="records"),
            "ranking": self.ranking.to_dict(orient="records"),
            "warnings": list(self.warnings),
        }


def fit_schedule_law(tables: Tables, opts: LawOptions | None = None) -> ScheduleLaw:
    """Fit the law per (model, layout, B, peak rate), predict every run, rank candidates."""
    opts = opts or LawOptions()
    groups, preds, ranks, warn = [], [], [], []
    for key, curves in sorted(build_curves(tables, opts).items(), key=lambda kv: str(kv[0])):
        g = fit_group(dict(zip(GROUP_KEYS, key, strict=True)), curves, opts)
        groups.append(g)
        name = f"{key[0]} [{key[1]}] B={key[2]} lr={key[3]:.4g}"
        if not g.identified:
            warn.append(f"schedule law {name}: not fitted ({g.note or 'fit failed'})")
            continue
        if g.note:
            warn.append(f"schedule law {name}: {g.note}")
        elif g.lam in (min(opts.lambdas), max(opts.lambdas)):
            warn.append(f"schedule law {name}: lam = {g.lam:g} is at the edge of its grid")
        if len({c.label for c in curves if c.fitted}) < 2:
            warn.append(
                f"schedule law {name}: fitted on one schedule only "
                f"({curves[0].label}); predictions of other schedules are extrapolations"
            )
        preds.append(predictions(g))
        ranks.append(rank_schedules(g, max(c.final_step for c in curves)))
    if opts.fit_schedules is not None and not any(c.fitted for g in groups for c in g.curves):
        raise AnalysisError(
            f"--fit-schedules {','.join(opts.fit_schedules)}: no run has one of these schedules "
            f"(present: {', '.join(sorted({c.label for g in groups for c in g.curves}))})"
        )
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    agree = rank_agreement(pred) if not pred.empty else pd.DataFrame()
    rank = pd.concat(ranks, ignore_index=True) if ranks else pd.DataFrame()
    return ScheduleLaw(opts, groups, pred, agree, rank, warn)
