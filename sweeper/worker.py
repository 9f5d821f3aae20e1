"""The one function every backend runs on the worker node: :func:`run_trial`.

Local threads, SLURM jobs and Ray trials all call it, so every backend produces identical records::

    python -m sweeper.worker results/demo cpu-tiny_lr2^-6_B16_s30-1a2b3c4d --backend slurm

It takes the run's exclusive lock, appends ``running``, keeps ``heartbeat`` fresh, runs the trainer
as a subprocess (forwarding SIGTERM/SIGUSR2 so it can checkpoint), and appends the final event from
the exit code and ``summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal

from sweeper.store import (
    RECORD,
    RunState,
    SweepStore,
    append_event,
    hostname,
    read_events,
    try_flock,
    write_json_atomic,
)

EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 3, 75  # trainer.config.EXIT_*
TRIAL_FILE = "trial.json"
TRAINER_PID = "trainer.pid"
STDERR_TAIL_CHARS = 2000
_FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

# Makes the trainer receive SIGTERM (and checkpoint) when the thread that started it dies, e.g. when
# the launcher is SIGKILLed, instead of running on as an orphan that a resumed attempt would race.
_PDEATHSIG_SHIM = (
    "import ctypes,os,signal,sys\n"
    "ppid=int(sys.argv[1])\n"
    "try:\n"
    " ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGTERM)\n"
    "except (OSError,AttributeError):\n"
    " pass\n"
    "if os.getppid()!=ppid: sys.exit(75)\n"
    "os.execvp(sys.argv[2],sys.argv[2:])\n"
)


def heartbeat_interval_s() -> float:
    """Seconds between heartbeat touches (``SWEEPER_HEARTBEAT_S``, default 5)."""
    return float(os.environ.get("SWEEPER_HEARTBEAT_S", "5"))


def trainer_command(record: dict[str, Any], trial_json: Path, run_dir: Path) -> list[str]:
    """The trainer command line for a run record.

    ``backend.command`` (a list) replaces the ``python -m trainer`` prefix; with more than one rank
    (``resources.nodes * procs_per_node``) the prefix is ``torchrun``.
    """
    res = record.get("resources") or {}
    custom = (record.get("backend") or {}).get("command")
    nodes, procs = int(res.get("nodes", 1)), int(res.get("procs_per_node", 1))
    if custom:
        prefix = [str(c) for c in custom]
    elif nodes * procs > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}"]
        if nodes > 1:
            rdzv = os.environ.get("SWEEPER_RDZV_ENDPOINT", "localhost:29500")
            prefix += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv}"]
        else:
            # --standalone picks a free port: two multi-rank runs on one node must not share 29500
            prefix.append("--standalone")
        prefix += ["-m", "trainer", "--"]  # "--": torchrun would take --run for its --run-path
    else:
        prefix = [sys.executable, "-m", "trainer"]
    return [*prefix, "--run", str(trial_json), "--out", str(run_dir)]


def run_trial(
    sweep_dir: str | Path,
    run_id: str,
    *,
    backend: str,
    job_id: str | None = None,
    env: dict[str, str] | None = None,
    on_interrupt: Literal["cancelled", "requeue"] = "cancelled",
    stop_event: threading.Event | None = None,
    wait_lock_s: float = 0.0,
) -> dict[str, Any]:
    """Run one trial to its end and record it.

    Args:
        sweep_dir: The sweep directory.
        run_id: The run to execute.
        backend: Backend name recorded in the events.
        job_id: Scheduler job id recorded in the events.
        env: Extra environment variables for the trainer (e.g. ``CUDA_VISIBLE_DEVICES``).
        on_interrupt: What a trainer checkpointed on a signal (exit 75) becomes: ``cancelled``
            (reason ``interrupted``) or, when the caller requeues the job, ``submitted``.
        stop_event: When set (from another thread), the trainer gets SIGTERM and checkpoints.
        wait_lock_s: How long to wait for the run's lock (e.g. held by a dying orphan trainer).

    Returns:
        ``{"run_id", "state", "exit_code"}``; ``state`` is the run's current state when the run was
        already completed or locked by another worker (then ``skipped`` is True).
    """
    store = SweepStore(Path(sweep_dir))
    run_dir = store.run_dir(run_id)
    record = store.load_record(run_id)
    with open(run_dir / ".lock", "a+b") as lock:
        if not try_flock(lock.fileno(), wait_lock_s):
            return {
                "run_id": run_id,
                "state": store.status(run_id).state.value,
                "exit_code": None,
                "skipped": True,
            }
        events = read_events(run_dir)
        if events and events[-1]["state"] == RunState.COMPLETED.value:
            return {"run_id": run_id, "state": "completed", "exit_code": None, "skipped": True}
        return _execute(
            store,
            run_id,
            record,
            lock.fileno(),
            backend=backend,
            job_id=job_id,
            env=env,
            on_interrupt=on_interrupt,
            stop_event=stop_event,
        )


def _execute(
    store: SweepStore,
    run_id: str,
    record: dict[str, Any],
    lock_fd: int,
    *,
    backend: str,
    job_id: str | None,
    env: dict[str, str] | None,
    on_interrupt: str,
    stop_event: threading.Event | None,
) -> dict[str, Any]:
    run_dir = store.run_dir(run_id)
    trial = _write_trial(store, run_dir, record, env)
    started = append_event(
        run_dir, "running", backend=backend, job_id=job_id, host=hostname(), pid=os.getpid()
    )
    cmd = trainer_command(record, trial, run_dir)
    full_env = {**os.environ, **(env or {})}
    stderr_path = run_dir / "stderr.log"
    beat_stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(run_dir, beat_stop), daemon=True)
    beat.start()
    try:
        with open(run_dir / "stdout.log", "ab") as out, open(stderr_path, "ab") as err:
            err_offset = err.tell()
            try:
                # The lock fd is inherited so the run stays locked until the trainer itself exits.
                proc = subprocess.Popen(
                    [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *cmd],
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    pass_fds=(lock_fd,),
                    # Off the terminal's process group: Ctrl-C reaches the launcher, which
                    # stops trainers with SIGTERM (checkpoint), not with a raw SIGINT.
                    start_new_session=True,
                )
            except OSError as e:
                return _finish(run_dir, run_id, "failed", 127, started, reason=f"cannot start: {e}")
            (run_dir / TRAINER_PID).write_text(str(proc.pid))
            code, asked = _wait(proc, stop_event)
    finally:
        beat_stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            (run_dir / TRAINER_PID).unlink()
    # Killed by the stop signal before it could install its handlers (e.g. still importing):
    # nothing is lost beyond the last checkpoint, so this is an interruption, not a failure.
    early = asked and code in (-signal.SIGTERM, -signal.SIGUSR2)
    return _record_outcome(
        run_dir, run_id, code, started, stderr_path, err_offset, on_interrupt, early
    )


def _write_trial(
    store: SweepStore, run_dir: Path, record: dict[str, Any], env: dict[str, str] | None
) -> Path:
    """The config this attempt runs: the record with machine-specific fields resolved.

    Paths in the record are relative to the sweep directory (so a sweep can be moved); threads come
    from ``OMP_NUM_THREADS`` when the spec leaves them unset. Neither enters the run id.
    """
    train = json.loads(json.dumps(record["train"]))
    branch = train.get("branch")
    if branch and not os.path.isabs(branch["run_dir"]):
        branch["run_dir"] = str((store.root / branch["run_dir"]).resolve())
    omp = (env or {}).get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if train.get("threads") is None and omp and omp.isdigit():
        train["threads"] = int(omp)
    path = run_dir / TRIAL_FILE
    write_json_atomic(path, {**{k: v for k, v in record.items() if k != "train"}, "train": train})
    return path.resolve()


def _heartbeat(run_dir: Path, stop: threading.Event) -> None:
    path = run_dir / "heartbeat"
    interval = heartbeat_interval_s()
    while True:
        with contextlib.suppress(OSError):
            path.touch()
        if stop.wait(interval):
            return


def _wait(proc: subprocess.Popen[bytes], stop_event: threading.Event | None) -> tuple[int, bool]:
    """Wait for the trainer, forwarding signals (main thread) and ``stop_event`` (any thread).

    Returns:
        The exit code, and whether the trainer was asked to stop.
    """
    asked = threading.Event()
    restore = _forward_signals(proc, asked)
    try:
        while True:
            try:
                return proc.wait(timeout=0.2), asked.is_set()
            except subprocess.TimeoutExpired:
                if stop_event is not None and stop_event.is_set() and not asked.is_set():
                    asked.set()
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
    finally:
        restore()


def _forward_signals(proc: subprocess.Popen[bytes], asked: threading.Event) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def forward(signum: int, _frame: Any) -> None:
        # SIGINT becomes SIGTERM: the trainer checkpoints on SIGTERM/SIGUSR2.
        sig = signal.SIGTERM if signum == signal.SIGINT else signum
        asked.set()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in _FORWARDED}
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def _record_outcome(
    run_dir: Path,
    run_id: str,
    code: int,
    started: dict[str, Any],
    stderr_path: Path,
    err_offset: int,
    on_interrupt: str,
    early_stop: bool = False,
) -> dict[str, Any]:
    summary = _read_summary(run_dir)
    status = summary.get("status")
    if code == EXIT_OK and status == "completed":
        return _finish(run_dir, run_id, "completed", code, started)
    if code == EXIT_DIVERGED or (code == EXIT_OK and status == "diverged"):
        return _finish(
            run_dir, run_id, "diverged", code, started, reason=summary.get("reason") or "diverged"
        )
    if code == EXIT_INTERRUPTED or early_stop:
        state = "submitted" if on_interrupt == "requeue" else "cancelled"
        why = "interrupted" if code == EXIT_INTERRUPTED else "interrupted before checkpointing"
        return _finish(run_dir, run_id, state, code, started, reason=why)
    reason = (
        f"exit {code} without a completed summary.json"
        if code == EXIT_OK
        else f"trainer exited with {_describe(code)}"
    )
    return _finish(
        run_dir,
        run_id,
        "failed",
        code,
        started,
        reason=reason,
        stderr_tail=_tail(stderr_path, err_offset),
    )


def _finish(
    run_dir: Path, run_id: str, state: str, code: int, started: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    append_event(
        run_dir,
        state,
        exit_code=code,
        attempt=started["attempt"],
        backend=started.get("backend"),
        job_id=started.get("job_id"),
        **fields,
    )
    return {"run_id": run_id, "state": state, "exit_code": code}


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(offset, os.path.getsize(path) - STDERR_TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeper.worker SWEEP_DIR RUN_ID [--backend NAME] [--job-id ID] [--requeue]``."""
    p = argparse.ArgumentParser(prog="python -m sweeper.worker", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("run_id")
    p.add_argument("--backend", default="local")
    p.add_argument("--job-id", default=None)
    p.add_argument(
        "--requeue",
        action="store_true",
        help="record an interrupted run as submitted (the scheduler requeues it)",
    )
    args = p.parse_args(argv)
    if not (Path(args.sweep_dir) / "runs" / args.run_id / RECORD).is_file():
        print(f"error: {args.sweep_dir}: no run {args.run_id!r}", file=sys.stderr)
        return 2
    result = run_trial(
        args.sweep_dir,
        args.run_id,
        backend=args.backend,
        job_id=args.job_id,
        on_interrupt="requeue" if args.requeue else "cancelled",
    )
    print(json.dumps(result))
    return 0 if result["state"] in ("completed", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
