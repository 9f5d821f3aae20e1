"""A live view of a sweep: per run its state and progress (step, tokens, latest loss and output
norm, throughput, ETA), and a summary of the whole sweep, re-reading only the files that changed.

Used by ``sweeper status`` (once) and ``sweeper status --watch`` (in a loop)::

    view = LiveView(sweep)
    rows = view.refresh()          # list[RunProgress]; a second call reads only what changed
    summary = view.summary(rows)

Two caches under ``<sweep>/.cache/`` make a ``status`` with nothing changed stat files instead of
reading them: ``status-index.json`` (what status needs of each run record, keyed by the record
file) and ``status-rows.json`` (each run's row, keyed by the signatures of the files it was read
from: the run directory, ``events.jsonl``, ``metrics.jsonl``, ``run.json`` and ``.lock``). What
ages with the clock (a running run turning stale, its throughput and ETA) is never cached: it is
derived at every refresh from the heartbeat's mtime and the current time. A cache file that is
not a regular file, too large, corrupt or of another version is ignored and rebuilt; a ``.cache``
that is not a real directory is neither read nor written (nothing is written outside the sweep).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from operator import contains
from typing import TYPE_CHECKING, Any

import orjson

from sweeper.errors import StoreError
from sweeper.fsutil import write_bytes_atomic
from sweeper.records import RunRecord, RunState
from sweeper.store import EVENTS, HEARTBEAT, RECORD, SweepStore
from sweeper.store_read import MAX_RECORD_BYTES, read_bytes, scan_runs
from trainer.schema import METRICS_FILE, parse_metrics_line

if TYPE_CHECKING:
    from sweeper.sweep import Sweep

_TAIL_BYTES = 8192  # a metrics line is a few hundred bytes: the last one is in the last 8 KiB
_SAFE_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC  # never a FIFO's wait
CACHE_DIR = ".cache"
_MAX_CACHE_BYTES = 256 << 20
# A file changed this close to the moment it was read may change again within the file system's
# timestamp granularity without its signature changing: such a row is not persisted.
_RACY_NS = 1_000_000_000
_SAVE_EVERY_S = 30.0  # a --watch rewrites the rows' cache at most this often


@dataclasses.dataclass(frozen=True)
class RunProgress:
    """One run as ``status`` shows it."""

    run_id: str
    state: RunState
    model: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    step: int | None = None
    total_steps: int | None = None
    tokens: int | None = None
    train_loss: float | None = None
    output_norm: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    attempt: int = 0
    backend: str | None = None
    job_id: str | None = None
    reason: str | None = None  # the last line of the failure reason
    remaining_tokens: int = 0
    flops_per_token: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Flat dict for tables, JSON and CSV."""
        # every field is a plain value: asdict's deep copy cost ~20% of ``status --format json``
        d = dict(self.__dict__)  # the fields, in order (no slots)
        d["state"] = self.state.value
        d["progress"] = f"{self.step}/{self.total_steps}" if self.step is not None else None
        return d


_PROGRESS_FIELDS = tuple(f.name for f in dataclasses.fields(RunProgress))


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    """The header of ``status``: counts by state, compute done and left, and the sweep's ETA."""

    counts: dict[str, int]
    flops_done: float
    flops_left: float
    tokens_per_s: float  # summed over running runs
    eta_s: float | None  # remaining tokens over the current aggregate throughput

    def line(self) -> str:
        """One line for a person."""
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items())) or "no runs"
        eta = "" if self.eta_s is None else f", ETA {format_seconds(self.eta_s)}"
        return (
            f"{counts}; compute {self.flops_done:.3g} FLOPs done, {self.flops_left:.3g} left{eta}"
        )


@dataclasses.dataclass(frozen=True)
class Brief:
    """What ``status`` needs of a run record (records never change, so this is cached)."""

    model: str
    lr: float
    batch_size: int
    seed: int
    steps: int
    start_step: int
    tokens_per_step: int
    flops_per_token: float

    @classmethod
    def of(cls, r: RunRecord) -> Brief:
        return cls(r.model, r.lr, r.batch_size, r.seed, r.steps, r.start_step,
                   r.tokens_per_step, r.train.flops_per_token())  # fmt: skip


def read_cache(store: SweepStore, name: str, version: int) -> dict[str, Any]:
    """The ``runs`` of cache file ``<sweep>/.cache/<name>``; empty if it is absent or cannot be
    trusted (``.cache`` not a real directory; the file a symlink, FIFO or directory, too large,
    corrupt, or of another version). Never follows a symlink, never blocks."""
    cache = store.root / CACHE_DIR
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(cache).st_mode):
            try:
                raw = orjson.loads(read_bytes(cache / name, _MAX_CACHE_BYTES))
            except (StoreError, orjson.JSONDecodeError):
                return {}
            if type(raw) is dict and raw.get("version") == version:
                runs = raw.get("runs")
                return runs if type(runs) is dict else {}
    return {}


def write_cache(store: SweepStore, name: str, version: int, runs: dict[str, Any]) -> None:
    """Atomically replace ``<sweep>/.cache/<name>`` (a concurrent reader sees the old file or
    the new one); nothing is written if ``.cache`` is not a real directory, or on an error."""
    cache = store.root / CACHE_DIR
    with contextlib.suppress(OSError):
        with contextlib.suppress(FileExistsError):
            cache.mkdir()
        if stat.S_ISDIR(os.lstat(cache).st_mode):  # not through a symlink
            write_bytes_atomic(cache / name, orjson.dumps({"version": version, "runs": runs}))


class RecordIndex:
    """Briefs of every run record, kept in ``<sweep>/.cache/status-index.json`` keyed by the
    record file's size and mtime: a cold ``status`` of 10,000 runs then parses one JSON file
    instead of validating 10,000 records (bench/bench_live.py). A record whose file changed is
    read again; a cache that cannot be read or written is ignored (see :func:`read_cache`).

    A brief is given only for a record that was validated as the file now is (a regular file,
    within the store's bound), so the store need not read it again for the run's status."""

    NAME = "status-index.json"

    def __init__(self, store: SweepStore) -> None:
        self.store = store
        self._entries: dict[str, Any] | None = None  # read at the first need
        self.dirty = False

    @property
    def entries(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = read_cache(self.store, self.NAME, _INDEX_VERSION)
        return self._entries

    def brief(self, rid: str) -> Brief | None:
        """The run's brief; None if its record is missing or not valid."""
        return self.brief_at(rid, _record_key(os.path.join(self.store.runs_dir, rid, RECORD)))

    def brief_at(self, rid: str, key: tuple[int, int] | None) -> Brief | None:
        """:meth:`brief`, given the record file's :func:`_record_key` just taken."""
        if key is None:
            return None  # missing, not a regular file, or too large: the status says which
        hit = self.entries.get(rid)
        if type(hit) is list and len(hit) == 2 and hit[0] == list(key):
            with contextlib.suppress(TypeError, ValueError):
                return _brief(hit[1])
        try:
            brief = Brief.of(self.store.load_record(rid))
        except StoreError:
            return None
        self.entries[rid] = [list(key), list(dataclasses.astuple(brief))]
        self.dirty = True
        return brief

    def save(self) -> None:
        if self.dirty:
            write_cache(self.store, self.NAME, _INDEX_VERSION, self.entries)
            self.dirty = False


def _brief(values: Any) -> Brief:
    """A brief from its cached values; TypeError if they are not what a record gives."""
    kinds = (str, float, int, int, int, int, int, float)
    if type(values) is not list or len(values) != len(kinds):
        raise TypeError("not a brief")
    for v, kind in zip(values, kinds, strict=True):
        if not (type(v) is kind or (kind is float and type(v) is int)):
            raise TypeError("not a brief")
    return Brief(*values)


_INDEX_VERSION = 1
_ROWS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class _Cached:
    """A run's row as its files gave it, before the clock: a run whose last event is
    ``running`` (``clocked``) is stored ``running`` without throughput or ETA, which
    :meth:`LiveView._clock` adds, or turns it ``stale``, at each refresh."""

    key: list[int]  # :func:`_signature` of the run's files when they were read
    row: RunProgress
    last_ts: float = 0.0  # the last event's time (a run without a heartbeat yet ages from it)
    tps: float | None = None  # the latest throughput, shown while the run is running
    eta_s: float | None = None  # its ETA while running
    clocked: bool = False
    racy: bool = False  # a file changed too close to the read: kept in memory, not persisted

    def dump(self) -> list[Any]:
        values = list(self.row.__dict__.values())  # the fields, in order (no slots)
        values[1] = self.row.state.value
        return [self.key, values[1:], self.last_ts, self.tps, self.eta_s, self.clocked]

    @classmethod
    def load(cls, rid: str, raw: Any) -> _Cached:
        """From :meth:`dump`'s list; TypeError or ValueError if it is not one, with values of
        the types of :class:`RunProgress`'s fields."""
        if type(raw) is not list or len(raw) != 6:
            raise TypeError("not a cached row")
        key, values, last_ts, tps, eta_s, clocked = raw
        if type(key) is not list or type(values) is not list or len(values) != len(_KINDS) - 1:
            raise TypeError("not a cached row")
        # checked in C (map over types): a per-value Python loop cost ~30% of a warm status
        if not set(map(type, key)) <= _INT or not all(map(contains, _KINDS[1:], map(type, values))):
            raise TypeError("not a cached row")
        if not set(map(type, (last_ts, tps, eta_s))) <= _NUMBER or type(clocked) is not bool:
            raise TypeError("not a cached row")
        fields = {"run_id": rid}
        fields.update(zip(_PROGRESS_FIELDS[1:], values, strict=True))
        fields["state"] = RunState(values[0])
        row = object.__new__(RunProgress)  # the frozen __init__ costs ~20% of a warm status
        row.__dict__.update(fields)
        return cls(key, row, last_ts or 0.0, tps, eta_s, clocked)


def _kinds(annotation: Any) -> frozenset[type]:
    """The JSON types a field of this annotation holds (a float may come back as an int)."""
    names = {t.strip() for t in str(annotation).split("|")}
    kinds = {str if n == "RunState" else {"str": str, "int": int, "float": float,
             "None": type(None)}[n] for n in names}  # fmt: skip
    return frozenset(kinds | ({int} if float in kinds else set()))


_KINDS = [_kinds(f.type) for f in dataclasses.fields(RunProgress)]
_NUMBER = frozenset({int, float, type(None)})
_INT = frozenset({int})


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused (it stays as it was if already off)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _with(row: RunProgress, **changes: Any) -> RunProgress:
    """``dataclasses.replace`` without its cost (the fields are plain values)."""
    new = object.__new__(RunProgress)
    new.__dict__.update(row.__dict__, **changes)
    return new


class LiveView:
    """Progress of every run of a sweep, cached per run by the signatures of its files, in
    memory (``--watch``) and in ``<sweep>/.cache/status-rows.json`` (one ``status`` to the
    next)."""

    ROWS = "status-rows.json"

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.store: SweepStore = sweep.store
        self._index = RecordIndex(sweep.store)
        self._runs_dir = str(sweep.store.runs_dir)  # plain strings: pathlib is slow per run
        self._rows: dict[str, _Cached] = {}
        self._saved: dict[str, Any] | None = None  # status-rows.json as read, until first used
        self._dirty = False
        self._saved_at: float | None = None  # monotonic time of the last write of the rows
        self.reads = 0  # files parsed by the last refresh (the bench and tests look at it)
        self.strays: list[str] = []  # entries of runs/ that are not runs, from the last refresh

    def refresh(self) -> list[RunProgress]:
        """Every run's progress, in plan order; unchanged runs come from the cache."""
        self.reads = 0
        if self._saved is None:
            self._saved = read_cache(self.store, self.ROWS, _ROWS_VERSION)
        ids, self.strays = scan_runs(self.store.runs_dir)
        now = time.time()
        with _no_gc():  # 10,000 rows of acyclic objects: collections only cost (~10%)
            rows = [self._row(rid, now) for rid in self.store.plan_order(ids)]
        self._index.save()
        self._save(ids)
        return rows

    def _row(self, rid: str, now: float) -> RunProgress:
        rd = f"{self._runs_dir}/{rid}"
        key, record, newest = _signature(rd)
        hit = self._rows.get(rid) or self._from_disk(rid)
        if hit is None or hit.key != key:
            hit = self._read(rid, rd, key, record, newest)
            self._rows[rid] = hit
            self._dirty = self._dirty or not hit.racy
        return self._clock(hit, rd, now) if hit.clocked else hit.row

    def _from_disk(self, rid: str) -> _Cached | None:
        raw = self._saved.pop(rid, None) if self._saved else None
        if raw is None:
            return None
        try:
            hit = _Cached.load(rid, raw)
        except (TypeError, ValueError):
            return None  # damaged: read again
        self._rows[rid] = hit
        return hit

    def _clock(self, c: _Cached, rd: str, now: float) -> RunProgress:
        """A ``running`` row as of ``now``: stale once its heartbeat (or, before the first beat,
        its ``running`` event) is older than the sweep's ``stale_after_s``."""
        try:
            beat = os.lstat(f"{rd}/{HEARTBEAT}").st_mtime
        except OSError:
            beat = 0.0
        if now - max(beat, c.last_ts) > self.store.stale_after_s:
            return _with(c.row, state=RunState.STALE)
        return _with(c.row, tokens_per_s=c.tps, eta_s=c.eta_s)

    def _save(self, ids: list[str]) -> None:
        """Persist the rows (at most every :data:`_SAVE_EVERY_S` under ``--watch``)."""
        live = set(ids)
        if not self._dirty and not any(rid not in live for rid in self._rows):
            return
        t = time.monotonic()
        if self._saved_at is not None and t - self._saved_at < _SAVE_EVERY_S:
            return
        self._saved_at = t
        keep = {rid: c.dump() for rid, c in self._rows.items() if rid in live and not c.racy}
        keep.update((rid, raw) for rid, raw in (self._saved or {}).items() if rid in live)
        write_cache(self.store, self.ROWS, _ROWS_VERSION, keep)
        self._rows = {rid: c for rid, c in self._rows.items() if rid in live}
        self._dirty = False

    def _read(
        self, rid: str, rd: str, key: list[int], record: tuple[int, int] | None, newest: int
    ) -> _Cached:
        self.reads += 1
        read_ns = time.time_ns()
        rec = self._index.brief_at(rid, record)
        # a brief is only given for a record validated as its file now is: not read again
        st = self.store.status(rid, 0.0, record_checked=rec is not None)
        last = last_metrics(f"{rd}/{METRICS_FILE}")
        ev = st.last_event
        clocked = ev is not None and ev.state == RunState.RUNNING and st.error is None
        step = last.get("step") if last else None
        tps = last.get("tokens_per_s") if last else None
        done = (step - rec.start_step) if (rec and step is not None) else 0
        remaining = (rec.steps - rec.start_step - done) * rec.tokens_per_step if rec else 0
        if st.state.is_finished():
            remaining = 0
        row = RunProgress(
            run_id=rid,
            state=RunState.RUNNING if clocked else st.state,
            model=rec.model if rec else None,
            lr=rec.lr if rec else None,
            batch_size=rec.batch_size if rec else None,
            seed=rec.seed if rec else None,
            step=step,
            total_steps=rec.steps if rec else None,
            tokens=last.get("tokens") if last else None,
            train_loss=last.get("train_loss") if last else None,
            output_norm=last.get("output_norm") if last else None,
            attempt=st.attempt,
            backend=st.backend,
            job_id=ev.job_id if ev else None,
            reason=last_line(st.reason),
            remaining_tokens=max(0, remaining),
            flops_per_token=rec.flops_per_token if rec else 0.0,
        )
        eta = remaining / tps if tps and remaining > 0 else None
        racy = newest > read_ns - _RACY_NS
        return _Cached(key, row, ev.ts if ev else 0.0, tps, eta, clocked, racy)

    @staticmethod
    def summary(rows: Iterable[RunProgress]) -> SweepSummary:
        """Counts by state, compute done and left, and the ETA of the sweep."""
        rows = list(rows)
        counts = Counter(r.state.value for r in rows)
        done = left = tps = 0.0
        for r in rows:
            left += r.remaining_tokens * r.flops_per_token
            if r.tokens is not None:
                done += r.tokens * r.flops_per_token
            if r.tokens_per_s:
                tps += r.tokens_per_s
        remaining = sum(r.remaining_tokens for r in rows)
        eta = remaining / tps if tps > 0 and remaining else None
        return SweepSummary(dict(counts), done, left, tps, eta)


def filter_rows(
    rows: list[RunProgress],
    *,
    states: Iterable[str] = (),
    models: Iterable[str] = (),
    batch_sizes: Iterable[int] = (),
    lr_range: tuple[float, float] | None = None,
    where: str | None = None,
) -> list[RunProgress]:
    """Rows matching every given filter. ``where`` is a pandas ``DataFrame.query`` expression
    over the row's columns (e.g. ``"lr > 0.01 and train_loss < 3"``)."""
    states, models, batch_sizes = set(states), set(models), set(batch_sizes)
    out = [
        r
        for r in rows
        if (not states or r.state.value in states)
        and (not models or r.model in models)
        and (not batch_sizes or r.batch_size in batch_sizes)
        and (lr_range is None or (r.lr is not None and lr_range[0] <= r.lr <= lr_range[1]))
    ]
    if where:
        out = _query(out, where)
    return out


def _query(rows: list[RunProgress], where: str) -> list[RunProgress]:
    import pandas as pd

    if not rows:
        return rows
    df = pd.DataFrame([r.to_dict() for r in rows])
    try:
        keep = set(df.query(where, engine="python")["run_id"])
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds for a bad expression
        raise StoreError(f"--where {where!r}: {' '.join(str(e).split())}") from None
    return [r for r in rows if r.run_id in keep]


def natural_key(row: RunProgress) -> tuple[Any, ...]:
    """Sort by model, batch size, lr, seed, then id with its numbers compared as numbers."""
    return (row.model or "", row.batch_size or 0, row.lr or 0.0, row.seed or 0, _IdKey(row.run_id))


class _IdKey:
    """A run id compared with its numbers as numbers, split only when two rows tie on the rest
    (splitting 10,000 ids up front cost ~40% of a warm ``status``)."""

    __slots__ = ("rid",)

    def __init__(self, rid: str) -> None:
        self.rid = rid

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _IdKey) and self.rid == other.rid

    def __hash__(self) -> int:
        return hash(self.rid)

    def __lt__(self, other: _IdKey) -> bool:
        return _split(self.rid) < _split(other.rid)


def _split(rid: str) -> tuple[Any, ...]:
    return tuple([int(p) if p.isdigit() else p for p in _DIGITS.split(rid)])


_DIGITS = re.compile(r"(\d+)")


def last_metrics(path: str) -> dict[str, Any] | None:
    """The last complete metrics line of a file, parsed through the trainer's schema."""
    try:
        fd = os.open(path, _SAFE_READ)  # a symlink is refused, a FIFO never waited on
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        tail = os.pread(fd, _TAIL_BYTES, max(0, st.st_size - _TAIL_BYTES))
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in reversed(tail.splitlines()):
        try:
            row = parse_metrics_line(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
        if row is not None:
            return row
    return None


def last_line(text: str | None) -> str | None:
    """The last non-empty line of a (possibly multi-line) reason."""
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else None


def format_seconds(s: float) -> str:
    """``3h05m``, ``4m10s`` or ``12s``."""
    if not math.isfinite(s):
        return "?"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _record_key(path: str) -> tuple[int, int] | None:
    """(size, mtime) of a record file that is a regular file within the store's bound."""
    try:
        return _as_record_key(os.lstat(path))
    except OSError:
        return None


def _as_record_key(st: os.stat_result) -> tuple[int, int] | None:
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_BYTES:
        return None
    return (st.st_size, st.st_mtime_ns)


_NO_FILE = (0, 0, 0, 0, 0)


def _signature(rd: str) -> tuple[list[int], tuple[int, int] | None, int]:
    """What a run's row is read from, by ``lstat`` alone (no symlink followed): the run
    directory's type, inode, mtime and ctime (which change when an entry such as ``.lock`` is
    created, replaced or removed); type, size, mtime, inode and ctime of ``events.jsonl``,
    ``metrics.jsonl`` and ``run.json`` (written in place or appended to). Also the record's
    :func:`_record_key` and the newest time seen (ns)."""
    try:
        d = os.lstat(rd)
    except OSError:
        return [0], None, 0
    if not stat.S_ISDIR(d.st_mode):
        return [d.st_mode, d.st_ino], None, 0  # a symlink or a file: nothing looked at through it
    key = [d.st_mode, d.st_ino, d.st_mtime_ns, d.st_ctime_ns]
    newest = max(d.st_mtime_ns, d.st_ctime_ns)
    record = None
    for name in (EVENTS, METRICS_FILE, RECORD):
        try:
            st = os.lstat(f"{rd}/{name}")
        except OSError:
            key += _NO_FILE
            continue
        key += (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        if name == RECORD:
            record = _as_record_key(st)
    return key, record, newest
