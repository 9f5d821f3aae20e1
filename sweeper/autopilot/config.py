"""``[autopilot]``: when a cell's eta* counts as identified, how waves are planned, when runs stop.

Every key is optional; ``docs/autopilot.md`` explains each rule the values feed::

    [autopilot]
    tolerance_log2 = 0.5       # half-width of eta*'s 95 % interval per (model, B, D) cell
    max_waves = 8
    budget_tokens = 0          # 0: no budget; else stop once this many tokens were trained
    norm_margin_log2 = 0.5     # stop a run once its norm is this far above the band's upper limit
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from sweeper.errors import SpecError


@dataclass(frozen=True, kw_only=True)
class AutopilotConfig:
    """The autopilot's settings (``[autopilot]``; :meth:`Sweep.autopilot` keywords override them).

    Attributes:
        tolerance_log2: A cell is identified when the 95 % interval of log2 eta* is at most this
            wide on each side of the estimate (and the fit is sound: no edge, a convex vertex
            inside the fitted points).
        side_points: Rates wanted on each side of eta* per cell; fewer are proposed for.
        design_step_log2: The spacing of a cell's design: ``side_points`` rates on each side of
            its eta* estimate.
        min_step_log2: The finest spacing densification goes to (rates sit on this lattice).
        max_waves: Waves after the first (the spec's grid) at most.
        budget_tokens: Stop once this many tokens were trained (0: no budget).
        budget_flops: Stop once this many FLOPs were spent (0: no budget).
        lr_log2_min: Lowest log2 rate an edge may be extended to.
        lr_log2_max: Highest log2 rate an edge may be extended to.
        max_side_points: Finest-lattice rates per side a cell still not identified once its
            design is there (noise; an edge whose far side was stopped before D) is widened
            to, one rate per side and wave (the analysis fits the 7 points nearest the
            minimum: 3 on each side).
        max_seeds: Seeds per rate when a cell is still too noisy at the finest spacing.
        batch_proposals: Propose batch sizes beyond the tried ones toward B*(D).
        max_new_batch_sizes: Batch sizes the autopilot may add per model.
        early_stop: Stop hopeless runs during a wave.
        norm_margin_log2: Norm rule: stop a constant-rate run whose log2 output norm is above the
            band's upper confidence limit at every horizon still to come by this much.
        band_min_slices: Finished, well-fitted slices needed to estimate the band.
        band_max_width_log2: The band (and the eta* trend) counts as identified only while its
            confidence interval at a horizon is at most this wide. A slice read off a grid h
            octaves apart carries a grid allowance of h / 4 in its error, so on the 2-octave
            grid the autopilot starts from one slice alone is +-1 wide at 95 %: the limit must
            be above 2 for any stop to happen before the grid is densified.
        band_z: Normal quantile of the band's and the trend's confidence limits.
        rate_margin_log2: Far rule: stop a run whose log2 rate is this far outside the eta*
            trend's confidence interval at every horizon still to come...
        loss_margin: ...and whose loss is above the best at the same tokens and batch by this
            fraction of the loss already gained (initial loss minus best).
        n_boot: Bootstrap resamples per slice for the intervals.
        poll_s: Seconds between stop checks on backends other than ``sim``.
    """

    tolerance_log2: float = 0.5
    side_points: int = 1
    design_step_log2: float = 0.5
    min_step_log2: float = 0.25
    max_waves: int = 8
    budget_tokens: int = 0
    budget_flops: float = 0.0
    lr_log2_min: float = -30.0
    lr_log2_max: float = 6.0
    max_side_points: int = 3
    max_seeds: int = 1
    batch_proposals: bool = True
    max_new_batch_sizes: int = 2
    early_stop: bool = True
    norm_margin_log2: float = 0.5
    band_min_slices: int = 3
    band_max_width_log2: float = 3.0
    band_z: float = 2.0
    rate_margin_log2: float = 1.0
    loss_margin: float = 0.02
    n_boot: int = 200
    poll_s: float = 5.0

    def validate(self, file: str = "<autopilot>") -> None:
        """SpecError naming the key unless every value is usable."""
        positive = (
            "tolerance_log2",
            "design_step_log2",
            "min_step_log2",
            "band_max_width_log2",
            "band_z",
            "poll_s",
        )
        for key in positive:
            _check(file, key, getattr(self, key), lambda v: v > 0, "must be > 0")
        for key in ("norm_margin_log2", "rate_margin_log2", "loss_margin"):
            _check(file, key, getattr(self, key), lambda v: v >= 0, "must be >= 0")
        for key in ("budget_tokens", "budget_flops", "max_waves", "max_new_batch_sizes"):
            _check(file, key, getattr(self, key), lambda v: v >= 0, "must be >= 0")
        _check(file, "side_points", self.side_points, lambda v: 1 <= v <= 20, "must be in 1..20")
        _check(file, "max_side_points", self.max_side_points, lambda v: 1 <= v <= 20,
               "must be in 1..20")  # fmt: skip
        _check(file, "max_seeds", self.max_seeds, lambda v: 1 <= v <= 16, "must be in 1..16")
        _check(file, "band_min_slices", self.band_min_slices, lambda v: v >= 2, "must be >= 2")
        _check(file, "n_boot", self.n_boot, lambda v: 20 <= v <= 10_000, "must be in 20..10000")
        if not -40 <= self.lr_log2_min < self.lr_log2_max <= 10:
            raise SpecError(file, "autopilot.lr_log2_max", self.lr_log2_max,
                            "need -40 <= lr_log2_min < lr_log2_max <= 10")  # fmt: skip

    def replace(self, **changes: Any) -> AutopilotConfig:
        """A copy with ``changes`` (each checked like a spec value)."""
        return from_dict({**dataclasses.asdict(self), **changes}, "<autopilot options>")


def _check(file: str, key: str, value: Any, ok: Any, message: str) -> None:
    if not ok(value):
        raise SpecError(file, f"autopilot.{key}", value, message)


def from_dict(table: dict[str, Any], file: str) -> AutopilotConfig:
    """Build and validate from a dict of the fields (types checked, ints accepted as floats)."""
    kinds = {f.name: f.type for f in fields(AutopilotConfig)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in kinds:
            known = ", ".join(sorted(kinds))
            raise SpecError(file, f"autopilot.{key}", value, f"unknown key (known: {known})")
        kind = kinds[key]
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = type(value) is int
        else:
            ok = type(value) in (int, float) and math.isfinite(value)
            value = float(value) if ok else value
        if not ok:
            raise SpecError(file, f"autopilot.{key}", value, f"expected {_WORDS[str(kind)]}")
        values[key] = value
    cfg = AutopilotConfig(**values)
    cfg.validate(file)
    return cfg


_WORDS = {"bool": "true or false", "int": "an integer", "float": "a finite number"}


def parse_section(table: dict[str, Any], file: str) -> AutopilotConfig:
    """Validate ``[autopilot]`` (every key optional). Raises SpecError naming the key."""
    return from_dict(table, file)
