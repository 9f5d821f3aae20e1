"""SLURM backend through submitit: job arrays, WSD branches at the fork, one throttle, requeue.

``launch`` submits the runs as tasks of job arrays and returns (``blocking = False``); the tasks
run :func:`sweeper.worker.run_trial` on the nodes. How runs become arrays and tasks, and how
``array_parallelism`` bounds the sweep, is in :mod:`sweeper.backends.slurm_script`; ``describe``
prints the exact sbatch files. Later commands need only the sweep directory: each run's job id
is in its ``submitted`` event, submitit's pickles, scripts and logs are under ``<sweep>/slurm/``.

Each array is submitted held (``#SBATCH --hold``), its runs' ``submitted`` events (with job ids)
are written, and only then is it released, so a fast task can never record ``running`` before the
launcher recorded ``submitted``.

Signals and requeues (the worker forwards SIGTERM/USR2 to the trainer, which checkpoints and exits
75; the worker records the run ``submitted``, then asks SLURM what is happening):

* USR2 while the job is ``RUNNING`` (time limit via ``--signal``, partition preemption with
  ``preempt_send_user_signal``, ``scancel --signal USR2``): submitit's handler requeues the job.
* ``scontrol requeue`` (or a preemption that requeues): SIGTERM, the job is ``COMPLETING`` and its
  ``Restarts`` count went up (``SLURM_RESTART_COUNT`` is what it was at start). The run stays
  ``submitted``, so ``resume`` does not start it a second time; the requeued task resumes it from
  the checkpoint. A worker killed before recording anything leaves ``running``: ``reconcile`` sees
  the job pending again and records ``submitted`` (reason ``requeued``).
* ``scancel``: SIGTERM, ``sacct`` says ``CANCELLED`` and ``Restarts`` did not change: the run ends
  ``cancelled``. When neither is certain the run stays ``submitted`` and ``reconcile`` decides
  from ``sacct`` once the job has left the queue.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from sweeper.backends import LaunchOptions
from sweeper.backends.slurm_script import (
    DEFAULT_MAX_ARRAY_SIZE,
    NAME,
    SUBMITIT_DIR,
    ArrayJob,
    Queue,
    SlurmConfig,
    Submission,
    describe_submission,
    plan_arrays,
    python_command,
)
from sweeper.errors import BackendError
from sweeper.records import RunEvent, RunRecord, RunState
from sweeper.store import SweepStore
from trainer.schema import CKPT_DIR, checkpoint_name

MAX_TIMEOUT_REQUEUES = 20  # submitit's own bound on requeues after time limits
STDERR_TAIL_CHARS = 2000
LOCK_WAIT_S = 30.0  # a task waits this long for a run lock held by a dying trainer
FORK_POLL_S = 2.0  # a branch task looks for its trunk's checkpoint at the fork this often
FORK_GRACE_S = 120.0  # ... and gives its slot back when the trunk is queued this long
_SCHEDULER_TIMEOUT_S = 60

# Scheduler states of a job that still holds or waits for resources: the worker owns the run.
ACTIVE_STATES = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_FED REQUEUE_HOLD RESIZING SUSPENDED CONFIGURING COMPLETING"
    " SIGNALING STAGE_OUT STOPPED RESV_DEL_HOLD".split()
)
REQUEUE_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"})
# Final scheduler states and the run state they become when the worker recorded no outcome
# (killed before it could, or never started). Interruptions by the scheduler become ``cancelled``,
# failures of the job ``failed``; `sweeper resume` restarts both from the last checkpoint.
FINAL_STATES = {
    "CANCELLED": RunState.CANCELLED,
    "PREEMPTED": RunState.CANCELLED,
    "TIMEOUT": RunState.CANCELLED,
    "DEADLINE": RunState.CANCELLED,
    "FAILED": RunState.FAILED,
    "NODE_FAIL": RunState.FAILED,
    "OUT_OF_MEMORY": RunState.FAILED,
    "BOOT_FAIL": RunState.FAILED,
    "REVOKED": RunState.FAILED,
    "COMPLETED": RunState.FAILED,  # the job ended but its run has no outcome: the trial never ran
}
_OK = frozenset({"completed", "diverged", "stopped"})
_IN_JOB = (RunState.SUBMITTED, RunState.RUNNING)  # last events that leave a run to its job


# ------------------------------------------------------------------------------------ the job side


class TrialFailed(RuntimeError):
    """Raised at the end of a task whose runs did not all complete, so the task ends FAILED."""


class SlurmTrial:
    """The callable an array task runs: :func:`sweeper.worker.run_trial` for each of its runs.

    submitit treats a callable with a ``checkpoint`` method as checkpointable: on USR2 it calls
    ``checkpoint()`` to get what the requeued job runs, which is this same call again, because the
    state that matters (the trainer's checkpoint, the events) lives in the run directories.

    Args:
        sweep_dir: The sweep directory (absolute, as seen from the nodes).
    """

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir

    def __call__(self, run_ids: list[str]) -> list[dict[str, Any]]:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_nodes > 1:
            os.environ.setdefault("SWEEPER_RDZV_ENDPOINT", f"{env.hostnames[0]}:29500")
            if env.node > 0:
                return _follow_runs(self.sweep_dir, run_ids, str(env.job_id))
        return self._run_task(run_ids, str(env.job_id))

    def checkpoint(self, run_ids: list[str]) -> Any:
        """What submitit requeues on USR2: this same call (the state is in the run dirs)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, run_ids)

    def _run_task(self, run_ids: list[str], job_id: str) -> list[dict[str, Any]]:
        store = SweepStore(Path(self.sweep_dir))
        results = []
        for rid in run_ids:
            res = _run_one(store, rid, job_id)
            results.append(res)
            if res["state"] == RunState.SUBMITTED.value and not res.get("skipped"):
                _after_interrupt(store, run_ids, job_id)  # checkpointed on a signal
                return results
        bad = [r for r in results if r["state"] not in _OK and not r.get("skipped")]
        if bad:
            raise TrialFailed(
                f"{len(bad)} of {len(results)} runs did not complete: "
                + ", ".join(f"{r['run_id']} ({r['state']})" for r in bad)
            )
        return results


def _ours(ev: RunEvent | None, job_id: str) -> bool:
    """True if the run waits for this job: queued or running, under no other job's id."""
    if ev is None:
        return True
    return ev.state in (RunState.SUBMITTED, RunState.RUNNING) and ev.job_id in (None, job_id)


def _run_one(store: SweepStore, rid: str, job_id: str) -> dict[str, Any]:
    """One run of a task; a branch first waits for its trunk's checkpoint at the fork."""
    from sweeper.worker import run_trial

    ev = store.status(rid).last_event
    if not _ours(ev, job_id):
        state = ev.state.value if ev else RunState.PLANNED.value
        return {"run_id": rid, "state": state, "exit_code": None, "skipped": True}
    record = store.load_record(rid)
    if record.parent is not None:
        action, why = wait_for_fork(store, record, job_id)
        if action == "requeue":
            _requeue_self(job_id, why)
        if action == "cancel":
            now = store.status(rid).last_event
            store.append_if(
                rid, RunState.CANCELLED, expect=now, backend=NAME, job_id=job_id, reason=why
            )
            return {"run_id": rid, "state": RunState.CANCELLED.value, "exit_code": None}
        if action != "go":  # requeued, or no longer this job's run
            state = store.status(rid).state.value
            return {"run_id": rid, "state": state, "exit_code": None, "skipped": True}
    return run_trial(
        store.root,
        rid,
        backend=NAME,
        job_id=job_id,
        env=_thread_env(record),
        on_interrupt=RunState.SUBMITTED,
        wait_lock_s=LOCK_WAIT_S,
    )


def wait_for_fork(store: SweepStore, record: RunRecord, job_id: str) -> tuple[str, str]:
    """Wait until branch ``record`` can start: ``("go", "")`` once its trunk's checkpoint at the
    fork exists (or the trunk completed); ``("cancel", why)`` when the trunk ended without it;
    ``("requeue", why)`` when the trunk has been queued (not running) for ``FORK_GRACE_S``;
    ``("skip", why)`` when the branch is no longer this job's (cancelled meanwhile)."""
    trunk = str(record.parent)
    ckpt = store.run_dir(trunk) / CKPT_DIR / checkpoint_name(record.start_step)
    queued_since: float | None = None
    while not ckpt.is_file():
        if not _ours(store.status(record.id).last_event, job_id):
            return "skip", "no longer this job's run"
        state = store.status(trunk).state
        if state == RunState.COMPLETED:
            return "go", ""
        if state.is_finished():
            return "cancel", f"trunk {trunk} ended {state.value} without a checkpoint at the fork"
        if state == RunState.RUNNING:
            queued_since = None
        else:
            queued_since = queued_since or time.monotonic()
            if time.monotonic() - queued_since > _fork_grace_s():
                return "requeue", f"trunk {trunk} is {state.value}, not running"
        time.sleep(FORK_POLL_S)
    return "go", ""


def _fork_grace_s() -> float:
    return float(os.environ.get("SWEEPER_FORK_GRACE_S") or FORK_GRACE_S)


def _requeue_self(job_id: str, why: str) -> None:
    print(f"sweeper: requeueing {job_id} to give its slot back: {why}", flush=True)
    _run(["scontrol", "requeue", job_id])
    time.sleep(600)  # SLURM ends this task; the requeued one starts over


def _thread_env(record: RunRecord) -> dict[str, str]:
    """OMP_NUM_THREADS per rank from the allocation, so torch does not oversubscribe the CPUs."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if "OMP_NUM_THREADS" in os.environ or not cpus.isdigit():
        return {}
    return {"OMP_NUM_THREADS": str(max(1, int(cpus) // record.resources.procs_per_node))}


def _after_interrupt(store: SweepStore, run_ids: list[str], job_id: str) -> None:
    """The trainer checkpointed on a signal and the run is ``submitted``: requeue the job (USR2),
    leave it to SLURM's requeue, or record ``cancelled`` after an ``scancel``."""
    info = job_info(job_id)
    start = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    restarts = int(info.get("Restarts") or 0)
    if restarts > start or info.get("JobState") in REQUEUE_STATES:
        return  # scontrol requeue / preemption: SLURM restarts the task, the run stays submitted
    if info.get("JobState") == "RUNNING":
        # USR2 (time limit, preemption, `scancel --signal USR2`). Hand over to submitit's handler
        # (the worker restored it): it calls checkpoint(), requeues the job and exits, counting
        # time limits against MAX_TIMEOUT_REQUEUES.
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(5)
        return
    acct = accounting({job_id}).get(job_id, {})
    if acct.get("State") != "CANCELLED":
        return  # not certain: reconcile decides from sacct once the job has left the queue
    for rid in run_ids:
        ev = store.status(rid).last_event
        if ev is not None and ev.state == RunState.SUBMITTED and ev.job_id == job_id:
            store.append_if(
                rid,
                RunState.CANCELLED,
                expect=ev,
                backend=NAME,
                job_id=job_id,
                reason=f"slurm job {job_id} {acct.get('FullState', 'CANCELLED')}",
            )


def _follow_runs(sweep_dir: str, run_ids: list[str], job_id: str) -> list[dict[str, Any]]:
    """Node ranks > 0 of a multi-node run: start the same torchrun for each run rank 0 starts.

    Rank 0 records events; the others only take part in the rendezvous.
    """
    from sweeper.worker import TRIAL_FILE, trainer_command

    store = SweepStore(Path(sweep_dir))
    results: list[dict[str, Any]] = []
    for rid in run_ids:
        if store.status(rid).state == RunState.COMPLETED:
            continue
        rd = store.run_dir(rid)
        record = store.load_record(rid)
        while not (rd / TRIAL_FILE).exists():  # rank 0 writes it (a branch: at the fork)
            if not _ours(store.status(rid).last_event, job_id):
                break
            time.sleep(0.5)
        if not (rd / TRIAL_FILE).exists():
            continue
        cmd = trainer_command(record, rd / TRIAL_FILE, rd)
        code = subprocess.call(cmd, env={**os.environ, **_thread_env(record)})
        results.append({"run_id": rid, "exit_code": code})
        if code == 75:
            break
    return results


# --------------------------------------------------------------------------------- scheduler calls


def _run(cmd: list[str], check: bool = True) -> str:
    """Run a SLURM client command; BackendError with its stderr on failure."""
    exe = shutil.which(cmd[0])
    if exe is None:
        raise BackendError(f"slurm: {cmd[0]} not found on PATH (is this a SLURM login node?)")
    try:
        proc = subprocess.run(
            [exe, *cmd[1:]], capture_output=True, text=True, timeout=_SCHEDULER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise BackendError(f"slurm: {' '.join(cmd)} timed out") from None
    if check and proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split())
        raise BackendError(f"slurm: {' '.join(cmd)} failed: {msg}")
    return proc.stdout


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (array indices must stay below it)."""
    out = _run(["scontrol", "show", "config"])
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def check_partition(store: SweepStore, cfg: SlurmConfig) -> None:
    """BackendError naming the spec key and value if the partition does not exist."""
    if not cfg.partition:
        return
    known = {p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split()}
    if cfg.partition not in known:
        raise BackendError(
            f"{store.root / 'spec.toml'}: backend.slurm.partition = {cfg.partition!r}: no such "
            f"partition on this cluster (known: {', '.join(sorted(known))})"
        )


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields of one job (empty if slurmctld no longer knows it)."""
    with contextlib.suppress(BackendError):
        out = _run(["scontrol", "-o", "show", "job", job_id])
        return dict(re.findall(r"(\w+)=(\S*)", out))
    return {}


def queue_states(job_ids: set[str]) -> dict[str, str]:
    """States of the jobs in the queue, keyed by id (``A_T`` for array tasks)."""
    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)], check=False)
    states = {}
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        states[jid.strip()] = state.strip()
    return states


def accounting(job_ids: set[str]) -> dict[str, dict[str, str]]:
    """Final accounting of jobs from ``sacct`` (latest record per job), keyed by id.

    Each value has ``State`` (first word, e.g. ``CANCELLED``), ``FullState``, ``ExitCode`` and
    ``Reason``.
    """
    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    out = _run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Reason", "-j", ",".join(bases)]
    )
    info: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        jid, state, code, reason = parts[:4]
        info[jid] = {
            "State": state.split()[0] if state else "",
            "FullState": state,
            "ExitCode": code,
            "Reason": reason,
        }
    return info


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - STDERR_TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------------- the backend


class SlurmBackend:
    """Runs go out as submitit job arrays; see the module docstring and ``slurm_script``."""

    name: ClassVar[str] = NAME
    blocking: ClassVar[bool] = False
    Config: ClassVar[type[SlurmConfig]] = SlurmConfig

    def __init__(self, config: SlurmConfig | None = None) -> None:
        self.config = config or SlurmConfig()

    # ---- launch
    def launch(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> None:
        """Submit ``runs`` and return once SLURM has them (``submitted`` events carry job ids)."""
        if not runs:
            return
        self._check_tools()
        check_partition(store, self.config)
        sub = self._submission(store, runs, opts)
        for rid, why in sub.refused.items():
            store.append_if(rid, RunState.CANCELLED, backend=NAME, reason=why)
        for jid, throttle in sub.retune.items():
            _run(["scontrol", "update", f"JobId={jid}", f"ArrayTaskThrottle={throttle}"])
        for i, array in enumerate(sub.arrays):
            try:
                self._submit(store, array)
            except BackendError as e:
                for later in sub.arrays[i:]:
                    for rid in (rid for task in later.tasks for rid in task):
                        store.append_if(rid, RunState.FAILED, backend=NAME, reason=str(e))
                raise

    def describe(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> str:
        """The exact sbatch scripts :meth:`launch` would submit; submits and writes nothing."""
        from sweeper.worker import TRIAL_FILE, trainer_command

        if not runs:
            return "slurm: nothing to submit"
        sub = self._submission(store, runs, opts)

        def line(record: RunRecord) -> list[str]:
            rd = store.run_dir(record.id).resolve()
            return trainer_command(record, rd / TRIAL_FILE, rd)

        folder = store.root.resolve() / SUBMITIT_DIR
        records = {r.id: r for r in runs}
        return describe_submission(sub, records, folder, python_command(self.config), line)

    def _submission(
        self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions
    ) -> Submission:
        launching = {r.id for r in runs}
        statuses = store.statuses()
        completed = frozenset(r for r, st in statuses.items() if st.state == RunState.COMPLETED)
        parent_jobs: dict[str, str] = {}
        live: set[str] = set()
        for rid, st in statuses.items():
            ev = st.last_event
            if rid in launching or ev is None or ev.backend != NAME or not ev.job_id:
                continue
            if ev.state in (RunState.SUBMITTED, RunState.RUNNING):
                parent_jobs[rid] = ev.job_id
                live.add(ev.job_id)
        queue = Queue(
            completed=completed,
            parent_jobs=parent_jobs,
            parent_states={r: st.state.value for r, st in statuses.items()},
            **self._live(live),
        )
        return plan_arrays(
            runs,
            self.config,
            f"sweeper-{store.root.name}",
            parallel=opts.max_parallel or self.config.array_parallelism,
            max_array=self._max_array_size(),
            queue=queue,
        )

    def _live(self, job_ids: set[str]) -> dict[str, Any]:
        """The sweep's arrays (unfinished tasks each) and plain jobs still in the queue."""
        if not job_ids or shutil.which("squeue") is None:
            return {}
        arrays: dict[str, int] = {}
        jobs = 0
        for jid in queue_states(job_ids):
            base, sep, _ = jid.partition("_")
            if sep:
                arrays[base] = arrays.get(base, 0) + 1
            else:
                jobs += 1
        return {"live_arrays": arrays, "live_jobs": jobs}

    def _max_array_size(self) -> int:
        if self.config.max_array_size:
            return self.config.max_array_size
        if shutil.which("scontrol") is None:
            return DEFAULT_MAX_ARRAY_SIZE
        return max_array_size()

    @staticmethod
    def _check_tools() -> None:
        try:
            import submitit  # noqa: F401
        except ImportError as e:
            raise BackendError(
                f"slurm: submitit is not installed ({e}); pip install submitit"
            ) from None
        if shutil.which("sbatch") is None:
            raise BackendError("slurm: sbatch not found on PATH (is this a SLURM login node?)")

    def _submit(self, store: SweepStore, array: ArrayJob) -> None:
        """sbatch one array (held), record its runs ``submitted`` with their job ids, release."""
        import submitit

        folder = store.root.resolve() / SUBMITIT_DIR
        executor = submitit.SlurmExecutor(
            folder=folder, python=self.config.python, max_num_timeout=MAX_TIMEOUT_REQUEUES
        )
        trial = SlurmTrial(str(store.root.resolve()))
        trunks = {r: store.status(r).last_event for r in array.after_runs}
        known = {r: str(ev.job_id) for r, ev in trunks.items() if ev is not None and ev.job_id}
        executor.update_parameters(**array.parameters(known))
        try:
            jobs = executor.map_array(trial, array.tasks)
        except Exception as e:  # submitit raises plain errors carrying sbatch's message
            msg = str(e).strip().splitlines()
            raise BackendError(f"slurm: submission failed: {msg[-1] if msg else e}") from None
        base = jobs[0].job_id.split("_")[0]
        try:
            for job, task in zip(jobs, array.tasks, strict=True):
                for rid in task:
                    store.append_event(rid, RunState.SUBMITTED, backend=NAME, job_id=job.job_id)
        except BaseException:
            _run(["scancel", base], check=False)
            raise
        _run(["scontrol", "release", base])

    # ---- reconcile
    def reconcile(self, store: SweepStore) -> None:
        """Record what happened to runs whose job ended (or was requeued) without the worker
        recording it."""
        candidates: dict[str, RunEvent] = {}
        for rid, st in store.statuses().items():
            ev = st.last_event
            if ev is not None and ev.backend == NAME and ev.job_id and ev.state in _IN_JOB:
                candidates[rid] = ev
        if not candidates:
            return
        jobs = {ev.job_id for ev in candidates.values() if ev.job_id}
        queued = queue_states(jobs)
        acct = accounting(jobs - set(queued))
        for rid, ev in candidates.items():
            jid = str(ev.job_id)
            if jid in queued:
                if ev.state == RunState.RUNNING and queued[jid] in REQUEUE_STATES:
                    why = f"requeued: slurm job {jid} is {queued[jid]} again"
                    store.append_if(
                        rid, RunState.SUBMITTED, expect=ev, backend=NAME, job_id=jid, reason=why
                    )
                continue
            info = acct.get(jid)
            if info is None or info["State"] not in FINAL_STATES:
                continue
            self._record_final(store, rid, ev, jid, info)

    @staticmethod
    def _record_final(
        store: SweepStore, rid: str, ev: RunEvent, jid: str, info: dict[str, str]
    ) -> None:
        state = FINAL_STATES[info["State"]]
        reason = f"slurm job {jid} {info['FullState']} (exit {info['ExitCode']})"
        if info["Reason"] not in ("", "None"):
            reason += f": {info['Reason']}"
        if info["State"] == "COMPLETED":
            reason += " without recording an outcome"
        fields: dict[str, Any] = {"backend": NAME, "job_id": jid, "reason": reason}
        if state == RunState.FAILED:
            fields["stderr_tail"] = _tail(store.root / SUBMITIT_DIR / f"{jid}_0_log.err")
        store.append_if(rid, state, expect=ev, **fields)

    # ---- cancel
    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """``scancel`` the jobs of ``run_ids``. Queued runs are recorded ``cancelled`` here; a
        running one is recorded by its task once its trainer has checkpointed.

        A task runs a unit of runs (a trunk and its branches, or a pack): cancelling one run
        cancels its whole task, and every run of it still queued is recorded ``cancelled``.
        """
        jobs: set[str] = set()
        for rid in run_ids:
            ev = store.status(rid).last_event
            if ev is not None and ev.backend == NAME and ev.job_id and ev.state in _IN_JOB:
                jobs.add(ev.job_id)
        if not jobs:
            return
        _run(["scancel", *sorted(jobs)])
        for rid, st in store.statuses().items():
            ev = st.last_event
            if ev is not None and ev.state == RunState.SUBMITTED and ev.job_id in jobs:
                why = f"slurm job {ev.job_id} cancelled"
                store.append_if(
                    rid, RunState.CANCELLED, expect=ev, backend=NAME, job_id=ev.job_id, reason=why
                )


Backend = SlurmBackend
