"""The run store: a sweep directory of plain files (see docs/architecture.md), no database server.

Layout::

    <sweep>/spec.toml  plan.json  extra_points.json  .lock
    <sweep>/runs/<id>/run.json  events.jsonl  heartbeat  horizons.json  .lock  stdout.log ...

A run's state is derived from its append-only ``events.jsonl`` plus the ``heartbeat`` mtime, so any
number of processes (launchers, workers on cluster nodes, ``sweeper status``) can read it without a
server. ``run.json`` is written once and never edited. Events are appended under an exclusive
``fcntl`` lock, flushed and fsync'd.

Damage stays with its run: a malformed event line, a missing or corrupt ``run.json``, a run
directory that is a symlink or not a directory makes that run's state ``error`` with the reason
(a completed run stays ``completed``, with the reason), never the sweep's. A run directory
without ``run.json`` is still listed; entries of ``runs/`` that are not runs are reported by
:meth:`SweepStore.strays`. Nothing here follows a symlink out of the sweep or blocks on a FIFO
(see :mod:`sweeper.store_read`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sweeper.errors import StoreError
from sweeper.fsutil import (  # noqa: F401 - re-exported for callers of the store
    atomic_write,
    is_regular_or_absent,
    write_json_atomic,
    write_text_atomic,
)
from sweeper.records import (
    RecordError,
    RunEvent,
    RunRecord,
    RunState,
    attempts,
    check_name,
    derive_state,
)
from sweeper.store_read import (  # noqa: F401 - re-exported for callers of the store
    EVENTS,
    MAX_EVENTS_BYTES,
    RECORD,
    EventLog,
    read_event_log,
    read_json,
    record_problem,
    scan_runs,
)

HEARTBEAT = "heartbeat"
HORIZONS = "horizons.json"  # horizons added after the record was written (a sidecar, union only)
PLAN = "plan.json"
DEFAULT_STALE_AFTER_S = 120.0

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
# Finished states whose data a damaged file must not hide: they keep their state (with the damage
# as the reason), so nothing ever selects them to run again.
_KEEPS_DATA = frozenset({RunState.COMPLETED, RunState.STOPPED})


@dataclass(frozen=True)
class RunStatus:
    """What ``sweeper status`` shows for one run."""

    run_id: str
    state: RunState
    attempt: int = 0
    last_event: RunEvent | None = None
    heartbeat_age_s: float | None = None
    where: RunEvent | None = None  # the latest event that names a host
    error: str | None = None  # why the run is in state ``error``

    @property
    def reason(self) -> str | None:
        if self.error is not None:
            return self.error
        return self.last_event.reason if self.last_event else None

    @property
    def exit_code(self) -> int | None:
        return self.last_event.exit_code if self.last_event else None

    @property
    def backend(self) -> str | None:
        """The backend of the latest event that names one."""
        for ev in (self.last_event, self.where):
            if ev is not None and ev.backend:
                return ev.backend
        return None

    def to_dict(self) -> dict[str, Any]:
        """Flat dict for JSON/CSV listings."""
        ev, where = self.last_event, self.where
        return {
            "run_id": self.run_id,
            "state": self.state.value,
            "attempt": self.attempt,
            "backend": self.backend,
            "job_id": (ev and ev.job_id) or (where and where.job_id),
            "host": where.host if where else None,
            "pid": where.pid if where else None,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "updated": ev.ts if ev else None,
            "heartbeat_age_s": None
            if self.heartbeat_age_s is None
            else round(self.heartbeat_age_s, 1),
        }


# ------------------------------------------------------------------------------------------- events


def read_events(run_dir: str | Path) -> list[RunEvent]:
    """The run's valid events (see :func:`read_event_log`)."""
    return read_event_log(run_dir).events


def append_event(run_dir: str | Path, state: str | RunState, **fields: Any) -> RunEvent:
    """Append one state event under an exclusive lock, flushed and fsync'd.

    ``ts`` is added; ``attempt`` defaults to the attempt of the latest ``running`` event (plus one
    when ``state`` is ``running``). Fields that are None are left out.

    Raises:
        StoreError: a derived state, or an events file that is not a regular file.
    """
    state = RunState(state)
    if not state.is_written():
        raise StoreError(f"{run_dir}: state {state.value!r} is derived and cannot be written")
    path = os.path.join(run_dir, EVENTS)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | _NOFOLLOW, 0o666)
    except OSError as e:
        raise StoreError(f"{path}: cannot append ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"{path}: not a regular file")
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if fields.get("attempt") is None:
                prior = attempts(read_events(run_dir))
                fields["attempt"] = prior + 1 if state == RunState.RUNNING else prior
            event = RunEvent(ts=round(time.time(), 3), state=state, **fields)
            line = orjson.dumps(event.to_dict()) + b"\n"
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn last line must not swallow this event
            os.write(fd, line)
            os.fsync(fd)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return event


def heartbeat_mtime(run_dir: str | Path) -> float | None:
    """mtime of the run's heartbeat file, None if there is none."""
    try:
        return os.stat(os.path.join(run_dir, HEARTBEAT), follow_symlinks=False).st_mtime
    except OSError:
        return None


def open_in_run_dir(run_dir: str | Path, name: str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` a file of a run directory without following a symlink (OSError if it is one)."""
    return os.open(os.path.join(run_dir, name), flags | _NOFOLLOW, mode)


def touch(run_dir: str | Path, name: str) -> None:
    """Create ``name`` or update its mtime, never through a symlink."""
    fd = open_in_run_dir(run_dir, name, os.O_WRONLY | os.O_CREAT)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe directory name; StoreError otherwise."""
    try:
        return check_name(run_id)
    except RecordError as e:
        raise StoreError(str(e)) from None


# -------------------------------------------------------------------------------------------- store


class SweepStore:
    """One sweep directory.

    Args:
        root: The sweep directory (``results/<sweep>``).
        stale_after_s: Heartbeat age after which a running run counts as stale; None reads
            ``stale_after_s`` from ``plan.json`` (default 120 s).
    """

    def __init__(self, root: Path, stale_after_s: float | None = None) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self._stale_after_s = stale_after_s

    def __repr__(self) -> str:
        return f"SweepStore({str(self.root)!r})"

    # ---- layout
    def exists(self) -> bool:
        """True if the directory holds a sweep (a ``plan.json``)."""
        return (self.root / PLAN).is_file()

    def run_dir(self, run_id: str) -> Path:
        """Directory of run ``run_id``; StoreError for an id that would leave ``runs/``."""
        return self.runs_dir / check_run_id(run_id)

    def run_ids(self) -> list[str]:
        """Ids of every run entry of ``runs/`` (with or without a record, damaged or not), sorted.
        Regular files and names that are not run ids are not runs (see :meth:`strays`)."""
        return scan_runs(self.runs_dir)[0]

    def strays(self) -> list[str]:
        """One line per entry of ``runs/`` that is not a run and is ignored (hidden ones aside)."""
        return scan_runs(self.runs_dir)[1]

    def _real_dir(self, run_id: str) -> Path:
        """The run's directory; StoreError unless it is a directory and not a symlink."""
        rd = self.run_dir(run_id)
        if os.path.islink(rd):
            raise StoreError(f"{rd}: is a symlink; run directories must be real directories")
        if os.path.lexists(rd) and not os.path.isdir(rd):
            raise StoreError(f"{rd}: not a directory")
        return rd

    @property
    def stale_after_s(self) -> float:
        if self._stale_after_s is None:
            self._stale_after_s = DEFAULT_STALE_AFTER_S
            with contextlib.suppress(StoreError, TypeError, ValueError, AttributeError):
                value = float(read_json(self.root / PLAN).get("stale_after_s"))
                if 0 < value < 1e9:  # NaN and infinity are not ages
                    self._stale_after_s = value
        return self._stale_after_s

    # ---- records
    def load_record(self, run_id: str) -> RunRecord:
        """The run record ``runs/<id>/run.json``; StoreError naming the file if it is bad."""
        path = self._real_dir(run_id) / RECORD
        raw = read_json(path)
        try:
            record = RunRecord.from_dict(raw)
        except RecordError as e:
            raise StoreError(f"{path}: {e}") from None
        if record.id != run_id:
            raise StoreError(f"{path}: id = {record.id!r}: does not match its directory")
        return record

    def write_record(self, record: RunRecord) -> bool:
        """Create ``runs/<id>/run.json`` atomically; an existing record is never replaced.

        Returns:
            True if the record was written.
        """
        try:
            rd = self._real_dir(record.id)
        except StoreError:
            return False  # damaged: its status says why; never written through
        path = rd / RECORD
        if os.path.lexists(path):
            return False
        rd.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record.to_dict())
        return True

    def extra_horizons(self, run_id: str) -> tuple[int, ...]:
        """Horizons added to a run after its record was written (``horizons.json``)."""
        path = self.run_dir(run_id) / HORIZONS
        if not os.path.lexists(path):
            return ()
        with contextlib.suppress(StoreError):
            self._real_dir(run_id)
            raw = read_json(path)
            values = raw.get("horizons_tokens") if isinstance(raw, dict) else None
            if isinstance(values, list) and all(type(v) is int and v > 0 for v in values):
                return tuple(sorted(set(values)))
        return ()

    def add_horizons(self, run_id: str, horizons: tuple[int, ...]) -> bool:
        """Union the horizons the run's record lacks into its ``horizons.json``; True if it grew.
        Horizons outside the run's span (before its start, after its last step) are ignored."""
        have = set(self.extra_horizons(run_id))
        try:
            rec = self.load_record(run_id)
        except StoreError:
            return False
        start = rec.start_step * rec.tokens_per_step
        new = {h for h in horizons if start < h <= rec.horizons_tokens[-1]}
        union = have | (new - set(rec.horizons_tokens))
        path = self.run_dir(run_id) / HORIZONS
        if union == have or not is_regular_or_absent(path):
            return False  # a damaged horizons.json is left for a person to look at
        write_json_atomic(path, {"horizons_tokens": sorted(union)})
        return True

    def load_plan(self) -> dict[str, Any]:
        """``plan.json`` with its ``runs`` checked; StoreError if it is missing or malformed."""
        if not self.exists():
            raise StoreError(f"{self.root}: not a sweep directory (no {PLAN})")
        path = self.root / PLAN
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise StoreError(f"{path}: expected a JSON object")
        runs = doc.setdefault("runs", [])
        if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
            raise StoreError(f"{path}: runs = {str(runs)[:60]}: expected a list of run ids")
        return doc

    def plan_order(self, ids: list[str] | None = None) -> list[str]:
        """Run ids in ``plan.json`` order (trunks before branches), then any others, sorted.

        A damaged ``plan.json`` only loses the order: every run directory is still listed.

        Args:
            ids: The run ids, if the caller has just listed them (:meth:`run_ids`).
        """
        ids = self.run_ids() if ids is None else ids
        try:
            listed = self.load_plan()["runs"]
        except StoreError:
            listed = []
        have = set(ids)
        order = list(dict.fromkeys(r for r in listed if r in have))
        seen = set(order)
        return order + [r for r in ids if r not in seen]

    def write_plan(self, plan: dict[str, Any]) -> None:
        """Atomically write ``plan.json`` (StoreError if something else than a file is there)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not is_regular_or_absent(self.root / PLAN):
            raise StoreError(f"{self.root / PLAN}: not a regular file; move it away to continue")
        write_json_atomic(self.root / PLAN, plan)

    # ---- state
    def events(self, run_id: str) -> list[RunEvent]:
        """The run's valid events."""
        return read_events(self.run_dir(run_id))

    def append_event(self, run_id: str, state: str | RunState, **fields: Any) -> RunEvent:
        """Append an event to run ``run_id`` (see :func:`append_event`); StoreError if its
        directory is a symlink or not a directory (never written through)."""
        return append_event(self._real_dir(run_id), state, **fields)

    def append_if(
        self,
        run_id: str,
        state: RunState,
        expect: RunEvent | None = None,
        **fields: Any,
    ) -> bool:
        """Append ``state`` unless a worker holds the run or its last event changed.

        ``expect`` is the last event the caller decided on (None: any non-final one). Taking the
        run's lock first means a worker cannot append an outcome between the check and this
        append. Every backend's cancel and reconcile goes through here.

        Returns:
            True if the event was appended.
        """
        with self.run_lock(run_id, timeout_s=0) as got:
            if not got:
                return False
            events = self.events(run_id)
            last = events[-1] if events else None
            if expect is not None and last != expect:
                return False
            if expect is None and last is not None and last.state.is_finished():
                return False
            self.append_event(run_id, state, **fields)
            return True

    def status(
        self, run_id: str, now: float | None = None, *, record_checked: bool = False
    ) -> RunStatus:
        """Current :class:`RunStatus` of one run.

        Args:
            record_checked: The caller has just validated the run's ``run.json``, which is then
                not read again (see :func:`record_problem`).
        """
        rd = f"{self.runs_dir}/{check_run_id(run_id)}"
        return self._status(run_id, rd, time.time() if now is None else now, record_checked)

    def _status(self, run_id: str, rd: str, now: float, record_checked: bool = False) -> RunStatus:
        log = read_event_log(rd)
        events = log.events
        last = events[-1] if events else None
        running = last is not None and last.state == RunState.RUNNING
        beat = heartbeat_mtime(rd) if running else None
        state = derive_state(events, beat, now, self.stale_after_s)
        error = record_problem(rd, record_checked) or log.error
        if error is not None and state not in _KEEPS_DATA:
            state = RunState.ERROR
        return RunStatus(
            run_id=run_id,
            state=state,
            attempt=attempts(events),
            last_event=last,
            heartbeat_age_s=None if beat is None else now - max(beat, last.ts if last else 0),
            where=next((e for e in reversed(events) if e.host), None),
            error=error,
        )

    def statuses(self, run_ids: list[str] | None = None) -> dict[str, RunStatus]:
        """Status of every run (or of ``run_ids``), keyed by id, in the given order."""
        now = time.time()
        ids = self.run_ids() if run_ids is None else run_ids
        runs = str(self.runs_dir)  # plain strings: pathlib costs ~10% here
        return {rid: self._status(rid, f"{runs}/{check_run_id(rid)}", now) for rid in ids}

    # ---- locking
    @contextlib.contextmanager
    def lock(self, timeout_s: float | None = None) -> Iterator[None]:
        """Sweep-level exclusive lock (``<sweep>/.lock``) held while selecting and claiming runs.

        Args:
            timeout_s: Give up with StoreError after this long; None waits forever.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / ".lock", timeout_s) as got:
            if not got:
                raise StoreError(f"{self.root}: locked by another sweeper process")
            yield

    @contextlib.contextmanager
    def run_lock(self, run_id: str, timeout_s: float | None = 0) -> Iterator[bool]:
        """The run's lock (held by its worker and trainer); yields False if not had in time, or
        if the run directory is a symlink or not a directory (no lock is created through it)."""
        rd = self.run_dir(run_id)
        if os.path.islink(rd) or not os.path.isdir(rd):
            yield False
            return
        with _locked(rd / ".lock", timeout_s) as got:
            yield got


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float | None) -> Iterator[bool]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as e:
        raise StoreError(f"{path}: cannot lock ({e.strerror})") from None
    try:
        try:
            got = try_flock(fd, timeout_s)
        except OSError as e:  # e.g. a Lustre client mounted with noflock
            raise StoreError(f"{path}: cannot lock ({e.strerror or e})") from None
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def try_flock(fd: int, timeout_s: float | None) -> bool:
    """Exclusive ``flock`` on ``fd``, waiting up to ``timeout_s`` (None: forever, 0: no wait)."""
    if timeout_s is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def hostname() -> str:
    """This machine's short host name, as recorded in events."""
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field
    22), None if it is gone or there is no procfs. With the pid it names a process uniquely."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def same_process(pid: int, start: int | None) -> bool:
    """True if ``pid`` is alive and, when ``start`` is known, is the process that started then."""
    if not pid_alive(pid):
        return False
    if start is None:
        return True
    return process_start(pid) == start
