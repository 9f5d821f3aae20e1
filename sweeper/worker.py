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
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sweeper.errors import StoreError
from sweeper.external import render_command, resume_checkpoint
from sweeper.records import RecordError, RunRecord, RunState
from sweeper.store import (
    EVENTS,
    SweepStore,
    append_event,
    hostname,
    open_in_run_dir,
    process_start,
    read_events,
    read_json,
    same_process,
    touch,
    try_flock,
    write_json_atomic,
)
from sweeper.tracking import start_mirror, stop_mirror
from trainer.schema import (
    CKPT_DIR,
    CONFIG_FILE,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    METRICS_FILE,
    PROVENANCE_FILE,
    SUMMARY_FILE,
    SchemaError,
    Status,
    Summary,
)

TRIAL_FILE = "trial.json"
TRAINER_PID = "trainer.pid"
STDOUT, STDERR = "stdout.log", "stderr.log"
STDERR_TAIL_CHARS = 2000
_FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
# Entries of a run directory the worker or the trainer writes: none may be a symlink (a write
# through it would land outside the sweep; see docs/clusters.md).
_WRITTEN = (
    CKPT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PROVENANCE_FILE,
    SUMMARY_FILE,
    STDOUT,
    STDERR,
    TRIAL_FILE,
    TRAINER_PID,
    "heartbeat",
)
OnInterrupt = Literal[RunState.CANCELLED, RunState.SUBMITTED]

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


def trainer_command(record: RunRecord, trial_json: Path, run_dir: Path) -> list[str]:
    """The trainer command line for a run record.

    ``record.command`` replaces the ``python -m trainer`` prefix; with more than one rank
    (``resources.nodes * procs_per_node``) the prefix is ``torchrun``. A ``[trainer]`` section
    (``params["trainer"]``) replaces the whole line with its rendered command.
    """
    if record.params and "trainer" in record.params:
        return render_command(record, run_dir, resume_checkpoint(record, run_dir), trial_json)
    res = record.resources
    if record.command:
        prefix = list(record.command)
    elif res.world_size > 1:
        prefix = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={res.procs_per_node}",
        ]
        if res.nodes > 1:
            rdzv = os.environ.get("SWEEPER_RDZV_ENDPOINT", "localhost:29500")
            prefix += [f"--nnodes={res.nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv}"]
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
    on_interrupt: OnInterrupt = RunState.CANCELLED,
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
        ``{"run_id", "state", "exit_code"}``; ``skipped`` is True when the run was completed or
        locked by another worker (``state``: its state) or its directory is unsafe (``error``).
    """
    run_dir = (store := SweepStore(Path(sweep_dir))).run_dir(run_id)
    if (refused := _refuse_unsafe(run_dir)) is not None:
        return refused
    # The flock belongs to this open file description; the trainer inherits the descriptor, so the
    # run stays locked until the trainer itself exits (an orphan of a killed launcher included).
    lock_fd = open_in_run_dir(run_dir, ".lock", os.O_RDWR | os.O_CREAT)
    try:
        if not try_flock(lock_fd, wait_lock_s):
            state = store.status(run_id).state
            return {"run_id": run_id, "state": state.value, "exit_code": None, "skipped": True}
        events = read_events(run_dir)
        if events and events[-1].state in (RunState.COMPLETED, RunState.STOPPED):
            done = events[-1].state.value
            return {"run_id": run_id, "state": done, "exit_code": None, "skipped": True}
        try:
            record = store.load_record(run_id)
            _refuse_symlinks(run_dir)
        except StoreError as e:
            append_event(run_dir, RunState.RUNNING, backend=backend, job_id=job_id, host=hostname())
            return _finish(run_dir, run_id, RunState.FAILED, 2, None, reason=str(e))
        return _execute(
            store,
            record,
            lock_fd,
            backend=backend,
            job_id=job_id,
            env=env,
            on_interrupt=on_interrupt,
            stop_event=stop_event,
        )
    finally:
        os.close(lock_fd)


def _refuse_unsafe(run_dir: Path) -> dict[str, Any] | None:
    """A skipped result if nothing may be written into ``run_dir``, not even the failure (a
    symlink or not a directory, or a lock or events file that is not a regular file: a write
    would leave the sweep or block); ``status`` shows such a run as ``error`` with the reason."""
    why = None
    if os.path.islink(run_dir) or not os.path.isdir(run_dir):
        why = f"{run_dir}: not a real directory (a symlink, a file or missing); refused"
    for name in (".lock", EVENTS):
        with contextlib.suppress(FileNotFoundError):
            if why is None and not stat.S_ISREG(os.lstat(run_dir / name).st_mode):
                why = f"{run_dir / name}: not a regular file (a symlink, a directory or a FIFO)"
    if why is None:
        return None
    return {"run_id": run_dir.name, "state": "error", "exit_code": None, "skipped": True,
            "reason": why}  # fmt: skip


def _refuse_symlinks(run_dir: Path) -> None:
    for name in _WRITTEN:
        if os.path.islink(run_dir / name):
            raise StoreError(
                f"{run_dir / name}: is a symlink; files of a run directory must not be links "
                "(put the whole results directory on scratch storage instead)"
            )


def _execute(
    store: SweepStore,
    record: RunRecord,
    lock_fd: int,
    *,
    backend: str,
    job_id: str | None,
    env: dict[str, str] | None,
    on_interrupt: OnInterrupt,
    stop_event: threading.Event | None,
) -> dict[str, Any]:
    run_dir = store.run_dir(record.id)
    trial = _write_trial(store, run_dir, record, env)
    started = append_event(
        run_dir, RunState.RUNNING, backend=backend, job_id=job_id, host=hostname(), pid=os.getpid()
    )
    try:
        cmd = trainer_command(record, trial, run_dir)
    except RecordError as e:
        return _finish(run_dir, record.id, RunState.FAILED, 2, started, reason=str(e))
    full_env = {**os.environ, **(env or {})}
    beat_stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(run_dir, beat_stop), daemon=True)
    beat.start()
    mirror = start_mirror(record, run_dir)  # tracking mirrors, when the record asks for them
    try:
        with _log(run_dir, STDOUT) as out, _log(run_dir, STDERR) as err:
            err_offset = err.tell()
            try:
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
                return _finish(
                    run_dir, record.id, RunState.FAILED, 127, started, reason=f"cannot start: {e}"
                )
            _write_pid(run_dir, proc.pid)
            code, asked = _wait(proc, stop_event)
    finally:
        stop_mirror(mirror)  # the last lines are mirrored while the heartbeat still beats
        beat_stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            (run_dir / TRAINER_PID).unlink()
    # Killed by the stop signal before it could install its handlers (e.g. still importing):
    # nothing is lost beyond the last checkpoint, so this is an interruption, not a failure.
    early = asked and code in (-signal.SIGTERM, -signal.SIGUSR2)
    outcome = _Outcome(code, started, err_offset, on_interrupt, early)
    return _record_outcome(run_dir, record, outcome)


@contextlib.contextmanager
def _log(run_dir: Path, name: str) -> Any:
    fd = open_in_run_dir(run_dir, name, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "ab") as f:
        f.seek(0, os.SEEK_END)
        yield f


def _write_pid(run_dir: Path, pid: int) -> None:
    """``trainer.pid``: the pid and its start time, so that a later cancel can tell our trainer
    from an unrelated process that got the same pid."""
    write_json_atomic(run_dir / TRAINER_PID, {"pid": pid, "start": process_start(pid)})


def signal_trainer(run_dir: Path, sig: int) -> bool:
    """Send ``sig`` to the run's trainer if ``trainer.pid`` still names it (its pid and start
    time; without a start time only where there is no procfs to tell); True if sent. The file is
    read without following a symlink or blocking on a FIFO."""
    try:
        raw = read_json(run_dir / TRAINER_PID, 4096)
        pid, start = raw["pid"], raw.get("start")
    except (StoreError, TypeError, KeyError, AttributeError):
        return False
    if type(pid) is not int or pid <= 1 or not (type(start) is int or start is None):
        return False
    if start is None and process_start(pid) is not None:
        return False  # procfs could tell, but the file cannot: not provably ours
    if not same_process(pid, start):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
        return True
    return False


def _write_trial(
    store: SweepStore, run_dir: Path, record: RunRecord, env: dict[str, str] | None
) -> Path:
    """The config this attempt runs: the record with machine-specific fields resolved.

    Paths in the record are relative to the sweep directory (so a sweep can be moved); threads come
    from ``OMP_NUM_THREADS`` when the spec leaves them unset; horizons added after the record was
    written (``horizons.json``) join a run that has not started yet. None of it enters the run id.
    """
    doc = record.to_dict()
    train = doc["train"]
    branch = train.get("branch")
    if branch and not os.path.isabs(branch["run_dir"]):
        branch["run_dir"] = str((store.root / branch["run_dir"]).resolve())
    omp = (env or {}).get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if train.get("threads") is None and omp and omp.isdigit() and int(omp) > 0:
        train["threads"] = int(omp)
    extra = store.extra_horizons(record.id)
    if extra and not os.path.lexists(run_dir / CONFIG_FILE):
        train["horizons_tokens"] = sorted(set(train["horizons_tokens"]) | set(extra))
    path = run_dir / TRIAL_FILE
    write_json_atomic(path, doc)
    return path.resolve()


def _heartbeat(run_dir: Path, stop: threading.Event) -> None:
    interval = heartbeat_interval_s()
    while True:
        with contextlib.suppress(OSError):
            touch(run_dir, "heartbeat")
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


class _Outcome(NamedTuple):
    code: int
    started: Any
    err_offset: int
    on_interrupt: OnInterrupt
    early_stop: bool


def _record_outcome(run_dir: Path, record: RunRecord, o: _Outcome) -> dict[str, Any]:
    """The final event from the exit code and ``summary.json``; a summary is believed only when
    it agrees with the exit code and with the run's planned steps."""
    summary, problem = _read_summary(run_dir)
    rid, code = record.id, o.code
    if code == EXIT_OK and summary is not None and summary.status == Status.COMPLETED:
        if summary.step == record.steps:
            return _finish(run_dir, rid, RunState.COMPLETED, code, o.started)
        problem = f"summary.json says completed at step {summary.step} of {record.steps}"
    elif code == EXIT_DIVERGED or (
        code == EXIT_OK and summary is not None and summary.status == Status.DIVERGED
    ):
        why = (summary.reason if summary else None) or "diverged"
        return _finish(run_dir, rid, RunState.DIVERGED, code, o.started, reason=why)
    elif code == EXIT_INTERRUPTED or o.early_stop:
        why = "interrupted" if code == EXIT_INTERRUPTED else "interrupted before checkpointing"
        return _finish(run_dir, rid, o.on_interrupt, code, o.started, reason=why)
    if code == EXIT_OK:
        reason = f"exit 0 without a valid completed summary.json ({problem or 'no summary'})"
    else:
        reason = f"trainer exited with {_describe(code)}"
    tail = _tail(run_dir / STDERR, o.err_offset)
    last = next((line for line in reversed(tail.strip().splitlines()) if line.strip()), "")
    if last:
        reason += f": {last.strip()[:200]}"
    return _finish(run_dir, rid, RunState.FAILED, code, o.started, reason=reason, stderr_tail=tail)


def _finish(
    run_dir: Path, run_id: str, state: RunState, code: int, started: Any, **fields: Any
) -> dict[str, Any]:
    append_event(
        run_dir,
        state,
        exit_code=code,
        attempt=getattr(started, "attempt", None),
        backend=getattr(started, "backend", None),
        job_id=getattr(started, "job_id", None),
        **fields,
    )
    return {"run_id": run_id, "state": state.value, "exit_code": code}


def _read_summary(run_dir: Path) -> tuple[Summary | None, str | None]:
    try:
        fd = open_in_run_dir(run_dir, SUMMARY_FILE, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            raw = json.loads(f.read(1 << 20))
        return Summary.from_dict(raw), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, SchemaError) as e:
        return None, " ".join(str(e).split())


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
    try:
        SweepStore(Path(args.sweep_dir)).load_record(args.run_id)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_trial(
        args.sweep_dir,
        args.run_id,
        backend=args.backend,
        job_id=args.job_id,
        on_interrupt=RunState.SUBMITTED if args.requeue else RunState.CANCELLED,
    )
    print(json.dumps(result))
    return 0 if result["state"] in (RunState.COMPLETED, RunState.DIVERGED) else 1


if __name__ == "__main__":
    sys.exit(main())
