"""Scaling analysis of a sweep's tables: optima, scaling laws, norm transfer, plots, report.

The entry points are in :mod:`sweeper.analysis.api`: :func:`~sweeper.analysis.api.analyze_tables`
(tables in, an :class:`~sweeper.analysis.api.Analysis` out, which can ``write`` its files) and
:func:`~sweeper.analysis.api.propose` (proposals of new runs, returned, never applied). Tables are
loaded by :mod:`sweeper.analysis.tables` (a sweep's own through :mod:`sweeper.tables`, with its
schema check; CSV/Parquet made elsewhere, including the norm-transfer toolkit's layout). The
package reads tables only, never run directories, and launches nothing;
:mod:`sweeper.cli.analysis` is the command-line adapter over it.
"""

from __future__ import annotations
