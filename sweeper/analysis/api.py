"""The analysis's entry points: tables in, results out. No files are read here and none are written
except by :meth:`Analysis.write`; proposals of new runs are returned, never applied.

    from sweeper.analysis.api import AnalysisOptions, analyze_tables
    from sweeper.analysis.tables import load_sweep

    result = analyze_tables(load_sweep("results/demo"), AnalysisOptions())
    result.optima          # one row per (model, layout, D, B) slice
    result.laws["series"]  # eta*(B, D) and B*(D) laws per (model, layout), with 95 % intervals
    result.warnings        # each names its slice
    result.width           # per-group rate exponents across width (None without a width family)
    result.schedule_law    # with AnalysisOptions(schedules=True): the schedule law
    result.write(Path("results/demo/analysis"))
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeAlias

import pandas as pd

from sweeper.analysis import checks, laws, refine
from sweeper.analysis.optimum import FitOptions, find_optima, optima_from_points, slice_points
from sweeper.analysis.smoothing import SmoothOptions, smooth_points, trajectories
from sweeper.analysis.tables import AnalysisError, Tables, from_frames, load_sweep, planned_runs

ETA_CHOICES = {"interp": "log2_lr_star_interp", "point": "log2_lr_star"}
_BSTAR_COLUMNS = [
    *("model", "layout", "tokens", "log2_D", "batch_size_star", "log2_B_star"),
    *("log2_B_star_interp", "y0", "x0", "lr_star", "log2_lr_star", "log2_lr_star_interp"),
    *("n_batch", "edge_batch", "censored"),
]


@dataclass(frozen=True, kw_only=True)
class AnalysisOptions:
    """Everything an analysis can be told (the CLI's options, one to one).

    Attributes:
        k: Points fitted per (D, B) slice.
        c_fixed: Loss at initialisation to fix the intercept to (default: the tables' step-0 loss).
        free_c: Fit the intercept instead of fixing it.
        max_loss: Drop points with a loss at or above this (default: the intercept).
        loss: ``train_loss`` (the paper's) or ``val_loss``.
        weight_floor: Smallest sigma in a weight, as a fraction of the slice's median (0: the
            toolkit's rule exactly).
        gap_sigmas: Noise scales beyond the grid allowance before a vertex below the data is
            flagged.
        smooth: Average each horizon point over neighbouring logged points (False: raw x and y).
        smooth_from: First logged point of the window relative to the one at D (the toolkit's
            ``AVG_REL_FROM``).
        smooth_to: Last logged point of the window (``AVG_REL_TO``).
        average_tokens: Horizons at which the window applies (``AVERAGE_H``; None: all).
        average_batch: Batch sizes at which the window applies (``AVERAGE_BS``; None: all).
        eta: Headline eta* (and B*) for the laws: ``interp`` (between grid points) or ``point``
            (the grid point nearest the vertex, the paper's); the other is fitted beside it.
        include_censored: Fit the laws on censored slices and horizons too.
        n_boot: Bootstrap resamples per slice.
        seed: Bootstrap seed.
        plots: Draw the figures when writing.
        title: Report title.
        width: Fit the per-group rate exponents across width when the table has a width family
            with per-group rates (:mod:`sweeper.analysis.width`).
        schedules: Fit the schedule law (:mod:`sweeper.analysis.schedule_law`; needs the metrics).
        fit_schedules: Schedules the law is fitted on (labels or kinds); the rest are held out
            and predicted. None: all.
    """

    k: int = 7
    c_fixed: float | None = None
    free_c: bool = False
    max_loss: float | None = None
    loss: str = "train_loss"
    weight_floor: float = 0.1
    gap_sigmas: float = 3.0
    smooth: bool = True
    smooth_from: int = -1
    smooth_to: int = 1
    average_tokens: tuple[int, ...] | None = None
    average_batch: tuple[int, ...] | None = None
    eta: str = "interp"
    include_censored: bool = False
    n_boot: int = 200
    seed: int = 0
    plots: bool = True
    title: str = ""
    width: bool = True
    schedules: bool = False
    fit_schedules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.k < 3:
            raise AnalysisError(f"--k = {self.k}: need at least 3 points for a quadratic")
        if self.free_c and self.c_fixed is not None:
            raise AnalysisError("c_fixed and free_c: give one or the other (--c-fixed, --free-c)")
        if self.loss not in ("train_loss", "val_loss"):
            raise AnalysisError(f"loss = {self.loss!r}: must be train_loss or val_loss")
        if self.eta not in ETA_CHOICES:
            raise AnalysisError(f"eta = {self.eta!r}: must be one of {', '.join(ETA_CHOICES)}")
        if self.weight_floor < 0 or self.n_boot < 0:
            raise AnalysisError("weight_floor and n_boot must be >= 0")
        self.smoothing()  # validates the window

    def smoothing(self) -> SmoothOptions:
        """The smoothing options."""
        return SmoothOptions(
            enabled=self.smooth,
            rel_from=self.smooth_from,
            rel_to=self.smooth_to,
            average_tokens=self.average_tokens,
            average_batch=self.average_batch,
        )


@dataclass(frozen=True)
class Intercept:
    """The loss at initialisation the parabolas are fixed to (None: fitted freely)."""

    c_fixed: float | None
    per_model: dict[str, float]
    origin: str

    def text(self) -> str:
        """``"c = 5.545 (median step-0 loss of the table)"`` or ``"c fitted freely"``."""
        if self.c_fixed is None:
            return "intercept fitted freely"
        return f"intercept fixed at c = {self.c_fixed:.4g} ({self.origin})"


@dataclass(frozen=True)
class Analysis:
    """The result of :func:`analyze_tables`.

    Attributes:
        options: What was asked.
        tables: The input.
        points: One point per (slice, rate): ``x`` (log2 norm), ``y`` (loss), ``std``, ``se``.
        optima: One row per slice (see ``docs/analysis.md`` for the columns).
        batch_star: B*(D) per (model, layout, D), with its edge flag and censoring reason.
        laws: ``series`` and ``pooled`` laws, ``norm_transfer``, ``layouts``.
        warnings: Each names the slice, horizon or series it is about.
        intercept: The intercept the parabolas were fixed to.
        timings: Wall seconds per stage (``smooth``, ``optima``, ``laws``).
        width: The per-group rate exponents across width, when the table has the design.
        schedule_law: The schedule law, when asked for (``schedules``).
    """

    options: AnalysisOptions
    tables: Tables
    points: pd.DataFrame
    optima: pd.DataFrame
    batch_star: pd.DataFrame
    laws: dict[str, Any]
    warnings: tuple[str, ...]
    intercept: Intercept
    timings: dict[str, float] = field(default_factory=dict)
    width: Any = None
    schedule_law: Any = None

    @property
    def eta_source(self) -> str:
        """The optima column the headline eta* law is fitted to."""
        return ETA_CHOICES[self.options.eta]

    @property
    def censored(self) -> pd.DataFrame:
        """Slices with an optimum whose eta* is left out of the laws, with the reason."""
        ok = self.optima[(self.optima["status"] == "ok") & (self.optima["censored"] != "")]
        return ok[["model", "layout", "tokens", "batch_size", "censored"]].reset_index(drop=True)

    def document(self) -> dict[str, Any]:
        """The content of ``fits.json`` (NaN as null)."""
        from sweeper.analysis.report import document

        return document(self)

    def write(self, out_dir: Path) -> list[Path]:
        """Write ``optima.parquet``, ``fits.json``, the PNG figures and ``report.html``.

        Each file is written atomically; figures of an earlier analysis that this one did not
        draw are removed. Returns the files written.
        """
        from sweeper.analysis.report import write_outputs

        return write_outputs(self, Path(out_dir))


def resolve_intercept(tables: Tables, options: AnalysisOptions) -> Intercept:
    """The intercept: ``--free-c``, ``--c-fixed``, or the tables' per-model loss at step 0."""
    if options.free_c:
        return Intercept(None, {}, "fitted freely (--free-c)")
    if options.c_fixed is not None:
        return Intercept(options.c_fixed, {}, "--c-fixed")
    if not tables.initial_loss:
        return Intercept(None, {}, "no step-0 loss found: intercept fitted freely")
    per = dict(tables.initial_loss)
    c = float(pd.Series(list(per.values())).median())
    origin = tables.initial_origin
    if len(set(per.values())) > 1:
        origin += " (per model: " + ", ".join(f"{m} {v:.4g}" for m, v in per.items()) + ")"
    return Intercept(c, per, origin)


def fit_options(options: AnalysisOptions, intercept: Intercept) -> FitOptions:
    """The per-slice fit settings of ``options`` with the resolved intercept (one place, so every
    caller, the autopilot included, fits slices the same way)."""
    return FitOptions(
        k=options.k,
        c_fixed=intercept.c_fixed,
        c_per_model=intercept.per_model,
        max_loss=options.max_loss,
        weight_floor=options.weight_floor,
        gap_sigmas=options.gap_sigmas,
        n_boot=options.n_boot,
        seed=options.seed,
    )


TableInput: TypeAlias = pd.DataFrame | Tables | str | os.PathLike[str]


def _as_tables(data: TableInput, metrics: pd.DataFrame | None) -> Tables:
    if isinstance(data, Tables):
        return data
    if isinstance(data, pd.DataFrame):
        return from_frames(data, metrics, source="table")
    return load_sweep(data)


def smoothed_points(tables: Tables, options: AnalysisOptions) -> pd.DataFrame:
    """The horizons table with the (smoothed) x and y of every point."""
    h = tables.horizons
    if options.loss not in h.columns or h[options.loss].isna().all():
        raise AnalysisError(f"--loss = {options.loss}: the table has no values in that column")
    return smooth_points(h, trajectories(tables.metrics), options.smoothing(), options.loss)


def analyze_tables(
    data: TableInput,
    options: AnalysisOptions | None = None,
    *,
    metrics: pd.DataFrame | None = None,
) -> Analysis:
    """Optima, laws and warnings of a horizons table.

    Args:
        data: The loaded tables (:func:`sweeper.analysis.tables.load_sweep`, ``load_file``), a
            horizons frame in the sweeper's layout, or a sweep directory (its tables are read).
        options: What to do (default :class:`AnalysisOptions`).
        metrics: With a frame: the long per-step metrics table, if any.

    Raises:
        AnalysisError: bad options or columns, or no slice has an optimum.
    """
    options = options or AnalysisOptions()
    tables = _as_tables(data, metrics)
    t0 = time.perf_counter()
    intercept = resolve_intercept(tables, options)
    smoothed = smoothed_points(tables, options)
    t1 = time.perf_counter()
    points = slice_points(smoothed)
    optima = optima_from_points(points, fit_options(options, intercept))
    extra = _extra_analyses(tables, options)
    if (optima.empty or not (optima["status"] == "ok").any()) and not any(extra.values()):
        raise AnalysisError(
            f"{tables.source or 'table'}: no (model, D, B) slice has 3 usable points to fit an "
            "optimum"
        )
    t2 = time.perf_counter()
    any_ok = (optima["status"] == "ok").any() if not optima.empty else False
    # a sweep with only width or schedule data has no slice to fit the laws on
    fit_on = optima if any_ok else optima.iloc[:0]
    fits = laws.fit_all(fit_on, ETA_CHOICES[options.eta], options.include_censored)
    bstar = fits.pop("batch_star")
    if bstar.empty:
        bstar = pd.DataFrame(columns=_BSTAR_COLUMNS)
    warn = [
        *checks.input_warnings(
            smoothed,
            options.smoothing(),
            options.loss,
            intercept.c_fixed,
            tables.metrics is not None,
        ),
        *checks.law_warnings(fits, optima["model"].nunique()),
        *checks.batch_warnings(bstar),
        *checks.slice_warnings(optima, intercept.text(), options.gap_sigmas),
    ]
    for more in extra.values():
        warn += more.warnings if more is not None else []
    timings = {"smooth": t1 - t0, "optima": t2 - t1, "laws": time.perf_counter() - t2}
    return Analysis(options, tables, points, optima, bstar, fits, tuple(warn), intercept, timings,
                    **extra)  # fmt: skip


def _extra_analyses(tables: Tables, options: AnalysisOptions) -> dict[str, Any]:
    """The width analysis (when the table has the design) and the schedule law (when asked)."""
    from sweeper.analysis import schedule_law, width

    w = None
    if options.width:
        w = width.analyze_width(tables.horizons, width.WidthOptions(loss=options.loss))
    law = None
    if options.schedules:
        law_opts = schedule_law.LawOptions(
            fit_schedules=options.fit_schedules, n_boot=min(options.n_boot, 100), seed=options.seed
        )
        law = schedule_law.fit_schedule_law(tables, law_opts)
    return {"width": w, "schedule_law": law}


def analyze_sweep(
    sweep_dir: str | os.PathLike[str], *, out_dir: Path | None = None, **options: Any
) -> Analysis:
    """Analyse a sweep's collected tables and write the outputs into ``<sweep>/analysis/``.

    Args:
        sweep_dir: The sweep directory (``horizons.parquet``, ``metrics.parquet``).
        out_dir: Where to write instead of ``<sweep>/analysis/``.
        options: :class:`AnalysisOptions` fields.
    """
    result = analyze_tables(load_sweep(sweep_dir), AnalysisOptions(**options))
    result.write(out_dir or Path(sweep_dir) / "analysis")
    return result


def propose(
    data: TableInput,
    options: AnalysisOptions | None = None,
    refine_options: refine.RefineOptions | None = None,
    *,
    existing: Iterable[tuple[str, str, int, float]] = (),
) -> list[refine.Proposal]:
    """Proposals of new runs (``sweeper refine``), deduplicated against the tables' runs.

    Args:
        data: The tables (as for :func:`analyze_tables`). For a sweep directory, the runs of its
            ``runs.parquet`` (planned, not yet collected) are left out too.
        options: Analysis options for the optima (the bootstrap is skipped).
        refine_options: Which proposals to make.
        existing: Keys ``(model, layout, batch_size, round(log2 lr, 6))`` to leave out besides the
            table's runs (planned runs, points already added).

    Returns:
        The proposals. Applying them (``extra_points.json``, planning the runs) is the caller's.
    """
    options = options or AnalysisOptions()
    tables = _as_tables(data, None)
    if not isinstance(data, pd.DataFrame | Tables):
        existing = [*existing, *refine.run_keys(planned_runs(data))]
    intercept = resolve_intercept(tables, options)
    smoothed = smoothed_points(tables, options)
    optima = find_optima(smoothed, replace(fit_options(options, intercept), n_boot=0))
    return refine.propose(
        tables.horizons, optima, refine_options or refine.RefineOptions(), existing=existing
    )
