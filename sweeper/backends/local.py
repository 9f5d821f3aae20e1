"""Local backend: up to ``max_parallel`` trials at once on this machine, each a thread calling
:func:`sweeper.worker.run_trial` (the trainer itself is a subprocess).

CPU threads are split between trials (``OMP_NUM_THREADS`` = cores // max_parallel) and each trial
gets its own GPU when there are any. SIGINT/SIGTERM stop the running trials cleanly: the trainers
get SIGTERM, checkpoint, and the runs are recorded as ``cancelled``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sweeper.backends import LaunchOptions, cancel_queued, reconcile_on_this_host
from sweeper.records import RunRecord, RunState
from sweeper.store import SweepStore, hostname, pid_alive
from sweeper.worker import run_trial, signal_trainer
from trainer.config import ConfigError
from trainer.schema import CKPT_DIR, checkpoint_name

# How long a trial waits for a run lock still held by a dying orphan trainer of a killed launcher.
ORPHAN_LOCK_WAIT_S = 60.0


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


@dataclass(frozen=True, kw_only=True)
class LocalConfig:
    """``[backend.local]``."""

    max_parallel: int = 1  # trials at once on this host

    def validate(self) -> None:
        cores = os.cpu_count() or 1
        if not 1 <= self.max_parallel <= max(64, 4 * cores):
            raise ConfigError(
                f"backend.local.max_parallel = {self.max_parallel}: must be in "
                f"1..{max(64, 4 * cores)} (this host has {cores} cores)"
            )


class LocalBackend:
    """Runs trials in threads on this host (blocking: :meth:`launch` returns when they ended)."""

    name: ClassVar[str] = "local"
    blocking: ClassVar[bool] = True
    Config: ClassVar[type[LocalConfig]] = LocalConfig

    def __init__(self, config: LocalConfig | None = None, cpu_count: int | None = None) -> None:
        self.config = config or LocalConfig()
        self.cpu_count = cpu_count or len(os.sched_getaffinity(0))

    # ---- launch
    def launch(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> None:
        """Run ``runs`` (already claimed as ``submitted``) to completion, branches after trunks."""
        if not runs:
            return
        stop = threading.Event()
        parallel = opts.max_parallel or self.config.max_parallel
        tokens = sum(r.trained_tokens for r in runs)
        with _stop_on_signals(stop), _progress(opts.progress, len(runs), tokens) as bar:
            _Scheduler(self, store, runs, parallel, stop, bar).run()
        if stop.is_set():
            raise KeyboardInterrupt  # the caller reports the interruption (exit 130)

    def describe(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> str:
        """The runs a launch would start, and how many at once."""
        parallel = opts.max_parallel or self.config.max_parallel
        lines = [f"local: {len(runs)} runs, {parallel} at once on {hostname()}"]
        lines += [f"  {r.id}  ({r.steps - r.start_step} steps)" for r in runs]
        return "\n".join(lines)

    def trial_env(self, max_parallel: int, gpu: str | None) -> dict[str, str]:
        """Environment of one trial: its GPU, or its share of the CPU threads."""
        if gpu is not None:
            return {"CUDA_VISIBLE_DEVICES": gpu}
        threads = max(1, self.cpu_count // max(1, max_parallel))
        return {"OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}

    # ---- reconcile / cancel
    def reconcile(self, store: SweepStore) -> None:
        """A submitted/running local run whose process on this host is gone: failed/cancelled."""
        reconcile_on_this_host(store, "local", "local process", lambda _rid, pid: pid_alive(pid))

    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """SIGTERM the trainers of running runs (they checkpoint and end ``cancelled``); queued
        runs are marked ``cancelled`` so their launcher skips them."""
        for rid in run_ids:
            st = cancel_queued(store, rid, "local")
            ev = st.last_event
            if st.state == RunState.RUNNING and ev is not None and ev.host == hostname():
                signal_trainer(store.run_dir(rid), signal.SIGTERM)


Backend = LocalBackend


class _Scheduler:
    """Feeds ready runs to a thread pool; a branch becomes ready when its trunk completed."""

    def __init__(
        self,
        backend: LocalBackend,
        store: SweepStore,
        runs: list[RunRecord],
        parallel: int,
        stop: threading.Event,
        bar: Any,
    ) -> None:
        self.backend, self.store, self.stop, self.bar = backend, store, stop, bar
        self.pending = [r.id for r in runs]
        self.parents = {r.id: r.parent for r in runs}
        self.forks = {r.id: r.start_step for r in runs}
        self.tokens = {r.id: r.trained_tokens for r in runs}
        self.in_batch = set(self.pending)
        self.finished: dict[str, str] = {}
        self.parallel = max(1, parallel)
        self.gpus: queue.Queue[str | None] = queue.Queue()
        gpus = visible_gpus()
        for i in range(self.parallel):
            self.gpus.put(gpus[i % len(gpus)] if gpus else None)

    def run(self) -> None:
        running: dict[Future[dict[str, Any]], str] = {}
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="trial") as pool:
            while self.pending or running:
                if not self.stop.is_set():
                    self._start_ready(pool, running)
                if not running:
                    if self.stop.is_set() or not self.pending:
                        break
                    self._drop_blocked()
                    continue
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    self._finish(running.pop(fut), fut)
        self._cancel_unstarted()

    def _start_ready(self, pool: ThreadPoolExecutor, running: dict[Future[Any], str]) -> None:
        for rid in list(self.pending):
            if len(running) >= self.parallel:
                return
            ready = self._ready(rid)
            if ready is None:
                continue
            self.pending.remove(rid)
            if ready:
                running[pool.submit(self._trial, rid)] = rid

    def _ready(self, rid: str) -> bool | None:
        """True: start; False: drop (no longer ours); None: wait for the trunk."""
        if self.store.status(rid).state != RunState.SUBMITTED:
            self._advance(rid, "skipped")  # not a state: the bar counts it apart
            return False
        parent = self.parents.get(rid)
        if parent is None:
            return True
        # A branch needs its trunk's checkpoint at the fork, not the whole trunk: start as soon
        # as that (permanent) checkpoint exists.
        if self._fork_exists(rid, parent):
            return True
        if parent in self.in_batch and parent not in self.finished:
            return None
        if self.store.status(parent).state == RunState.COMPLETED:
            return True
        self.store.append_event(
            rid,
            RunState.CANCELLED,
            backend="local",
            reason=f"trunk {parent} is not completed and has no checkpoint at the fork",
        )
        self._advance(rid, RunState.CANCELLED)
        return False

    def _fork_exists(self, rid: str, parent: str) -> bool:
        step = self.forks.get(rid, 0)
        ckpt = self.store.run_dir(parent) / CKPT_DIR / checkpoint_name(step)
        return step > 0 and ckpt.is_file()

    def _drop_blocked(self) -> None:
        for rid in list(self.pending):
            if self._ready(rid) is None:  # trunk never started: cannot happen unless skipped
                self.pending.remove(rid)
                self.store.append_event(
                    rid,
                    RunState.CANCELLED,
                    backend="local",
                    reason=f"trunk {self.parents[rid]} did not run",
                )
                self._advance(rid, RunState.CANCELLED)

    def _trial(self, rid: str) -> dict[str, Any]:
        gpu = self.gpus.get()
        try:
            return run_trial(
                self.store.root,
                rid,
                backend="local",
                env=self.backend.trial_env(self.parallel, gpu),
                on_interrupt=RunState.CANCELLED,
                stop_event=self.stop,
                wait_lock_s=ORPHAN_LOCK_WAIT_S,
            )
        finally:
            self.gpus.put(gpu)

    def _finish(self, rid: str, fut: Future[dict[str, Any]]) -> None:
        try:
            state = fut.result()["state"]
        except Exception as e:  # noqa: BLE001 - a broken run must not stop the sweep
            self.store.append_event(
                rid, RunState.FAILED, backend="local", reason=f"worker error: {e!r}"
            )
            state = RunState.FAILED
        self.finished[rid] = state
        self._advance(rid, state)

    def _advance(self, rid: str, state: str) -> None:
        self.finished.setdefault(rid, state)
        if self.bar is not None:
            self.bar.advance(state, self.tokens.get(rid, 0))

    def _cancel_unstarted(self) -> None:
        for rid in self.pending:
            if self.store.status(rid).state == RunState.SUBMITTED:
                self.store.append_event(
                    rid, RunState.CANCELLED, backend="local", reason="interrupted before start"
                )


class _Bar:
    """Runs finished by state, and the tokens of the finished runs out of the launch's total."""

    def __init__(self, progress: Progress, runs: int, tokens: int) -> None:
        self.progress = progress
        self.counts: dict[str, int] = {}
        self.runs, self.done = runs, 0
        self.task = progress.add_task("tokens", total=max(1, tokens), counts="")

    def advance(self, state: str, tokens: int) -> None:
        self.counts[state] = self.counts.get(state, 0) + 1
        self.done += 1
        text = f"{self.done}/{self.runs} runs " + " ".join(
            f"{k}={v}" for k, v in sorted(self.counts.items())
        )
        self.progress.update(self.task, advance=tokens, counts=text)


@contextlib.contextmanager
def _progress(show: bool, runs: int, tokens: int) -> Any:
    if not show:
        yield None
        return
    columns = (
        TextColumn("[bold]sweep"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("of {task.total:,.0f} tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[counts]}"),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield _Bar(progress, runs, tokens)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Any:
    """SIGINT/SIGTERM set ``stop`` (only the main thread can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
