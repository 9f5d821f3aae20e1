"""The next wave: each (model, layout, B, D) cell's verdict, and the runs that would settle it.

Pure functions of a :class:`~sweeper.autopilot.estimates.Snapshot`. A cell is *identified* when its
slice's fit is sound (status ok, no edge, the vertex inside the fitted points, a valid bootstrap),
the 95 % interval of log2 eta* is at most ``tolerance_log2`` on each side, and at least
``side_points`` usable rates lie on each side of eta*. Otherwise the cell asks for runs, each
with its reason:

* **edge**: ``side_points`` rates past the last usable rate, at the spacing of the outermost
  usable rates (at least ``design_step_log2``);
* **one-sided**: ``side_points`` rates on the short side of the estimate, ``design_step_log2``
  apart;
* **densify**: the design around eta*, finer while the usable rates around it are close (down to
  ``min_step_log2``);
* **widen**: the design there at the finest spacing and the cell still unsettled (noise, or an
  edge whose far side was stopped before D): the next finest-lattice rate outward on each side,
  one per wave, up to ``max_side_points`` a side; then further seeds at the rates nearest eta*
  (``max_seeds``);
* **no points**: rates around eta* predicted from the trend (or the nearest identified cell);
* **batch**: when B*(D) (the batch with the lowest optimal loss) is the smallest or largest batch
  tried, the next batch size beyond it, with rates around its predicted eta*.

A proposal is a rate of a (model, layout, B) run to the largest horizon: it serves every D, so
proposals are deduplicated per rate, and a rate already tried (in any state) is never proposed
again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sweeper.autopilot.config import AutopilotConfig
from sweeper.autopilot.estimates import Snapshot, finite
from sweeper.autopilot.rules import Line, lr_trends

VERDICT_COLUMNS = ["model", "layout", "batch_size", "tokens", "identified", "why",
                   "log2_lr_star", "log2_lr_star_lo", "log2_lr_star_hi", "y0"]  # fmt: skip


@dataclass(frozen=True)
class Proposal:
    """One proposed run: a rate (and seed) at a (model, layout, B), with why."""

    model: str
    layout: str
    lr_scales: tuple[float, float, float]
    batch_size: int
    log2_lr: float
    seed: int
    reason: str
    source: str = "autopilot"

    def point(self) -> dict[str, Any]:
        """The ``extra_points.json`` entry (``Sweep.apply``)."""
        return {
            "model": self.model,
            "lr": 2.0**self.log2_lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "lr_scales": list(self.lr_scales),
            "source": self.source,
        }

    def key(self) -> tuple[str, str, int, float, int]:
        return (self.model, self.layout, self.batch_size, round(self.log2_lr, 6), self.seed)


# ---------------------------------------------------------------------------------- verdicts


def verdicts(snap: Snapshot, cfg: AutopilotConfig) -> pd.DataFrame:
    """One row per cell (model, layout, B, D) of the sweep's runs: identified or why not."""
    rows = []
    optima = {}
    if not snap.optima.empty:
        for r in snap.optima.itertuples(index=False):
            optima[(r.model, r.layout, int(r.batch_size), int(r.tokens))] = r
    for (model, layout, batch), g in snap.runs.groupby(["model", "layout", "batch_size"]):
        horizons = sorted({int(d) for hs in g["horizons_tokens"] for d in hs})
        for d in horizons:
            o = optima.get((model, layout, int(batch), d))
            ok, why = _verdict(o, snap.valid_rates(model, layout, int(batch), d), cfg)
            rows.append([model, layout, int(batch), d, ok, why, *(_get(o, c) for c in _ESTIMATES)])
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


_ESTIMATES = ("log2_lr_star_interp", "log2_lr_star_lo", "log2_lr_star_hi", "y0")


def _get(o: Any, name: str) -> float:
    value = getattr(o, name, math.nan) if o is not None else math.nan
    return float(value) if finite(value) else math.nan


def _verdict(o: Any, valid: list[float], cfg: AutopilotConfig) -> tuple[bool, str]:
    if o is None or o.status == "no_points":
        return False, "no points"
    if o.status != "ok":
        return False, str(o.status).replace("_", " ")
    if o.edge:
        return False, f"optimum at the {o.edge} edge"
    if o.vertex_outside:
        return False, "vertex outside the fitted points"
    lo, hi, est = o.log2_lr_star_lo, o.log2_lr_star_hi, o.log2_lr_star_interp
    if not (finite(lo) and finite(hi) and finite(est)) or o.boot_valid < 0.5:
        return False, "no interval"
    if (hi - lo) / 2 > cfg.tolerance_log2:
        return False, f"interval +-{(hi - lo) / 2:.2f} > {cfg.tolerance_log2:g}"
    below, above = sum(v < est for v in valid), sum(v > est for v in valid)
    if min(below, above) < cfg.side_points:
        return False, f"{below} rates below eta*, {above} above"
    return True, "identified"


# --------------------------------------------------------------------------------- proposals


def propose(snap: Snapshot, cfg: AutopilotConfig, cells: pd.DataFrame) -> list[Proposal]:
    """Runs for every cell not yet identified, plus batch sizes toward B*(D); deduplicated."""
    out: dict[tuple[str, str, int, float, int], Proposal] = {}
    trends = lr_trends(snap, cfg)
    for (model, layout, batch), _g in snap.runs.groupby(["model", "layout", "batch_size"]):
        group = _Group(snap, cfg, str(model), str(layout), int(batch), trends.get((model, layout)))
        for c in cells[
            (cells["model"] == model) & (cells["layout"] == layout) & (cells["batch_size"] == batch)
            & ~cells["identified"]
        ].itertuples(index=False):  # fmt: skip
            for p in group.for_cell(int(c.tokens), c):
                out.setdefault(p.key(), p)
    if cfg.batch_proposals:
        for p in batch_proposals(snap, cfg, cells, trends):
            out.setdefault(p.key(), p)
    return list(out.values())


class _Group:
    """The runs of one (model, layout, B): what was tried and how to propose next to it."""

    def __init__(
        self,
        snap: Snapshot,
        cfg: AutopilotConfig,
        model: str,
        layout: str,
        batch: int,
        trend: Line | None,
    ) -> None:
        r = snap.runs
        mine = r[(r["model"] == model) & (r["layout"] == layout) & (r["batch_size"] == batch)]
        self.snap, self.cfg, self.trend = snap, cfg, trend
        self.model, self.layout, self.batch = model, layout, batch
        pairs = zip(mine["log2_lr"], mine["seed"], strict=True)
        self.tried = {(round(float(v), 6), int(s)) for v, s in pairs}
        self.rates = {v for v, _ in self.tried}
        self.seed = int(mine["seed"].min()) if len(mine) else 30
        self.scales = _scales(mine)
        diffs = np.diff(sorted(self.rates))
        self.coarse = float(np.median(diffs)) if len(diffs) else 1.0

    def for_cell(self, tokens: int, c: Any) -> list[Proposal]:
        """The rates that would settle cell (B, D) = (self.batch, tokens): the cell's *design*,
        ``side_points`` rates on each side of its eta* estimate at the spacing its points call
        for, minus the rates that have a point there or were tried already."""
        losses = self.snap.cell_losses.get((self.model, self.layout, self.batch, tokens), {})
        valid = sorted(losses)
        if not valid:
            centre = self._predict(tokens)
            why = f"no usable point at D = {tokens}; around the trend's eta*"
            return [] if centre is None else self._design(centre, 1.0, why)
        best = min(losses, key=losses.__getitem__)
        edge = str(c.why).startswith("optimum at")
        centre = best if edge or not finite(c.log2_lr_star) else float(c.log2_lr_star)
        side = _short_side(valid, best, centre, edge)
        at_end = edge or len(valid) < 3
        if side:
            out = self._extend(side, valid, centre, at_end, f"D = {tokens}: {c.why}")
            if out:
                return out
        h = self._spacing(centre, valid)
        out = self._design(centre, h, f"D = {tokens}: {c.why}; design at spacing {h:g}")
        while not out and h > self.cfg.min_step_log2 + 1e-9:  # the design's rates were tried
            h = max(self.cfg.min_step_log2, h / 2)  # (e.g. stopped before D): a finer one
            out = self._design(centre, h, f"D = {tokens}: {c.why}; design at spacing {h:g}")
        finest = h <= self.cfg.min_step_log2 + 1e-9
        if not out and self._pending(centre, h):
            return []  # another cell of this wave asked for the design's rates: wait for them
        if not out and finest:  # the design is there, the cell still unsettled: widen it
            out = self._widen(centre, valid, f"D = {tokens}: {c.why}; widened")
        if not out and finest and not edge:
            out = self._seeds(centre, valid, f"D = {tokens}: {c.why}; another seed")
        return out

    def _pending(self, centre: float, h: float) -> bool:
        """Whether a rate this wave already proposes (for another cell of the batch size) lies
        within ``side_points`` steps of h of the centre."""
        width = (self.cfg.side_points + 0.5) * h
        return any(abs(v - centre) <= width for v, _ in self.tried if v not in self.rates)

    def _widen(self, centre: float, valid: list[float], why: str) -> list[Proposal]:
        """A cell still unsettled with its design there: on each side, the nearest of the
        ``max_side_points`` finest-lattice rates next to the centre that has no point yet, one
        per side and wave. A side ends at a rate tried without a point here (a run stopped or
        diverged before this D: no rate beyond it would get further)."""
        h, out = self.cfg.min_step_log2, []
        have = {round(v, 6) for v in valid}
        first = {-1: math.floor(centre / h - 1e-9), 1: math.ceil(centre / h + 1e-9)}
        for side, start in first.items():
            for j in range(self.cfg.max_side_points):
                v = self._lattice((start + side * j) * h)
                if v not in have:
                    out += [] if v in self.rates else self._make(v, self.seed, why)
                    break
        return out

    def _extend(self, side: int, valid: list[float], centre: float, edge: bool, why: str
                ) -> list[Proposal]:  # fmt: skip
        """``side_points`` rates on the short side (``side`` -1: below, +1: above). Past an edge,
        beyond the last usable rate at the spacing of the outermost usable rates (at least the
        design step): a grid that missed the optimum is extended at its own pace, not one fine
        step per wave. One-sided inside the range: between the estimate and the far rates, at
        the design step."""
        step = self.cfg.design_step_log2
        start = centre
        if edge:
            outer = valid[:2] if side < 0 else valid[-2:]
            step = max(step, abs(outer[-1] - outer[0]) if len(outer) == 2 else 0.0)
            start = valid[0] if side < 0 else valid[-1]
        where = "below" if side < 0 else "above"
        out = []
        for j in range(1, self.cfg.side_points + 1):
            v = self._lattice(start + side * j * step)
            if v not in self.rates:
                out += self._make(v, self.seed, f"{why}; {where} at spacing {step:g}")
        return out

    def _spacing(self, centre: float, valid: list[float]) -> float:
        """The design step while the usable rates around the centre are farther apart; once they
        are that close, half their gap (down to the finest step)."""
        below = [v for v in valid if v <= centre + 1e-9]
        above = [v for v in valid if v >= centre - 1e-9]
        gap = (min(above) - max(below)) if below and above else math.inf
        gaps = [b - a for a, b in zip(valid, valid[1:], strict=False)]
        gap = max(gap, min(gaps, default=math.inf))
        if gap > self.cfg.design_step_log2 + 1e-9:
            return self.cfg.design_step_log2
        return max(self.cfg.min_step_log2, gap / 2)

    def _design(self, centre: float, h: float, why: str) -> list[Proposal]:
        """The ``side_points`` rates of the h-lattice nearest the centre on each side (a lattice
        shared by every cell of the batch size, so neighbouring cells share their runs)."""
        below = math.floor(centre / h + 1e-9)
        above = below + 1 if abs(below * h - centre) > 1e-9 else below + 1
        n = self.cfg.side_points
        grid = [(below - j) * h for j in range(n)] + [(above + j) * h for j in range(n)]
        out = []
        for v in grid:
            v = self._lattice(v)
            if v not in self.rates:
                out += self._make(v, self.seed, why)
        return out

    def _seeds(self, centre: float, valid: list[float], why: str) -> list[Proposal]:
        out: list[Proposal] = []
        for v in sorted(valid, key=lambda v: abs(v - centre))[:3]:
            seeds = sorted(s for r, s in self.tried if r == round(v, 6))
            if len(seeds) < self.cfg.max_seeds:
                out += self._make(v, max(seeds) + 1, why)
        return out

    def _predict(self, tokens: int) -> float | None:
        if self.trend is not None:
            return self.trend.predict(math.log2(tokens), math.log2(self.batch))[0]
        return None

    def _lattice(self, log2_lr: float) -> float:
        step = self.cfg.min_step_log2
        return round(round(log2_lr / step) * step, 6)

    def _make(self, log2_lr: float, seed: int, why: str) -> list[Proposal]:
        v = self._lattice(log2_lr)
        if not self.cfg.lr_log2_min <= v <= self.cfg.lr_log2_max or (v, seed) in self.tried:
            return []
        self.tried.add((v, seed))
        return [Proposal(self.model, self.layout, self.scales, self.batch, v, seed, why)]


def _short_side(valid: list[float], best: float, centre: float, edge: bool) -> int:
    """-1 when fewer than two usable rates lie below the optimum (an edge, the best rate the
    lowest, or a one-sided fit), +1 when fewer than two lie above, 0 when both sides have two."""
    if edge or len(valid) < 3:
        return -1 if best <= valid[0] + 1e-9 else 1 if best >= valid[-1] - 1e-9 else 0
    below = sum(v < centre - 1e-9 for v in valid)
    above = sum(v > centre + 1e-9 for v in valid)
    if min(below, above) >= 2 or below == above:
        return 0
    return -1 if below < above else 1


def _scales(runs: pd.DataFrame) -> tuple[float, float, float]:
    if runs.empty:
        return (1.0, 1.0, 1.0)
    r = runs.iloc[0]
    return tuple(float(r[c] / r["lr"]) for c in ("lr_in", "lr_hidden", "lr_out"))  # type: ignore[return-value]


# ------------------------------------------------------------------------------ batch sizes


def batch_proposals(
    snap: Snapshot, cfg: AutopilotConfig, cells: pd.DataFrame, trends: dict[tuple[str, str], Line]
) -> list[Proposal]:
    """Batch sizes beyond the tried ones where B*(D) sits at the smallest or largest tried."""
    out: list[Proposal] = []
    ok = cells[cells["identified"] & np.isfinite(cells["y0"])]
    for (model, layout), g in snap.runs.groupby(["model", "layout"]):
        trend = trends.get((model, layout))
        tried = sorted({int(b) for b in g["batch_size"]})
        added = sum(1 for s in g["source"] if s == "autopilot_batch")
        if trend is None or len(tried) < 2 or added >= cfg.max_new_batch_sizes:
            continue
        mine = ok[(ok["model"] == model) & (ok["layout"] == layout)]
        want = set()
        for _d, cell in mine.groupby("tokens"):
            if cell["batch_size"].nunique() < 2:
                continue
            best = int(cell.loc[cell["y0"].idxmin(), "batch_size"])
            if best == tried[0] and tried[0] > 1:
                want.add(tried[0] // 2)
            elif best == tried[-1]:
                want.add(tried[-1] * 2)
        horizons = sorted({int(d) for hs in g["horizons_tokens"] for d in hs})
        for b in sorted(want)[: cfg.max_new_batch_sizes - added]:
            out += _new_batch(snap, cfg, str(model), str(layout), b, horizons, trend)
    return out


def _new_batch(
    snap: Snapshot,
    cfg: AutopilotConfig,
    model: str,
    layout: str,
    batch: int,
    horizons: list[int],
    trend: Line,
) -> list[Proposal]:
    """Rates for a new batch size: from the trend's eta* at the largest horizon minus
    ``side_points`` steps to its eta* at the smallest plus ``side_points`` steps."""
    group = _Group(snap, cfg, model, layout, batch, trend)
    ref = snap.runs[(snap.runs["model"] == model) & (snap.runs["layout"] == layout)]
    group.scales, group.seed = _scales(ref), int(ref["seed"].min())
    group.coarse = max(1.0, 2 * cfg.min_step_log2)
    hi = trend.predict(math.log2(horizons[0]), math.log2(batch))[0]
    lo = trend.predict(math.log2(horizons[-1]), math.log2(batch))[0]
    n = cfg.side_points
    rates = np.arange(lo - n * group.coarse, hi + n * group.coarse + 1e-9, group.coarse)
    why = f"B*(D) at the edge of the tried batch sizes: new batch {batch}"
    out = []
    for v in rates:
        out += group._make(float(v), group.seed, why)
    return [dataclasses.replace(p, source="autopilot_batch") for p in out]
