"""Horizon rows: each run read off at its token budgets D.

A run's horizons are its record's ``horizons_tokens`` plus those added later (``horizons.json``,
``SweepStore.extra_horizons``), inside the run's own span: a run started from another's checkpoint
(a WSD branch, a continuation) is never read off at or before its start step, where its first line
repeats its parent's state (``sweeper.collect.run``). Horizon D is *reached* when the run's
metrics have a line at step ``D / tokens_per_step``; its row carries every float metric of that line
(``tables.HORIZON_METRICS``) and the smoothing window: the line and its logged neighbours, one
on each side in the run's step order (the paper's {D-1, D, D+1}, as ``sweeper.analysis.smoothing``
does by default). Runs with a ``problem`` get no horizon rows: their numbers are not trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from sweeper import tables
from sweeper.collect.run import RunInfo

_STEP_BITS = 40  # key = file index << 40 | step; steps stay far below 2**40
_PER_RUN = [f.name for f in tables.HORIZONS_SCHEMA if f.name in tables.RUNS_SCHEMA.names]


def horizon_rows(
    runs: pa.Table, wide: pa.Table, infos: Sequence[RunInfo]
) -> tuple[pa.Table, np.ndarray]:
    """The horizon rows of the runs in ``infos`` and the number of rows per run.

    Args:
        runs: The runs rows of ``infos``, in the same order.
        wide: Their metrics lines (``metrics.Metrics.table``: ``_file`` indexes ``infos``,
            sorted by file and step, one line per step).
        infos: The runs; only those without a problem are read off.
    """
    file, step, final = _planned(infos)
    key = wide.column("_file").to_numpy().astype(np.int64) << _STEP_BITS
    key += wide.column("step").to_numpy()
    target = (file << _STEP_BITS) + step
    pos = np.searchsorted(key, target)
    hit = pos < len(key)
    hit[hit] = key[pos[hit]] == target[hit]
    file, step, final, pos = file[hit], step[hit], final[hit], pos[hit]
    cols: dict[str, Any] = {
        "tokens": wide.column("tokens").to_numpy()[pos],
        "step": step,
        "is_final": final,
    }
    cols.update(_window(wide, file, pos))
    for name in tables.HORIZON_METRICS:
        cols[name] = wide.column(name).take(pa.array(pos))
    per_run = np.bincount(file, minlength=len(infos))
    picked = runs.select(_PER_RUN).take(pa.array(file))
    out = {name: picked.column(name) for name in _PER_RUN}
    out.update(cols)
    return tables.conform("horizons", pa.table(out)), per_run


def _planned(infos: Sequence[RunInfo]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(run index, step, is the largest horizon) of every planned horizon of trusted runs."""
    file, step, final = [], [], []
    for i, info in enumerate(infos):
        if info.record is None or info.problems or not info.horizons:
            continue
        tps, last = info.record.tokens_per_step, max(info.horizons)
        for d in info.horizons:
            if d % tps == 0:
                file.append(i)
                step.append(d // tps)
                final.append(d == last)
    return (
        np.array(file, dtype=np.int64),
        np.array(step, dtype=np.int64),
        np.array(final, dtype=bool),
    )


def _window(wide: pa.Table, file: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Window statistics around each horizon line ``pos`` (rows of run ``file``).

    The window is the line and its neighbours in the run (two points at either end of a run).
    Points without a train loss (a non-finite one, which the trainer writes as null) are left
    out; the output norm is averaged in log space (a geometric mean), as the analysis does.
    """
    n = wide.num_rows
    offsets = np.array([-1, 0, 1])
    j = pos[:, None] + offsets[None, :]
    jj = np.clip(j, 0, max(n - 1, 0))
    runs = wide.column("_file").to_numpy()
    inside = (j >= 0) & (j < n) & (runs[jj] == file[:, None])
    loss, loss_ok = _values(wide, "train_loss")
    norm, norm_ok = _values(wide, "output_norm")
    use = inside & loss_ok[jj]
    count = use.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(use, loss[jj], 0.0).sum(axis=1) / count
        var = np.where(use, (loss[jj] - mean[:, None]) ** 2, 0.0).sum(axis=1) / count
        use_norm = inside & norm_ok[jj]
        log_norm = np.where(use_norm, np.log(np.where(use_norm, norm[jj], 1.0)), 0.0)
        geo = np.exp(log_norm.sum(axis=1) / use_norm.sum(axis=1))
    return {
        "train_loss_smoothed": mean,
        "train_loss_std": np.sqrt(var),
        "smoothing_points": count,
        "window_complete": inside[:, 0] & inside[:, 2],
        "output_norm_smoothed": geo,
    }


def _values(wide: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A float column as numpy (NaN for null) and its validity mask."""
    col = wide.column(name)
    return (
        col.to_numpy(zero_copy_only=False).astype(np.float64),
        ~col.is_null().to_numpy(zero_copy_only=False),
    )
