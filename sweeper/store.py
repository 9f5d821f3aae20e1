"""The run store: a sweep directory of plain files (see docs/architecture.md), no database server.

Layout::

    <sweep>/spec.toml  plan.json  extra_points.json  .lock
    <sweep>/runs/<id>/run.json  events.jsonl  heartbeat  .lock  stdout.log  stderr.log  ...

A run's state is derived from its append-only ``events.jsonl`` plus the ``heartbeat`` mtime, so any
number of processes (launchers, workers on cluster nodes, ``sweeper status``) can read it without a
server. Every JSON file is written to a temp file and ``os.replace``d; events are appended under an
exclusive ``fcntl`` lock, flushed and fsync'd.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from sweeper.errors import StoreError

EVENTS = "events.jsonl"
HEARTBEAT = "heartbeat"
RECORD = "run.json"
PLAN = "plan.json"
DEFAULT_STALE_AFTER_S = 120.0

# Run ids are slugs plus a hash; anything else (slashes, "..", leading dots) could escape runs/.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.^+=-]{0,199}")


class RunState(StrEnum):
    """Lifecycle of a run. ``STALE`` is derived from the heartbeat and never written."""

    PLANNED = "planned"
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"
    STALE = "stale"

    def is_finished(self) -> bool:
        """True for terminal states (nothing is running or queued for the run)."""
        return self in _FINISHED

    def is_active(self) -> bool:
        """True while a backend owns the run (queued or running, heartbeat fresh)."""
        return self in (RunState.SUBMITTED, RunState.RUNNING)


_FINISHED = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.DIVERGED, RunState.CANCELLED})
_WRITABLE = {s.value for s in RunState} - {"planned", "stale"}


@dataclass(frozen=True)
class RunStatus:
    """What ``sweeper status`` shows for one run."""

    run_id: str
    state: RunState
    attempt: int = 0
    last_event: dict[str, Any] = field(default_factory=dict)
    heartbeat_age_s: float | None = None
    where: dict[str, Any] | None = None  # host/pid/job_id of the latest event that names a host

    @property
    def reason(self) -> str | None:
        return self.last_event.get("reason")

    @property
    def exit_code(self) -> int | None:
        return self.last_event.get("exit_code")

    def to_dict(self) -> dict[str, Any]:
        """Flat dict for JSON/CSV listings."""
        ev = self.last_event
        where = self.where or {}
        return {
            "run_id": self.run_id,
            "state": self.state.value,
            "attempt": self.attempt,
            "backend": ev.get("backend") or where.get("backend"),
            "job_id": ev.get("job_id") or where.get("job_id"),
            "host": where.get("host"),
            "pid": where.get("pid"),
            "exit_code": ev.get("exit_code"),
            "reason": ev.get("reason"),
            "updated": ev.get("ts"),
            "heartbeat_age_s": None
            if self.heartbeat_age_s is None
            else round(self.heartbeat_age_s, 1),
        }


# --------------------------------------------------------------------------------------- atomic I/O


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file atomically: ``write(f)`` fills a temp file in the same directory, which is
    flushed, fsync'd and ``os.replace``d onto ``path``, so readers see the old file or the new one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file; StoreError naming the file if it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: corrupt JSON ({e})") from None


# ------------------------------------------------------------------------------------------- events


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All state events of a run, oldest first.

    A torn last line (a writer killed mid-append) and any unparsable line are skipped, so a reader
    never fails on a half-written file.
    """
    try:
        with open(os.path.join(run_dir, EVENTS), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    events = []
    for line in data.splitlines():
        try:
            ev = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if type(ev) is dict and type(ev.get("state")) is str:
            events.append(ev)
    return events


def append_event(run_dir: Path, state: str | RunState, **fields: Any) -> dict[str, Any]:
    """Append one state event under an exclusive lock, flushed and fsync'd.

    ``ts`` is added; ``attempt`` defaults to the attempt of the latest ``running`` event (plus one
    when ``state`` is ``running``). Fields that are None are left out.

    Returns:
        The event as written.
    """
    state = RunState(state).value
    if state not in _WRITABLE:
        raise StoreError(f"{run_dir}: state {state!r} is derived and cannot be written")
    path = Path(run_dir) / EVENTS
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if "attempt" not in fields or fields["attempt"] is None:
                f.seek(0)
                prior = _attempts(f.read())
                fields["attempt"] = prior + 1 if state == "running" else prior
            event = {"ts": round(time.time(), 3), "state": state}
            event.update({k: v for k, v in fields.items() if v is not None})
            line = json.dumps(event, separators=(",", ":")) + "\n"
            f.seek(0, os.SEEK_END)
            if f.tell() and not _ends_with_newline(f):
                line = "\n" + line  # a torn last line must not swallow this event
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return event


def _ends_with_newline(f: Any) -> bool:
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(0, os.SEEK_END)
    return last == b"\n"


def _attempts(data: bytes) -> int:
    n = 0
    for line in data.splitlines():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            ev = json.loads(line)
            if ev.get("state") == "running":
                n = max(n, int(ev.get("attempt") or 0))
    return n


def attempts(events: list[dict[str, Any]]) -> int:
    """Number of attempts (``running`` events) so far."""
    return max((int(e.get("attempt") or 0) for e in events if e["state"] == "running"), default=0)


def derive_state(
    events: list[dict[str, Any]],
    heartbeat_mtime: float | None,
    now: float,
    stale_after_s: float,
) -> str:
    """The run's state from its events and heartbeat.

    ``planned`` without events; otherwise the last event's state, except that a ``running`` run
    whose heartbeat (or, before the first beat, its ``running`` event) is older than
    ``stale_after_s`` is ``stale``.
    """
    if not events:
        return RunState.PLANNED.value
    last = events[-1]
    state = last["state"]
    if state == RunState.RUNNING.value:
        beat = heartbeat_mtime if heartbeat_mtime is not None else float(last.get("ts", 0.0))
        beat = max(beat, float(last.get("ts", 0.0)))
        if now - beat > stale_after_s:
            return RunState.STALE.value
    return state if state in _WRITABLE else RunState.FAILED.value


def heartbeat_mtime(run_dir: Path) -> float | None:
    """mtime of the run's heartbeat file, None if there is none."""
    try:
        return os.stat(os.path.join(run_dir, HEARTBEAT)).st_mtime
    except FileNotFoundError:
        return None


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe directory name; StoreError otherwise."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise StoreError(f"run id {run_id!r}: not a valid run id (letters, digits, _.^+=- only)")
    return run_id


# -------------------------------------------------------------------------------------------- store


class SweepStore:
    """One sweep directory.

    Args:
        root: The sweep directory (``results/<sweep>``).
        stale_after_s: Heartbeat age after which a running run counts as stale; None reads
            ``backend.stale_after_s`` from ``plan.json`` (default 120 s).
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
        path = self.runs_dir / check_run_id(run_id)
        if path.parent != self.runs_dir:
            raise StoreError(f"run id {run_id!r}: escapes {self.runs_dir}")
        return path

    def run_ids(self) -> list[str]:
        """Ids of every run with a record, sorted."""
        try:
            names = os.listdir(self.runs_dir)
        except FileNotFoundError:
            return []
        base = str(self.runs_dir)
        return sorted(
            n
            for n in names
            if _RUN_ID.fullmatch(n) and os.path.isfile(os.path.join(base, n, RECORD))
        )

    @property
    def stale_after_s(self) -> float:
        if self._stale_after_s is None:
            try:
                plan = read_json(self.root / PLAN)
                self._stale_after_s = float(plan.get("backend", {}).get("stale_after_s"))
            except (StoreError, TypeError, ValueError, AttributeError):
                self._stale_after_s = DEFAULT_STALE_AFTER_S
        return self._stale_after_s

    # ---- records
    def load_record(self, run_id: str) -> dict[str, Any]:
        """The run record ``runs/<id>/run.json``."""
        return read_json(self.run_dir(run_id) / RECORD)

    def write_record(self, record: dict[str, Any], *, overwrite: bool = False) -> bool:
        """Create ``runs/<id>/run.json`` atomically.

        An existing record is only replaced with ``overwrite=True`` (used to update a run's
        horizon list, never its training config).

        Returns:
            True if the record was written.
        """
        rd = self.run_dir(record["id"])
        path = rd / RECORD
        if path.exists() and not overwrite:
            return False
        rd.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
        return True

    def load_plan(self) -> dict[str, Any]:
        """``plan.json``; StoreError if this is not a sweep directory."""
        if not self.exists():
            raise StoreError(f"{self.root}: not a sweep directory (no {PLAN})")
        return read_json(self.root / PLAN)

    def write_plan(self, plan: dict[str, Any]) -> None:
        """Atomically write ``plan.json``."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / PLAN, plan)

    # ---- state
    def events(self, run_id: str) -> list[dict[str, Any]]:
        """The run's events (see :func:`read_events`)."""
        return read_events(self.run_dir(run_id))

    def append_event(self, run_id: str, state: str | RunState, **fields: Any) -> dict[str, Any]:
        """Append an event to run ``run_id`` (see :func:`append_event`)."""
        return append_event(self.run_dir(run_id), state, **fields)

    def status(self, run_id: str, now: float | None = None) -> RunStatus:
        """Current :class:`RunStatus` of one run."""
        rd = self.run_dir(run_id)
        return self._status(run_id, rd, time.time() if now is None else now)

    def _status(self, run_id: str, rd: str | Path, now: float) -> RunStatus:
        events = read_events(rd)
        beat = heartbeat_mtime(rd) if events and events[-1]["state"] == "running" else None
        state = RunState(derive_state(events, beat, now, self.stale_after_s))
        return RunStatus(
            run_id=run_id,
            state=state,
            attempt=attempts(events),
            last_event=events[-1] if events else {},
            heartbeat_age_s=None if beat is None else now - beat,
            where=next((e for e in reversed(events) if "host" in e), None),
        )

    def statuses(self, run_ids: list[str] | None = None) -> dict[str, RunStatus]:
        """Status of every run (or of ``run_ids``), keyed by id, in id order."""
        now = time.time()
        ids = self.run_ids() if run_ids is None else run_ids
        base = str(self.runs_dir)
        return {rid: self._status(rid, os.path.join(base, check_run_id(rid)), now) for rid in ids}

    # ---- locking
    @contextlib.contextmanager
    def lock(self, timeout_s: float | None = None) -> Iterator[None]:
        """Sweep-level exclusive lock (``<sweep>/.lock``) held while selecting and claiming runs.

        Args:
            timeout_s: Give up with StoreError after this long; None waits forever.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            if not try_flock(f.fileno(), timeout_s):
                raise StoreError(f"{self.root}: locked by another sweeper process")
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


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
