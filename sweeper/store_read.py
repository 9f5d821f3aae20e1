"""Reading a sweep's files without trusting them: every reader here names the file and says what
is wrong, never blocks on a FIFO, never follows a symlink out of the sweep, never reads more than a
bound, and never raises for damage it can describe.

Used by :mod:`sweeper.store`, which turns what they report into a run's ``error`` state.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sweeper.errors import StoreError
from sweeper.records import SAFE_NAME, RecordError, RunEvent, RunKind

EVENTS = "events.jsonl"
RECORD = "run.json"
LOCK = ".lock"
MAX_EVENTS_BYTES = 16 << 20  # an events file past this is damage, not history
MAX_RECORD_BYTES = 4 << 20
# O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer (and a
# regular file ignores the flag). O_NOFOLLOW: a symlink in the last component is refused.
_SAFE_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {k.value for k in RunKind}


def read_bytes(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Raises:
        StoreError: naming the file: missing, a symlink, a directory, a FIFO or device, larger
            than ``max_bytes``, or unreadable.
    """
    try:
        fd = os.open(path, _SAFE_READ)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"{path}: is a symlink; refused") from None
        raise StoreError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise StoreError(f"{path}: {what}")
        data = _read_fd(fd, st.st_size, max_bytes)
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise StoreError(f"{path}: larger than {max_bytes} bytes")
    return data


def _read_fd(fd: int, size: int, max_bytes: int) -> bytes:
    """Up to ``max_bytes + 1`` bytes of an open regular file of ``size`` bytes (at the fstat).

    Sized by the fstat: a buffered ``read(max_bytes + 1)`` allocates the whole bound first, which
    cost ~40 us a file (most of ``statuses()``'s reading).
    """
    data = os.read(fd, min(size, max_bytes) + 1)
    if len(data) == size or len(data) > max_bytes:
        return data  # the whole file (a read of a regular file stops short only at its end)
    parts, total = [data], len(data)  # it changed since the fstat: read on, to the bound
    while total <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total))):
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def read_json(path: str | Path, max_bytes: int = 64 << 20) -> Any:
    """A JSON file of the sweep; StoreError naming the file if it is missing, not a regular file
    (symlinks included), larger than ``max_bytes`` or corrupt."""
    data = read_bytes(path, max_bytes)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{path}: corrupt JSON ({' '.join(str(e).split())})") from None


# ------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class EventLog:
    """A run's valid events, and the first damage found (a line that is not a valid event, or an
    events file that cannot be read); None when the log is sound."""

    events: list[RunEvent]
    error: str | None = None


def read_event_log(run_dir: str | Path) -> EventLog:
    """All valid state events of a run, oldest first; never raises.

    A writer killed mid-line leaves a *torn* line: the start of a JSON object that never reached
    its closing brace (the next append starts on a new line). Such lines are skipped silently.
    Every other bad line (not JSON, a JSON value that is not a valid event) is damage: it is
    skipped too, and the first one is reported in ``error``, so the run's state can still be told
    from the lines around it.
    """
    path = os.path.join(run_dir, EVENTS)
    try:
        data = read_bytes(path, MAX_EVENTS_BYTES)
    except StoreError as e:
        if not os.path.lexists(path):
            return EventLog([])
        return EventLog([], _relative(str(e), path, EVENTS))
    events: list[RunEvent] = []
    error = None
    for n, line in enumerate(data.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            events.append(RunEvent.from_dict(orjson.loads(stripped)))
        except orjson.JSONDecodeError:
            if stripped.startswith(b"{") and not stripped.endswith(b"}"):
                continue  # a torn write
            error = error or f"{EVENTS} line {n}: not a JSON event ({_preview(stripped)})"
        except RecordError as e:
            error = error or f"{EVENTS} line {n}: {e}"
    return EventLog(events, error)


def _preview(line: bytes, limit: int = 40) -> str:
    text = line[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(line) > limit else ""))


def _relative(message: str, path: str, name: str) -> str:
    """A StoreError message about ``path`` with the path shortened to the file's name."""
    return message.replace(path, name, 1)


# ------------------------------------------------------------------------------------------ records


def record_problem(run_dir: str | Path, record_checked: bool = False) -> str | None:
    """Why a run directory cannot be trusted, by cheap checks, or None.

    Checked: the directory is a real directory; its ``.lock`` is a regular file if it exists;
    ``run.json`` is a regular file holding a JSON object whose ``id`` is the directory's name,
    with a known ``kind`` and a ``train`` object.
    Validating the whole record costs ~0.1 ms a run, too much for ``status`` of 100,000 runs;
    :meth:`SweepStore.load_record` does it when a run is about to start.

    Args:
        record_checked: The caller has just validated ``run.json`` (read without following a
            symlink, within :data:`MAX_RECORD_BYTES`, a valid record of this id), so it is not
            read again: collect reads every record anyway, and ``status`` keeps an index of
            the records it validated (:class:`sweeper.live.RecordIndex`).
    """
    try:
        mode = os.lstat(run_dir).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return "run directory is a symlink; refused"
    if not stat.S_ISDIR(mode):
        return "not a directory"
    try:  # the run's lock: a worker never opens one that is not a regular file
        if not stat.S_ISREG(os.lstat(os.path.join(run_dir, LOCK)).st_mode):
            return f"{LOCK}: not a regular file (a symlink, a directory or a FIFO); refused"
    except FileNotFoundError:
        pass
    if record_checked:
        return None
    path = os.path.join(run_dir, RECORD)
    try:
        raw = orjson.loads(read_bytes(path, MAX_RECORD_BYTES))
    except StoreError as e:
        if not os.path.lexists(path):
            return f"{RECORD} is missing"
        return _relative(str(e), path, RECORD)
    except orjson.JSONDecodeError:
        return f"{RECORD}: corrupt JSON"
    if type(raw) is not dict:
        return f"{RECORD}: expected a JSON object"
    if raw.get("id") != os.path.basename(run_dir):
        return f"{RECORD}: id = {_short(raw.get('id'))} does not match its directory"
    if not isinstance(raw.get("kind"), str) or raw["kind"] not in _KINDS:
        return f"{RECORD}: kind = {_short(raw.get('kind'))}: unknown kind"
    if type(raw.get("train")) is not dict:
        return f"{RECORD}: train: expected an object"
    return None


def _short(value: Any, limit: int = 50) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------- run listing


def scan_runs(runs_dir: Path) -> tuple[list[str], list[str]]:
    """The run entries of ``runs/`` and the strays.

    Returns:
        The ids of every entry that is a run: a directory or symlink (so its status can say a
        symlink is refused) or any other non-regular file whose name is a valid run id, sorted;
        and one line per stray entry that is not a run (a regular file, or a name that is not a
        run id), hidden entries (``.name``) excepted.
    """
    try:
        entries = list(os.scandir(runs_dir))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    except OSError as e:
        return [], [f"{runs_dir}: cannot list ({e.strerror})"]
    runs, strays = [], []
    for entry in entries:
        try:
            regular = entry.is_file(follow_symlinks=False)
        except OSError:
            regular = False
        if SAFE_NAME.fullmatch(entry.name) and ".." not in entry.name and not regular:
            runs.append(entry.name)
        elif not entry.name.startswith("."):
            why = "a file, not a run directory" if regular else "not a valid run id"
            strays.append(f"{runs_dir.name}/{entry.name!r}: {why}; ignored")
    return sorted(runs), sorted(strays)
