"""A synthetic loss surface over (eta, B, D) with planted scaling laws (tests, benchmarks, docs).

The planted model, per run (model, eta, B) read at D tokens (logs base 2):

* optimal rate ``log2 eta*(B, D) = alpha log2 B + beta log2 D + gamma``;
* output norm ``||W_out|| = 1 + (2^x* - 1) eta / eta*(B, D)``: 1 at initialisation, growing with
  the tokens seen (as D^-beta at a fixed run, i.e. with the accumulated learning rate), and equal to
  the planted optimal norm 2^x* exactly on the optimal-rate line (norm transfer);
* best loss at (B, D) ``y0 = E_model + K D^-p + h (log2 B - log2 B*(D))^2`` with
  ``log2 B*(D) = b log2 D + log2 a``;
* loss ``y = y0 + (c - y0) ((x - x*) / x*)^2`` with x = log2 norm, so that the loss is ``c`` (the
  loss at initialisation) at x = 0 and minimal at x = x*; plus Gaussian noise whose spread falls
  with B. A run whose loss would exceed ``c`` diverges there (no rows from that horizon on).

:func:`generate` returns a horizons table in the sweeper's layout and the long per-step metrics
table; :func:`write_sweep_tables` writes them as ``sweeper collect`` would, and :func:`to_nt_csv`
converts them to the norm-transfer toolkit's per-step CSV layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from sweeper import tables

DEFAULT_HORIZONS = tuple(2**k for k in range(20, 27))


@dataclass(frozen=True, kw_only=True)
class Surface:
    """Planted parameters of the synthetic surface (see the module docstring)."""

    alpha: float = 0.5
    beta: float = -0.5
    gamma: float = 4.5
    x_star: float = 7.0
    b: float = 0.45
    log2_a: float = -4.8
    loss_init: float = math.log(256)
    e_floor: float = 1.0
    k_data: float = 64.0
    p_data: float = 0.25
    h_batch: float = 0.03
    noise: float = 0.004
    noise_ref_batch: int = 64
    seq_len: int = 256

    def log2_lr_star(self, batch: npt.ArrayLike, tokens: npt.ArrayLike) -> np.ndarray:
        """Planted log2 eta*(B, D)."""
        return self.alpha * np.log2(batch) + self.beta * np.log2(tokens) + self.gamma

    def log2_batch_star(self, tokens: npt.ArrayLike) -> np.ndarray:
        """Planted log2 B*(D)."""
        return self.b * np.log2(tokens) + self.log2_a

    def norm(self, lr: npt.ArrayLike, batch: npt.ArrayLike, tokens: npt.ArrayLike) -> np.ndarray:
        """Output norm after ``tokens`` tokens (1 at 0 tokens)."""
        tokens = np.asarray(tokens, dtype=float)
        ratio = np.exp2(np.log2(lr) - self.log2_lr_star(batch, np.maximum(tokens, 1)))
        return np.asarray(np.where(tokens > 0, 1 + (2**self.x_star - 1) * ratio, 1.0))

    def best_loss(
        self, batch: npt.ArrayLike, tokens: npt.ArrayLike, offset: float = 0.0
    ) -> np.ndarray:
        """y0(B, D): the loss at the optimal rate."""
        dev = np.log2(batch) - self.log2_batch_star(tokens)
        data = self.k_data * np.power(np.asarray(tokens, dtype=float), -self.p_data)
        return np.asarray(self.e_floor + offset + data + self.h_batch * dev**2)

    def loss(
        self, lr: npt.ArrayLike, batch: npt.ArrayLike, tokens: npt.ArrayLike, offset: float = 0.0
    ) -> np.ndarray:
        """Noise-free loss after ``tokens`` tokens (``loss_init`` at 0 tokens)."""
        x = np.log2(self.norm(lr, batch, tokens))
        y0 = self.best_loss(batch, np.maximum(tokens, 1), offset)
        return np.asarray(y0 + (self.loss_init - y0) * ((x - self.x_star) / self.x_star) ** 2)

    def noise_std(self, batch: npt.ArrayLike) -> np.ndarray:
        """Spread of the per-step loss: shrinks as 1/sqrt(B)."""
        return self.noise * np.sqrt(self.noise_ref_batch / np.asarray(batch, dtype=float))


def default_lrs(lo: float = -12.0, hi: float = 1.0, step: float = 0.5) -> list[float]:
    """A 2^step learning-rate grid from 2^lo to 2^hi."""
    n = int(round((hi - lo) / step))
    return [2.0 ** (lo + i * step) for i in range(n + 1)]


def generate(
    surface: Surface | None = None,
    *,
    models: Sequence[str] = ("cpu-tiny",),
    lrs: Sequence[float] | None = None,
    batch_sizes: Sequence[int] = (8, 16, 32, 64, 128, 256, 512),
    horizons: Sequence[int] = DEFAULT_HORIZONS,
    seeds: Sequence[int] = (30,),
    layouts: Sequence[tuple[float, float, float]] = ((1.0, 1.0, 1.0),),
    model_offsets: dict[str, float] | None = None,
    rng_seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Horizons and metrics tables of a synthetic sweep (every run of the grid product).

    Each run logs step 0 and, around each horizon step s, the steps ``s - d, s, s + d`` with
    ``d = max(1, s // 16)`` (none past its last horizon), each with its own noise. The horizons
    table's window columns are those of ``sweeper collect``: the mean, population std and count of
    the logged losses around D, and the geometric mean of the norm.

    Args:
        surface: Planted parameters (default :class:`Surface`).
        models: Model names; all share the planted laws (norm transfer), offset in loss.
        lrs: Base learning rates (default :func:`default_lrs`).
        batch_sizes: Global batch sizes in sequences.
        horizons: Token budgets; a run of batch B reads those divisible by B * seq_len.
        seeds: Seeds; each adds independent noise.
        layouts: Per-group LR multipliers (in, hidden, out); a layout costs 0.005 per squared
            log2 multiplier in loss.
        model_offsets: Loss offset per model (default: 0.1 per model in order).
        rng_seed: Seed of the noise.

    Returns:
        ``(horizons, metrics)`` in the layouts of ``horizons.parquet`` and ``metrics.parquet``.
    """
    s = surface or Surface()
    lrs = list(lrs) if lrs is not None else default_lrs()
    offsets = model_offsets or {m: 0.1 * i for i, m in enumerate(models)}
    rng = np.random.default_rng(rng_seed)
    hz = np.asarray(sorted(horizons), dtype=np.int64)
    h_rows: list[pd.DataFrame] = []
    m_rows: list[pd.DataFrame] = []
    for model in models:
        for layout in layouts:
            off = offsets.get(model, 0.0) + 0.005 * sum(math.log2(v) ** 2 for v in layout)
            for batch in batch_sizes:
                grid = np.array([(lr, seed) for lr in lrs for seed in seeds], dtype=float).reshape(
                    -1, 2
                )
                h, m = _runs(s, model, layout, int(batch), grid, hz, off, rng)
                h_rows.append(h)
                m_rows.append(m)
    return pd.concat(h_rows, ignore_index=True), pd.concat(m_rows, ignore_index=True)


def _runs(
    s: Surface,
    model: str,
    layout: tuple[float, float, float],
    batch: int,
    grid: np.ndarray,
    hz: np.ndarray,
    off: float,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All runs of one (model, layout, B), vectorised over (lr, seed) x horizons x window."""
    tps = batch * s.seq_len
    hz = hz[hz % tps == 0]
    lr, seed = grid[:, 0], grid[:, 1].astype(np.int64)
    prefix = f"{model}-{':'.join(f'{v:.4g}' for v in layout)}-b{batch}"
    run_id = np.array([f"{prefix}-lr{v:.6g}-s{sd}" for v, sd in zip(lr, seed, strict=True)])
    h_step = hz // tps
    # logged steps around each horizon: (n_horizons, 3); none past the last horizon
    win = h_step[:, None] + np.maximum(1, h_step // 16)[:, None] * np.array([-1, 0, 1])
    logged = np.ones(win.shape, dtype=bool)
    if len(hz):
        logged[-1, 2] = False
    L, T = np.meshgrid(lr, (win * tps).ravel().astype(float), indexing="ij")
    true = s.loss(L, batch, T, off).reshape(len(lr), *win.shape)
    loss = true + rng.normal(0, s.noise_std(batch), size=true.shape)
    norm = s.norm(L, batch, T).reshape(true.shape)
    alive = np.cumprod(true[:, :, 1] < s.loss_init, axis=1).astype(bool)
    diverged = np.asarray(~alive.all(axis=1))
    use = logged[None] & alive[:, :, None] & (true < s.loss_init)
    mean, std, geo, n = _window_columns(loss, norm, use)
    ri, hi = np.nonzero(alive)
    horizons = pd.DataFrame(
        {
            "run_id": run_id[ri],
            "model": model,
            "n_params": 0,
            "lr": lr[ri],
            "lr_in": lr[ri] * layout[0],
            "lr_hidden": lr[ri] * layout[1],
            "lr_out": lr[ri] * layout[2],
            "batch_size": batch,
            "seq_len": s.seq_len,
            "seed": seed[ri],
            "tokens": hz[hi],
            "step": h_step[hi],
            "train_loss": loss[ri, hi, 1],
            "train_loss_smoothed": mean[ri, hi],
            "train_loss_std": std[ri, hi],
            "smoothing_points": n[ri, hi],
            "val_loss": true[ri, hi, 1] + rng.normal(0, s.noise_std(batch) / 4, size=len(ri)),
            "output_norm": norm[ri, hi, 1],
            "output_norm_smoothed": geo[ri, hi],
            "output_norm_rms": norm[ri, hi, 1] / 2,
            "input_norm": np.sqrt(norm[ri, hi, 1]),
            "hidden_norm": np.log1p(norm[ri, hi, 1]),
            "state": np.where(diverged[ri], "diverged", "completed"),
        }
    )
    return horizons, _metrics(s, run_id, lr, batch, win, loss, norm, use, off)


def _window_columns(
    loss: np.ndarray, norm: np.ndarray, use: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``sweeper collect``'s window columns over the last axis: loss mean, population std,
    geometric-mean norm, count."""
    n = use.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(use, loss, 0.0).sum(axis=2) / n
        std = np.sqrt(np.where(use, (loss - mean[:, :, None]) ** 2, 0.0).sum(axis=2) / n)
        geo = np.exp(np.where(use, np.log(norm), 0.0).sum(axis=2) / n)
    return mean, std, geo, n


def _metrics(
    s: Surface,
    run_id: np.ndarray,
    lr: np.ndarray,
    batch: int,
    win: np.ndarray,
    loss: np.ndarray,
    norm: np.ndarray,
    use: np.ndarray,
    off: float,
) -> pd.DataFrame:
    """The long metrics table: step 0 and the logged steps around each horizon."""
    tps = batch * s.seq_len
    ri, hi, wi = np.nonzero(use)
    steps = win[hi, wi]
    base = {
        "run_id": np.concatenate([run_id, run_id[ri]]),
        "step": np.concatenate([np.zeros(len(run_id), dtype=np.int64), steps]),
    }
    base["tokens"] = base["step"] * tps
    l0 = s.loss(lr, batch, np.zeros(len(lr)), off)
    values = {
        "output_norm": np.concatenate([np.ones(len(run_id)), norm[ri, hi, wi]]),
        "train_loss": np.concatenate([l0, loss[ri, hi, wi]]),
    }
    out = pd.concat(
        [pd.DataFrame({**base, "metric": k, "value": v}) for k, v in values.items()],
        ignore_index=True,
    )
    return out.sort_values(["run_id", "step", "metric"], kind="stable").reset_index(drop=True)


def to_nt_csv(horizons: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """The sweep in the norm-transfer toolkit's preprocessed CSV layout: one row per logged step.

    Columns ``run_name, lr, lr_in, lr_hidden, lr_out, bs, seed, step, horizon, train_loss,
    output_norm`` (``horizon`` is the tokens seen at that step).
    """
    wide = metrics.pivot_table(
        index=["run_id", "step", "tokens"], columns="metric", values="value", aggfunc="first"
    ).reset_index()
    runs = horizons.drop_duplicates("run_id")[
        ["run_id", "lr", "lr_in", "lr_hidden", "lr_out", "batch_size", "seed"]
    ]
    df = wide.merge(runs, on="run_id", how="inner").sort_values(["run_id", "step"])
    return pd.DataFrame(
        {
            "run_name": df["run_id"],
            "lr": df["lr"],
            "lr_in": df["lr_in"],
            "lr_hidden": df["lr_hidden"],
            "lr_out": df["lr_out"],
            "bs": df["batch_size"],
            "seed": df["seed"],
            "step": df["step"],
            "horizon": df["tokens"],
            "train_loss": df["train_loss"],
            "output_norm": df["output_norm"],
        }
    ).reset_index(drop=True)


def write_sweep_tables(sweep_dir: Path, horizons: pd.DataFrame, metrics: pd.DataFrame) -> None:
    """Write ``horizons.parquet`` and ``metrics.parquet`` as ``sweeper collect`` would.

    Columns the synthetic tables lack are null; the files carry the table name and schema version.
    """
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for name, df in (("horizons", horizons), ("metrics", metrics)):
        schema = tables.SCHEMAS[name]
        cols = {}
        for f in schema:
            if f.name in df.columns:
                cols[f.name] = pa.array(df[f.name].to_numpy().tolist()).cast(f.type)
            else:
                cols[f.name] = pa.nulls(len(df), f.type)
        table = pa.table(cols)
        tables.write_table(name, table, tables.table_path(sweep_dir, name))
