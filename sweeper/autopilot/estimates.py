"""What the autopilot's rules read: a :class:`Snapshot` of the sweep's tables after a collect.

The optima come from the analysis (``sweeper.analysis``): the toolkit's fit per (model, layout, D,
B) slice with bootstrap intervals of the optimal norm x0 and of log2 eta*. Nothing here decides
anything; :mod:`sweeper.autopilot.rules` and :mod:`sweeper.autopilot.proposals` do.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sweeper import tables
from sweeper.analysis.api import AnalysisOptions, fit_options, resolve_intercept, smoothed_points
from sweeper.analysis.optimum import optima_from_points, slice_points
from sweeper.analysis.tables import AnalysisError, Tables, from_frames, layout_labels

# runs-table columns the rules use
RUN_COLUMNS = [
    "run_id", "kind", "model", "lr", "lr_in", "lr_hidden", "lr_out", "batch_size", "seed",
    "schedule", "weight_decay", "warmup_steps", "horizons_tokens", "max_tokens", "tokens_per_step",
    "start_step", "trained_tokens", "flops", "state", "tokens_done", "source",
]  # fmt: skip
FINAL_STATES = ("completed", "failed", "diverged", "cancelled", "stopped", "error")


@dataclass(frozen=True)
class Snapshot:
    """The sweep as the rules see it.

    Attributes:
        runs: One row per run: the run columns plus ``layout``, ``log2_lr``, ``final`` (the run
            ended), ``spent_tokens`` and ``spent_flops`` (what it trained so far).
        points: One row per (run, horizon reached): keys, ``log2_lr``, ``x`` (log2 norm, smoothed)
            and ``y`` (loss, smoothed).
        optima: One row per (model, layout, D, B) slice (``sweeper.analysis.optimum``).
        latest: One row per run with a logged step: ``tokens``, ``x`` (log2 output norm now),
            ``loss`` and ``monotone`` (the norm never decreased).
        initial_loss: The loss at initialisation per model.
    """

    runs: pd.DataFrame
    points: pd.DataFrame = field(default_factory=pd.DataFrame)
    optima: pd.DataFrame = field(default_factory=pd.DataFrame)
    latest: pd.DataFrame = field(default_factory=pd.DataFrame)
    initial_loss: dict[str, float] = field(default_factory=dict)

    @property
    def spent_tokens(self) -> int:
        """Tokens trained by every run so far."""
        return int(self.runs["spent_tokens"].sum()) if len(self.runs) else 0

    @property
    def spent_flops(self) -> float:
        """FLOPs spent by every run so far."""
        return float(self.runs["spent_flops"].sum()) if len(self.runs) else 0.0

    @functools.cached_property
    def cell_losses(self) -> dict[tuple[str, str, int, int], dict[float, float]]:
        """Per cell (model, layout, B, D): log2 rate (rounded) to the mean usable loss there."""
        p = self.points
        if p.empty:
            return {}
        p = p[np.isfinite(p["x"]) & np.isfinite(p["y"])].assign(r=p["log2_lr"].round(6))
        out: dict[tuple[str, str, int, int], dict[float, float]] = {}
        for (m, lay, b, d, r), y in p.groupby(["model", "layout", "batch_size", "tokens", "r"])[
            "y"
        ]:
            out.setdefault((str(m), str(lay), int(b), int(d)), {})[float(r)] = float(y.mean())
        return out

    @functools.cached_property
    def cell_points(self) -> dict[tuple[str, str, int, int], tuple[np.ndarray, np.ndarray]]:
        """Per cell: the usable points' x (log2 norm) and log2 rates."""
        p = self.points
        if p.empty:
            return {}
        p = p[np.isfinite(p["x"]) & np.isfinite(p["y"])]
        return {
            (str(m), str(lay), int(b), int(d)): (g["x"].to_numpy(), g["log2_lr"].to_numpy())
            for (m, lay, b, d), g in p.groupby(["model", "layout", "batch_size", "tokens"])
        }

    def valid_rates(self, model: str, layout: str, batch: int, tokens: int) -> list[float]:
        """log2 rates with a usable point in the cell, ascending."""
        return sorted(self.cell_losses.get((model, layout, batch, tokens), {}))

    @functools.cached_property
    def last_points(self) -> dict[str, tuple[int, float]]:
        """Per run: its latest horizon reached and its smoothed loss there."""
        p = self.points
        if p.empty:
            return {}
        last = p.sort_values(["run_id", "tokens"]).groupby("run_id").tail(1)
        return {str(r): (int(t), float(y)) for r, t, y in zip(last["run_id"], last["tokens"],
                                                             last["y"], strict=True)}  # fmt: skip


def take(sweep_root: Path, n_boot: int, seed: int = 0) -> Snapshot:
    """Read the (already collected) tables of a sweep into a :class:`Snapshot`."""
    runs = _runs(sweep_root)
    try:
        hz = tables.read_sweep_table(sweep_root, "horizons").to_pandas()
        metrics = _metrics(tables.read_sweep_table(sweep_root, "metrics"))
    except tables.TableError:
        return Snapshot(runs)
    latest = _latest(metrics)
    if hz.empty:
        return Snapshot(runs, latest=latest)
    try:
        t = from_frames(hz, metrics, source=str(sweep_root))
        opts = AnalysisOptions(n_boot=n_boot, seed=seed, plots=False)
        smoothed = smoothed_points(t, opts)
    except AnalysisError:
        return Snapshot(runs, latest=latest)
    pts = slice_points(smoothed)
    optima = _optima(t, pts, opts)
    points = pd.DataFrame(
        {
            "run_id": smoothed["run_id"].astype(str),
            "model": smoothed["model"],
            "layout": smoothed["layout"],
            "batch_size": smoothed["batch_size"].astype(int),
            "tokens": smoothed["tokens"].astype(int),
            "log2_lr": np.log2(smoothed["lr"].astype(float)),
            "x": np.log2(smoothed["x_norm"].astype(float).where(smoothed["x_norm"] > 0)),
            "y": smoothed["y_loss"].astype(float),
        }
    )
    return Snapshot(runs, points, optima, latest, dict(t.initial_loss))


def _optima(t: Tables, pts: pd.DataFrame, opts: AnalysisOptions) -> pd.DataFrame:
    intercept = resolve_intercept(t, opts)
    fit = fit_options(opts, intercept)
    optima = optima_from_points(pts, fit)
    if optima.empty:
        return optima
    return optima.assign(model=optima["model"].astype(str), layout=optima["layout"].astype(str))


def _runs(sweep_root: Path) -> pd.DataFrame:
    try:
        runs = tables.read_sweep_table(sweep_root, "runs").to_pandas()
    except tables.TableError:
        runs = pd.DataFrame(columns=RUN_COLUMNS)
    for col in RUN_COLUMNS:
        if col not in runs.columns:
            runs[col] = np.nan
    runs = runs[RUN_COLUMNS].copy()
    runs = runs[runs["lr"].notna() & (runs["lr"] > 0)].reset_index(drop=True)
    runs["model"] = runs["model"].astype(str)
    runs["layout"] = layout_labels(runs) if len(runs) else pd.Series(dtype=str)
    runs["log2_lr"] = np.log2(runs["lr"].astype(float))
    runs["final"] = runs["state"].isin(FINAL_STATES)
    tps = runs["tokens_per_step"].fillna(0).astype(float)
    start = runs["start_step"].fillna(0).astype(float) * tps
    done = runs["tokens_done"].fillna(0).astype(float)
    runs["spent_tokens"] = (done - start).clip(lower=0)
    per_token = runs["flops"].astype(float) / runs["trained_tokens"].astype(float).where(
        runs["trained_tokens"] > 0
    )
    runs["spent_flops"] = (runs["spent_tokens"] * per_token).fillna(0.0)
    return runs


def _metrics(table: pa.Table) -> pd.DataFrame:
    """The rows of the two metrics the smoothing and the rules read, with plain string keys
    (converting the whole dictionary-encoded table to pandas would cost seconds)."""
    table = table.filter(pc.is_in(table["metric"].cast(pa.string()), pa.array(_METRICS)))
    for name in ("run_id", "metric"):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table[name].cast(pa.string()))
    return table.to_pandas()


_METRICS = ["train_loss", "output_norm"]


def _latest(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each run's last logged tokens, log2 output norm and loss, and whether its norm grew
    monotonically (within a relative 1e-6) over every logged step."""
    cols = ["run_id", "tokens", "x", "loss", "monotone"]
    if metrics.empty:
        return pd.DataFrame(columns=cols)
    wide = (
        metrics.drop_duplicates(["run_id", "step", "metric"], keep="last")
        .set_index(["run_id", "step", "tokens", "metric"])["value"]
        .unstack("metric")
        .reset_index()
    )
    for col in ("output_norm", "train_loss"):
        if col not in wide.columns:
            wide[col] = np.nan
    wide = wide.sort_values(["run_id", "step"], kind="stable")
    norm = wide["output_norm"].astype(float)
    prev = norm.groupby(wide["run_id"]).shift(1)
    wide["drop"] = (norm < prev * (1 - 1e-6)) & prev.notna()
    g = wide.groupby("run_id", sort=False)
    last = g.tail(1).set_index("run_id")
    out = pd.DataFrame(
        {
            "run_id": last.index,
            "tokens": last["tokens"].astype(int).to_numpy(),
            "x": np.log2(last["output_norm"].astype(float).where(last["output_norm"] > 0)),
            "loss": last["train_loss"].astype(float).to_numpy(),
            "monotone": ~g["drop"].any().reindex(last.index).to_numpy(),
        }
    )
    return out.reset_index(drop=True)


def finite(value: Any) -> bool:
    """True for a finite number (not None, not NaN)."""
    return isinstance(value, int | float | np.floating | np.integer) and math.isfinite(value)
