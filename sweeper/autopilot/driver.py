"""The wave loop, over the :class:`sweeper.Sweep` API only (``apply``, ``launch``/``resume``,
``collect``, the store's events), with every decision in ``autopilot.jsonl`` before it acts.

Wave 0 is the spec's grid. After each wave: collect, find the optima with their intervals, judge
every cell, propose runs (:mod:`~sweeper.autopilot.proposals`), apply them, launch. During a wave
the stop rules (:mod:`~sweeper.autopilot.rules`) run after every round of the ``sim`` backend, or
every ``poll_s`` seconds on the others; a stop is logged, written to the run's
``stop_request.json`` and sent as the backend's cancel, and the run ends ``stopped`` (its data
kept, its last event saying why). A killed autopilot resumes from the journal: the open wave's
proposals are applied again (idempotent), its runs resumed, and runs already stopped stay stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sweeper.autopilot import estimates, proposals, rules
from sweeper.autopilot.config import AutopilotConfig
from sweeper.autopilot.journal import Journal, Progress, replay
from sweeper.backends import load_backend
from sweeper.backends.sim import request_stop, round_hook
from sweeper.errors import SpecError, StoreError
from sweeper.plan import extra_point
from sweeper.records import RunState

log = logging.getLogger(__name__)
LOCK = ".autopilot.lock"
# States a stopped-on-request run may be in before it is recorded as stopped.
_FINALIZABLE = {RunState.PLANNED, RunState.SUBMITTED, RunState.CANCELLED, RunState.FAILED,
                RunState.STALE}  # fmt: skip


@dataclass(frozen=True)
class AutopilotReport:
    """What an autopilot call ended with.

    Attributes:
        finished: Why it stopped: ``tolerance`` (every cell identified), ``budget``,
            ``max_waves`` or ``no proposals``.
        waves: Waves done (the spec's grid is wave 0).
        cells: One row per (model, layout, B, D) cell: ``identified``, ``why``, the estimate of
            log2 eta* and its interval, the optimal loss ``y0``.
        spent_tokens: Tokens trained by the sweep's runs.
        spent_flops: FLOPs spent by the sweep's runs.
        runs: Runs in the sweep.
        stopped: Runs stopped early.
        journal: The decision log.
    """

    finished: str
    waves: int
    cells: pd.DataFrame
    spent_tokens: int
    spent_flops: float
    runs: int
    stopped: int
    journal: Path

    @property
    def identified(self) -> int:
        """Cells identified to the tolerance."""
        return int(self.cells["identified"].sum()) if len(self.cells) else 0


def run_autopilot(
    sweep: Any,
    *,
    backend: str | None = None,
    max_parallel: int | None = None,
    progress: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> AutopilotReport:
    """Run waves on ``sweep`` until every cell's eta* is identified or a limit is reached.

    Args:
        sweep: A :class:`sweeper.Sweep` (created from a spec; its grid is wave 0).
        backend: Backend name (default: the spec's).
        max_parallel: Runs at once (backends that take it).
        progress: Show the backend's progress bar.
        on_event: Called with every journal record as it is written (e.g. to print progress).
        **options: :class:`AutopilotConfig` fields overriding the spec's ``[autopilot]``.

    Raises:
        SpecError: a bad option. StoreError: another autopilot holds the sweep.
    """
    cfg = sweep.spec.section("autopilot") or AutopilotConfig()
    if options:
        cfg = cfg.replace(**options)
    with _exclusive(sweep.root):
        pilot = _Pilot(sweep, cfg, backend or sweep.spec.backend.name, max_parallel, progress)
        pilot.on_event = on_event
        return pilot.run()


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{root}: an autopilot is already running on this sweep") from None
        yield
    finally:
        os.close(fd)


class _Pilot:
    """One autopilot call: the journal, the stops of this call, the loop."""

    def __init__(
        self,
        sweep: Any,
        cfg: AutopilotConfig,
        backend: str,
        max_parallel: int | None,
        progress: bool,
    ) -> None:
        self.sweep, self.cfg, self.backend = sweep, cfg, backend
        self.max_parallel, self.progress = max_parallel, progress
        self.journal = Journal(sweep.root)
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.stops: dict[str, dict[str, Any]] = {}
        self.wave = 0
        self.lock = threading.Lock()
        self.last: tuple[estimates.Snapshot, pd.DataFrame] | None = None  # of the wave's end

    def _log(self, event: str, **fields: Any) -> dict[str, Any]:
        rec = self.journal.append(event, **fields)
        if self.on_event is not None:
            self.on_event(rec)
        return rec

    # ---- the loop
    def run(self) -> AutopilotReport:
        prog = replay(self.journal.records())
        self.stops = dict(prog.stops)
        self._log("start", backend=self.backend, options=dataclasses.asdict(self.cfg),
                  resumed_from_wave=prog.waves_done)  # fmt: skip
        self._finalize_stops()
        if prog.open_wave is not None:
            self._wave(int(prog.open_wave["wave"]), _points(prog.open_wave), prog, resume=True)
        elif prog.waves_done == 0:
            runs = len(self.sweep.store.run_ids())
            self._log("wave", wave=0, proposals=[], note=f"the spec's grid: {runs} runs")
            self._wave(0, [], prog, resume=False)
        while True:
            snap, cells = self.last or self._judge()
            self.last = None
            why = self._finished(snap, cells)
            props = [] if why else self._proposals(snap, cells)
            if not why and not props:
                why = "no proposals"
            if why:
                return self._finish(why, snap, cells)
            self.wave += 1
            self._log("wave", wave=self.wave, proposals=[_as_record(p) for p in props],
                      **_cell_counts(cells))  # fmt: skip
            self._wave(self.wave, [p.point() for p in props], Progress(), resume=False)

    def _finished(self, snap: estimates.Snapshot, cells: pd.DataFrame) -> str:
        if len(cells) and bool(cells["identified"].all()):
            return "tolerance"
        cfg = self.cfg
        if cfg.budget_tokens and snap.spent_tokens >= cfg.budget_tokens:
            return "budget"
        if cfg.budget_flops and snap.spent_flops >= cfg.budget_flops:
            return "budget"
        if self.wave >= cfg.max_waves:
            return "max_waves"
        return ""

    def _proposals(self, snap: estimates.Snapshot, cells: pd.DataFrame) -> list[proposals.Proposal]:
        """The next wave's proposals that the spec accepts, trimmed to the budget."""
        out = []
        for i, p in enumerate(proposals.propose(snap, self.cfg, cells)):
            try:
                extra_point(p.point(), self.sweep.spec, f"proposal[{i}]")
            except SpecError as e:
                log.info("autopilot: proposal dropped: %s", e)
                continue
            out.append(p)
        tokens = self.cfg.budget_tokens
        if tokens and out:
            room = tokens - snap.spent_tokens
            per_run = max(int(d) for hs in snap.runs["horizons_tokens"] for d in hs)
            out = out[: max(0, room // max(1, per_run))] if room < per_run * len(out) else out
        return out

    def _wave(self, wave: int, points: list[dict[str, Any]], prog: Progress, resume: bool) -> None:
        self.wave = wave
        if points:
            new = self.sweep.apply(points)
            if not (resume and prog.applied):
                self._log("applied", wave=wave, new_runs=list(new))
        with self._monitor():
            opts = {"backend": self.backend, "max_parallel": self.max_parallel,
                    "progress": self.progress}  # fmt: skip
            if resume:
                self.sweep.resume(**opts)
            else:
                self.sweep.launch(**opts)
        self._finalize_stops()
        snap, cells = self.last = self._judge()  # the next wave is planned from this snapshot
        self._log("wave_end", wave=wave, spent_tokens=snap.spent_tokens,
                  spent_flops=snap.spent_flops, runs=len(snap.runs), stopped=len(self.stops),
                  **_cell_counts(cells))  # fmt: skip

    def _finish(self, why: str, snap: estimates.Snapshot, cells: pd.DataFrame) -> AutopilotReport:
        self._log("finish", reason=why, wave=self.wave, spent_tokens=snap.spent_tokens,
                  spent_flops=snap.spent_flops, **_cell_counts(cells))  # fmt: skip
        return AutopilotReport(
            why, self.wave, cells, snap.spent_tokens, snap.spent_flops, len(snap.runs),
            len(self.stops), self.journal.path,
        )  # fmt: skip

    def _judge(self) -> tuple[estimates.Snapshot, pd.DataFrame]:
        snap = self._snapshot()
        return snap, proposals.verdicts(snap, self.cfg)

    def _snapshot(self) -> estimates.Snapshot:
        self.sweep.collect()
        return estimates.take(self.sweep.root, self.cfg.n_boot)

    # ---- stops
    @contextlib.contextmanager
    def _monitor(self) -> Iterator[None]:
        """Stop checks during a wave: after each sim round, or on a polling thread."""
        if not self.cfg.early_stop:
            yield
            return
        if self.backend == "sim":
            with round_hook(self.sweep.root, self._on_round):
                yield
            return
        done = threading.Event()

        def poll() -> None:
            while not done.wait(self.cfg.poll_s):
                try:
                    self.check_stops()
                except Exception as e:  # noqa: BLE001 - a failed check must not end the wave
                    log.warning("autopilot: stop check failed: %s", e)

        thread = threading.Thread(target=poll, name="autopilot-stops", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _on_round(self, _store: Any) -> None:
        self.check_stops()

    def check_stops(self) -> list[rules.Stop]:
        """Apply the stop rules to the sweep as it is now; log and send every stop."""
        with self.lock:
            snap = self._snapshot()
            stops = rules.decide_stops(snap, self.cfg, set(self.stops))
            for s in stops:
                rec = self._log("stop", wave=self.wave, run_id=s.run_id, rule=s.rule,
                                reason=s.reason, evidence=s.evidence)  # fmt: skip
                self.stops[s.run_id] = rec
                self._send(s.run_id, rec)
            return stops

    def _send(self, run_id: str, rec: dict[str, Any]) -> None:
        store = self.sweep.store
        why = f"{rec['rule']}: {rec['reason']}"  # the run's last event says which rule and why
        request_stop(store, run_id, RunState.STOPPED, reason=why, rule=rec["rule"])
        if self.backend != "sim":
            cfg = self.sweep.spec.backend.config(self.backend)
            load_backend(self.backend, cfg).cancel(store, [run_id])

    def _finalize_stops(self) -> None:
        """Record ``stopped`` for every logged stop whose run ended otherwise (e.g. cancelled by
        the backend's cancel, or failed when a killed launcher's run was reconciled)."""
        store = self.sweep.store
        for run_id, rec in self.stops.items():
            with contextlib.suppress(StoreError):
                st = store.status(run_id)
                if st.state in _FINALIZABLE:
                    reason = f"{rec.get('rule', 'stop')}: {rec.get('reason', '')}"
                    store.append_if(run_id, RunState.STOPPED, expect=st.last_event,
                                    backend=self.backend, reason=reason)  # fmt: skip


def _points(wave: dict[str, Any]) -> list[dict[str, Any]]:
    return [p["point"] for p in wave.get("proposals", []) if isinstance(p, dict) and "point" in p]


def _as_record(p: proposals.Proposal) -> dict[str, Any]:
    return {"point": p.point(), "reason": p.reason, "layout": p.layout}


def _cell_counts(cells: pd.DataFrame) -> dict[str, Any]:
    if cells.empty:
        return {"cells": 0, "identified": 0}
    return {"cells": len(cells), "identified": int(cells["identified"].sum())}
