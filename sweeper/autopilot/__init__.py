"""The autopilot: waves of runs until every (model, B, D) cell's eta* is identified, stopping runs
that cannot be optimal on the way. ``docs/autopilot.md`` explains the method and its rules.

* :mod:`sweeper.autopilot.config` — ``[autopilot]`` (:class:`AutopilotConfig`).
* :mod:`sweeper.autopilot.estimates` — the tables a decision reads: runs, optima with intervals,
  each run's latest logged point.
* :mod:`sweeper.autopilot.rules` — pure functions: the norm band, the eta* trend, stop decisions.
* :mod:`sweeper.autopilot.proposals` — pure functions: cells, their verdicts, the next wave.
* :mod:`sweeper.autopilot.journal` — ``autopilot.jsonl``, the decision log it resumes from.
* :mod:`sweeper.autopilot.driver` — the wave loop over the :class:`sweeper.Sweep` API.

Only the config is imported here (the spec parser imports it); the rest loads on first use.
"""

from __future__ import annotations

from typing import Any

from sweeper.autopilot.config import AutopilotConfig, parse_section

__all__ = ["AutopilotConfig", "parse_section", "run_autopilot"]


def run_autopilot(sweep: Any, **options: Any) -> Any:
    """Run the autopilot on ``sweep`` (see :func:`sweeper.autopilot.driver.run_autopilot`)."""
    from sweeper.autopilot.driver import run_autopilot as run

    return run(sweep, **options)
