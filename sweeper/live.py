"""A live view of a sweep: per run its state and progress (step, tokens, latest loss and output
norm, throughput, ETA), and a summary of the whole sweep, re-reading only the files that changed.

Used by ``sweeper status`` (once) and ``sweeper status --watch`` (in a loop)::

    view = LiveView(sweep)
    rows = view.refresh()          # list[RunProgress]; a second call reads only what changed
    summary = view.summary(rows)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from sweeper.errors import StoreError
from sweeper.fsutil import write_bytes_atomic
from sweeper.records import RunRecord, RunState
from sweeper.store import EVENTS, RECORD, SweepStore
from sweeper.store_read import MAX_RECORD_BYTES
from trainer.schema import METRICS_FILE, parse_metrics_line

if TYPE_CHECKING:
    from sweeper.sweep import Sweep

_CLOCKED = frozenset({RunState.RUNNING, RunState.STALE})
_TAIL_BYTES = 8192  # a metrics line is a few hundred bytes: the last one is in the last 8 KiB


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
        d = {name: getattr(self, name) for name in _PROGRESS_FIELDS}
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


@dataclasses.dataclass
class _Cached:
    key: tuple[Any, ...]
    row: RunProgress


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


class RecordIndex:
    """Briefs of every run record, kept in ``<sweep>/.cache/status-index.json`` keyed by the
    record file's size and mtime: a cold ``status`` of 10,000 runs then parses one JSON file
    instead of validating 10,000 records (bench/bench_live.py). A record whose file changed is
    read again; a cache that cannot be read or written is ignored.

    A brief is given only for a record that was validated as the file now is (a regular file,
    within the store's bound), so the store need not read it again for the run's status."""

    def __init__(self, store: SweepStore) -> None:
        self.store = store
        self.path = store.root / ".cache" / "status-index.json"
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False
        with contextlib.suppress(OSError, ValueError, TypeError):
            raw = orjson.loads(self.path.read_bytes())
            if isinstance(raw, dict) and raw.get("version") == _INDEX_VERSION:
                self.entries = raw["runs"]

    def brief(self, rid: str) -> Brief | None:
        """The run's brief; None if its record is missing or not valid."""
        return self.brief_at(rid, _record_key(os.path.join(self.store.runs_dir, rid, RECORD)))

    def brief_at(self, rid: str, key: tuple[int, int] | None) -> Brief | None:
        """:meth:`brief`, given the record file's :func:`_record_key` just taken."""
        if key is None:
            return None  # missing, not a regular file, or too large: the status says which
        hit = self.entries.get(rid)
        if hit is not None and tuple(hit[0]) == key:
            with contextlib.suppress(TypeError, ValueError):
                return Brief(*hit[1])
        try:
            brief = Brief.of(self.store.load_record(rid))
        except StoreError:
            return None
        self.entries[rid] = [list(key), list(dataclasses.astuple(brief))]
        self.dirty = True
        return brief

    def save(self) -> None:
        if not self.dirty:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(exist_ok=True)
            doc = {"version": _INDEX_VERSION, "runs": self.entries}
            write_bytes_atomic(self.path, orjson.dumps(doc))
            self.dirty = False


_INDEX_VERSION = 1


class LiveView:
    """Progress of every run of a sweep, cached per run by the stats of its files."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.store: SweepStore = sweep.store
        self._index = RecordIndex(sweep.store)
        self._runs_dir = str(sweep.store.runs_dir)  # plain strings: pathlib is slow per run
        self._rows: dict[str, _Cached] = {}
        self.reads = 0  # files parsed by the last refresh (the bench and tests look at it)

    def refresh(self) -> list[RunProgress]:
        """Every run's progress, in plan order; unchanged runs come from the cache."""
        self.reads = 0
        now = time.time()
        rows = [self._row(rid, now) for rid in self.store.plan_order()]
        self._index.save()
        return rows

    def _row(self, rid: str, now: float) -> RunProgress:
        rd = f"{self._runs_dir}/{rid}"
        key = (
            _stat(f"{rd}/{EVENTS}"),
            _stat(f"{rd}/{METRICS_FILE}"),
            _stat(f"{rd}/heartbeat"),
            _record_key(f"{rd}/{RECORD}"),
        )
        hit = self._rows.get(rid)
        # A running run's state (stale or not) and ETA depend on the clock, so it is read again;
        # every other run is served from the cache while its files are unchanged.
        if hit is not None and hit.key == key and hit.row.state not in _CLOCKED:
            return hit.row
        row = self._read(rid, rd, now, key[3])
        self._rows[rid] = _Cached(key, row)
        return row

    def _read(self, rid: str, rd: str, now: float, record: tuple[int, int] | None) -> RunProgress:
        self.reads += 1
        rec = self._index.brief_at(rid, record)
        # a brief is only given for a record validated as its file now is: not read again
        st = self.store.status(rid, now, record_checked=rec is not None)
        last = last_metrics(f"{rd}/{METRICS_FILE}")
        step = last.get("step") if last else None
        total = rec.steps if rec else None
        tps = last.get("tokens_per_s") if last else None
        done = (step - rec.start_step) if (rec and step is not None) else 0
        remaining = (rec.steps - rec.start_step - done) * rec.tokens_per_step if rec else 0
        if st.state == RunState.COMPLETED or st.state.is_finished():
            remaining = 0
        running = st.state == RunState.RUNNING
        eta = remaining / tps if running and tps and remaining > 0 else None
        return RunProgress(
            run_id=rid,
            state=st.state,
            model=rec.model if rec else None,
            lr=rec.lr if rec else None,
            batch_size=rec.batch_size if rec else None,
            seed=rec.seed if rec else None,
            step=step,
            total_steps=total,
            tokens=last.get("tokens") if last else None,
            train_loss=last.get("train_loss") if last else None,
            output_norm=last.get("output_norm") if last else None,
            tokens_per_s=tps if running else None,
            eta_s=eta,
            attempt=st.attempt,
            backend=st.backend,
            job_id=st.last_event.job_id if st.last_event else None,
            reason=last_line(st.reason),
            remaining_tokens=max(0, remaining),
            flops_per_token=rec.flops_per_token if rec else 0.0,
        )

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
    parts = re.split(r"(\d+)", row.run_id)
    id_key = tuple(int(p) if p.isdigit() else p for p in parts)
    return (row.model or "", row.batch_size or 0, row.lr or 0.0, row.seed or 0, id_key)


def last_metrics(path: str) -> dict[str, Any] | None:
    """The last complete metrics line of a file, parsed through the trainer's schema."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
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
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_BYTES:
        return None
    return (st.st_size, st.st_mtime_ns)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)
