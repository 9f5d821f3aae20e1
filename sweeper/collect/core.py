"""``collect_sweep``: the incremental collect of a sweep directory into its three tables.

A collect takes the sweep's collect lock, compares every run's file signatures with the manifest
(:mod:`sweeper.collect.scan`), reads the runs that changed (new, touched, or in a state that ages
with the clock) in groups (:mod:`~sweeper.collect.run`, :mod:`~sweeper.collect.metrics`,
:mod:`~sweeper.collect.horizons`), merges their rows with the cached rows of the others, and
writes the cache and the published tables, each atomically. When nothing changed nothing is
written.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sweeper import tables
from sweeper.collect.horizons import horizon_rows
from sweeper.collect.metrics import Metrics, long_metrics, read_metrics
from sweeper.collect.run import Context, RunInfo, read_run, runs_row
from sweeper.collect.scan import (
    CACHE_DIR,
    VOLATILE,
    Cache,
    generation_of,
    listed_ids,
    run_ids,
    signatures,
)
from sweeper.errors import StoreError, SweepError
from sweeper.store import SweepStore
from trainer.schema import METRICS_FILE

# Runs read and parsed at a time: each group goes all the way to its rows before the next, so
# its file bytes (a few MB) are freed and the memory reused.
GROUP = 256


class CollectError(SweepError):
    """The sweep directory cannot be collected at all (one line, naming the path)."""


@dataclass(frozen=True)
class CollectResult:
    """What a collect did.

    Attributes:
        sweep_dir: The sweep directory.
        n_runs: Runs in the tables.
        reread: Ids of the runs whose files were read this time (the others came from the cache).
        removed: Ids of runs that disappeared since the last collect.
        written: True if the tables were (re)written; False when nothing changed.
        states: Number of runs per state.
        problems: ``run_id -> problem`` for every run whose numbers are not trusted (the
            ``problem`` column).
        rows: Row count per table.
        elapsed_s: Wall time of the collect.
    """

    sweep_dir: Path
    n_runs: int
    reread: tuple[str, ...]
    removed: tuple[str, ...]
    written: bool
    states: dict[str, int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def paths(self) -> dict[str, Path]:
        """Path of each table."""
        return {name: tables.table_path(self.sweep_dir, name) for name in tables.TABLE_NAMES}

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """One line for the CLI: ``40 runs (12 read, 28 cached; ...); 1 with problems; ...``."""
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.states.items()))
        what = "tables written" if self.written else "nothing changed"
        return (
            f"{self.n_runs} runs ({len(self.reread)} read, "
            f"{self.n_runs - len(self.reread)} cached; {states or 'none'}); "
            f"{len(self.problems)} with problems; {what}; "
            f"{self.rows.get('horizons', 0)} horizon rows, {self.rows.get('metrics', 0)} metric "
            f"rows in {self.elapsed_s:.2f} s"
        )


def collect_sweep(
    sweep_dir: Path, *, full: bool = False, now: float | None = None
) -> CollectResult:
    """Collect a sweep directory into ``runs.parquet``, ``horizons.parquet`` and
    ``metrics.parquet`` (docs/tables.md).

    Args:
        sweep_dir: ``results/<sweep>`` (must contain ``runs/``).
        full: Ignore the cache and read every run again.
        now: The clock for the stale check (tests); None: ``time.time()``.

    Returns:
        A :class:`CollectResult`; ``reread`` names the runs whose files were read.

    Raises:
        CollectError: ``sweep_dir`` is not a sweep directory, or the tables cannot be written.
    """
    t0 = time.perf_counter()
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "runs").is_dir():
        raise CollectError(f"{sweep_dir}: not a sweep directory (no runs/)")
    store = SweepStore(sweep_dir)
    listed = listed_ids(store)
    ctx = Context(store, _sweep_name(store), time.time() if now is None else now, frozenset(listed))
    with _locked(sweep_dir / CACHE_DIR):
        _remove_leftovers(sweep_dir)
        try:
            result = _collect_locked(ctx, full)
        except OSError as e:  # a full disk or a read-only sweep directory: say which file
            where = e.filename2 or e.filename or sweep_dir
            raise CollectError(
                f"{where}: cannot write the collected tables ({e.strerror})"
            ) from None
    return dataclasses.replace(result, elapsed_s=time.perf_counter() - t0)


def _sweep_name(store: SweepStore) -> str:
    try:
        name = store.load_plan().get("sweep")
    except StoreError:
        name = None
    return name if isinstance(name, str) else store.root.resolve().name


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    try:
        cache_dir.mkdir(exist_ok=True)
        f = open(cache_dir / "lock", "a+b")  # noqa: SIM115 - held for the whole collect
    except OSError as e:
        raise CollectError(f"{cache_dir}: cannot create the collect cache ({e.strerror})") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(sweep_dir: Path) -> None:
    """Temp files of a collect that was killed mid-write (only collect writes these names, and
    only under the lock held here)."""
    leftovers = list((sweep_dir / CACHE_DIR).glob(".*.tmp"))
    for name in tables.TABLE_NAMES:
        leftovers += sweep_dir.glob(f".{name}.parquet.*.tmp")
    for path in leftovers:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- incremental


def _collect_locked(ctx: Context, full: bool) -> CollectResult:
    cache_dir = ctx.store.root / CACHE_DIR
    cache = None if full else Cache.load(cache_dir)
    ids = run_ids(ctx.store, sorted(ctx.listed))
    if cache is None:  # every run is read, and reading a run takes its signature
        sigs: dict[str, str] = {}
        changed, removed = ids, []
    else:
        sigs = signatures(ctx.store, ids)
        old = cache.runs
        changed = [r for r in ids if r not in old or old[r][0] != sigs[r] or old[r][1] in VOLATILE]
        removed = sorted(set(old) - set(sigs))
    new = None
    if changed:
        new, read_sigs = read_runs(ctx, changed)
        sigs.update(read_sigs)  # as read: a file that changed since the scan is read again
    if cache is not None and not removed and (new is None or _same_rows(cache, new["runs"], sigs)):
        written = _ensure_published(ctx.store.root, cache)
    else:
        merged = _merge(cache, new, set(changed) | set(removed))
        cache = Cache.build(cache_dir, merged, sigs)
        # Both writers spend their time in Arrow's C++ code, outside the GIL: on a machine with
        # a free core the cache costs no wall time next to the Parquet files.
        with ThreadPoolExecutor(1) as pool:
            saved = pool.submit(cache.save, merged)
            for name, table in merged.items():
                path = tables.table_path(ctx.store.root, name)
                tables.write_table(name, table, path, cache.generation)
            saved.result()
        written = True
    return CollectResult(
        sweep_dir=ctx.store.root,
        n_runs=len(cache.runs),
        reread=tuple(changed),
        removed=tuple(removed),
        written=written,
        states=dict(Counter(entry[1] for entry in cache.runs.values())),
        problems={rid: entry[2] for rid, entry in cache.runs.items() if entry[2]},
        rows=dict(cache.rows),
    )


def read_runs(ctx: Context, ids: list[str]) -> tuple[dict[str, pa.Table], dict[str, str]]:
    """The rows of the three tables for runs ``ids``, and each run's signature as read (never
    raises for bad files).

    Runs are read :data:`GROUP` at a time. A group's metrics are parsed in a second thread while
    this one reads the next group's files: the parse is ``pyarrow``'s C++ code, which runs
    without the GIL, and the reading is mostly Python, which needs it.
    """
    parts: list[dict[str, pa.Table]] = []
    sigs: dict[str, str] = {}
    with ThreadPoolExecutor(1) as pool:
        previous: tuple[list[RunInfo], Future[Metrics]] | None = None
        for start in range(0, len(ids), GROUP):
            infos = [read_run(ctx, rid) for rid in ids[start : start + GROUP]]
            sigs.update((info.run_id, info.signature) for info in infos)
            parsing = pool.submit(read_metrics, [info.metrics for info in infos])
            if previous is not None:
                parts.append(_group_tables(ctx, *previous))
            previous = infos, parsing
        if previous is not None:
            parts.append(_group_tables(ctx, *previous))
    return {name: pa.concat_tables([p[name] for p in parts]) for name in tables.TABLE_NAMES}, sigs


def _group_tables(
    ctx: Context, infos: list[RunInfo], parsing: Future[Metrics]
) -> dict[str, pa.Table]:
    """The rows of one group of runs, once its metrics are parsed."""
    metrics = parsing.result()
    rows = []
    for info, note, last in zip(infos, metrics.notes, metrics.last_lines(len(infos)), strict=True):
        info.metrics = b""  # parsed: let the bytes go
        if note:
            info.notes.append(f"{METRICS_FILE}: {note}")
        rows.append(runs_row(ctx, info, last))
    runs = tables.from_rows("runs", rows)
    horizons, per_run = horizon_rows(runs, metrics.table, infos)
    i = runs.schema.get_field_index("horizons_reached")
    runs = runs.set_column(i, "horizons_reached", pa.array(per_run, pa.int64()))
    ids = [info.run_id for info in infos]
    return {"runs": runs, "horizons": horizons, "metrics": long_metrics(metrics.table, ids)}


def _same_rows(cache: Cache, runs: pa.Table, sigs: dict[str, str]) -> bool:
    """True if re-reading changed nothing: same files and same runs rows (e.g. a run still
    running with a fresh heartbeat)."""
    ids = runs.column("run_id").to_pylist()
    if any(rid not in cache.runs or cache.runs[rid][0] != sigs[rid] for rid in ids):
        return False
    old = cache.table("runs")
    old_rows = old.filter(_isin(old.column("run_id"), set(ids))).to_pylist()
    new_rows = runs.to_pylist()
    return _canonical(old_rows) == _canonical(new_rows)


def _canonical(rows: list[dict[str, Any]]) -> str:
    return json.dumps(sorted(rows, key=lambda r: r["run_id"]), sort_keys=True, default=str)


def _isin(column: pa.ChunkedArray, ids: set[str]) -> np.ndarray:
    """Mask of the rows whose string (plain or dictionary) ``column`` value is in ``ids``."""
    parts = []
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            hit = np.array([v in ids for v in chunk.dictionary.to_pylist()], dtype=bool)
            idx = chunk.indices.to_numpy(zero_copy_only=False)
            parts.append(hit[idx] if len(hit) else np.zeros(len(chunk), dtype=bool))
        else:
            parts.append(np.array([v in ids for v in chunk.to_pylist()], dtype=bool))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _merge(
    cache: Cache | None, new: dict[str, pa.Table] | None, drop: set[str]
) -> dict[str, pa.Table]:
    """Cached rows minus the re-read or removed runs, plus the re-read rows.

    ``runs`` is sorted by run id and ``horizons`` by (run id, tokens). ``metrics`` stays in block
    order (the cached runs, then the re-read ones): sorting its millions of rows would double the
    cost of an incremental collect, and each run's rows are contiguous and in (step, metric) order.
    """
    out = {}
    for name in tables.TABLE_NAMES:
        parts = [new[name] if new else tables.empty(name)]
        if cache is not None:
            old = cache.table(name)
            parts.insert(0, _drop_rows(old, _isin(old.column("run_id"), drop)))
        merged = pa.concat_tables([tables.conform(name, p) for p in parts])
        if name == "metrics":
            out[name] = merged.unify_dictionaries()  # an Arrow file has one dictionary per column
        elif name == "horizons":
            out[name] = merged.sort_by([("run_id", "ascending"), ("tokens", "ascending")])
        else:
            out[name] = merged.sort_by("run_id")
    return out


def _drop_rows(table: pa.Table, drop: np.ndarray) -> pa.Table:
    """``table`` without the rows where ``drop`` is true, as zero-copy slices (a run's rows are
    contiguous: ~10x faster than ``Table.filter`` on millions of rows)."""
    if not drop.any():
        return table
    edges = np.flatnonzero(np.diff(np.r_[0, (~drop).astype(np.int8), 0]))
    slices = [table.slice(a, b - a) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return pa.concat_tables(slices) if slices else table.schema.empty_table()


def _ensure_published(sweep_dir: Path, cache: Cache) -> bool:
    """Re-publish any table that is missing or not the one the last collect wrote."""
    written = False
    for name in tables.TABLE_NAMES:
        path = tables.table_path(sweep_dir, name)
        if generation_of(path) != cache.generation:
            tables.write_table(name, cache.table(name), path, cache.generation)
            written = True
    return written
