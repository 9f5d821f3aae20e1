"""``sweeper collect``: read every run directory of a sweep into the three Parquet tables.

This package is the only sweeper code that reads the trainer's files (docs/architecture.md), and
it reads them through their contracts: records through :mod:`sweeper.records`, state through the
store, the trainer's files through ``trainer.schema``. It is

* **incremental** (:mod:`~sweeper.collect.scan`): only runs whose files changed since the last
  collect, or whose state ages with the clock, are read again; when nothing changed nothing is
  written;
* **sceptical** (:mod:`~sweeper.collect.run`): ``config.json`` is cross-checked against
  ``run.json``, and ``summary.json`` against the planned steps and the metrics; a run that fails a
  check keeps its row, with the reason in ``problem``, and contributes no horizon rows;
* **tolerant**: one broken run directory affects only that run's row, never the collect;
* **safe under concurrency**: one lock serialises collects of a sweep, and every file is written
  atomically, so readers always see a complete table.

Tables and their columns: docs/tables.md.
"""

from __future__ import annotations

from sweeper.collect.core import CollectError, CollectResult, collect_sweep
from sweeper.collect.scan import CACHE_DIR

__all__ = ["CACHE_DIR", "CollectError", "CollectResult", "collect_sweep"]
