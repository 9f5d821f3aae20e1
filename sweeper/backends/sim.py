"""The ``sim`` backend: runs a ``[simulator]`` sweep in-process, thousands of runs in seconds.

Each run is :class:`trainer.sim.SimRun` (the simulated trainer that ``python -m trainer.sim``
runs), driven from the launcher's thread instead of a subprocess, so the run directory gets the
same files: ``trial.json`` as the worker writes it, then the trainer's files, and the events the
worker appends (``running``, then ``completed``/``diverged``/``failed``, with the same exit codes).

Runs advance in lockstep *rounds* (``[backend.sim]``: at every horizon of the launch, shortest
first, and ``rounds_per_octave`` times per doubling of tokens between them), so every launched
run has reached D before any passes it. After each round the backend calls the hooks
registered with :func:`round_hook` for the sweep (the autopilot decides its early stops there) and
ends every run that has a stop request: ``runs/<id>/stop_request.json`` holding ``{"state":
"stopped" | "cancelled", "reason": ...}`` (:func:`request_stop`). Such a run writes its
checkpoint marker and an ``interrupted`` summary, keeps its data, and ends in that state.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sweeper.backends import LaunchOptions, cancel_queued, reconcile_on_this_host
from sweeper.records import RunKind, RunRecord, RunState
from sweeper.store import SweepStore, hostname, pid_alive, read_json, touch, write_json_atomic
from sweeper.worker import TRIAL_FILE, _write_trial
from trainer.config import ConfigError
from trainer.schema import EXIT_BY_STATUS, EXIT_CONFIG, EXIT_CRASH, EXIT_INTERRUPTED, Status
from trainer.sim import SimRun, Trial

STOP_REQUEST = "stop_request.json"
Hook = Callable[[SweepStore], None]
_HOOKS: dict[Path, list[Hook]] = {}
_LIVE: set[tuple[Path, str]] = set()  # (sweep, run id) being simulated by a launch in this process


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """``[backend.sim]``."""

    rounds: bool = True  # advance the runs together, round by round (else one after another)
    rounds_per_octave: int = 2  # rounds per doubling of tokens between horizons (1: horizons only)

    def validate(self) -> None:
        """Raise ConfigError unless every value is usable."""
        if not 1 <= self.rounds_per_octave <= 64:
            raise ConfigError(
                f"backend.sim.rounds_per_octave = {self.rounds_per_octave}: must be in 1..64"
            )


@contextlib.contextmanager
def round_hook(sweep_root: Path, hook: Hook) -> Iterator[None]:
    """Call ``hook(store)`` after every round of a sim launch of this sweep (same process)."""
    key = Path(sweep_root).resolve()
    _HOOKS.setdefault(key, []).append(hook)
    try:
        yield
    finally:
        _HOOKS[key].remove(hook)
        if not _HOOKS[key]:
            del _HOOKS[key]


def request_stop(store: SweepStore, run_id: str, state: RunState, **doc: Any) -> None:
    """Ask the run to end in ``state`` (``stopped`` or ``cancelled``) at the next round; ``doc``
    (``reason``, evidence) is kept in ``stop_request.json``."""
    write_json_atomic(store.run_dir(run_id) / STOP_REQUEST, {"state": state.value, **doc})


def stop_request(store: SweepStore, run_id: str) -> dict[str, Any] | None:
    """The run's stop request, if it has one."""
    path = store.run_dir(run_id) / STOP_REQUEST
    if not path.exists():
        return None
    with contextlib.suppress(Exception):
        doc = read_json(path)
        if isinstance(doc, dict) and doc.get("state") in ("stopped", "cancelled"):
            return doc
    return None


@dataclass
class _Active:
    record: RunRecord
    sim: SimRun
    started: Any  # the running event


class SimBackend:
    """In-process simulator (blocking: :meth:`launch` returns when the runs ended)."""

    name: ClassVar[str] = "sim"
    blocking: ClassVar[bool] = True
    Config: ClassVar[type[SimConfig]] = SimConfig

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()

    def launch(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> None:
        """Run ``runs`` (claimed as ``submitted``): trunks and single runs, then the branches."""
        first = [r for r in runs if r.kind != RunKind.BRANCH]
        branches = [r for r in runs if r.kind == RunKind.BRANCH]
        root = store.root.resolve()
        for phase in (first, branches):
            active = [a for r in phase if (a := self._start(store, r)) is not None]
            live = {(root, a.record.id) for a in active}
            _LIVE.update(live)
            try:
                for until in self._rounds(active):
                    self._round(store, active, until)
                    active = [a for a in active if a.sim.step <= a.sim.total]
            finally:
                _LIVE.difference_update(live)

    def _rounds(self, active: list[_Active]) -> list[int | None]:
        if not self.config.rounds:
            return [None]
        tokens = sorted({d for a in active for d in a.record.train.horizons_tokens})
        k = self.config.rounds_per_octave
        between = [
            int(lo * 2 ** (j / k))
            for lo, hi in zip(tokens, tokens[1:], strict=False)
            for j in range(1, k * 64)
            if lo * 2 ** (j / k) < hi
        ]
        return [*sorted(set(tokens[:-1]) | set(between)), None]

    def _start(self, store: SweepStore, record: RunRecord) -> _Active | None:
        """Claim one run (it must still be ``submitted``), write ``trial.json`` and open it."""
        rid = record.id
        with store.run_lock(rid, timeout_s=0) as got:
            if not got or store.status(rid).state != RunState.SUBMITTED:
                return None
            rd = store.run_dir(rid)
            trial = _write_trial(store, rd, record, None)
            started = store.append_event(
                rid, RunState.RUNNING, backend=self.name, host=hostname(), pid=os.getpid()
            )
        try:
            sim = SimRun(Trial.from_dict(json.loads(trial.read_text())), rd)
            done = sim.open()
        except ConfigError as e:
            self._finish(store, rid, RunState.FAILED, EXIT_CONFIG, started, reason=str(e))
            return None
        active = _Active(record, sim, started)
        if done is not None:  # the directory already holds a finished run
            self._outcome(store, active, done)
            return None
        return active

    def _round(self, store: SweepStore, active: list[_Active], until_tokens: int | None) -> None:
        for a in active:
            until = None if until_tokens is None else until_tokens // a.record.tokens_per_step
            try:
                summary = a.sim.advance(until_step=until)
            except Exception as e:  # noqa: BLE001 - one broken run must not stop the launch
                self._crash(store, a, e)
                continue
            if summary is not None:
                self._outcome(store, a, summary)
        live = [a for a in active if a.sim.step <= a.sim.total]
        for a in live:
            with contextlib.suppress(OSError):
                touch(store.run_dir(a.record.id), "heartbeat")
        for hook in list(_HOOKS.get(store.root.resolve(), [])) if live else []:
            hook(store)  # (not after the last round: no run is left to stop)
        for a in live:
            req = stop_request(store, a.record.id)
            if req is not None:
                summary = a.sim.advance(stop=_constant(str(req.get("reason") or req["state"])))
                assert summary is not None
                self._outcome(store, a, summary, RunState(req["state"]))

    def _outcome(
        self,
        store: SweepStore,
        a: _Active,
        summary: dict[str, Any],
        interrupted: RunState = RunState.CANCELLED,
    ) -> None:
        """The final event from the summary, as the worker records it."""
        status = Status(summary["status"])
        a.sim.step = a.sim.total + 1  # ended: out of every later round
        code = EXIT_BY_STATUS[status]
        if status == Status.COMPLETED:
            self._finish(store, a.record.id, RunState.COMPLETED, code, a.started)
        elif status == Status.DIVERGED:
            why = summary.get("reason") or "diverged"
            self._finish(store, a.record.id, RunState.DIVERGED, code, a.started, reason=why)
        else:
            why = summary.get("reason") or "interrupted"
            self._finish(store, a.record.id, interrupted, EXIT_INTERRUPTED, a.started, reason=why)

    def _crash(self, store: SweepStore, a: _Active, e: Exception) -> None:
        a.sim.step = a.sim.total + 1
        tail = "".join(traceback.format_exception(e))[-2000:]
        why = f"simulator crashed: {type(e).__name__}: {e}"
        self._finish(store, a.record.id, RunState.FAILED, EXIT_CRASH, a.started, reason=why,
                     stderr_tail=tail)  # fmt: skip

    def _finish(
        self, store: SweepStore, rid: str, state: RunState, code: int, started: Any, **fields: Any
    ) -> None:
        store.append_event(
            rid, state, exit_code=code, attempt=started.attempt, backend=self.name, **fields
        )
        with contextlib.suppress(FileNotFoundError):
            (store.run_dir(rid) / STOP_REQUEST).unlink()

    # ---- the rest of the protocol
    def describe(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> str:
        """The runs a launch would simulate."""
        lines = [f"sim: {len(runs)} runs in-process on {hostname()}"]
        lines += [f"  {r.id}  ({r.steps - r.start_step} steps)" for r in runs]
        return "\n".join(lines)

    def reconcile(self, store: SweepStore) -> None:
        """A submitted/running sim run whose launcher on this host is gone: failed/cancelled."""
        root = store.root.resolve()

        def alive(rid: str, pid: int) -> bool:
            # a run this process simulates is alive; this process's pid on a run it does not
            # simulate is a launcher that died and whose pid came back to this process
            return (root, rid) in _LIVE or (pid_alive(pid) and pid != os.getpid())

        reconcile_on_this_host(store, self.name, "sim launcher", alive)

    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """Queued runs end ``cancelled`` now; running ones at the end of their launcher's round."""
        for rid in run_ids:
            if cancel_queued(store, rid, self.name).state == RunState.RUNNING:
                request_stop(store, rid, RunState.CANCELLED, reason="cancelled by user")


def _constant(reason: str) -> Callable[[], str | None]:
    return lambda: reason


Backend = SimBackend

__all__ = ["STOP_REQUEST", "SimBackend", "SimConfig", "TRIAL_FILE", "request_stop", "round_hook"]
