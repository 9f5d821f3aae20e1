"""Scaling analysis of a sweep's horizons table: optima, scaling laws, norm transfer, plots, report.

Entry points: :func:`sweeper.analysis.report.run_analysis` (the whole pipeline, used by
``sweeper analyze``) and :func:`sweeper.analysis.refine.propose` (``sweeper refine``). The package
reads tables only (``horizons.parquet``, ``metrics.parquet`` or a CSV made elsewhere), never run
directories.
"""

from __future__ import annotations
