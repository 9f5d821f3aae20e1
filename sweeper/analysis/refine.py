"""Proposals of new runs from a sweep's optima (``sweeper refine``).

Four sources, all snapped to the model's learning-rate grid and deduplicated against the runs the
table already has and against ``extra_points.json``:

* ``extend``: an optimum on the edge of the rate grid gets the next rates beyond that edge;
* ``densify``: half-steps either side of each slice's eta* (a run covers all its horizons, so
  proposals are merged across D);
* ``untried``: for a batch size one grid step beyond the tried ones (or a tried B that never reached
  some D), the rate predicted to reach the sweep's optimal output norm at D, from an OLS fit of the
  norm growth ``log2 ||W_out|| ~ log2 eta + log2 B + log2 D``, plus its grid neighbours;
* ``optuna``: a TPE sampler over (log2 eta, log2 B) per D, seeded with the finished runs.

Nothing here writes a file: :func:`merge_points` returns the new ``extra_points.json`` entries, and
applying them (writing the file, planning the runs) is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sweeper.analysis import laws
from sweeper.analysis.tables import AnalysisError, layout_scales

_ROUND = 6  # log2 rates equal to 1e-6 are the same grid point


@dataclass(frozen=True)
class Proposal:
    """One proposed run.

    Attributes:
        model: Model name.
        lr: Base learning rate.
        batch_size: Global batch size in sequences.
        layout: Per-group LR layout label (``in:hidden:out``).
        source: Why, in words (for people).
        kind: Which rule proposed it: ``extend``, ``densify``, ``untried`` or ``optuna``; the
            point's ``source`` in ``extra_points.json`` is ``refine_<kind>``.
    """

    model: str
    lr: float
    batch_size: int
    layout: str
    source: str
    kind: str = "extend"

    @property
    def key(self) -> tuple[str, str, int, float]:
        """Dedup key ``(model, layout, batch_size, round(log2 lr, 6))``."""
        return (self.model, self.layout, self.batch_size, round(math.log2(self.lr), _ROUND))

    def to_point(self) -> dict[str, Any]:
        """The ``extra_points.json`` entry."""
        return {
            "model": self.model,
            "lr": self.lr,
            "batch_size": self.batch_size,
            # Always explicit: the planner's default is the spec's first layout, maybe not ours.
            "lr_scales": layout_scales(self.layout),
            "source": f"refine_{self.kind}",
        }


@dataclass(frozen=True, kw_only=True)
class RefineOptions:
    """Which proposals to make.

    Attributes:
        extend: Rates added beyond an edge optimum.
        densify: Propose half-steps around each eta* (when the grid step is above ``min_step``).
        min_step: Finest log2 rate step worth densifying to.
        untried: Propose rates for untried (B, D) from the norm-growth fit.
        window: Grid neighbours either side of each predicted rate (``untried``).
        optuna_trials: TPE proposals per (model, layout, D); 0 turns the sampler off.
        seed: Sampler seed.
    """

    extend: int = 2
    densify: bool = True
    min_step: float = 0.25
    untried: bool = True
    window: int = 1
    optuna_trials: int = 0
    seed: int = 0


class _Grid:
    """The log2 rate grid and log2 batch grid of one (model, layout)."""

    def __init__(self, log2_lr: np.ndarray, log2_b: np.ndarray) -> None:
        lrs = np.unique(np.round(log2_lr, _ROUND))
        steps = np.diff(lrs)
        self.step = float(np.median(steps)) if len(steps) else 0.5
        self.origin = float(lrs[0]) if len(lrs) else 0.0
        bs = np.unique(np.round(log2_b, _ROUND))
        bsteps = np.diff(bs)
        self.b_step = float(np.median(bsteps)) if len(bsteps) else 1.0
        self.b_values = bs

    def snap(self, log2_lr: float, step: float | None = None) -> float:
        """The grid point (of ``step``, default the grid's) nearest ``log2_lr``."""
        st = step or self.step
        return round(self.origin + st * round((log2_lr - self.origin) / st), _ROUND)


def propose(
    df: pd.DataFrame,
    optima: pd.DataFrame,
    opts: RefineOptions,
    *,
    existing: Iterable[tuple[str, str, int, float]] = (),
) -> list[Proposal]:
    """New runs for a sweep.

    Args:
        df: The normalised horizons table.
        optima: :func:`sweeper.analysis.optimum.find_optima` of ``df``.
        opts: Which proposals to make.
        existing: Keys ``(model, layout, batch_size, round(log2 lr, 6))`` to leave out besides the
            table's runs (e.g. ``extra_points.json`` entries, planned runs).

    Returns:
        Deduplicated proposals, in source order (extend, densify, untried, optuna).
    """
    seen = set(existing) | set(run_keys(df))
    grids = {
        key: _Grid(np.log2(g["lr"].to_numpy()), np.log2(g["batch_size"].to_numpy()))
        for key, g in df.groupby(["model", "layout"])
    }
    cands: list[Proposal] = []
    cands += _extend(optima, grids, opts)
    if opts.densify:
        cands += _densify(optima, grids, opts)
    if opts.untried:
        cands += _untried(df, optima, grids, opts)
    if opts.optuna_trials > 0:
        cands += _optuna(df, optima, grids, opts)
    out = []
    for p in cands:
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out


def run_keys(df: pd.DataFrame) -> list[tuple[str, str, int, float]]:
    """Dedup keys of the runs in a table with ``model, layout, batch_size, lr`` columns."""
    u = df[["model", "layout", "batch_size", "lr"]].drop_duplicates()
    return [
        (str(m), str(lay), int(b), round(math.log2(lr), _ROUND))
        for m, lay, b, lr in u.itertuples(index=False)
    ]


def _extend(optima: pd.DataFrame, grids: dict[Any, _Grid], opts: RefineOptions) -> list[Proposal]:
    out = []
    for r in optima[optima["edge"] != ""].itertuples():
        g = grids[(r.model, r.layout)]
        sign = 1 if r.edge == "high" else -1
        for i in range(1, opts.extend + 1):
            le = g.snap(r.log2_lr_argmin + sign * i * g.step)
            why = (
                f"extend eta {'above' if sign > 0 else 'below'} the grid: optimum on the "
                f"{r.edge} edge at D={r.tokens}, B={r.batch_size}"
            )
            out.append(Proposal(r.model, 2.0**le, int(r.batch_size), r.layout, why, "extend"))
    return out


def _densify(optima: pd.DataFrame, grids: dict[Any, _Grid], opts: RefineOptions) -> list[Proposal]:
    out = []
    ok = optima[(optima["status"] == "ok") & (optima["edge"] == "")]
    for r in ok.itertuples():
        g = grids[(r.model, r.layout)]
        half = g.step / 2
        if half < opts.min_step - 1e-9:
            continue
        for sign in (-1, 1):
            le = g.snap(r.log2_lr_star + sign * half, half)
            why = f"densify eta around eta* at D={r.tokens}, B={r.batch_size}"
            out.append(Proposal(r.model, 2.0**le, int(r.batch_size), r.layout, why, "densify"))
    return out


def norm_growth_fit(df: pd.DataFrame) -> dict[str, Any]:
    """OLS ``log2 ||W_out|| = p_lr log2 eta + p_B log2 B + p_D log2 D + q`` past the initial phase.

    Points with a norm below 2 are left out: there the norm is dominated by its initial value 1.
    """
    d = df[(df["output_norm"] > 2) & np.isfinite(df["output_norm"])]
    return laws.ols(
        np.log2(d["output_norm"].to_numpy()),
        {
            "p_lr": np.log2(d["lr"].to_numpy()),
            "p_B": np.log2(d["batch_size"].to_numpy(dtype=float)),
            "p_D": np.log2(d["tokens"].to_numpy(dtype=float)),
        },
    )


def _untried(
    df: pd.DataFrame, optima: pd.DataFrame, grids: dict[Any, _Grid], opts: RefineOptions
) -> list[Proposal]:
    out: list[Proposal] = []
    ok = optima[optima["status"] == "ok"]
    if ok.empty:
        return out
    x0 = float(ok["x0"].mean())
    seq_len = df["seq_len"].dropna() if "seq_len" in df.columns else pd.Series(dtype=float)
    for (model, layout), g in df.groupby(["model", "layout"]):
        fit = norm_growth_fit(g)
        if not fit["identified"] or not fit["coef"]["p_lr"] > 0:
            continue
        c = fit["coef"]
        grid = grids[(model, layout)]
        bs = np.concatenate(
            [[grid.b_values[0] - grid.b_step], grid.b_values, [grid.b_values[-1] + grid.b_step]]
        )
        tried = set(
            zip(
                ok.loc[(ok["model"] == model) & (ok["layout"] == layout), "tokens"],
                ok.loc[(ok["model"] == model) & (ok["layout"] == layout), "batch_size"],
                strict=True,
            )
        )
        all_tokens = sorted(int(t) for t in g["tokens"].unique())
        for tokens in all_tokens:
            for lb in bs:
                batch = int(round(2.0**lb))
                if batch < 1 or (tokens, batch) in tried:
                    continue
                # A run reads every horizon of the sweep, so B * seq_len must divide all of them.
                if len(seq_len) and any(t % (batch * int(seq_len.iloc[0])) for t in all_tokens):
                    continue
                le = (x0 - c["const"] - c["p_B"] * lb - c["p_D"] * math.log2(tokens)) / c["p_lr"]
                centre = grid.snap(le)
                why = f"untried B={batch} at D={tokens}: eta predicted to reach log2 norm {x0:.2f}"
                for i in range(-opts.window, opts.window + 1):
                    le = centre + i * grid.step
                    out.append(Proposal(model, 2.0**le, batch, layout, why, "untried"))
    return out


def _optuna(
    df: pd.DataFrame, optima: pd.DataFrame, grids: dict[Any, _Grid], opts: RefineOptions
) -> list[Proposal]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = []
    for (model, layout, tokens), g in df.groupby(["model", "layout", "tokens"]):
        grid = grids[(model, layout)]
        pts = g.groupby(["lr", "batch_size"])["train_loss"].mean().dropna().reset_index()
        if len(pts) < 2:
            continue
        l2 = np.log2(pts["lr"].to_numpy())
        b2 = np.round(np.log2(pts["batch_size"].to_numpy(dtype=float))).astype(int)
        dists = {
            "log2_lr": optuna.distributions.FloatDistribution(
                float(l2.min() - 2 * grid.step), float(l2.max() + 2 * grid.step)
            ),
            "log2_B": optuna.distributions.IntDistribution(int(b2.min() - 1), int(b2.max() + 1)),
        }
        sampler = optuna.samplers.TPESampler(seed=opts.seed, n_startup_trials=0)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for lr_, b_, y in zip(l2, b2, pts["train_loss"], strict=True):
            study.add_trial(
                optuna.trial.create_trial(
                    params={"log2_lr": float(lr_), "log2_B": int(b_)},
                    distributions=dists,
                    value=float(y),
                )
            )
        for _ in range(opts.optuna_trials):
            trial = study.ask(dists)
            le = grid.snap(trial.params["log2_lr"])
            batch = 2 ** int(trial.params["log2_B"])
            # The sampler learns nothing from a proposal that has not run yet; tell it a pessimistic
            # value so it spreads its remaining asks instead of repeating one point.
            study.tell(trial, float(pts["train_loss"].max()))
            why = f"optuna TPE over (log2 eta, log2 B) at D={tokens}"
            out.append(Proposal(model, 2.0**le, batch, layout, why, "optuna"))
    return out


# --------------------------------------------------------------------------- extra_points.json


def point_key(d: dict[str, Any]) -> tuple[str, str, int, float]:
    """Dedup key of an ``extra_points.json`` entry."""
    scales = d.get("lr_scales") or [1.0, 1.0, 1.0]
    layout = ":".join(f"{float(v):.4g}" for v in scales)
    return (str(d["model"]), layout, int(d["batch_size"]), round(math.log2(float(d["lr"])), _ROUND))


def check_points(entries: Any, source: str) -> list[dict[str, Any]]:
    """Validate the content of an ``extra_points.json``: a list of objects with model, lr, B.

    Raises:
        AnalysisError: naming ``source`` and the first bad entry.
    """
    if not isinstance(entries, list) or not all(isinstance(d, dict) for d in entries):
        raise AnalysisError(f"{source}: expected a JSON list of objects")
    for i, d in enumerate(entries):
        for key in ("model", "lr", "batch_size"):
            if key not in d:
                raise AnalysisError(f"{source}: entry {i} has no {key!r}")
    return entries


def merge_points(
    entries: list[dict[str, Any]], proposals: Iterable[Proposal]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(all entries, entries added)``: the proposals not yet among ``entries``, appended."""
    have = {point_key(d) for d in entries}
    added = []
    for p in proposals:
        if p.key in have:
            continue
        have.add(p.key)
        added.append(p.to_point())
    return [*entries, *added], added
