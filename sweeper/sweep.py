"""The library API: a :class:`Sweep` is a sweep directory plus the verbs that act on it.

From a notebook, with no CLI::

    from sweeper import Sweep
    sweep = Sweep.create("sweeps/demo.toml")        # validate, plan, write the run records
    sweep.launch(max_parallel=2)                     # local: returns when the runs ended
    sweep.collect()
    sweep.table("horizons")                          # a pandas DataFrame
    sweep.analyze()

Every launch and resume goes through one sequence, for every backend: take the sweep lock,
reconcile the backend's view, select the runs, claim them (blocking backends) or submit them
(cluster backends) under the lock, then run the blocking ones outside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper.backends import LaunchOptions, load_backend
from sweeper.errors import SpecError, StoreError, SweepError
from sweeper.extend import Extender
from sweeper.plan import GridPoint, Plan, extra_point, extra_points, plan_sweep
from sweeper.records import LAUNCHABLE, RESUMABLE, RunKind, RunRecord, RunState
from sweeper.spec import SweepSpec, load_spec, parse_spec_text, read_spec_file
from sweeper.store import (
    PLAN,
    RunStatus,
    SweepStore,
    hostname,
    read_json,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    import pandas as pd

SPEC_FILE = "spec.toml"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
EXTRA_POINTS = "extra_points.json"
# Files a --restart removes; a completed run is never restarted.
_RESTART_FILES = ("metrics.jsonl", "summary.json", "config.json", "provenance.json", "heartbeat")


@dataclasses.dataclass(frozen=True)
class LaunchReport:
    """What a launch or resume did (or, for a dry run, would do).

    Attributes:
        backend: The backend's name.
        run_ids: The runs started or submitted, in order.
        dry_run: Nothing was started or written.
        description: For a dry run, the backend's account of what it would submit.
        states: After a blocking launch, the count of each final state of ``run_ids``.
        new_runs: Runs whose records this call created.
    """

    backend: str
    run_ids: tuple[str, ...]
    dry_run: bool = False
    description: str = ""
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    new_runs: tuple[str, ...] = ()

    @property
    def failed(self) -> int:
        """Runs that ended ``failed`` (a blocking launch)."""
        return self.states.get(RunState.FAILED.value, 0)


def plan(spec: SweepSpec, extra_points: list[GridPoint] | None = None) -> list[RunRecord]:
    """The run records of ``spec`` (plus extra points), trunks before their branches."""
    return plan_sweep(spec, extra_points or []).runs


def _single(r: RunRecord) -> bool:
    return r.kind == RunKind.SINGLE


def _check_results(results: str | Path) -> None:
    """The results directory's absolute path may hold no control character: it is written into
    job scripts (a newline in ``#SBATCH --output=...`` would end the line and run the rest)."""
    path = os.path.abspath(results)
    if _CONTROL.search(path):
        raise SpecError(
            "<cli>", "--results", path, "newlines and control characters are not allowed"
        )


class Sweep:
    """A sweep directory and its spec. Build one with :meth:`create` or :meth:`open`."""

    def __init__(self, store: SweepStore, spec: SweepSpec) -> None:
        self.store = store
        self.spec = spec
        self.new_ids: tuple[str, ...] = ()  # runs whose records the last write created

    def __repr__(self) -> str:
        return f"Sweep({self.spec.name!r} at {str(self.store.root)!r})"

    @property
    def root(self) -> Path:
        """The sweep directory."""
        return self.store.root

    # ---- construction
    @classmethod
    def create(
        cls,
        spec: str | Path | SweepSpec,
        results: str | Path = "results",
        *,
        write: bool = True,
        backend: str | None = None,
    ) -> Sweep:
        """Validate ``spec``, plan it, and create or extend ``<results>/<name>``.

        An existing sweep keeps every run; only runs not yet present are added, and new smaller
        horizons of existing single runs are recorded in their ``horizons.json``. A changed spec
        replaces ``spec.toml`` atomically and the old one is kept as ``spec.<UTC time>.toml``.
        With ``write=False`` nothing is written (a dry run). ``backend`` (default: the spec's) is
        loaded first, so an unusable backend fails before anything is written.
        """
        if not isinstance(spec, SweepSpec):
            spec = load_spec(spec)
        _check_results(results)
        name = backend or spec.backend.name
        load_backend(name, spec.backend.config(name))
        sweep = cls(SweepStore(Path(results) / spec.name), spec)
        if write:
            sweep._write()
        return sweep

    @classmethod
    def open(cls, path_or_name: str | Path, results: str | Path = "results") -> Sweep:
        """An existing sweep: a sweep directory, or a name under ``results``."""
        for cand in (Path(path_or_name), Path(results) / str(path_or_name)):
            # a sweep without its plan.json (deleted, damaged) still opens: the runs are listed
            has_runs = (cand / PLAN).is_file() or (cand / "runs").is_dir()
            if (cand / SPEC_FILE).is_file() and has_runs:
                _check_results(cand)
                store = SweepStore(cand)
                path = cand / SPEC_FILE
                return cls(store, parse_spec_text(read_spec_file(path), str(path)))
        where = Path(results) / str(path_or_name)
        raise StoreError(f"sweep {str(path_or_name)!r}: no sweep directory there nor at {where}")

    # ---- planning
    def extra_points(self) -> list[GridPoint]:
        """Validated points of ``extra_points.json`` (empty if the file is absent)."""
        path = self.root / EXTRA_POINTS
        if not path.exists():
            return []
        raw = read_json(path)
        if not isinstance(raw, list):
            raise SpecError(str(path), None, raw, "expected a list of points")
        return [pt for i, p in enumerate(raw) for pt in extra_points(p, self.spec, f"{path}[{i}]")]

    def plan(self) -> Plan:
        """The plan of the spec plus its extra points, with every run that extends an existing
        constant-rate run to a larger horizon replaced by its continuation (``sweeper.extend``):
        what the sweep directory should hold."""
        planned = plan_sweep(self.spec, self.extra_points())
        runs, self._horizon_adds = self._resolve(planned.runs)
        return dataclasses.replace(planned, runs=runs)

    def _resolve(
        self, runs: list[RunRecord]
    ) -> tuple[list[RunRecord], list[tuple[str, tuple[int, ...]]]]:
        have = set(self.store.run_ids())
        adds: list[tuple[str, tuple[int, ...]]] = []
        new = [r for r in runs if r.id not in have]
        if not new or not have:  # nothing to extend (the common case: no record is read)
            adds = [(r.id, r.horizons_tokens) for r in runs if r.id in have and _single(r)]
            return runs, adds
        existing = []
        for rid in have:
            with contextlib.suppress(StoreError):
                existing.append(self.store.load_record(rid))
        ext = Extender(self.store, existing)
        out = []
        for r in runs:
            if r.id in have:
                out.append(r)
                if _single(r):
                    adds.append((r.id, r.horizons_tokens))
                continue
            resolved, more = ext.resolve(r)
            out.append(resolved)
            adds += more
        unique = {r.id: r for r in out}
        return list(unique.values()), adds

    def _write(self) -> list[str]:
        """Write the spec, the records of new runs and ``plan.json`` under the sweep lock."""
        planned = self.plan()  # validated before anything is written
        with self.store.lock():
            self._store_spec()
            return self._write_plan(planned)

    def _store_spec(self) -> None:
        path = self.root / SPEC_FILE
        text = self.spec.text
        if path.exists():
            old = read_spec_file(path)
            if old == text:
                return
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            write_text_atomic(self.root / f"spec.{stamp}.toml", old)
        write_text_atomic(path, text)

    def _write_plan(self, planned: Plan) -> list[str]:
        existing = set(self.store.run_ids())
        new_ids = []
        for run in planned.runs:
            if run.id not in existing:
                self.store.write_record(run)
                new_ids.append(run.id)
        for rid, horizons in getattr(self, "_horizon_adds", []):
            self.store.add_horizons(rid, horizons)
        old_ids: list[str] = []
        if self.store.exists():
            with_plan = self.store.plan_order()
            old_ids = [r for r in with_plan if r in existing]
        doc = planned.to_dict(self.spec)
        current = set(doc["runs"])
        # Runs of an earlier spec stay listed (after the current ones) so they are never orphaned.
        doc["runs"] = doc["runs"] + [r for r in old_ids if r not in current]
        self.store.write_plan(doc)
        self.new_ids = tuple(new_ids)
        return new_ids

    def replan(self) -> list[str]:
        """Write records for planned runs not yet present (e.g. after :meth:`apply`)."""
        return self._write()

    # ---- running
    def launch(
        self,
        backend: str | None = None,
        *,
        max_parallel: int | None = None,
        dry_run: bool = False,
        progress: bool = False,
    ) -> LaunchReport:
        """Start the sweep's planned runs on ``backend`` (default: the spec's).

        A blocking backend (local) returns when the runs ended; a cluster backend returns once
        they are submitted. With ``dry_run`` nothing is started or written; the report's
        ``description`` says what would be submitted.
        """
        return self._start(LAUNCHABLE, backend, max_parallel, dry_run, progress, restart=False)

    def resume(
        self,
        *,
        restart: bool = False,
        diverged: bool = False,
        dry_run: bool = False,
        backend: str | None = None,
        max_parallel: int | None = None,
        progress: bool = False,
    ) -> LaunchReport:
        """Re-run failed, stale, cancelled (and planned) runs from their last checkpoint.

        A completed run is never run again. ``restart`` deletes the selected runs' checkpoints
        and metrics first; ``diverged`` re-runs diverged runs too.
        """
        wanted = RESUMABLE | ({RunState.DIVERGED} if diverged else set())
        return self._start(frozenset(wanted), backend, max_parallel, dry_run, progress, restart)

    def _start(
        self,
        wanted: frozenset[RunState],
        backend_name: str | None,
        max_parallel: int | None,
        dry_run: bool,
        progress: bool,
        restart: bool,
    ) -> LaunchReport:
        name = backend_name or self.spec.backend.name
        backend = load_backend(name, self.spec.backend.config(name))
        opts = LaunchOptions(max_parallel=max_parallel, progress=progress)
        if dry_run:
            runs = self._select(wanted, include_unwritten=True)
            text = backend.describe(self.store, runs, opts)
            return LaunchReport(name, tuple(r.id for r in runs), True, text)
        with self.store.lock():
            backend.reconcile(self.store)
            runs = self._select(wanted)
            if restart:  # every run is checked before any file is deleted
                for r in runs:
                    self._check_restart(r.id)
                for r in runs:
                    self.restart_run(r.id)
            if backend.blocking:
                self._claim(runs, name)
            else:
                backend.launch(self.store, runs, opts)
        if backend.blocking:
            backend.launch(self.store, runs, opts)
        ids = tuple(r.id for r in runs)
        states = Counter(st.state.value for st in self.store.statuses(list(ids)).values())
        return LaunchReport(name, ids, False, "", dict(states), self.new_ids)

    def _select(
        self, wanted: frozenset[RunState], include_unwritten: bool = False
    ) -> list[RunRecord]:
        """Runs in ``wanted`` states, in plan order (trunks before branches). Never a completed
        one, never one whose directory is damaged (state ``error``)."""
        order = self.store.plan_order()
        statuses = self.store.statuses(order)
        runs = []
        for rid in order:
            if statuses[rid].state in wanted:
                try:
                    runs.append(self.store.load_record(rid))
                except StoreError as e:  # damaged beyond status's cheap checks: skip, say why
                    logging.getLogger(__name__).warning("skipping run %s: %s", rid, e)
        if include_unwritten:
            have = set(order)
            runs = [r for r in self.plan().runs if r.id not in have] + runs
            # trunks before branches, as in plan order (a stable sort keeps the rest)
            runs.sort(key=lambda r: r.kind is RunKind.BRANCH)
        return runs

    def _claim(self, runs: list[RunRecord], backend: str) -> None:
        """Mark runs ``submitted`` by this process (under the sweep lock)."""
        for r in runs:
            self.store.append_event(
                r.id, RunState.SUBMITTED, backend=backend, host=hostname(), pid=os.getpid()
            )

    def _check_restart(self, run_id: str) -> Path:
        """The directory of a run that may be restarted; StoreError for a completed run, or for a
        run directory, ``ckpt/`` or file to delete that is a symlink (never deleted through)."""
        if self.store.status(run_id).state in (RunState.COMPLETED, RunState.STOPPED):
            raise StoreError(f"run {run_id}: completed; refusing to delete its data")
        rd = self.store.run_dir(run_id)
        for path in (rd, *(rd / name for name in ("ckpt", *_RESTART_FILES))):
            if os.path.islink(path):
                raise StoreError(
                    f"{path}: is a symlink; refusing to restart through it "
                    "(symlinks inside run directories are not supported, see docs/clusters.md)"
                )
        return rd

    def restart_run(self, run_id: str) -> None:
        """Delete a non-completed run's checkpoints and metrics so it starts from step 0."""
        rd = self._check_restart(run_id)
        shutil.rmtree(rd / "ckpt", ignore_errors=True)
        for name in _RESTART_FILES:
            (rd / name).unlink(missing_ok=True)

    def cancel(self) -> dict[str, int]:
        """Stop queued and running runs (trainers checkpoint; runs end ``cancelled``).

        Returns:
            The number of runs a cancel was sent to, per backend.
        """
        by_backend: dict[str, list[str]] = {}
        for rid, st in self.store.statuses().items():
            if st.state.is_active() or st.state == RunState.STALE:
                by_backend.setdefault(st.backend or self.spec.backend.name, []).append(rid)
        for name, ids in by_backend.items():
            load_backend(name, self.spec.backend.config(name)).cancel(self.store, ids)
        return {name: len(ids) for name, ids in by_backend.items()}

    def status(self, refresh: bool = False) -> list[RunStatus]:
        """Every run's status in plan order; ``refresh`` asks each backend the runs used first."""
        if refresh:
            names = {self.spec.backend.name}
            names |= {st.backend for st in self.store.statuses().values() if st.backend}
            with self.store.lock():
                for name in sorted(names):
                    load_backend(name, self.spec.backend.config(name)).reconcile(self.store)
        return list(self.store.statuses(self.store.plan_order()).values())

    # ---- tables and analysis
    def collect(self, full: bool = False) -> Any:
        """Read every changed run into the Parquet tables (``runs``, ``horizons``, ``metrics``)."""
        from sweeper.collect import collect_sweep

        return collect_sweep(self.root, full=full)

    def table(self, name: str) -> pd.DataFrame:
        """One of the sweep's tables as a DataFrame: ``runs``, ``horizons``, ``metrics`` or
        ``optima`` (the latter after :meth:`analyze`)."""
        from sweeper.export import load_table

        return load_table(self.root, name).to_pandas()

    def export(
        self, table: str, fmt: str, output: Path | None = None, columns: list[str] | None = None
    ) -> None:
        """Write one table as csv, parquet, jsonl or markdown to ``output`` (None: stdout)."""
        from sweeper.export import export_table

        export_table(self.root, table, fmt, output, columns)

    def analyze(self, **options: Any) -> Any:
        """Optima, laws and the report from the collected tables (``analysis/``); keyword options
        are :class:`sweeper.analysis.api.AnalysisOptions` fields."""
        from sweeper.analysis import api

        return api.analyze_sweep(self.root, **options)

    def propose(self, seed: int = 0, **refine_options: Any) -> tuple[list[Any], list[str]]:
        """Proposed next runs from the current optima (``sweeper refine``), without the points
        already planned or added, and without those the spec rejects.

        Keywords are :class:`sweeper.analysis.refine.RefineOptions` fields (``extend``,
        ``densify``, ``untried``, ``optuna_trials``).

        Returns:
            The proposals (``.to_point()`` gives what :meth:`apply` takes), and why any were left
            out.
        """
        from sweeper.analysis import api
        from sweeper.analysis import refine as rf
        from sweeper.analysis.tables import load_sweep, planned_runs

        path = self.root / EXTRA_POINTS
        entries = rf.check_points(read_json(path) if path.exists() else [], str(path))
        existing = {rf.point_key(d) for d in entries} | set(rf.run_keys(planned_runs(self.root)))
        ropts = rf.RefineOptions(seed=seed, **refine_options)
        props = api.propose(
            load_sweep(self.root), api.AnalysisOptions(seed=seed), ropts, existing=existing
        )
        kept, dropped = [], []
        for p in props:
            try:
                extra_point(p.to_point(), self.spec, "proposal")
            except SweepError as e:
                dropped.append(str(e))
                continue
            kept.append(p)
        return kept, dropped

    def apply(self, points: list[dict[str, Any]]) -> list[str]:
        """Add points (``{"model", "lr", "batch_size", ...}``, e.g. from :meth:`propose`) to
        ``extra_points.json`` and write the records of the runs they add.

        Every point is validated like the spec's axes before anything is written.

        Returns:
            Ids of the new runs.
        """
        path = self.root / EXTRA_POINTS
        for i, p in enumerate(points):
            extra_point(p, self.spec, f"proposal[{i}]")
        with self.store.lock():
            have = read_json(path) if path.exists() else []
            if not isinstance(have, list):
                raise SpecError(str(path), None, have, "expected a list of points")
            added = [p for p in points if p not in have]
            if added:
                write_json_atomic(path, have + added)
        return self.replan()

    def autopilot(self, **options: Any) -> Any:
        """Run waves until every (model, B, D) cell's eta* is identified to the tolerance or a
        budget is spent, stopping hopeless runs on the way (``docs/autopilot.md``). Keywords:
        ``backend``, ``max_parallel``, ``progress``, ``on_event`` and any
        :class:`sweeper.autopilot.AutopilotConfig` field (overriding ``[autopilot]``).

        Returns:
            A :class:`sweeper.autopilot.driver.AutopilotReport`.
        """
        from sweeper.autopilot import run_autopilot

        return run_autopilot(self, **options)
