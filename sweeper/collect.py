"""``sweeper collect``: read every run directory of a sweep into the three Parquet tables.

This is the only sweeper code that reads the trainer's files (docs/architecture.md). It is

* **incremental**: a manifest in ``results/<sweep>/.collect/`` records each run's file signatures
  (size, mtime, inode of run.json, config.json, provenance.json, events.jsonl, metrics.jsonl,
  summary.json) next to a cache of the rows collected from it; only runs whose files changed, or
  whose state depends on the clock (running, stale), are read again, and when nothing
  changed no file is written at all;
* **tolerant**: a run with broken files still gets a row, whose ``error`` column says what is wrong
  (a corrupt metrics line is skipped, the valid lines still count);
* **safe under concurrency**: one ``fcntl`` lock serialises collects of a sweep, and every file is
  written to a dot-prefixed temp file and renamed, so readers always see a complete table.

Metrics files are parsed with ``pyarrow.json`` over the concatenation of many files (one C++ parse
instead of one ``json.loads`` per line; see bench/README.md); a file the fast path rejects is parsed
line by line in Python, which skips and reports the bad lines.

Speed (bench/README.md, "Collect"): runs are read in groups of :data:`_READ_GROUP`, each taken all
the way to its rows before the next, so memory is reused instead of growing by the whole sweep's
metrics; each file is read with one ``os.open``/``fstat``/``read``, and the ``fstat`` gives its
signature, so a first collect needs no separate stat pass; on a machine that is not busy, a large
sweep is read by two processes (:func:`collect_sweep`'s ``parallel``).
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import multiprocessing
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pj

from sweeper import store, tables
from sweeper.errors import SweepError
from trainer.config import (
    BranchConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    model_from_preset,
)

CACHE_DIR = ".collect"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
WATCHED = (
    "run.json",
    "config.json",
    "provenance.json",
    "events.jsonl",
    "metrics.jsonl",
    "summary.json",
)
# States that can change without any watched file changing (the heartbeat ages into ``stale``, see
# ``store.derive_state``): runs in them are re-read by every collect.
VOLATILE = frozenset({"running", "stale"})
# Fewer runs than this are read in one process: forking costs more than it saves.
PARALLEL_MIN_RUNS = 2000

# Metric keys with a fixed type (docs/architecture.md); other numeric keys are kept as float64.
_INT_KEYS = ("step", "tokens")
_FLOAT_KEYS = (
    "train_loss",
    "val_loss",
    "lr_in",
    "lr_hidden",
    "lr_out",
    "output_norm",
    "output_norm_rms",
    "input_norm",
    "hidden_norm",
    "update_norm_in",
    "update_norm_hidden",
    "update_norm_out",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
)
_KNOWN_METRICS = pa.schema(
    [(k, pa.int64()) for k in _INT_KEYS]
    + [(k, pa.float64()) for k in _FLOAT_KEYS]
    + [("horizon", pa.bool_())]
)
_HORIZON_POINT = (
    "train_loss",
    "val_loss",
    "output_norm",
    "output_norm_rms",
    "input_norm",
    "hidden_norm",
)
_STEP_BITS = 40  # key = run index << 40 | step; steps stay far below 2**40
_BLOCK = 1 << 24  # pyarrow.json block size: larger blocks parse faster (bench/README.md)
_READ_GROUP = 500  # runs read and parsed at a time (bench/README.md)


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
        errors: ``run_id -> error`` for every run whose files are broken or that failed.
        rows: Row count per table.
        elapsed_s: Wall time of the collect.
    """

    sweep_dir: Path
    n_runs: int
    reread: tuple[str, ...]
    removed: tuple[str, ...]
    written: bool
    states: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def paths(self) -> dict[str, Path]:
        """Path of each table."""
        return {name: tables.table_path(self.sweep_dir, name) for name in tables.TABLE_NAMES}

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """One line for the CLI, e.g. ``40 runs (12 read, 28 cached); tables written; ...``."""
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.states.items()))
        what = "tables written" if self.written else "nothing changed"
        return (
            f"{self.n_runs} runs ({len(self.reread)} read, "
            f"{self.n_runs - len(self.reread)} cached; "
            f"{states or 'none'}); {len(self.errors)} with errors; {what}; "
            f"{self.rows.get('horizons', 0)} horizon rows, "
            f"{self.rows.get('metrics', 0)} metric rows "
            f"in {self.elapsed_s:.2f} s"
        )


# ------------------------------------------------------------------------------------------ entry


def collect_sweep(
    sweep_dir: Path,
    *,
    stale_after_s: float | None = None,
    now: float | None = None,
    full: bool = False,
    parallel: bool | None = None,
) -> CollectResult:
    """Collect a sweep directory into runs.parquet, horizons.parquet and metrics.parquet.

    Args:
        sweep_dir: ``results/<sweep>`` (must contain ``runs/``).
        stale_after_s: Heartbeat age after which a running run is ``stale``; None: the sweep's
            ``backend.stale_after_s`` from plan.json (default 120 s).
        now: The clock for the stale check (tests); None: ``time.time()``.
        full: Ignore the cache and read every run again.
        parallel: Read the runs in two processes (True), in this one (False), or decide (None):
            two when at least :data:`PARALLEL_MIN_RUNS` runs are read, the process may use two
            CPUs and the load average is below their number. The tables are the same either way.

    Returns:
        A :class:`CollectResult`; ``reread`` names the runs whose files were read.

    Raises:
        CollectError: ``sweep_dir`` is not a sweep directory or the cache directory is not writable.
    """
    t0 = time.perf_counter()
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "runs").is_dir():
        raise CollectError(f"{sweep_dir}: not a sweep directory (no runs/)")
    sweep_store = store.SweepStore(sweep_dir, stale_after_s)
    ctx = _Context(
        sweep_dir=sweep_dir,
        sweep_name=_sweep_name(sweep_dir),
        now=time.time() if now is None else now,
        stale_after_s=sweep_store.stale_after_s,
    )
    with _locked(sweep_dir / CACHE_DIR):
        _remove_leftovers(sweep_dir / CACHE_DIR)
        try:
            result = _collect_locked(ctx, full, parallel)
        except OSError as e:  # a full disk or a read-only sweep directory: say which file
            where = e.filename2 or e.filename or sweep_dir
            raise CollectError(
                f"{where}: cannot write the collected tables ({e.strerror})"
            ) from None
    return _with_elapsed(result, time.perf_counter() - t0)


def _remove_leftovers(cache_dir: Path) -> None:
    """Delete part files of a collect that was killed; only called under the collect lock."""
    for part in cache_dir.glob(".part-*"):
        part.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Context:
    sweep_dir: Path
    sweep_name: str
    now: float
    stale_after_s: float

    @functools.cached_property
    def runs_dir(self) -> str:
        return f"{self.sweep_dir}/runs"


def _with_elapsed(result: CollectResult, elapsed: float) -> CollectResult:
    return CollectResult(**{**result.__dict__, "elapsed_s": elapsed})


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


def _sweep_name(sweep_dir: Path) -> str:
    try:
        plan = json.loads((sweep_dir / store.PLAN).read_bytes())
        return str(plan["sweep"])
    except (OSError, ValueError, KeyError, TypeError):
        return sweep_dir.resolve().name


# ---------------------------------------------------------------------------------- incremental


def _collect_locked(ctx: _Context, full: bool, parallel: bool | None) -> CollectResult:
    cache_dir = ctx.sweep_dir / CACHE_DIR
    cache = None if full else _Cache.load(cache_dir)
    if cache is None:
        # Every run is read, and reading a file yields its signature (fstat of the open file):
        # no separate stat pass.
        sigs: dict[str, str] = {}
        changed = sorted(run_ids(ctx.sweep_dir))
        removed: list[str] = []
    else:
        sigs = scan_signatures(ctx.sweep_dir)
        old = cache.runs
        changed = sorted(
            rid
            for rid, sig in sigs.items()
            if rid not in old or old[rid][0] != sig or old[rid][1] in VOLATILE
        )
        removed = sorted(set(old) - set(sigs))
    batch = _read_runs(ctx, changed, parallel) if changed else None
    if batch is not None:
        sigs.update(batch.sigs)  # as read: a file changed since the scan is read again next time
    if cache is not None and not removed and (batch is None or _same_rows(cache, batch, sigs)):
        written = _ensure_published(ctx.sweep_dir, cache)
    else:
        merged = _merge(cache, batch, set(changed) | set(removed))
        cache = _Cache.build(cache_dir, merged, sigs)
        # Both writers spend their time in Arrow's C++ code, outside the GIL: on a machine with
        # a free core the cache costs no wall time next to the Parquet files.
        with ThreadPoolExecutor(1) as pool:
            saved = pool.submit(cache.save, merged)
            _publish(ctx.sweep_dir, merged, cache.generation)
            saved.result()
        written = True
    return _result(ctx.sweep_dir, cache, changed, removed, written)


def _result(
    sweep_dir: Path, cache: _Cache, changed: list[str], removed: list[str], written: bool
) -> CollectResult:
    return CollectResult(
        sweep_dir=sweep_dir,
        n_runs=len(cache.runs),
        reread=tuple(changed),
        removed=tuple(removed),
        written=written,
        states=dict(Counter(entry[1] for entry in cache.runs.values())),
        errors={rid: entry[2] for rid, entry in cache.runs.items() if entry[2]},
        rows=dict(cache.rows),
    )


def scan_signatures(sweep_dir: Path) -> dict[str, str]:
    """``run_id -> signature`` for every run directory (and every run id in plan.json).

    The signature joins ``size:mtime_ns:inode`` of each file in :data:`WATCHED` (``-`` for a missing
    one): appending, rewriting, replacing or touching any of them changes it. A string keeps the
    manifest small and quick to load and compare.
    """
    runs_dir = Path(sweep_dir) / "runs"
    sigs: dict[str, str] = {}
    with os.scandir(runs_dir) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            sigs[entry.name] = ",".join([_stat_sig(f"{entry.path}/{name}") for name in WATCHED])
    for rid in _plan_ids(sweep_dir):
        sigs.setdefault(rid, ",".join("-" * len(WATCHED)))
    return sigs


def run_ids(sweep_dir: Path) -> set[str]:
    """The run ids :func:`scan_signatures` covers (run directories and plan.json), without stats."""
    with os.scandir(Path(sweep_dir) / "runs") as it:
        ids = {e.name for e in it if not e.name.startswith(".") and e.is_dir()}
    return ids.union(_plan_ids(sweep_dir))


def _stat_sig(path: str) -> str:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _plan_ids(sweep_dir: Path) -> list[str]:
    try:
        ids = json.loads((sweep_dir / store.PLAN).read_bytes()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    out = []
    for rid in ids if isinstance(ids, list) else []:
        try:
            out.append(store.check_run_id(rid))
        except SweepError:
            continue
    return out


@dataclass
class _Cache:
    """What the last collect left in ``.collect/``.

    ``manifest.json`` maps each run to ``[signature, state, error]`` and names the generation (a
    random id) of the cached tables ``.collect/<table>.arrow`` (Arrow IPC, lz4: reading it back is
    ~30x faster than decoding the Parquet file, bench/README.md), which the published
    ``<sweep>/<table>.parquet`` files also carry. The tables are read only when needed.
    """

    cache_dir: Path
    generation: str
    runs: dict[str, list[Any]]
    rows: dict[str, int]

    @classmethod
    def load(cls, cache_dir: Path) -> _Cache | None:
        """The cache, or None if it is missing or from another version (then all runs are read)."""
        try:
            doc = json.loads((cache_dir / MANIFEST).read_bytes())
            if doc.get("version") != MANIFEST_VERSION or doc.get("schema") != tables.SCHEMA_VERSION:
                return None
            cache = cls(cache_dir, str(doc["generation"]), dict(doc["runs"]), dict(doc["rows"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for name in tables.TABLE_NAMES:
            if cache.table_generation(cache.path(name)) != cache.generation:
                return None
        return cache

    @classmethod
    def build(cls, cache_dir: Path, merged: dict[str, pa.Table], sigs: dict[str, str]) -> _Cache:
        """A new cache (new generation) describing ``merged``."""
        runs = merged["runs"]
        cols = [runs.column(c).to_pylist() for c in ("run_id", "state", "error")]
        entries = {rid: [sigs[rid], state, err] for rid, state, err in zip(*cols, strict=True)}
        rows = {name: t.num_rows for name, t in merged.items()}
        return cls(cache_dir, uuid.uuid4().hex, entries, rows)

    def path(self, name: str) -> Path:
        return self.cache_dir / f"{name}.arrow"

    @staticmethod
    def table_generation(path: Path) -> str | None:
        """Generation recorded in a cached (Arrow IPC) or published (Parquet) table, if readable."""
        try:
            if path.suffix == ".arrow":
                with pa.memory_map(str(path)) as source:
                    meta = pa.ipc.open_file(source).schema.metadata or {}
            else:
                meta = tables.read_metadata(path)
        except (OSError, pa.ArrowException, tables.TableError):
            return None
        return meta.get(tables.META_GENERATION, b"").decode()

    def table(self, name: str) -> pa.Table:
        """Cached table ``name`` (schema metadata stripped)."""
        with pa.memory_map(str(self.path(name))) as source:
            table = pa.ipc.open_file(source).read_all()
        return tables.conform(name, table.replace_schema_metadata(None))

    def save(self, merged: dict[str, pa.Table]) -> None:
        """Write the cached tables, then the manifest naming their generation (the commit point)."""
        meta = {tables.META_GENERATION: self.generation.encode()}
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        for name, table in merged.items():
            table = table.replace_schema_metadata(meta)

            def write(f: Any, table: pa.Table = table) -> None:
                with pa.ipc.new_file(f, table.schema, options=options) as writer:
                    writer.write_table(table)

            tables.atomic_write_bytes(self.path(name), write)
        doc = {
            "version": MANIFEST_VERSION,
            "schema": tables.SCHEMA_VERSION,
            "generation": self.generation,
            "rows": self.rows,
            "runs": self.runs,
        }
        payload = json.dumps(doc, separators=(",", ":")).encode()
        tables.atomic_write_bytes(self.cache_dir / MANIFEST, lambda f: f.write(payload))


def _same_rows(cache: _Cache, batch: _Batch, sigs: dict[str, str]) -> bool:
    """True if re-reading ``batch`` changed nothing: same files and same runs rows (e.g. a run
    still running with a fresh heartbeat)."""
    ids = batch.runs.column("run_id").to_pylist()
    if any(rid not in cache.runs or cache.runs[rid][0] != sigs[rid] for rid in ids):
        return False
    old_runs = cache.table("runs")
    old = old_runs.filter(_isin(old_runs.column("run_id"), set(ids))).to_pylist()
    old.sort(key=lambda r: r["run_id"])
    new = sorted(batch.runs.to_pylist(), key=lambda r: r["run_id"])
    return _canonical(old) == _canonical(new)


def _canonical(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, sort_keys=True, default=str)


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


def _merge(cache: _Cache | None, batch: _Batch | None, drop: set[str]) -> dict[str, pa.Table]:
    """Cached rows minus the re-read or removed runs, plus the re-read rows, sorted by run id."""
    new = batch.tables() if batch else {n: tables.empty(n) for n in tables.TABLE_NAMES}
    out = {}
    for name in tables.TABLE_NAMES:
        parts = [new[name]]
        if cache is not None:
            old = cache.table(name)
            parts.insert(0, _drop_rows(old, _isin(old.column("run_id"), drop)))
        merged = pa.concat_tables([tables.conform(name, p) for p in parts])
        out[name] = _sort_by_run(name, merged)
    return out


def _sort_by_run(name: str, table: pa.Table) -> pa.Table:
    """Order runs by id and horizons by (id, tokens).

    The metrics table is left in block order (the cached runs, then the re-read ones): sorting its
    millions of rows would double the cost of an incremental collect, and each run's rows are
    contiguous and in (step, metric) order anyway.
    """
    if name == "metrics":
        return table.unify_dictionaries()  # one dictionary per column (Arrow IPC files need it)
    keys = [("run_id", "ascending")]
    if name == "horizons":
        keys.append(("tokens", "ascending"))
    return table.sort_by(keys)


def _drop_rows(table: pa.Table, drop: np.ndarray) -> pa.Table:
    """``table`` without the rows where ``drop`` is true, as zero-copy slices.

    A run's rows are contiguous, so dropping a few re-read runs leaves a few long slices; this is
    ~10x faster than ``Table.filter`` on millions of rows.
    """
    if not drop.any():
        return table
    edges = np.flatnonzero(np.diff(np.r_[0, (~drop).astype(np.int8), 0]))
    slices = [table.slice(a, b - a) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return pa.concat_tables(slices) if slices else table.schema.empty_table()


def _publish(sweep_dir: Path, merged: dict[str, pa.Table], generation: str) -> None:
    for name, table in merged.items():
        tables.write_table(name, table, tables.table_path(sweep_dir, name), generation)


def _ensure_published(sweep_dir: Path, cache: _Cache) -> bool:
    """Re-publish any table that is missing or not the one the last collect wrote."""
    written = False
    for name in tables.TABLE_NAMES:
        path = tables.table_path(sweep_dir, name)
        if cache.table_generation(path) != cache.generation:
            tables.write_table(name, cache.table(name), path, cache.generation)
            written = True
    return written


# ------------------------------------------------------------------------------------- read runs


@dataclass
class _Batch:
    """Rows read from a set of run directories."""

    runs: pa.Table
    horizons: pa.Table
    metrics: pa.Table
    sigs: dict[str, str]

    def tables(self) -> dict[str, pa.Table]:
        return {"runs": self.runs, "horizons": self.horizons, "metrics": self.metrics}

    def parts(self) -> tuple[pa.Table, pa.Table, pa.Table]:
        return self.runs, self.horizons, self.metrics

    @classmethod
    def concat(cls, batches: list[_Batch]) -> _Batch:
        """One batch of the rows of ``batches``, in order (chunks are not copied)."""
        parts = zip(*(b.parts() for b in batches), strict=True)
        sigs = {rid: sig for b in batches for rid, sig in b.sigs.items()}
        return cls(*(pa.concat_tables(p) for p in parts), sigs=sigs)

    @classmethod
    def load(cls, part: Path, sigs: dict[str, str]) -> _Batch:
        """The batch :func:`_read_block_to_files` wrote, memory-mapped."""
        loaded = []
        for name in tables.TABLE_NAMES:
            with pa.memory_map(f"{part}.{name}.arrow") as source:
                loaded.append(pa.ipc.open_file(source).read_all())
        return cls(*loaded, sigs=sigs)


def _read_runs(ctx: _Context, run_ids: list[str], parallel: bool | None) -> _Batch:
    """Read the files of ``run_ids`` into rows of the three tables (never raises for bad files).

    ``parallel`` (None: :func:`_use_two_processes` decides) reads the second half of the runs
    in a forked process while this one reads the first half.
    """
    if parallel is None:
        parallel = len(run_ids) >= PARALLEL_MIN_RUNS and _use_two_processes()
    if not parallel or len(run_ids) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return _read_block(ctx, run_ids)
    half = len(run_ids) // 2
    part = ctx.sweep_dir / CACHE_DIR / f".part-{uuid.uuid4().hex}"
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            future = pool.submit(_read_block_to_files, ctx, run_ids[half:], part)
            first = _read_block(ctx, run_ids[:half])
            try:
                second = _Batch.load(part, future.result())
            except BrokenProcessPool:  # the worker died (e.g. out of memory): read its half here
                second = _read_block(ctx, run_ids[half:])
    finally:
        for name in tables.TABLE_NAMES:
            Path(f"{part}.{name}.arrow").unlink(missing_ok=True)  # mapped tables stay readable
    return _Batch.concat([first, second])


def _read_block_to_files(ctx: _Context, run_ids: list[str], part: Path) -> dict[str, str]:
    """:func:`_read_block` in the worker process: the tables go to ``part.<table>.arrow``.

    Uncompressed Arrow files that the parent memory-maps cost a third of pickling the tables
    through the pipe (about 100 MB for 5,000 runs): the parent reads them without a copy.
    """
    batch = _read_block(ctx, run_ids)
    for name, table in batch.tables().items():
        table = table.unify_dictionaries()  # an Arrow file has one dictionary per column
        with pa.OSFile(f"{part}.{name}.arrow", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
    return batch.sigs


def _use_two_processes() -> bool:
    """True when this process may use two CPUs and the machine is not already busy.

    Two processes cost 0-12% more CPU in all (forking, handing the rows over) and win wall
    time only where a second core is free. On 2 cores they were 1.5x faster than one process at a
    load average of 1.7, 1.1x at 2.3 and 0.8-0.9x at 3.5 and more (bench/README.md), so they are
    used while the 1-minute load average is below the number of usable CPUs.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus >= 2 and os.getloadavg()[0] < cpus


def _read_block(ctx: _Context, run_ids: list[str]) -> _Batch:
    """:func:`_read_runs` in this process, :data:`_READ_GROUP` runs at a time.

    Each group goes all the way to its rows before the next is read, so that its metrics bytes
    and arrays (a few MB) are freed and their memory reused: holding a whole sweep's metrics
    (170 MB of files and 5 million long-format rows for 10,000 runs) in fresh memory, and copying
    it into one buffer for the parser, cost more than the parsing on a busy machine.
    """
    groups = [run_ids[i : i + _READ_GROUP] for i in range(0, len(run_ids), _READ_GROUP)]
    return _Batch.concat([_read_group(ctx, group) for group in groups or [[]]])


def _read_group(ctx: _Context, run_ids: list[str]) -> _Batch:
    """Read ``run_ids`` and parse their metrics in one ``pyarrow.json`` call."""
    infos = [_read_run(ctx, rid) for rid in run_ids]
    wide, notes = parse_metrics([info.metrics for info in infos])
    for info, note in zip(infos, notes, strict=True):
        info.metrics = b""
        if note:
            info.errors.append(f"runs/{info.run_id}/metrics.jsonl: {note}")
    wide = _sorted_dedup(wide)
    _fill_progress(infos, wide)
    runs = tables.from_rows("runs", [info.row() for info in infos])
    horizons, per_run = _horizon_rows(runs, infos, wide)
    runs = runs.set_column(
        runs.schema.get_field_index("horizons_reached"),
        "horizons_reached",
        pa.array(per_run, pa.int64()),
    )
    metrics = _long_metrics(wide, [i.run_id for i in infos])
    return _Batch(runs, horizons, metrics, {i.run_id: i.signature() for i in infos})


@dataclass
class _RunInfo:
    """Everything read from one run directory except the metrics."""

    run_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    horizons: list[int] = field(default_factory=list)
    tokens_per_step: int | None = None
    log_every: int | None = None
    metrics: bytes = b""
    sigs: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The runs row: fields plus ``error`` (broken files first, then the failure reason)."""
        return _finish_row(self)

    def signature(self) -> str:
        """The run's signature as :func:`scan_signatures` computes it, taken when read."""
        return ",".join([self.sigs.get(name, "-") for name in WATCHED])


def _read_run(ctx: _Context, rid: str) -> _RunInfo:
    rd = f"{ctx.runs_dir}/{rid}"  # plain strings: pathlib costs ~10% of a large collect
    info = _RunInfo(run_id=rid)
    rel = f"runs/{rid}"
    record = _load_json(info, rd, "run.json", rel)
    if record is None and not os.path.isdir(rd):
        info.errors[-1:] = [f"{rel}/: missing (listed in plan.json)"]
    prov = _load_json(info, rd, "provenance.json", rel, required=False)
    summary = _load_json(info, rd, "summary.json", rel, required=False)
    info.metrics = _read_bytes(info, rd, "metrics.jsonl", rel) or b""
    f = info.fields
    f.update(run_id=rid, sweep=(record or {}).get("sweep") or ctx.sweep_name)
    _record_fields(f, record)
    _config_fields(info, record, rd, rel)
    if "config.json" not in info.sigs:  # not read: run.json had the config
        info.sigs["config.json"] = _stat_sig(f"{rd}/config.json")
    _provenance_fields(f, prov)
    _event_fields(info, ctx, rd, rel)
    _summary_fields(info, summary, rel)
    return info


def _read_bytes(
    info: _RunInfo, rd: str, name: str, rel: str, required: bool = False
) -> bytes | None:
    """A run file's bytes; None (and an error if ``required``) when it is missing or unreadable.

    Records the file's signature in ``info.sigs``, from ``fstat`` of the open file (before the
    read, so that a file that changes meanwhile is read again by the next collect). ``os.open``
    and ``os.read`` save a third of the cost of ``open().read()`` over 50,000 files.
    """
    path = f"{rd}/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            info.errors.append(f"{rel}/{name}: missing")
        return None
    except OSError as e:
        info.sigs[name] = _stat_sig(path)
        info.errors.append(f"{rel}/{name}: unreadable ({e.strerror})")
        return None
    try:
        st = os.fstat(fd)
        info.sigs[name] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        return _read_all(fd, st.st_size)
    except OSError as e:
        info.errors.append(f"{rel}/{name}: unreadable ({e.strerror})")
        return None
    finally:
        os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    """Read to the end of ``fd``, expecting ``size`` bytes (a file can grow while it is read)."""
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    parts = [data]
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


_SCAN = json.JSONDecoder().scan_once  # the C scanner behind json.loads


def _json_loads(data: bytes) -> Any:
    """``json.loads(data)``, minus its Python-level overhead for the common case.

    The common case is UTF-8 text that starts with a JSON value and ends with it or with JSON
    whitespace; anything else (a BOM, another encoding, leading whitespace, an error) goes through
    ``json.loads``, which gives the same result or raises its usual error.
    """
    try:
        text = data.decode()
        obj, end = _SCAN(text, 0)
    except (ValueError, StopIteration):
        return json.loads(data)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        return json.loads(data)  # trailing data: json raises "Extra data"
    return obj


def _load_json(info: _RunInfo, rd: str, name: str, rel: str, required: bool = True) -> dict | None:
    """A run's JSON object file; None with a one-line error if it is missing (and required),
    unreadable, corrupt or not an object."""
    data = _read_bytes(info, rd, name, rel, required)
    if data is None:
        return None
    try:
        obj = _json_loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        info.errors.append(f"{rel}/{name}: corrupt JSON ({_first_line(e)})")
        return None
    if not isinstance(obj, dict):
        info.errors.append(f"{rel}/{name}: expected a JSON object, got {type(obj).__name__}")
        return None
    return obj


def _record_fields(f: dict[str, Any], record: dict | None) -> None:
    record = record or {}
    f.update(
        slug=_str_or_none(record.get("slug")),
        kind=_str_or_none(record.get("kind")),
        parent=_str_or_none(record.get("parent")),
        model=_str_or_none(record.get("model_name")),
    )


def _config_fields(info: _RunInfo, record: dict | None, rd: str, rel: str) -> None:
    """Configuration columns from run.json's ``train``, else from the trainer's config.json.

    The trainer writes config.json as the resolved ``train`` of the same record, so it is read only
    when run.json has no usable ``train`` (one file less per run in a large collect).
    """
    raw, where = None, ""
    if record is not None and isinstance(record.get("train"), dict):
        raw, where = record["train"], f"{rel}/run.json: train"
    else:
        config = _load_json(info, rd, "config.json", rel, required=False)
        if config is not None:
            raw = {k: v for k, v in config.items() if k != "schema_version"}
            where = f"{rel}/config.json"
    if raw is None:
        return
    try:
        cfg = resolve_config(raw)
    except ConfigError as e:
        info.errors.append(f"{where}: {_first_line(e)}")
        return
    m, o = cfg.model, cfg.optim
    n_params, n_params_non_embedding = _param_counts(m)
    info.fields.update(
        n_params=n_params,
        n_params_non_embedding=n_params_non_embedding,
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        vocab_size=m.vocab_size,
        seq_len=m.seq_len,
        optimizer=o.name,
        lr=o.lr,
        lr_in=o.lr_in,
        lr_hidden=o.lr_hidden,
        lr_out=o.lr_out,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        optim_output_norm=o.output_norm,
        schedule=cfg.schedule.kind,
        warmup_steps=cfg.schedule.warmup_steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        tokens_per_step=cfg.tokens_per_step,
        total_steps=cfg.total_steps,
        max_tokens=cfg.max_tokens,
        branch_step=cfg.branch.step if cfg.branch else None,
    )
    derived = (record or {}).get("derived") or {}
    extra = derived.get("horizons_tokens") if isinstance(derived, dict) else None
    planned = set(cfg.horizons_tokens)
    if isinstance(extra, list):
        planned |= {d for d in extra if isinstance(d, int) and d > 0}
    info.horizons = sorted(planned)
    info.fields["horizons_tokens"] = info.horizons
    info.tokens_per_step = cfg.tokens_per_step
    info.log_every = cfg.log_every


def resolve_config(raw: dict[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` from a run's config dict.

    Builds the dataclasses directly (``TrainConfig.from_dict`` costs about a millisecond per call,
    which is most of a 10,000-run collect); anything unusual goes through ``from_dict``, whose
    ConfigError names the bad key.
    """
    try:
        cfg = _fast_config(raw)
        cfg.validate()
        return cfg
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError):
        return TrainConfig.from_dict(raw)


def _fast_config(raw: dict[str, Any]) -> TrainConfig:
    d = dict(raw)
    d["model"] = _model(d.get("model", {}))
    for key, cls in (("optim", OptimConfig), ("schedule", ScheduleConfig), ("data", DataConfig)):
        d[key] = cls(**d.get(key, {}))
    if d.get("branch") is not None:
        d["branch"] = BranchConfig(**d["branch"])
    for key in ("horizons_tokens", "checkpoint_steps"):
        if key in d:
            d[key] = tuple(d[key])
    return TrainConfig(**d)


def _model(model: Any) -> ModelConfig:
    if not isinstance(model, dict):
        raise TypeError("model is not a table")
    return _model_cached(tuple(sorted(model.items())))


@functools.lru_cache(maxsize=1024)
def _model_cached(items: tuple[tuple[str, Any], ...]) -> ModelConfig:
    m = dict(items)
    if "preset" in m:
        preset = m.pop("preset")
        return model_from_preset(preset, **m)
    model = ModelConfig(**m)
    model.validate()
    return model


@functools.lru_cache(maxsize=1024)
def _param_counts(model: ModelConfig) -> tuple[int, int]:
    """Parameter counts of a model shape (a sweep has a few shapes and thousands of runs)."""
    return model.n_params(), model.n_params_non_embedding()


def _provenance_fields(f: dict[str, Any], prov: dict | None) -> None:
    prov = prov or {}
    dirty = prov.get("git_dirty")
    f.update(
        git_sha=_str_or_none(prov.get("git_sha")),
        git_dirty=dirty if isinstance(dirty, bool) else None,
        torch_version=_str_or_none(prov.get("torch")),
        python_version=_str_or_none(prov.get("python")),
        device=_str_or_none(prov.get("device")),
        device_name=_str_or_none(prov.get("device_name")),
        hostname=_str_or_none(prov.get("hostname")),
        world_size=_int_or_none(prov.get("world_size")),
    )


def parse_events(data: bytes) -> list[dict[str, Any]]:
    """The state events in an ``events.jsonl`` file's bytes, as ``store.read_events`` reads them.

    Unparsable lines (a torn last line among them) and lines without a string ``state`` are
    skipped. Collect reads the bytes itself, to take the file's signature from the open file.
    """
    events = []
    for line in data.splitlines():
        try:
            ev = _json_loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if type(ev) is dict and type(ev.get("state")) is str:
            events.append(ev)
    return events


def _event_fields(info: _RunInfo, ctx: _Context, rd: str, rel: str) -> None:
    data = _read_bytes(info, rd, store.EVENTS, rel)
    events = parse_events(data) if data else []
    beat = store.heartbeat_mtime(rd) if events and events[-1]["state"] == "running" else None
    state = store.derive_state(events, beat, ctx.now, ctx.stale_after_s)
    f = info.fields
    f.update(state=state, attempts=store.attempts(events))
    for key in ("host", "backend", "job_id"):  # where the latest attempt ran
        f[key] = _str_or_none(next((e[key] for e in reversed(events) if e.get(key)), None))
    last = events[-1] if events else {}
    # how the run ended: the last event only, never an earlier attempt's failure
    f["exit_code"] = _int_or_none(last.get("exit_code"))
    f["reason"] = _str_or_none(last.get("reason"))
    f["stderr_tail"] = _str_or_none(last.get("stderr_tail"))
    if state == "stale":
        age = ctx.now - (beat if beat is not None else _float(last.get("ts")) or 0.0)
        f["reason"] = f"stale: no heartbeat for {age:.0f} s (limit {ctx.stale_after_s:g} s)"
    hostname = f.pop("hostname", None)
    f["host"] = f["host"] or hostname
    f["started_at"] = next((_float(e.get("ts")) for e in events if e["state"] == "running"), None)
    f["updated_at"] = _float(events[-1].get("ts")) if events else None


def _summary_fields(info: _RunInfo, summary: dict | None, rel: str) -> None:
    f = info.fields
    if summary is None:
        if f["state"] in ("completed", "diverged") and not any(
            "summary.json" in e for e in info.errors
        ):
            info.errors.append(f"{rel}/summary.json: missing (state {f['state']})")
        return
    f.update(
        summary_status=_str_or_none(summary.get("status")),
        final_loss=_float(summary.get("final_loss")),
        final_output_norm=_float(summary.get("final_output_norm")),
        wall_time_s=_float(summary.get("wall_time_s")),
        diverged_step=_int_or_none(summary.get("diverged_step")),
        steps_done=_int_or_none(summary.get("step")),
        tokens_done=_int_or_none(summary.get("tokens")),
    )
    if f["reason"] is None and summary.get("reason"):
        f["reason"] = str(summary["reason"])


def _finish_row(info: _RunInfo) -> dict[str, Any]:
    f = dict(info.fields)
    reason, tail = f.pop("reason", None), f.get("stderr_tail")
    errors = list(info.errors)
    if f.get("state") in ("failed", "diverged", "stale", "cancelled"):
        if reason:
            errors.append(str(reason))
        elif tail:
            lines = [ln for ln in str(tail).splitlines() if ln.strip()]
            errors.append(lines[-1].strip() if lines else "")
    f["error"] = "; ".join(e for e in errors if e) or None
    f["stderr_tail"] = _str_or_none(tail)
    return f


def _fill_progress(infos: list[_RunInfo], wide: pa.Table) -> None:
    """Steps/tokens done from the last metrics line where summary.json has none."""
    if wide.num_rows == 0:
        return
    run = wide.column("_run").to_numpy()
    last = np.flatnonzero(np.r_[run[1:] != run[:-1], True])
    steps = wide.column("step").to_numpy()
    tokens = wide.column("tokens").to_numpy(zero_copy_only=False)
    for i in last:
        f = infos[run[i]].fields
        if f.get("steps_done") is None:
            f["steps_done"] = int(steps[i])
            tok = tokens[i]
            f["tokens_done"] = None if _isnan(tok) else int(tok)


# ---------------------------------------------------------------------------------- metrics parse


def parse_metrics(chunks: list[bytes]) -> tuple[pa.Table, list[str]]:
    """Parse many ``metrics.jsonl`` files at once.

    Args:
        chunks: The files' contents, one per run.

    Returns:
        A wide table with one row per valid line (documented keys typed as in docs/architecture.md,
        other numeric keys as float64, non-numeric ones dropped) plus ``_run``, the index into
        ``chunks``; and one note per chunk saying which lines were skipped ("" if none).
    """
    notes = [""] * len(chunks)
    bodies = []
    for i, chunk in enumerate(chunks):
        body, torn = _strip_torn(chunk)
        if torn:
            notes[i] = "torn last line ignored"
        bodies.append(body)
    parts: list[pa.Table] = []
    _parse_group(list(range(len(chunks))), bodies, parts, notes)
    if not parts:
        return _empty_wide(), notes
    return pa.concat_tables(parts, promote_options="default"), notes


def _empty_wide() -> pa.Table:
    return _with_run(_KNOWN_METRICS.empty_table(), np.zeros(0, dtype=np.int32))


def _strip_torn(chunk: bytes) -> tuple[bytes, bool]:
    """Drop a last line without newline unless it is complete JSON (a writer killed mid-line).

    Returns the body (ending with a newline unless empty) and whether a torn line was dropped.
    """
    torn = False
    if chunk and not chunk.endswith(b"\n"):
        cut = chunk.rfind(b"\n") + 1
        tail = chunk[cut:]
        try:
            complete = isinstance(json.loads(tail), dict)
        except (ValueError, UnicodeDecodeError):
            complete = False
        chunk, torn = (chunk + b"\n", False) if complete else (chunk[:cut], bool(tail.strip()))
    return chunk, torn


def _parse_group(
    idx: list[int], bodies: list[bytes], out: list[pa.Table], notes: list[str]
) -> None:
    """Parse ``idx`` chunks in one pyarrow call; on failure split in halves, down to single files,
    which fall back to the line-by-line Python parser."""
    idx = [i for i in idx if bodies[i]]
    if not idx:
        return
    parsed = _arrow_parse([bodies[i] for i in idx])
    if parsed is not None:
        table, file = parsed
        out.append(_with_run(table, np.array(idx, dtype=np.int32)[file]))
        return
    if len(idx) == 1:
        table, note = _python_parse(bodies[idx[0]])
        notes[idx[0]] = "; ".join(n for n in (notes[idx[0]], note) if n)
        out.append(_with_run(table, np.full(table.num_rows, idx[0], dtype=np.int32)))
        return
    half = len(idx) // 2
    _parse_group(idx[:half], bodies, out, notes)
    _parse_group(idx[half:], bodies, out, notes)


# A line after every file tells which file each row came from. Counting each file's lines instead
# costs as much as a third of the parse: pyarrow skips blank lines and reads a line holding two
# objects as two rows, so only an exact count of the non-blank lines would do.
_END_KEY = "sweeper.end_of_file"
_END_LINE = b'{"sweeper.end_of_file":true}\n'


def _arrow_parse(bodies: list[bytes]) -> tuple[pa.Table, np.ndarray] | None:
    """The rows of ``bodies`` (files ending with a newline) and each row's file (its index in
    ``bodies``); None if pyarrow rejects them or a file's rows are not one per non-blank line
    (a line with two objects: the Python parser reports it as invalid)."""
    try:
        table = pj.read_json(
            pa.BufferReader(_END_LINE.join(bodies) + _END_LINE),
            read_options=pj.ReadOptions(block_size=_BLOCK),
            parse_options=pj.ParseOptions(
                explicit_schema=_KNOWN_METRICS, unexpected_field_behavior="infer"
            ),
        )
    except (pa.ArrowException, ValueError):
        return None
    if _END_KEY not in table.column_names:
        return None
    end = table.column(_END_KEY).is_valid().to_numpy(zero_copy_only=False)
    if int(end.sum()) != len(bodies) or not end[-1]:
        return None  # a file holds the end line itself: let the Python parser read it
    file = (np.cumsum(end) - end)[~end]
    rows = np.bincount(file, minlength=len(bodies))
    for k, n in enumerate(rows):
        if n != bodies[k].count(b"\n") and n != _count_lines(bodies[k]):
            return None
    table = table.drop_columns([_END_KEY]).filter(pa.array(~end))
    if table.column("step").null_count:
        return None  # lines without a step: let the Python parser name them
    return _numeric_extras(table), file


def _count_lines(body: bytes) -> int:
    """Non-blank lines of ``body`` (which ends with a newline); pyarrow skips blank ones."""
    return sum(1 for line in body.split(b"\n") if line.strip())


def _numeric_extras(table: pa.Table) -> pa.Table:
    """Keep the documented columns plus numeric extras (as float64); drop the rest."""
    known = set(_KNOWN_METRICS.names)
    cols, names = [], []
    for name, col in zip(table.column_names, table.columns, strict=True):
        if name in known:
            cols.append(col)
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            cols.append(col.cast(pa.float64()))
        else:
            continue
        names.append(name)
    return pa.table(cols, names=names)


def _python_parse(body: bytes) -> tuple[pa.Table, str]:
    """Parse one metrics file line by line, skipping (and reporting) lines that are not valid."""
    rows, bad = [], []
    extras: set[str] = set()
    for lineno, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        row = _check_line(line)
        if row is None:
            bad.append(lineno)
            continue
        extras.update(k for k in row if k not in _KNOWN_METRICS.names)
        rows.append(row)
    schema = pa.schema(list(_KNOWN_METRICS) + [(k, pa.float64()) for k in sorted(extras)])
    note = ""
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        note = f"{len(bad)} invalid line(s) skipped (line {shown})"
    return pa.Table.from_pylist(rows, schema=schema), note


def _check_line(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    row: dict[str, Any] = {}
    for key, value in obj.items():
        if key in _INT_KEYS:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                return None
        elif key == "horizon":
            if value is not None and not isinstance(value, bool):
                return None
        elif value is None:
            pass
        elif isinstance(value, bool) or not isinstance(value, int | float):
            if key in _FLOAT_KEYS:
                return None
            continue  # a non-numeric extra key is not a metric
        else:
            value = float(value)
        row[key] = value
    return row if isinstance(row.get("step"), int) else None


def _with_run(table: pa.Table, run: np.ndarray) -> pa.Table:
    return table.append_column("_run", pa.array(run, type=pa.int32()))


def _sorted_dedup(wide: pa.Table) -> pa.Table:
    """Sort by (run, step); of repeated steps keep the last line logged (a resumed run)."""
    if wide.num_rows == 0:
        return wide
    run = wide.column("_run").to_numpy()
    step = wide.column("step").to_numpy()
    order = np.lexsort((np.arange(len(run)), step, run))
    run, step = run[order], step[order]
    keep = np.r_[(run[1:] != run[:-1]) | (step[1:] != step[:-1]), True]
    return wide.take(pa.array(order[keep]))


def _isnan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# -------------------------------------------------------------------------------------- horizons


def _float_col(wide: pa.Table, name: str) -> np.ndarray:
    """Column as float64 with NaN for missing; a separate mask tells missing from a logged NaN."""
    if name not in wide.column_names:
        return np.full(wide.num_rows, np.nan)
    return wide.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _valid(wide: pa.Table, name: str) -> np.ndarray:
    if name not in wide.column_names:
        return np.zeros(wide.num_rows, dtype=bool)
    return ~wide.column(name).is_null().to_numpy(zero_copy_only=False)


def _horizon_rows(
    runs: pa.Table, infos: list[_RunInfo], wide: pa.Table
) -> tuple[pa.Table, np.ndarray]:
    """One row per (run, planned horizon D) whose step ``D / tokens_per_step`` was logged.

    The smoothed loss is the mean over the logged points whose step lies within one log interval
    (``log_every`` steps) of the horizon step, i.e. the horizon point and its logged neighbours (the
    paper's {D-1, D, D+1}); ``train_loss_std`` is their population std; ``output_norm_smoothed`` is
    the geometric mean of the output norm over the same points.
    """
    hr, hs, hd, fin, le = _planned_horizons(infos)
    if wide.num_rows == 0 or len(hr) == 0:
        return tables.empty("horizons"), np.zeros(len(infos), dtype=np.int64)
    key = (wide.column("_run").to_numpy().astype(np.int64) << _STEP_BITS) + wide.column(
        "step"
    ).to_numpy()
    base = hr.astype(np.int64) << _STEP_BITS
    target = base + hs
    pos = np.searchsorted(key, target)
    hit = pos < len(key)
    hit[hit] = key[pos[hit]] == target[hit]
    hr, hs, hd, fin, le, pos, base = (a[hit] for a in (hr, hs, hd, fin, le, pos, base))
    lo = np.searchsorted(key, base + np.maximum(hs - le, 0))
    hi = np.searchsorted(key, base + hs + le, side="right")
    loss, loss_ok = _float_col(wide, "train_loss"), _valid(wide, "train_loss")
    mean, std, n = _window_stats(loss, loss_ok, lo, hi)
    norm, norm_ok = _float_col(wide, "output_norm"), _valid(wide, "output_norm")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mean, _, _ = _window_stats(np.log(norm), norm_ok, lo, hi)
    cols: dict[str, Any] = {
        "tokens": _tokens_at(wide, pos, hd),
        "step": hs,
        "is_final": fin,
        "train_loss_smoothed": mean,
        "train_loss_std": std,
        "smoothing_points": n,
        "window_complete": (key[lo] < key[pos]) & (key[hi - 1] > key[pos]),
        "output_norm_smoothed": np.exp(log_mean),
    }
    for name in _HORIZON_POINT:
        col = _float_col(wide, name)
        cols[name] = pa.array(col[pos], mask=~_valid(wide, name)[pos])
    per_run = np.bincount(hr, minlength=len(infos))
    return _attach_run_columns(runs, hr, cols), per_run


def _planned_horizons(infos: list[_RunInfo]) -> tuple[np.ndarray, ...]:
    hr, hs, hd, fin, le = [], [], [], [], []
    for i, info in enumerate(infos):
        tps = info.tokens_per_step
        if not tps or not info.horizons:
            continue
        last = max(info.horizons)
        for d in info.horizons:
            if d % tps == 0:
                hr.append(i)
                hs.append(d // tps)
                hd.append(d)
                fin.append(d == last)
                le.append(info.log_every or 1)
    return (
        np.array(hr, dtype=np.int64),
        np.array(hs, dtype=np.int64),
        np.array(hd, dtype=np.int64),
        np.array(fin, dtype=bool),
        np.array(le, dtype=np.int64),
    )


def _window_stats(
    x: np.ndarray, ok: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, population std and count of ``x[lo:hi]`` (valid entries only) for every window.

    Windows are a handful of points, so this loops over the offset within the window rather than
    over windows; a logged NaN (a diverged run) makes the window's statistics NaN.
    """
    width = int((hi - lo).max()) if len(lo) else 0
    total = np.zeros(len(lo))
    count = np.zeros(len(lo), dtype=np.int64)
    for k in range(width):
        j = lo + k
        inside = j < hi
        jj = np.where(inside, j, 0)
        use = inside & ok[jj]
        total += np.where(use, x[jj], 0.0)
        count += use
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        sq = np.zeros(len(lo))
        for k in range(width):
            j = lo + k
            jj = np.where(j < hi, j, 0)
            use = (j < hi) & ok[jj]
            sq += np.where(use, (x[jj] - mean) ** 2, 0.0)
        std = np.sqrt(sq / count)
    return mean, std, count


def _tokens_at(wide: pa.Table, pos: np.ndarray, planned: np.ndarray) -> np.ndarray:
    """Tokens of the logged horizon line (the planned D where the line has none)."""
    col = wide.column("tokens")
    logged = col.to_numpy(zero_copy_only=False)[pos] if col.null_count == 0 else None
    if logged is None:
        vals = col.to_numpy(zero_copy_only=False).astype(np.float64)[pos]
        return np.where(np.isnan(vals), planned, vals).astype(np.int64)
    return logged.astype(np.int64)


_PER_RUN = [f.name for f in tables.HORIZONS_SCHEMA if f.name in tables.RUNS_SCHEMA.names]


def _attach_run_columns(runs: pa.Table, hr: np.ndarray, cols: dict[str, Any]) -> pa.Table:
    runs = runs.select(_PER_RUN).take(pa.array(hr))
    out = {name: runs.column(name) for name in _PER_RUN}
    out.update(cols)
    return tables.conform("horizons", pa.table(out))


# -------------------------------------------------------------------------------- long metrics


def _long_metrics(wide: pa.Table, run_ids: list[str]) -> pa.Table:
    """Unpivot the wide table: one row per (run, step, metric) with a value, in that order."""
    names = [
        n
        for n in wide.column_names
        if n not in ("_run", "step", "tokens", "horizon")
        and pa.types.is_floating(wide.schema.field(n).type)
    ]
    if wide.num_rows == 0 or not names:
        return tables.empty("metrics")
    values = np.empty((wide.num_rows, len(names)))
    valid = np.empty((wide.num_rows, len(names)), dtype=bool)
    for j, name in enumerate(names):
        col = wide.column(name)
        values[:, j] = col.to_numpy(zero_copy_only=False)
        valid[:, j] = True if col.null_count == 0 else ~col.is_null().to_numpy(False)
    # Repeating each per-row column by its row's count of values, and masking a tiled metric
    # index, is sequential work; fancy indexing with flat positions (divmod) cost 5x more.
    mask = valid.ravel()
    per_row = valid.sum(axis=1)
    tokens = wide.column("tokens")
    tokens = (
        np.repeat(tokens.to_numpy(), per_row)
        if tokens.null_count == 0
        else tokens.combine_chunks().take(pa.array(np.repeat(np.arange(len(per_row)), per_row)))
    )
    metric = np.tile(np.arange(len(names), dtype=np.int32), wide.num_rows)[mask]
    return pa.table(
        {
            "run_id": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat(wide.column("_run").to_numpy(), per_row), pa.int32()),
                pa.array(run_ids),
            ),
            "step": np.repeat(wide.column("step").to_numpy(), per_row),
            "tokens": tokens,
            "metric": pa.DictionaryArray.from_arrays(pa.array(metric), pa.array(names)),
            "value": values.ravel()[mask],
        },
        schema=tables.METRICS_SCHEMA,
    )


# ------------------------------------------------------------------------------------- utilities


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())
