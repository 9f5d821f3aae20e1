"""sweeper: plan, run (local, SLURM, Ray), collect and analyse learning-rate x batch-size x
token-budget sweeps of Scion-trained language models.

The library API (the ``sweeper`` command line is a thin layer over it)::

    from sweeper import Sweep, load_spec, plan
    spec = load_spec("sweeps/demo.toml")
    runs = plan(spec)                                   # list[RunRecord], nothing written
    sweep = Sweep.create(spec)                          # results/demo
    report = sweep.launch(max_parallel=2)
    sweep.collect()
    horizons = sweep.table("horizons")
    analysis = sweep.analyze()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sweeper.calibrate import calibrate
from sweeper.cost import CostConfig, cost_rows, needs_confirmation
from sweeper.errors import BackendError, SpecError, StoreError, SweepError
from sweeper.live import (
    LiveView,
    RunProgress,
    SweepSummary,
    filter_rows,
    format_seconds,
    natural_key,
)
from sweeper.records import Resources, RunEvent, RunKind, RunRecord, RunState
from sweeper.spec import SweepSpec, check_launch, host_warning, load_spec
from sweeper.store import RunStatus
from sweeper.sweep import LaunchReport, Sweep, plan

__version__ = "0.2.0"

# The analysis imports pandas, scipy and matplotlib (about a second): its names load on first use,
# so `import sweeper` (and `sweeper status`) stays fast.
_LAZY = {
    "Analysis": "sweeper.analysis.api",
    "AnalysisOptions": "sweeper.analysis.api",
    "analyze_tables": "sweeper.analysis.api",
    "load_tables_file": ("sweeper.analysis.tables", "load_file"),
    "load_sweep_tables": ("sweeper.analysis.tables", "load_sweep"),
    "RefineOptions": ("sweeper.analysis.refine", "RefineOptions"),
    "Proposal": ("sweeper.analysis.refine", "Proposal"),
    "Tables": ("sweeper.analysis.tables", "Tables"),
}

if TYPE_CHECKING:  # the lazy names, for type checkers
    from sweeper.analysis.api import Analysis, AnalysisOptions, analyze_tables
    from sweeper.analysis.refine import Proposal, RefineOptions
    from sweeper.analysis.tables import Tables
    from sweeper.analysis.tables import load_file as load_tables_file
    from sweeper.analysis.tables import load_sweep as load_sweep_tables


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'sweeper' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)


__all__ = [
    "Analysis",
    "AnalysisOptions",
    "Proposal",
    "RefineOptions",
    "Tables",
    "analyze_tables",
    "load_sweep_tables",
    "load_tables_file",
    "BackendError",
    "CostConfig",
    "LaunchReport",
    "LiveView",
    "RunProgress",
    "SweepSummary",
    "Resources",
    "RunEvent",
    "RunKind",
    "RunRecord",
    "RunState",
    "RunStatus",
    "SpecError",
    "StoreError",
    "Sweep",
    "SweepError",
    "SweepSpec",
    "__version__",
    "calibrate",
    "check_launch",
    "cost_rows",
    "filter_rows",
    "format_seconds",
    "host_warning",
    "load_spec",
    "natural_key",
    "needs_confirmation",
    "plan",
]
