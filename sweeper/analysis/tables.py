"""Reading the analysis's input: a sweep's tables, or a Parquet/CSV table made elsewhere.

Two layouts are understood:

* the sweeper's (``sweeper collect``): ``horizons.parquet``, one row per (run, horizon D) with
  ``lr, batch_size, tokens, train_loss, output_norm`` and optional ``model, run_id, seed, lr_in,
  lr_hidden, lr_out, step, train_loss_smoothed, train_loss_std, output_norm_smoothed, val_loss``,
  and the long per-step ``metrics.parquet``. A sweep's own files are read through
  :mod:`sweeper.tables`, which checks their table name and schema version;
* the norm-transfer toolkit's CSVs (``lr, bs, step, horizon, train_loss, output_norm`` and optional
  ``lr_in, lr_hidden, lr_out, seed, run_name``; or its seed-aggregated form with
  ``train_loss_mean, output_norm_mean``). They hold every logged step: the rows at the horizons
  become the horizons table, and all rows become the per-step metrics table that the smoothing
  window (:mod:`sweeper.analysis.smoothing`) reads, exactly as for the sweeper's own tables.

Rows at 0 tokens are not horizons: their loss is the loss at initialisation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sweeper import tables
from sweeper.errors import SweepError

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
_METRIC_COLUMNS = ["run_id", "step", "tokens", "metric", "value"]


class AnalysisError(SweepError):
    """Bad input to the analysis (a missing file or column, an unusable value); one line."""


@dataclass(frozen=True)
class Tables:
    """The analysis's input, normalised to the sweeper's layout.

    Attributes:
        horizons: One row per (run, horizon D); at least ``model, layout, run_id, lr, batch_size,
            tokens, step, train_loss, output_norm``.
        metrics: The long per-step table (``run_id, step, tokens, metric, value``), or None.
        initial_loss: Median loss at 0 tokens per model (empty when no table has one).
        initial_origin: Where ``initial_loss`` came from, in words.
        source: The file or directory read, for the report.
        title: A short name (the sweep, or the file's stem).
    """

    horizons: pd.DataFrame
    metrics: pd.DataFrame | None = None
    initial_loss: dict[str, float] = field(default_factory=dict)
    initial_origin: str = ""
    source: str = ""
    title: str = ""


# ------------------------------------------------------------------------------------ reading


def read_frame(path: str | os.PathLike[str], expect: str = "horizons") -> pd.DataFrame:
    """Read a Parquet or CSV file as a frame, with a one-line :class:`AnalysisError` on failure.

    A Parquet file that carries the sweeper's table metadata is read through
    :func:`sweeper.tables.read_table`, so a table of another kind (``expect``) or another schema
    version is refused; any other Parquet or CSV file is a table made elsewhere.
    """
    p = Path(path)
    if not p.is_file():
        raise AnalysisError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        meta = tables.read_metadata(p)
        if tables.META_TABLE in meta:
            return tables.read_table(p, expect).to_pandas()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".csv", ".txt"):
            return pd.read_csv(p)
    except Exception as e:  # pyarrow and pandas raise many types; all mean "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AnalysisError(f"{p}: cannot read table ({first})") from None
    raise AnalysisError(f"{p}: unknown table format {suffix!r} (expected .parquet or .csv)")


def load_sweep(sweep_dir: str | os.PathLike[str]) -> Tables:
    """A sweep's ``horizons.parquet`` and (if present) ``metrics.parquet``, schema-checked."""
    sdir = Path(sweep_dir)
    path = tables.table_path(sdir, "horizons")
    if not path.is_file():
        raise AnalysisError(f"{path}: no such file (run `sweeper collect {sdir.name}` first)")
    horizons = tables.read_table(path, "horizons").to_pandas()
    mpath = tables.table_path(sdir, "metrics")
    metrics = None
    if mpath.is_file():
        metrics = tables.read_table(mpath, "metrics", _METRIC_COLUMNS).to_pandas()
    return from_frames(horizons, metrics, source=str(path), title=sdir.name)


def load_file(
    path: str | os.PathLike[str],
    *,
    horizons: Sequence[int] | None = None,
    metrics_path: str | os.PathLike[str] | None = None,
) -> Tables:
    """A horizons table made elsewhere (either layout), with an optional metrics table.

    Args:
        path: Parquet or CSV file.
        horizons: Token budgets to keep (toolkit layout only; default: the powers of two present).
        metrics_path: The long per-step metrics table, if any (the toolkit's layout brings its own).

    Raises:
        AnalysisError: unreadable file, missing columns (named), or non-numeric values.
    """
    df = read_frame(path, "horizons")
    name = Path(path).stem
    metrics = None if metrics_path is None else load_metrics(metrics_path)
    if is_nt_layout(df):
        df, nt_metrics = from_nt(df, str(path), horizons=horizons)
        metrics = nt_metrics if metrics is None else metrics
        name = name.split("-momentum")[0]
    return from_frames(df, metrics, source=str(path), title=Path(path).stem, default_model=name)


def load_metrics(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The long per-step metrics table (``run_id, step, tokens, metric, value``)."""
    df = read_frame(path, "metrics")
    missing = [c for c in ("run_id", "step", "tokens", "metric", "value") if c not in df.columns]
    if missing:
        raise AnalysisError(f"{path}: missing columns {', '.join(missing)}")
    return df


def from_frames(
    horizons: pd.DataFrame,
    metrics: pd.DataFrame | None = None,
    *,
    source: str = "table",
    title: str = "",
    default_model: str = "model",
) -> Tables:
    """Normalise a horizons frame (sweeper layout) and find the loss at initialisation."""
    df, first = normalise(horizons, source=source, default_model=default_model)
    if metrics is not None:
        metrics = metrics.assign(
            run_id=metrics["run_id"].astype(str), metric=metrics["metric"].astype(str)
        )
    init, origin = initial_losses(df, first, metrics)
    return Tables(df, metrics, init, origin, source, title)


# ------------------------------------------------------------------------------ normalising


def is_nt_layout(df: pd.DataFrame) -> bool:
    """True for the norm-transfer toolkit's CSV layout (``bs``/``horizon`` instead of ours)."""
    return "bs" in df.columns and "batch_size" not in df.columns


def normalise(
    df: pd.DataFrame, *, source: str, default_model: str = "model"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check and complete a horizons frame in the sweeper's layout.

    Returns:
        ``(horizons, initial_rows)``: the rows at D > 0, and the rows at 0 tokens (whose loss is the
        loss at initialisation).
    """
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
    for col in ("train_loss_smoothed", "train_loss_std", "val_loss", "seed", "step"):
        if col not in df.columns:
            df[col] = np.nan
    df["layout"] = layout_labels(df)
    if "run_id" not in df.columns:
        df["run_id"] = _synth_run_ids(df)
    df["run_id"] = df["run_id"].astype(str)
    first = df[df["tokens"] == 0]
    df = df[df["tokens"] != 0]
    bad = ~(df["lr"].gt(0) & df["batch_size"].gt(0) & df["tokens"].gt(0))
    if bad.any():
        row = df[bad].iloc[0]
        raise AnalysisError(
            f"{source}: lr, batch_size and tokens must be > 0 (run {row['run_id']}: "
            f"lr = {row['lr']}, batch_size = {row['batch_size']}, tokens = {row['tokens']})"
        )
    df = df.astype({"batch_size": "int64", "tokens": "int64"})
    # A run read twice at one horizon (a resumed log): the first row counts, as in the toolkit.
    df = df.drop_duplicates(["run_id", "tokens"], keep="first")
    return df.reset_index(drop=True), first.reset_index(drop=True)


def layout_labels(df: pd.DataFrame) -> pd.Series:
    """Series label of each row: the per-group LR layout ``in:hidden:out`` as multiples of ``lr``.

    ``1:1:1`` when the table has no per-group rates. When the table mixes schedules (``schedule``,
    a tag such as ``wsd0.2``) or WSD trunks and decay branches with other runs (``kind``), the
    label gets the schedule and ``trunk``/``branch`` appended (``"1:1:1 wsd0.2 branch"``), so such
    runs never share a slice with constant-rate ones.
    """
    if {"lr_in", "lr_hidden", "lr_out"} <= set(df.columns):
        ratios = [(df[c] / df["lr"]).map(_fmt_ratio) for c in ("lr_in", "lr_hidden", "lr_out")]
        label = ratios[0] + ":" + ratios[1] + ":" + ratios[2]
    else:
        label = pd.Series("1:1:1", index=df.index)
    if "schedule" in df.columns and df["schedule"].nunique(dropna=True) > 1:
        label = label + " " + df["schedule"].fillna("unknown").astype(str)
    if "kind" in df.columns:
        kind = df["kind"].astype(str)
        # a WSD trunk (read at its fork points) never joins the constant-rate runs' series
        for name in ("trunk", "branch"):
            hit = kind == name
            if hit.any() and not hit.all():
                label = label + hit.map({True: f" {name}", False: ""})
    return label


def layout_scales(label: str) -> list[float]:
    """The ``[in, hidden, out]`` LR multipliers of a series label."""
    return [float(v) for v in label.split(" ")[0].split(":")]


def initial_losses(
    df: pd.DataFrame, first: pd.DataFrame, metrics: pd.DataFrame | None
) -> tuple[dict[str, float], str]:
    """Per-model median loss at initialisation, and where it came from.

    Looks at the table's rows at 0 tokens, then at the step-0 ``train_loss`` of the metrics table
    (every run of a model starts from the same loss, about ln(vocab_size)).
    """
    rows = first.dropna(subset=["train_loss"])
    if not rows.empty:
        per = rows.groupby("model")["train_loss"].median()
        return {str(k): float(v) for k, v in per.items()}, "median step-0 loss of the table"
    if metrics is None or "step" not in metrics.columns:
        return {}, "none found"
    m = metrics[(metrics["metric"] == "train_loss") & (metrics["step"] == 0)]
    m = m.dropna(subset=["value"]).merge(
        df[["run_id", "model"]].drop_duplicates("run_id"), on="run_id", how="inner"
    )
    if m.empty:
        return {}, "none found"
    per = m.groupby("model")["value"].median()
    return {str(k): float(v) for k, v in per.items()}, "median step-0 train_loss of the metrics"


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


# ------------------------------------------------------------------ the toolkit's CSV layout


def from_nt(
    df: pd.DataFrame, path: str, *, horizons: Sequence[int] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The toolkit's per-step CSV as (horizon rows in the sweeper's layout, long metrics table).

    A run is one ``run_name`` (or one ``lr, lr_in, lr_hidden, lr_out, bs, seed``). The horizon row
    of a run at D is its first logged row with ``horizon == D``; every row of the file becomes the
    per-step trajectory, so the smoothing window reaches the neighbouring logged points.
    """
    df = df.rename(columns={"train_loss_mean": "train_loss", "output_norm_mean": "output_norm"})
    missing = [c for c in NT_REQUIRED if c not in df.columns]
    if missing:
        raise AnalysisError(
            f"{path}: missing columns {', '.join(missing)} (the norm-transfer CSV layout needs "
            f"{', '.join(NT_REQUIRED)})"
        )
    for col in (*NT_REQUIRED, "seed", "lr_in", "lr_hidden", "lr_out"):
        if col in df.columns:
            df[col] = _numeric(df[col], path, col)
    df = df.drop(columns=[c for c in ("train_loss_std", "output_norm_std") if c in df.columns])
    df = df.rename(columns={"bs": "batch_size", "horizon": "tokens"})
    keys = [c for c in ("lr", "lr_in", "lr_hidden", "lr_out", "batch_size", "seed") if c in df]
    if "run_name" in df.columns:
        df["run_id"] = df["run_name"].astype(str)
    else:
        df["run_id"] = df.groupby(keys, sort=False, dropna=False).ngroup().map(lambda i: f"run{i}")
    df = df.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)
    metrics = pd.concat(
        [
            df[["run_id", "step", "tokens"]].assign(metric=name, value=df[name])
            for name in ("train_loss", "output_norm")
        ],
        ignore_index=True,
    )
    tok = df["tokens"].to_numpy()
    if horizons:
        keep = df["tokens"].isin({int(h) for h in horizons}).to_numpy()
    else:
        ok = np.isfinite(tok) & (tok > 0)
        itok = np.where(ok, tok, 1).astype(np.int64)
        keep = ok & (itok & (itok - 1) == 0)
    keep = keep | (tok == 0)  # the loss at initialisation
    out = df[keep].drop_duplicates(["run_id", "tokens"], keep="first")
    if not (out["tokens"] > 0).any():
        raise AnalysisError(f"{path}: no rows at a horizon (tokens a power of two or --horizons)")
    return out.drop(columns=[c for c in ("run_name",) if c in out.columns]), metrics


def planned_runs(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``model, layout, batch_size, lr`` of every run in ``runs.parquet`` (planned or not).

    Empty when the sweep has no ``runs.parquet``.
    """
    path = tables.table_path(Path(sweep_dir), "runs")
    cols = ["model", "lr", "lr_in", "lr_hidden", "lr_out", "batch_size", "schedule", "kind"]
    if not path.is_file():
        return pd.DataFrame(columns=["model", "layout", "batch_size", "lr"])
    runs = tables.read_table(path, "runs", cols).to_pandas()
    runs = runs.dropna(subset=["lr", "batch_size"])
    runs = runs[runs["lr"] > 0]
    runs = runs.assign(model=runs["model"].astype(str), layout=layout_labels(runs))
    return runs[["model", "layout", "batch_size", "lr"]].reset_index(drop=True)
