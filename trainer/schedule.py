"""Learning-rate schedules: the LR multiplier as a pure function of the optimizer step.

``lr_multiplier(cfg, step, total_steps)`` is the factor applied to every group's base LR for the
update that takes the model from ``step`` to ``step + 1`` (``step`` runs over
``0 .. total_steps - 1``).
Because it depends on nothing but its arguments, a resumed run or a decay branch forked from a
constant-LR trunk sees exactly the LRs an uninterrupted run would have used.

Kinds (``trainer.config.ScheduleConfig``):

* ``constant``: linear warmup over ``warmup_steps`` (the first update uses ``1 / warmup_steps``),
  then 1. With no warmup this is the paper's main-scan schedule.
* ``wsd``: warmup, stable at 1, then a linear decay over the last ``decay_fraction`` of the steps.
  The decay starts at 1 and reaches ``min_lr_ratio`` one step after the last update (torchtitan's
  "virtual last step"), so no update is wasted with an LR of exactly 0.
* ``cosine``: warmup, then a half cosine from 1 towards ``min_lr_ratio``, with the same end
  convention.
"""

from __future__ import annotations

import math

from trainer.config import ScheduleConfig


def decay_start(cfg: ScheduleConfig, total_steps: int) -> int:
    """First step of the ``wsd`` decay phase (steps before it use the stable LR).

    Args:
        cfg: The schedule configuration.
        total_steps: The run's number of optimizer steps, used when ``cfg.total_steps`` is None.
    """
    total = cfg.total_steps or total_steps
    return max(cfg.warmup_steps, total - int(round(cfg.decay_fraction * total)))


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """The LR multiplier for the update from ``step`` to ``step + 1``.

    Args:
        cfg: The schedule configuration.
        step: Optimizer steps done so far (0 for the first update).
        total_steps: The run's number of optimizer steps, used when ``cfg.total_steps`` is None.

    Returns:
        A factor in ``[0, 1]``; steps past the end keep the final value.
    """
    if step < 0:
        raise ValueError(f"step = {step}: must be >= 0")
    total = cfg.total_steps or total_steps
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        start = decay_start(cfg, total)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total - start))
        return 1.0 - (1.0 - floor) * progress
    if cfg.kind == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.kind = {cfg.kind!r}: unknown")
