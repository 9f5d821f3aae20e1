"""SLURM backend through submitit: job arrays, packing, requeue on preemption, sacct reconcile.

``launch`` submits every run as a task of a job array (several tiny runs per task with
``resources.runs_per_job``) and returns; the jobs then run :func:`sweeper.worker.run_trial` on the
nodes. Everything later commands need lives in the sweep directory: the job id of each run in its
``submitted`` event, submitit's pickles and logs under ``<sweep>/slurm/``.

A job is submitted held, its runs' ``submitted`` events are written, and only then is it released,
so a fast job can never record ``running`` before the launcher recorded ``submitted``.

Signals: SLURM sends USR2 ``signal_delay_s`` before the time limit and on preemption
(``preempt_send_user_signal``); the worker forwards it, the trainer checkpoints and exits 75, and
the job requeues itself through submitit's handler; the requeued job resumes from the checkpoint.
``scancel`` sends SIGTERM: the trainer checkpoints too, and the run ends ``cancelled``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sweeper.backends import LaunchOptions
from sweeper.errors import BackendError
from sweeper.store import RunState, SweepStore, read_events, try_flock

NAME = "slurm"
SUBMITIT_DIR = "slurm"  # <sweep>/slurm: submitit's folder (job pickles, sbatch files, logs)
SIGNAL_DELAY_S = 90  # USR2 this long before the time limit: time to checkpoint
MAX_TIMEOUT_REQUEUES = 20  # submitit's own bound on requeues after time limits
STDERR_TAIL_CHARS = 2000
_SCHEDULER_TIMEOUT_S = 60

# Scheduler states of a job that still holds or waits for resources: the worker owns the run.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "CONFIGURING",
        "COMPLETING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
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


# ------------------------------------------------------------------------------------ the job side


class TrialFailed(RuntimeError):
    """Raised at the end of a job whose runs did not all complete, so the job ends FAILED (and
    dependent jobs, e.g. branches waiting on a trunk with ``afterok``, do not start)."""


class SlurmTrial:
    """The callable a SLURM job runs: :func:`sweeper.worker.run_trial` for each run of its pack.

    submitit treats any callable with a ``checkpoint`` method as checkpointable: on USR2 it calls
    ``checkpoint()`` to get what the requeued job runs, which is this same call again, because the
    state that matters (the trainer's checkpoint) lives in the run directory.

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
                return _follow_runs(self.sweep_dir, run_ids)
        return self._run_pack(run_ids, env.job_id)

    def checkpoint(self, run_ids: list[str]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, run_ids)

    def _run_pack(self, run_ids: list[str], job_id: str) -> list[dict[str, Any]]:
        from sweeper.worker import run_trial

        results = []
        for rid in run_ids:
            res = run_trial(
                self.sweep_dir,
                rid,
                backend=NAME,
                job_id=job_id,
                env=_thread_env(),
                on_interrupt="requeue",
                wait_lock_s=30.0,
            )
            results.append(res)
            if res["state"] == RunState.SUBMITTED.value:
                _after_interrupt(SweepStore(Path(self.sweep_dir)), run_ids, job_id)
                return results
        bad = [r for r in results if r["state"] not in ("completed", "diverged")]
        if bad:
            raise TrialFailed(
                f"{len(bad)} of {len(results)} runs did not complete: "
                + ", ".join(f"{r['run_id']} ({r['state']})" for r in bad)
            )
        return results


def _thread_env() -> dict[str, str]:
    """OMP_NUM_THREADS from the allocation, so torch does not oversubscribe the job's CPUs."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if "OMP_NUM_THREADS" in os.environ or not cpus:
        return {}
    return {"OMP_NUM_THREADS": cpus}


def _after_interrupt(store: SweepStore, run_ids: list[str], job_id: str) -> None:
    """The trainer checkpointed on a signal: requeue the job, unless SLURM is ending it."""
    state = scontrol_job_state(job_id)
    if state in ("RUNNING", None):
        # USR2 (time limit, preemption, `scancel --signal USR2`). Hand over to submitit's handler
        # (the worker restored it): it calls checkpoint(), requeues the job and exits, counting
        # time limits against MAX_TIMEOUT_REQUEUES.
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(5)
        return
    if state in REQUEUE_STATES:
        return  # SLURM requeues it itself (preemption, `scontrol requeue`): stays `submitted`
    # scancel (COMPLETING, then CANCELLED): the worker recorded `submitted`, expecting a requeue.
    for rid in run_ids:
        append_if_unchanged(
            store,
            rid,
            RunState.CANCELLED,
            backend=NAME,
            job_id=job_id,
            reason=f"slurm job {job_id} ended ({state}) after a checkpoint",
        )


def _follow_runs(sweep_dir: str, run_ids: list[str]) -> list[dict[str, Any]]:
    """Node ranks > 0 of a multi-node run: start the same torchrun for each run rank 0 starts.

    Rank 0 records events; the others only take part in the rendezvous.
    """
    from sweeper.worker import trainer_command

    store = SweepStore(Path(sweep_dir))
    results = []
    for rid in run_ids:
        if store.status(rid).state == RunState.COMPLETED:
            continue
        rd = store.run_dir(rid)
        cmd = trainer_command(store.load_record(rid), rd / "run.json", rd)
        code = subprocess.call(cmd, env={**os.environ, **_thread_env()})
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
        msg = (proc.stderr or proc.stdout).strip().replace("\n", " ")
        raise BackendError(f"slurm: {' '.join(cmd)} failed: {msg}")
    return proc.stdout


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (array indices must stay below it)."""
    out = _run(["scontrol", "show", "config"])
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(match.group(1)) if match else 1001


def check_partitions(store: SweepStore, records: Any) -> None:
    """BackendError naming the spec key and value if a run asks for a partition SLURM lacks."""
    wanted = {(r.get("resources") or {}).get("partition") for r in records} - {None, ""}
    if not wanted:
        return
    known = {p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split()}
    for name in sorted(wanted - known):
        raise BackendError(
            f"{store.root / 'spec.toml'}: resources.partition = {name!r}: no such "
            f"partition on this cluster (known: {', '.join(sorted(known))})"
        )


def scontrol_job_state(job_id: str) -> str | None:
    """``JobState`` of one job from slurmctld (None if it is not known there any more)."""
    with contextlib.suppress(BackendError):
        out = _run(["scontrol", "-o", "show", "job", job_id])
        match = re.search(r"\bJobState=(\S+)", out)
        if match:
            return match.group(1)
    return None


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

    Each value has ``State`` (first word, e.g. ``CANCELLED``), ``ExitCode`` and ``Reason``.
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


# ------------------------------------------------------------------------------- store utilities


@contextlib.contextmanager
def run_lock(store: SweepStore, run_id: str) -> Iterator[bool]:
    """Try the run's lock without waiting; yields False while a worker (or its trainer) holds it."""
    with open(store.run_dir(run_id) / ".lock", "a+b") as f:
        got = try_flock(f.fileno(), 0)
        try:
            yield got
        finally:
            if got:
                import fcntl

                fcntl.flock(f, fcntl.LOCK_UN)


def append_if_unchanged(
    store: SweepStore,
    run_id: str,
    state: RunState,
    expect: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Append ``state`` unless a worker holds the run or its last event changed.

    ``expect`` is the last event the caller decided on (None: any non-final one). Taking the run's
    lock first means a worker cannot append an outcome between the check and this append.

    Returns:
        True if the event was appended.
    """
    with run_lock(store, run_id) as got:
        if not got:
            return False
        events = read_events(store.run_dir(run_id))
        last = events[-1] if events else {}
        if expect is not None and last != expect:
            return False
        if RunState(last.get("state", "planned")).is_finished() and expect is None:
            return False
        store.append_event(run_id, state, **fields)
        return True


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - STDERR_TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------------- submission


def sbatch_parameters(resources: dict[str, Any], job_name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters (sbatch names) for a run's ``resources``.

    One task per node: the worker starts torchrun for ``procs_per_node`` ranks inside it, so the
    task gets the CPUs of all of them.
    """
    procs = int(resources.get("procs_per_node", 1))
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": int(resources.get("nodes", 1)),
        "ntasks_per_node": 1,
        "cpus_per_task": int(resources.get("cpus_per_task", 1)) * procs,
        "mem": _mem(float(resources.get("mem_gb", 8.0))),
        "time": int(resources.get("time_min", 60)),
        "signal_delay_s": SIGNAL_DELAY_S,
        "array_parallelism": int(resources.get("array_parallelism", 64)),
        # requeueable even where the cluster's JobRequeue default is 0
        "additional_parameters": {"requeue": True, **(resources.get("sbatch_extra") or {})},
    }
    if int(resources.get("gpus_per_node", 0)) > 0:
        params["gpus_per_node"] = int(resources["gpus_per_node"])
    for key in ("partition", "account", "qos", "constraint"):
        if resources.get(key):
            params[key] = resources[key]
    return params


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def packs(run_ids: list[str], runs_per_job: int) -> list[list[str]]:
    """Split runs into consecutive packs of at most ``runs_per_job``."""
    n = max(1, runs_per_job)
    return [run_ids[i : i + n] for i in range(0, len(run_ids), n)]


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """Split ``items`` into consecutive chunks of at most ``size`` (one job array each)."""
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _group_key(record: dict[str, Any]) -> str:
    return json.dumps(record.get("resources") or {}, sort_keys=True)


class SlurmBackend:
    """Runs go out as submitit job arrays; see the module docstring.

    Args:
        python: Command that starts Python on the nodes (default: this interpreter).
        max_array_size: Override of the cluster's ``MaxArraySize`` (read with ``scontrol``).
    """

    name = NAME

    def __init__(
        self, python: str | None = None, max_array_size: int | None = None, **_: Any
    ) -> None:
        self.python = python
        self._max_array_size = max_array_size

    # ---- launch
    def launch(self, store: SweepStore, runs: list[str], opts: LaunchOptions) -> None:
        """Submit ``runs`` and return once SLURM has them (``submitted`` events carry job ids)."""
        if not runs:
            return
        records = {rid: store.load_record(rid) for rid in runs}
        if opts.dry_run:
            self._print_plan(store, runs, records)
            return
        check_partitions(store, records.values())
        limit = self._max_array_size or max_array_size()
        submitted: dict[str, str] = {}  # run id -> job id, for branches waiting on trunks
        for dependency, group in self._groups(store, runs, records, submitted):
            for resources, ids in group.items():
                self._submit_group(
                    store, ids, json.loads(resources), records, opts, limit, dependency, submitted
                )

    def _groups(
        self,
        store: SweepStore,
        runs: list[str],
        records: dict[str, dict[str, Any]],
        submitted: dict[str, str],
    ) -> Iterator[tuple[str | None, dict[str, list[str]]]]:
        """Runs grouped by dependency (the parent trunk's job) and resources, trunks first."""
        free: dict[str, list[str]] = {}
        waiting: dict[str, list[str]] = {}
        for rid in runs:
            parent = records[rid].get("parent")
            if parent and store.status(parent).state != RunState.COMPLETED:
                waiting.setdefault(parent, []).append(rid)
            else:
                free.setdefault(_group_key(records[rid]), []).append(rid)
        if free:
            yield None, free
        for parent, ids in waiting.items():
            job = submitted.get(parent) or self._parent_job(store, parent)
            if job is None:
                print(
                    f"slurm: not submitting {len(ids)} branch run(s) of {parent}: it is "
                    f"{store.status(parent).state.value} and not in this launch",
                    file=sys.stderr,
                )
                continue
            group: dict[str, list[str]] = {}
            for rid in ids:
                group.setdefault(_group_key(records[rid]), []).append(rid)
            yield job, group

    @staticmethod
    def _parent_job(store: SweepStore, parent: str) -> str | None:
        st = store.status(parent)
        if st.state.is_active() and st.last_event.get("backend") == NAME:
            return st.last_event.get("job_id")
        return None

    def _executor(self, store: SweepStore) -> Any:
        try:
            import submitit
        except ImportError as e:
            raise BackendError(
                f"slurm: submitit is not installed ({e}); pip install submitit"
            ) from None
        if shutil.which("sbatch") is None:
            raise BackendError("slurm: sbatch not found on PATH (is this a SLURM login node?)")
        folder = store.root.resolve() / SUBMITIT_DIR
        return submitit.SlurmExecutor(
            folder=folder, python=self.python, max_num_timeout=MAX_TIMEOUT_REQUEUES
        )

    def _submit_group(
        self,
        store: SweepStore,
        ids: list[str],
        resources: dict[str, Any],
        records: dict[str, dict[str, Any]],
        opts: LaunchOptions,
        limit: int,
        dependency: str | None,
        submitted: dict[str, str],
    ) -> None:
        params = sbatch_parameters(resources, f"sweeper-{store.root.name}")
        parallel = int(opts.extra.get("array_parallelism") or 0)
        if parallel > 0:
            params["array_parallelism"] = parallel
        params["additional_parameters"]["hold"] = True
        if dependency:
            params["additional_parameters"]["dependency"] = f"afterok:{dependency}"
            params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
        trial = SlurmTrial(str(store.root.resolve()))
        for chunk in chunks(packs(ids, int(resources.get("runs_per_job", 1))), limit):
            executor = self._executor(store)
            executor.update_parameters(**params)
            try:
                jobs = executor.map_array(trial, chunk)
            except Exception as e:  # submitit raises plain errors carrying sbatch's message
                msg = str(e).strip().splitlines()
                raise BackendError(f"slurm: submission failed: {msg[-1] if msg else e}") from None
            for job, pack in zip(jobs, chunk, strict=True):
                for rid in pack:
                    store.append_event(rid, RunState.SUBMITTED, backend=NAME, job_id=job.job_id)
                    submitted[rid] = job.job_id
            _run(["scontrol", "release", jobs[0].job_id.split("_")[0]])

    def _print_plan(self, store: SweepStore, runs: list[str], records: dict[str, Any]) -> None:
        for rid in runs:
            params = sbatch_parameters(
                records[rid].get("resources") or {}, f"sweeper-{store.root.name}"
            )
            print(f"slurm: would submit {rid}: {json.dumps(params, sort_keys=True)}")

    # ---- reconcile
    def reconcile(self, store: SweepStore) -> None:
        """Record the outcome of runs whose SLURM job ended without the worker recording one."""
        candidates: dict[str, dict[str, Any]] = {}
        for rid, st in store.statuses().items():
            ev = st.last_event
            if (
                ev.get("backend") == NAME
                and ev.get("job_id")
                and ev["state"] in (RunState.SUBMITTED.value, RunState.RUNNING.value)
            ):
                candidates[rid] = ev
        if not candidates:
            return
        jobs = {ev["job_id"] for ev in candidates.values()}
        queued = queue_states(jobs)
        acct = accounting(jobs - set(queued))
        for rid, ev in candidates.items():
            jid = ev["job_id"]
            if jid in queued and queued[jid] in ACTIVE_STATES:
                continue
            info = acct.get(jid)
            if info is None or info["State"] in ACTIVE_STATES or info["State"] not in FINAL_STATES:
                continue
            self._record_final(store, rid, ev, jid, info)

    def _record_final(
        self, store: SweepStore, rid: str, ev: dict[str, Any], jid: str, info: dict[str, str]
    ) -> None:
        state = FINAL_STATES[info["State"]]
        reason = f"slurm job {jid} {info['FullState']} (exit {info['ExitCode']})"
        if info["State"] == "COMPLETED":
            reason += " without recording an outcome"
        fields: dict[str, Any] = {"backend": NAME, "job_id": jid, "reason": reason}
        if state == RunState.FAILED:
            fields["stderr_tail"] = _tail(store.root / SUBMITIT_DIR / f"{jid}_0_log.err")
        append_if_unchanged(store, rid, state, expect=ev, **fields)

    # ---- cancel
    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """``scancel`` the jobs of ``run_ids``. Queued runs are recorded ``cancelled`` here; a
        running one is recorded by its job once its trainer has checkpointed.

        A packed job runs several runs: cancelling one cancels the whole job.
        """
        jobs: dict[str, list[str]] = {}
        for rid in run_ids:
            st = store.status(rid)
            if st.state.is_active() and st.last_event.get("backend") == NAME:
                jid = st.last_event.get("job_id")
                if jid:
                    jobs.setdefault(jid, []).append(rid)
        if not jobs:
            return
        _run(["scancel", *sorted(jobs)])
        for jid, ids in jobs.items():
            for rid in ids:
                ev = store.status(rid).last_event
                if ev.get("state") == RunState.SUBMITTED.value:
                    append_if_unchanged(
                        store,
                        rid,
                        RunState.CANCELLED,
                        expect=ev,
                        backend=NAME,
                        job_id=jid,
                        reason=f"slurm job {jid} cancelled",
                    )
