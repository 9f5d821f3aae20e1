"""The one smoothing of noisy horizon points, for the sweeper's tables and tables made elsewhere.

The norm-transfer toolkit (``select_avg_window_at_horizon``) replaces the point of a run at horizon
D by an average over a window of the run's *logged points*: from ``rel_from`` to ``rel_to``
positions around the first logged point at D, in the run's step order, clipped to the run. The loss
is the window's mean and its population standard deviation becomes the weight 1/std^2; the norm is
the geometric mean (x = log2 norm is averaged). The window is applied only at the horizons listed in
``average_tokens`` and the batch sizes listed in ``average_batch`` (the toolkit's ``AVERAGE_H`` and
``AVERAGE_BS``; ``None`` means everywhere). Elsewhere the raw point is kept with no weight.

The per-step trajectory comes from the long metrics table (``run_id, step, tokens, metric, value``):
``metrics.parquet`` for the sweeper's own sweeps, the CSV itself for the toolkit's layout (which
holds every logged step). A horizon row whose step is not in the trajectory keeps the window columns
the table already has (``sweeper collect`` writes them with the same +-1 logged-point rule), or the
raw point if it has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sweeper.analysis.tables import AnalysisError

# Columns this module adds to a horizons table.
X_COL, Y_COL, STD_COL, N_COL, SRC_COL = "x_norm", "y_loss", "y_std", "n_window", "smoothed_from"
D2_COL = "loss_d2"


@dataclass(frozen=True, kw_only=True)
class SmoothOptions:
    """Where and how horizon points are averaged over neighbouring logged points.

    Attributes:
        enabled: False uses the raw loss and the raw norm at D, unweighted (``--no-smooth``).
        rel_from: First logged point of the window, relative to the one at D (<= 0).
        rel_to: Last logged point of the window, relative to the one at D (>= 0).
        average_tokens: Horizons D at which to average (``None``: every D).
        average_batch: Batch sizes at which to average (``None``: every B).
    """

    enabled: bool = True
    rel_from: int = -1
    rel_to: int = 1
    average_tokens: tuple[int, ...] | None = None
    average_batch: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.rel_from > 0 or self.rel_to < 0:
            raise AnalysisError(
                f"smoothing window {self.rel_from}:{self.rel_to}: must include the point at D "
                "(from <= 0 <= to)"
            )

    @property
    def is_default_window(self) -> bool:
        """True for the +-1 logged-point window that ``sweeper collect`` precomputes."""
        return (self.rel_from, self.rel_to) == (-1, 1)


def trajectories(metrics: pd.DataFrame | None) -> pd.DataFrame:
    """Per-step ``run_id, step, train_loss, output_norm`` from a long metrics table, in step order.

    Returns an empty frame when there is no metrics table or it has neither metric.
    """
    cols = ["run_id", "step", "train_loss", "output_norm"]
    if metrics is None or metrics.empty or "step" not in metrics.columns:
        return pd.DataFrame(columns=cols)
    m = metrics[metrics["metric"].astype(str).isin(("train_loss", "output_norm"))]
    if m.empty:
        return pd.DataFrame(columns=cols)
    m = m.assign(run_id=m["run_id"].astype(str), metric=m["metric"].astype(str))
    # one value per (run, step, metric); a logged NaN stays (it makes its windows NaN)
    m = m.drop_duplicates(["run_id", "step", "metric"], keep="first")
    wide = m.set_index(["run_id", "step", "metric"])["value"].unstack("metric")
    wide = wide.reindex(columns=["train_loss", "output_norm"]).reset_index()
    wide.columns.name = None
    return wide.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)[cols]


def window_stats(
    traj: pd.DataFrame, run_id: np.ndarray, step: np.ndarray, rel_from: int, rel_to: int
) -> pd.DataFrame:
    """Window statistics around each (run, step) target, by position in the run's logged points.

    Args:
        traj: :func:`trajectories` output (sorted by run and step).
        run_id, step: The targets.
        rel_from, rel_to: The window, in logged points relative to the target.

    Returns:
        One row per target: ``found`` (the step is logged), ``loss_mean``, ``loss_std``
        (population), ``norm_geo`` (geometric mean), ``n``, and ``d2``: the second difference of
        the loss over the target and its neighbouring logged points (centred where the run has a
        point on each side). A non-finite value in the window makes its statistics NaN, as in the
        toolkit (the point is then dropped as diverged).
    """
    n_t = len(run_id)
    if traj.empty or n_t == 0:
        nan = np.full(n_t, np.nan)
        return pd.DataFrame(
            {"found": np.zeros(n_t, bool), "loss_mean": nan, "loss_std": nan, "norm_geo": nan,
             "n": np.zeros(n_t), "d2": nan}
        )  # fmt: skip
    runs = pd.Index(np.unique(traj["run_id"].to_numpy(dtype=str)))
    code = runs.get_indexer(traj["run_id"].to_numpy(dtype=str)).astype(np.int64)
    tcode = runs.get_indexer(np.asarray(run_id, dtype=str)).astype(np.int64)
    key = code * (1 << 40) + traj["step"].to_numpy(dtype=np.int64)
    target = tcode * (1 << 40) + np.asarray(step, dtype=np.int64)
    pos = np.minimum(np.searchsorted(key, target), len(key) - 1)
    found = (tcode >= 0) & (key[pos] == target)
    loss = traj["train_loss"].to_numpy(dtype=float)
    norm = traj["output_norm"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lnorm = np.log2(np.where(norm > 0, norm, np.nan))
    offsets = np.arange(rel_from, rel_to + 1)
    j = pos[:, None] + offsets[None, :]
    jj = np.clip(j, 0, len(key) - 1)
    inside = found[:, None] & (j >= 0) & (j < len(key)) & (code[jj] == tcode[:, None])
    cnt = inside.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(inside, loss[jj], 0.0).sum(axis=1) / cnt
        var = np.where(inside, (loss[jj] - mean[:, None]) ** 2, 0.0).sum(axis=1) / cnt
        geo = np.exp2(np.where(inside, lnorm[jj], 0.0).sum(axis=1) / cnt)
    return pd.DataFrame(
        {"found": found, "loss_mean": mean, "loss_std": np.sqrt(var), "norm_geo": geo, "n": cnt,
         "d2": _second_difference(loss, code, pos, tcode, found)}
    )  # fmt: skip


def _second_difference(
    loss: np.ndarray, code: np.ndarray, pos: np.ndarray, tcode: np.ndarray, found: np.ndarray
) -> np.ndarray:
    """``y[i-1] - 2 y[i] + y[i+1]`` around each target along its run's logged points (shifted
    back, or forward, by one point at the run's ends). Its spread is sqrt(6) times the noise of one
    logged loss, free of the loss's trend to first order."""
    n = len(loss)

    def same(off: int) -> np.ndarray:
        j = pos + off
        return np.asarray(found & (j >= 0) & (j < n) & (code[np.clip(j, 0, n - 1)] == tcode))

    centre = np.where(same(-1) & same(1), pos, np.where(same(-2) & same(-1), pos - 1, pos + 1))
    ok = same(-1) & same(1) | same(-2) & same(-1) | same(1) & same(2)
    c = np.clip(centre, 1, max(n - 2, 1))
    with np.errstate(invalid="ignore"):
        d2 = loss[c - 1] - 2 * loss[c] + loss[np.minimum(c + 1, n - 1)]
    return np.asarray(np.where(ok & (n >= 3), d2, np.nan))


def _applies(values: pd.Series, listed: tuple[int, ...] | None) -> np.ndarray:
    if listed is None:
        return np.ones(len(values), dtype=bool)
    return np.asarray(values.isin(set(listed)).to_numpy(), dtype=bool)


def smooth_points(
    horizons: pd.DataFrame, traj: pd.DataFrame, opts: SmoothOptions, loss: str = "train_loss"
) -> pd.DataFrame:
    """The (x, y, std) of every horizon row: smoothed where the window applies, raw elsewhere.

    Adds ``x_norm`` (the norm, geometric mean over the window), ``y_loss``, ``y_std`` (the window's
    population std, NaN where no window was applied: such points get equal weights), ``n_window``
    (points averaged; 1 for a raw point) and ``smoothed_from`` (``metrics``: the window over the
    per-step trajectory; ``table``: the table's own window columns; ``raw``), and ``loss_d2`` (the
    second difference of the logged loss around D, for the noise estimate; NaN without a
    trajectory). Only the train loss is smoothed; with ``loss="val_loss"`` both axes are the raw
    values at D.
    """
    out = horizons.copy()
    out[X_COL] = out["output_norm"].astype(float)
    out[Y_COL] = out[loss].astype(float)
    out[STD_COL] = np.nan
    out[N_COL] = 1.0
    out[SRC_COL] = "raw"
    out[D2_COL] = np.nan
    if not opts.enabled or loss != "train_loss" or out.empty:
        return out
    apply = _applies(out["tokens"], opts.average_tokens) & _applies(
        out["batch_size"], opts.average_batch
    )
    w = window_stats(
        traj, out["run_id"].to_numpy(), out["step"].to_numpy(), opts.rel_from, opts.rel_to
    )
    use = apply & w["found"].to_numpy()
    for col, src in (
        (X_COL, "norm_geo"),
        (Y_COL, "loss_mean"),
        (STD_COL, "loss_std"),
        (N_COL, "n"),
    ):
        out.loc[use, col] = w.loc[use, src].to_numpy()
    out.loc[use, SRC_COL] = "metrics"
    found = w["found"].to_numpy()
    out.loc[found, D2_COL] = w.loc[found, "d2"].to_numpy()
    # Rows not in the trajectory: the table's own window columns (collect's +-1 logged points).
    table = apply & ~use & out["train_loss_smoothed"].notna().to_numpy()
    if opts.is_default_window and table.any():
        out.loc[table, Y_COL] = out.loc[table, "train_loss_smoothed"]
        out.loc[table, STD_COL] = out.loc[table, "train_loss_std"]
        if "output_norm_smoothed" in out.columns:
            geo = out.loc[table, "output_norm_smoothed"]
            out.loc[table, X_COL] = geo.where(geo.notna(), out.loc[table, X_COL])
        n = out["smoothing_points"] if "smoothing_points" in out.columns else None
        out.loc[table, N_COL] = np.nan if n is None else n[table].to_numpy(dtype=float)
        out.loc[table, SRC_COL] = "table"
    return out
