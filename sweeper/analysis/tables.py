"""Reading horizons tables: the sweep's own Parquet, or a Parquet/CSV made elsewhere.

Two layouts are understood:

* the sweeper's (``sweeper collect``): one row per (run, horizon D) with ``lr, batch_size, tokens,
  train_loss, output_norm`` and optional ``model, run_id, seed, lr_in, lr_hidden, lr_out,
  train_loss_smoothed, train_loss_std, val_loss, step, state``;
* the norm-transfer toolkit's CSVs (``lr, bs, step, horizon, train_loss, output_norm`` and optional
  ``lr_in, lr_hidden, lr_out, seed, run_name``; or its seed-aggregated form with ``train_loss_mean,
  output_norm_mean, train_loss_std``). These hold every logged step, so the rows at the horizons are
  picked out (powers of two unless told otherwise) and, optionally, smoothed over the neighbouring
  logged points as the toolkit does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeper.errors import SweepError
from sweeper.store import atomic_write

REQUIRED = ("lr", "batch_size", "tokens", "train_loss", "output_norm")
NT_REQUIRED = ("lr", "bs", "step", "horizon", "train_loss", "output_norm")
_NUMERIC = (
    "lr",
    "lr_in",
    "lr_hidden",
    "lr_out",
    "batch_size",
    "tokens",
    "step",
    "seed",
    "train_loss",
    "train_loss_smoothed",
    "train_loss_std",
    "val_loss",
    "output_norm",
    "output_norm_smoothed",
)


class AnalysisError(SweepError):
    """Bad input to the analysis (a missing file or column, an unusable value); one line."""


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a Parquet or CSV file, with a one-line :class:`AnalysisError` on any failure."""
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".csv", ".txt"):
            return pd.read_csv(p)
    except Exception as e:  # pyarrow and pandas raise many types; all mean "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AnalysisError(f"{p}: cannot read table ({first})") from None
    raise AnalysisError(f"{p}: unknown table format {suffix!r} (expected .parquet or .csv)")


def is_nt_layout(df: pd.DataFrame) -> bool:
    """True for the norm-transfer toolkit's CSV layout (``bs``/``horizon`` instead of ours)."""
    return "bs" in df.columns and "batch_size" not in df.columns


def load_horizons(
    path: str | os.PathLike[str],
    *,
    horizons: Sequence[int] | None = None,
    smooth_window: int = 1,
) -> pd.DataFrame:
    """Load a horizons table of either layout and normalise it to the sweeper's columns.

    Args:
        path: Parquet or CSV file.
        horizons: Token budgets to keep (toolkit layout only; default: the powers of two present).
        smooth_window: For the toolkit layout, average over this many logged points either side of
            each horizon (its ``AVG_REL_FROM/TO``); 0 keeps the raw point.

    Returns:
        A frame with at least ``model, layout, run_id, lr, batch_size, tokens, train_loss,
        output_norm, train_loss_smoothed, train_loss_std``.

    Raises:
        AnalysisError: unreadable file, missing columns (named), or non-numeric values.
    """
    df = read_table(path)
    name = Path(path).stem
    if is_nt_layout(df):
        df = _from_nt(df, path, horizons=horizons, smooth_window=smooth_window)
        name = name.split("-momentum")[0]
    return normalise(df, source=str(path), default_model=name)


def normalise(df: pd.DataFrame, *, source: str, default_model: str = "model") -> pd.DataFrame:
    """Check and complete a horizons frame in the sweeper's layout (see :func:`load_horizons`)."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise AnalysisError(
            f"{source}: missing columns {', '.join(missing)} (a horizons table needs "
            f"{', '.join(REQUIRED)})"
        )
    df = df.copy()
    for col in _NUMERIC:
        if col in df.columns:
            df[col] = _numeric(df[col], source, col)
    if "model" not in df.columns:
        df["model"] = default_model
    df["model"] = df["model"].astype(str)
    if "state" not in df.columns:
        df["state"] = "completed"
    for col in ("train_loss_smoothed", "train_loss_std", "val_loss", "seed"):
        if col not in df.columns:
            df[col] = np.nan
    df["layout"] = layout_labels(df)
    df = _drop_initial_rows(df)
    if "run_id" not in df.columns:
        df["run_id"] = _synth_run_ids(df)
    df["run_id"] = df["run_id"].astype(str)
    bad = ~(df["lr"].gt(0) & df["batch_size"].gt(0) & df["tokens"].gt(0))
    if bad.any():
        row = df[bad].iloc[0]
        raise AnalysisError(
            f"{source}: lr, batch_size and tokens must be > 0 (run {row['run_id']}: "
            f"lr = {row['lr']}, batch_size = {row['batch_size']}, tokens = {row['tokens']})"
        )
    df["batch_size"] = df["batch_size"].astype("int64")
    df["tokens"] = df["tokens"].astype("int64")
    return df.reset_index(drop=True)


def layout_labels(df: pd.DataFrame) -> pd.Series:
    """Series label of each row: the per-group LR layout ``in:hidden:out`` as multiples of ``lr``.

    ``1:1:1`` when the table has no per-group rates. When the table mixes schedules (``schedule``)
    or decay branches with other runs (``kind``), the label gets the schedule and ``branch``
    appended (``"1:1:1 wsd branch"``), so such runs never share a slice with constant-rate ones.
    """
    if {"lr_in", "lr_hidden", "lr_out"} <= set(df.columns):
        ratios = [(df[c] / df["lr"]).map(_fmt_ratio) for c in ("lr_in", "lr_hidden", "lr_out")]
        label = ratios[0] + ":" + ratios[1] + ":" + ratios[2]
    else:
        label = pd.Series("1:1:1", index=df.index)
    if "schedule" in df.columns and df["schedule"].nunique(dropna=True) > 1:
        label = label + " " + df["schedule"].fillna("unknown").astype(str)
    if "kind" in df.columns:
        branch = df["kind"].astype(str) == "branch"
        if branch.any() and not branch.all():
            label = label + branch.map({True: " branch", False: ""})
    return label


def layout_scales(label: str) -> list[float]:
    """The ``[in, hidden, out]`` LR multipliers of a series label."""
    return [float(v) for v in label.split(" ")[0].split(":")]


def _drop_initial_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows at 0 tokens (before any update) are not horizons; their loss is the initial loss."""
    init = df["tokens"] == 0
    if not init.any():
        return df
    out = df[~init].copy()
    first = df[init].dropna(subset=["train_loss"])
    if not first.empty and "initial_loss" not in out.attrs:
        out.attrs["initial_loss"] = float(first["train_loss"].median())
        per_model = first.groupby("model")["train_loss"].median()
        out.attrs["initial_loss_per_model"] = {str(k): float(v) for k, v in per_model.items()}
    return out


def _fmt_ratio(v: float) -> str:
    if not math.isfinite(v):
        return "1"
    return f"{v:.4g}"


def _numeric(col: pd.Series, source: str, name: str) -> pd.Series:
    out = pd.to_numeric(col, errors="coerce")
    bad = out.isna() & col.notna()
    if bad.any():
        raise AnalysisError(f"{source}: column {name} has a non-numeric value {col[bad].iloc[0]!r}")
    return out.astype("float64")


def _synth_run_ids(df: pd.DataFrame) -> pd.Series:
    seed = df["seed"].map(lambda s: "" if pd.isna(s) else f"-s{int(s)}")
    return (
        df["model"]
        + "-lr"
        + df["lr"].map(lambda v: f"{v:.6g}")
        + "-bs"
        + df["batch_size"].map(lambda v: f"{int(v)}")
        + "-"
        + df["layout"]
        + seed
    )


def _from_nt(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    horizons: Sequence[int] | None,
    smooth_window: int,
) -> pd.DataFrame:
    """Map the toolkit's columns onto ours and pick (and smooth) the rows at the horizons."""
    df = df.rename(columns={"train_loss_mean": "train_loss", "output_norm_mean": "output_norm"})
    missing = [c for c in NT_REQUIRED if c not in df.columns]
    if missing:
        raise AnalysisError(
            f"{path}: missing columns {', '.join(missing)} (the norm-transfer CSV layout needs "
            f"{', '.join(NT_REQUIRED)})"
        )
    for col in ("lr", "bs", "step", "horizon", "train_loss", "output_norm"):
        df[col] = _numeric(df[col], str(path), col)
    df = df.rename(columns={"bs": "batch_size", "horizon": "tokens"})
    if "run_name" in df.columns and "run_id" not in df.columns:
        df = df.rename(columns={"run_name": "run_id"})
    keys = [c for c in ("run_id", "lr", "lr_in", "lr_hidden", "lr_out", "batch_size", "seed")]
    keys = [c for c in keys if c in df.columns]
    df = df.sort_values([*keys, "step"], kind="stable").reset_index(drop=True)
    if smooth_window > 0 and "train_loss_smoothed" not in df.columns:
        df = _smooth_neighbours(df, keys, smooth_window)
    step0 = df.loc[df["step"] == 0, "train_loss"].dropna()
    wanted = set(int(h) for h in horizons) if horizons else None
    tok = df["tokens"].to_numpy()
    if wanted is None:
        ok = np.isfinite(tok) & (tok > 0)
        itok = np.where(ok, tok, 1).astype(np.int64)
        keep = ok & (itok & (itok - 1) == 0)
    else:
        keep = df["tokens"].isin(wanted).to_numpy()
    out = df[keep].copy()
    if out.empty:
        raise AnalysisError(f"{path}: no rows at a horizon (tokens a power of two or --horizons)")
    if not step0.empty:
        out.attrs["initial_loss"] = float(step0.median())
    return out


def _smooth_neighbours(df: pd.DataFrame, keys: list[str], w: int) -> pd.DataFrame:
    """Toolkit smoothing over +-w logged points: loss mean and population std, norm geometric mean.

    Only neighbours within 10 % of the row's token count take part, so a table holding just the
    horizon rows (no per-step log) is not averaged across horizons.
    """
    df = df.copy()
    run = df.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
    tok = df["tokens"].to_numpy(dtype=float)
    loss = df["train_loss"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        lnorm = np.log(df["output_norm"].to_numpy(dtype=float))
    n = len(df)
    s1, s2, sl, cnt = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for off in range(-w, w + 1):
        j = np.arange(n) + off
        ok = (j >= 0) & (j < n)
        jj = np.clip(j, 0, n - 1)
        ok &= (run[jj] == run) & (np.abs(tok[jj] - tok) <= 0.1 * tok)
        ok &= np.isfinite(loss[jj]) & np.isfinite(lnorm[jj])
        s1 += np.where(ok, loss[jj], 0.0)
        s2 += np.where(ok, loss[jj] ** 2, 0.0)
        sl += np.where(ok, lnorm[jj], 0.0)
        cnt += ok
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / cnt
        var = np.maximum(s2 / cnt - mean**2, 0.0)
        df["train_loss_smoothed"] = mean
        df["train_loss_std"] = np.where(cnt > 1, np.sqrt(var), np.nan)
        df["output_norm"] = np.where(cnt > 0, np.exp(sl / cnt), df["output_norm"])
    return df


def load_metrics(path: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The long per-step metrics table (``run_id, step, tokens, metric, value``), if it exists."""
    p = Path(path)
    if not p.is_file():
        return None
    df = read_table(p)
    missing = [c for c in ("run_id", "tokens", "metric", "value") if c not in df.columns]
    if missing:
        raise AnalysisError(f"{p}: missing columns {', '.join(missing)}")
    return df


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    """Write a frame as Parquet atomically, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: df.to_parquet(f, index=False))


def unique_sorted(values: Iterable[Any]) -> list[Any]:
    """Sorted distinct values."""
    return sorted(set(values))
