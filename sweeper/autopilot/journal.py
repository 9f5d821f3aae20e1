"""``<sweep>/autopilot.jsonl``: every decision of the autopilot, and the state it resumes from.

One JSON object per line, appended under an exclusive lock and fsync'd (a torn last line from a
kill is skipped). ``event`` is one of:

* ``start``: an autopilot call began (its options);
* ``wave``: a wave's proposals, each with its reason (``wave`` 0 is the spec's grid);
* ``applied``: the wave's points were added to the sweep (the new run ids);
* ``stop``: a run stopped early, with its rule, reason and evidence;
* ``wave_end``: the wave's runs ended; compute spent, cells identified;
* ``finish``: why the autopilot stopped (``tolerance``, ``budget``, ``max_waves``, ``no
  proposals``).

On restart :func:`replay` gives the last finished wave, the open wave (proposed but not ended: its
proposals are used again, never recomputed) and the runs already stopped, so no decision is made
twice.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

JOURNAL = "autopilot.jsonl"


class Journal:
    """The decision log of one sweep."""

    def __init__(self, sweep_root: Path) -> None:
        self.path = Path(sweep_root) / JOURNAL

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, oldest first."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in data.splitlines():
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn write
            if isinstance(rec, dict) and isinstance(rec.get("event"), str):
                out.append(rec)
        return out

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record (``ts`` and ``event`` added), locked, flushed and fsync'd."""
        rec = {"ts": round(time.time(), 3), "event": event, **fields}
        line = orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn last line must not swallow this record
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec


@dataclass
class Progress:
    """What the journal says has happened.

    Attributes:
        waves_done: Waves whose runs ended (the next wave is this number).
        open_wave: The ``wave`` record of a wave proposed but not ended, if any.
        applied: Whether the open wave's points were added to the sweep.
        stops: Run id to its ``stop`` record.
        finish: The last ``finish`` record after the last ``start``, if the last call finished.
        spent: The ``wave_end`` records, in order.
    """

    waves_done: int = 0
    open_wave: dict[str, Any] | None = None
    applied: bool = False
    stops: dict[str, dict[str, Any]] = field(default_factory=dict)
    finish: dict[str, Any] | None = None
    spent: list[dict[str, Any]] = field(default_factory=list)


def replay(records: list[dict[str, Any]]) -> Progress:
    """The :class:`Progress` the records describe."""
    p = Progress()
    for rec in records:
        ev = rec["event"]
        if ev == "start":
            p.finish = None
        elif ev == "wave":
            p.open_wave, p.applied = rec, False
        elif ev == "applied":
            p.applied = True
        elif ev == "stop" and isinstance(rec.get("run_id"), str):
            p.stops.setdefault(rec["run_id"], rec)
        elif ev == "wave_end":
            p.waves_done = max(p.waves_done, int(rec.get("wave", 0)) + 1)
            p.open_wave, p.applied = None, False
            p.spent.append(rec)
        elif ev == "finish":
            p.finish = rec
    return p
