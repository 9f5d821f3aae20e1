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
table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


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

    def log2_lr_star(self, batch: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Planted log2 eta*(B, D)."""
        return self.alpha * np.log2(batch) + self.beta * np.log2(tokens) + self.gamma

    def log2_batch_star(self, tokens: np.ndarray) -> np.ndarray:
        """Planted log2 B*(D)."""
        return self.b * np.log2(tokens) + self.log2_a

    def norm(self, lr: np.ndarray, batch: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Output norm after ``tokens`` tokens (1 at 0 tokens)."""
        ratio = np.exp2(np.log2(lr) - self.log2_lr_star(batch, np.maximum(tokens, 1)))
        return np.where(tokens > 0, 1 + (2**self.x_star - 1) * ratio, 1.0)

    def best_loss(self, batch: np.ndarray, tokens: np.ndarray, offset: float = 0.0) -> np.ndarray:
        """y0(B, D): the loss at the optimal rate."""
        dev = np.log2(batch) - self.log2_batch_star(tokens)
        return (
            self.e_floor
            + offset
            + self.k_data * np.power(tokens, -self.p_data)
            + self.h_batch * dev**2
        )

    def loss(
        self, lr: np.ndarray, batch: np.ndarray, tokens: np.ndarray, offset: float = 0.0
    ) -> np.ndarray:
        """Noise-free loss after ``tokens`` tokens (``loss_init`` at 0 tokens)."""
        x = np.log2(self.norm(lr, batch, tokens))
        y0 = self.best_loss(batch, np.maximum(tokens, 1), offset)
        return y0 + (self.loss_init - y0) * ((x - self.x_star) / self.x_star) ** 2

    def noise_std(self, batch: np.ndarray) -> np.ndarray:
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
    horizons: Sequence[int] = tuple(2**d for d in range(20, 27)),
    seeds: Sequence[int] = (30,),
    layouts: Sequence[tuple[float, float, float]] = ((1.0, 1.0, 1.0),),
    model_offsets: dict[str, float] | None = None,
    log_points: int = 24,
    rng_seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Horizons and metrics tables of a synthetic sweep (every run of the grid product).

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
        log_points: Logged steps per run in the metrics table (log-spaced, plus step 0).
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
                h, m = _runs(s, model, layout, int(batch), grid, hz, off, log_points, rng)
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
    log_points: int,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All runs of one (model, layout, B), vectorised over (lr, seed) x horizons."""
    tps = batch * s.seq_len
    hz = hz[hz % tps == 0]
    lr, seed = grid[:, 0], grid[:, 1].astype(np.int64)
    lay = ":".join(f"{v:.4g}" for v in layout)
    run_id = np.array(
        [f"{model}-{lay}-b{batch}-lr{v:.6g}-s{sd}" for v, sd in zip(lr, seed, strict=True)]
    )
    L, T = np.meshgrid(lr, hz.astype(float), indexing="ij")
    true = s.loss(L, batch, T, off)
    sd = s.noise_std(batch)
    loss = true + rng.normal(0, sd, size=true.shape)
    smooth = true + rng.normal(0, sd / math.sqrt(3), size=true.shape)
    alive = np.cumprod(true < s.loss_init, axis=1).astype(bool)
    diverged = ~alive.all(axis=1)
    norm = s.norm(L, batch, T)
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
            "step": hz[hi] // tps,
            "train_loss": loss[ri, hi],
            "train_loss_smoothed": smooth[ri, hi],
            "train_loss_std": sd,
            "val_loss": true[ri, hi] + rng.normal(0, sd / 4, size=len(ri)),
            "output_norm": norm[ri, hi],
            "output_norm_rms": norm[ri, hi] / 2,
            "input_norm": np.sqrt(norm[ri, hi]),
            "hidden_norm": np.log1p(norm[ri, hi]),
            "state": np.where(diverged[ri], "diverged", "completed"),
        }
    )
    return horizons, _metrics(s, run_id, lr, batch, hz, off, alive, log_points, rng)


def _metrics(
    s: Surface,
    run_id: np.ndarray,
    lr: np.ndarray,
    batch: int,
    hz: np.ndarray,
    off: float,
    alive: np.ndarray,
    log_points: int,
    rng: np.random.Generator,
) -> pd.DataFrame:
    tps = batch * s.seq_len
    if len(hz) == 0:
        return pd.DataFrame(columns=["run_id", "step", "tokens", "metric", "value"])
    max_step = int(hz.max() // tps)
    steps = np.unique(np.round(np.geomspace(1, max_step, log_points)).astype(np.int64))
    steps = np.concatenate([[0], steps])
    # A run that diverged stops logging at its first failed horizon.
    last = np.where(alive.any(axis=1), hz[np.maximum(alive.sum(axis=1) - 1, 0)] // tps, 0)
    L, S = np.meshgrid(lr, steps.astype(float), indexing="ij")
    T = S * tps
    keep = S <= last[:, None]
    norm = s.norm(L, batch, T)
    loss = s.loss(L, batch, T, off) + rng.normal(0, s.noise_std(batch), size=L.shape) * (S > 0)
    ri, si = np.nonzero(keep)
    base = {"run_id": run_id[ri], "step": steps[si], "tokens": steps[si] * tps}
    return pd.concat(
        [
            pd.DataFrame({**base, "metric": "output_norm", "value": norm[ri, si]}),
            pd.DataFrame({**base, "metric": "train_loss", "value": loss[ri, si]}),
        ],
        ignore_index=True,
    )


def to_nt_csv(horizons: pd.DataFrame) -> pd.DataFrame:
    """The horizons table in the norm-transfer toolkit's preprocessed CSV layout."""
    return pd.DataFrame(
        {
            "run_name": horizons["run_id"],
            "lr": horizons["lr"],
            "lr_in": horizons["lr_in"],
            "lr_hidden": horizons["lr_hidden"],
            "lr_out": horizons["lr_out"],
            "bs": horizons["batch_size"],
            "seed": horizons["seed"],
            "step": horizons["step"],
            "horizon": horizons["tokens"],
            "train_loss": horizons["train_loss"],
            "output_norm": horizons["output_norm"],
        }
    )
