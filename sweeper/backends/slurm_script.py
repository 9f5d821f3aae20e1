"""SLURM configuration and job arrays: what a launch submits, as data and as sbatch text.

Nothing here calls SLURM. :func:`plan_arrays` turns the runs of one launch into job arrays and
:func:`sbatch_script` renders one of them with submitit's own script builder, so that a dry run
(:meth:`SlurmBackend.describe`) prints exactly the file that :meth:`SlurmBackend.launch` submits.

How runs become jobs
--------------------
* **One array per resource group.** Runs whose sbatch parameters are equal (usually every run of a
  sweep) go into one job array; each array task runs one *unit* of runs, in order, through
  :func:`sweeper.worker.run_trial`. More tasks than the cluster's ``MaxArraySize`` are split over
  several arrays.
* **WSD branches start at the fork, not at the end of the trunk.** A branch needs only its trunk's
  (permanent) checkpoint at the branch step. Branches of a trunk in this launch are tasks of the
  trunk's array, after every trunk of it: array tasks start in index order, so a branch task starts
  only once its trunk has started. The task then waits (polling, without running anything) until
  the checkpoint at the fork exists and trains the branch from it while the trunk goes on. A
  branch whose trunk ended without that checkpoint is recorded ``cancelled``; a branch whose
  trunk is queued again (requeued, preempted) for longer than ``FORK_GRACE_S`` gives its slot
  back with ``scontrol requeue`` of its own task and stays ``submitted``.
* **Branches of a trunk in another job** (an earlier launch whose trunk is still queued or
  running, or an array that is full or has other resources) go into arrays with
  ``--dependency=after:<the trunks' jobs>`` (*after*: once those jobs started, not ended), then
  wait for the checkpoint in the same way. Branches of a trunk that is neither completed nor
  queued are not submitted: they end ``cancelled`` with the reason.
* **Packing.** ``runs_per_job = k`` puts consecutive runs into one task, k at most (trunks and
  single runs together, branches together).
* **One throttle for the whole sweep.** ``array_parallelism = N`` bounds the running tasks of the
  sweep, over every array and every launch: the throttle ``%n`` of each array is its share of N, in
  proportion to its unfinished tasks (at least 1 each, so the bound holds while the sweep has at
  most N live arrays). Arrays of earlier launches that are still in the queue are counted in, and
  their ``ArrayTaskThrottle`` is lowered with ``scontrol update`` (one call per such array). A
  lowered throttle stops new starts; tasks already running finish.
* **Bounded calls.** A launch makes one sbatch per array (resource groups x ``MaxArraySize``
  chunks, plus the chunks of branches whose trunk is in another job) and one ``scontrol update``
  per live array of earlier launches; never one per run or per trunk.

Scripts carry ``setup`` lines (``module load ...``) and ``env`` exports before the worker line,
``--requeue`` (so preemption and ``scontrol requeue`` work where ``JobRequeue=0``) and
``--signal=USR2@signal_delay_s`` (the trainer checkpoints before the time limit).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.records import Resources, RunRecord
from trainer.config import ConfigError

NAME = "slurm"
SUBMITIT_DIR = "slurm"  # <sweep>/slurm: submitit's folder (job pickles, sbatch files, logs)
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z-]*")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# sbatch options the sweeper sets itself: an sbatch_extra entry for them would break the mapping
# of array tasks to runs, or contradict [resources] / another backend.slurm key.
_OWNED = {
    "array": "set by the sweeper",
    "output": "set by the sweeper",
    "error": "set by the sweeper",
    "open-mode": "set by the sweeper",
    "dependency": "set by the sweeper",
    "wrap": "set by the sweeper",
    "hold": "set by the sweeper",
    "job-name": "set by the sweeper",
    "signal": "use backend.slurm.signal_delay_s",
    "nodes": "use resources.nodes",
    "ntasks-per-node": "use resources.procs_per_node",
    "cpus-per-task": "use resources.cpus_per_task",
    "gpus-per-node": "use resources.gpus_per_node",
    "mem": "use resources.mem_gb",
    "time": "use resources.time_min",
    "partition": "use backend.slurm.partition",
    "account": "use backend.slurm.account",
    "qos": "use backend.slurm.qos",
    "constraint": "use backend.slurm.constraint",
}


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    """``[backend.slurm]``: where and how the sweep's jobs are submitted.

    Maps are lists of ``"KEY=VALUE"`` strings: ``sbatch_extra = ["gres=gpu:1", "exclusive"]`` (a
    key alone is a flag), ``env = ["NCCL_DEBUG=INFO"]``.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_extra: tuple[str, ...] = ()  # extra sbatch options, "key=value" or "key"
    setup: tuple[str, ...] = ()  # shell lines run in the job before the worker
    env: tuple[str, ...] = ()  # "KEY=VALUE" exported in the job
    array_parallelism: int = 64  # running tasks of the sweep at once, over all its arrays
    runs_per_job: int = 1  # pack this many runs into one array task
    python: str | None = None  # command that starts Python on the nodes (default: this one)
    max_array_size: int | None = None  # default: the cluster's MaxArraySize
    signal_delay_s: int = 90  # USR2 this long before the time limit: time to checkpoint

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the key) for an unusable value."""
        for key in ("partition", "account", "qos", "constraint", "python"):
            value = getattr(self, key)
            if value is not None:
                _check_text(key, value)
                if not value.strip():
                    _bad(key, value, "must not be empty")
        for line in self.setup:
            _check_text("setup", line)
        self.extra_options()
        self.env_vars()
        if not 1 <= self.array_parallelism <= 1_000_000:
            _bad("array_parallelism", self.array_parallelism, "must be in 1..1000000")
        if not 1 <= self.runs_per_job <= 10_000:
            _bad("runs_per_job", self.runs_per_job, "must be in 1..10000")
        if self.max_array_size is not None and self.max_array_size < 1:
            _bad("max_array_size", self.max_array_size, "must be >= 1")
        if not 0 <= self.signal_delay_s <= 3600:
            _bad("signal_delay_s", self.signal_delay_s, "must be in 0..3600 seconds")

    def extra_options(self) -> dict[str, str | bool]:
        """``sbatch_extra`` as submitit's ``additional_parameters`` (a flag maps to True)."""
        out: dict[str, str | bool] = {}
        for item in self.sbatch_extra:
            _check_text("sbatch_extra", item)
            key, eq, value = item.removeprefix("--").partition("=")
            if not _SBATCH_KEY.fullmatch(key):
                _bad("sbatch_extra", item, "the option name must match [A-Za-z-]+ (a letter first)")
            if key in _OWNED:
                _bad("sbatch_extra", item, _OWNED[key])
            out[key] = value if eq else True
        return out

    def env_vars(self) -> dict[str, str]:
        """``env`` as a dict."""
        out: dict[str, str] = {}
        for item in self.env:
            _check_text("env", item)
            key, eq, value = item.partition("=")
            if not eq or not _ENV_KEY.fullmatch(key):
                _bad("env", item, "expected NAME=VALUE with NAME a shell variable name")
            out[key] = value
        return out


def _bad(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"backend.slurm.{key} = {_short(value)}: {why}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(key: str, value: str) -> None:
    if _CONTROL.search(value):
        _bad(key, value, "newlines and control characters are not allowed")


# ------------------------------------------------------------------------------- sbatch parameters


def mem_string(gb: float) -> str:
    """``--mem`` for ``gb`` GB: whole GB as ``NG``, otherwise MB rounded up (never ``0``)."""
    if gb == int(gb) and gb >= 1:
        return f"{int(gb)}G"
    return f"{max(1, math.ceil(gb * 1024))}M"


def sbatch_parameters(res: Resources, cfg: SlurmConfig, job_name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters (sbatch names) for one run's resources.

    One task per node: the worker starts torchrun for ``procs_per_node`` ranks inside it, so the
    task gets the CPUs of all of them.
    """
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": res.nodes,
        "ntasks_per_node": 1,
        "cpus_per_task": res.cpus_per_task * res.procs_per_node,
        "mem": mem_string(res.mem_gb),
        "time": res.time_min,
        "signal_delay_s": cfg.signal_delay_s,
        # requeueable even where the cluster's JobRequeue default is 0
        "additional_parameters": {"requeue": True, **cfg.extra_options()},
    }
    if res.gpus_per_node > 0:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key):
            params[key] = getattr(cfg, key)
    setup = [f"export {k}={shlex.quote(v)}" for k, v in cfg.env_vars().items()]
    setup += list(cfg.setup)
    if setup:
        params["setup"] = setup
    return params


# ------------------------------------------------------------------------------------- the arrays


@dataclass
class ArrayJob:
    """One sbatch: ``tasks[i]`` are the run ids array task ``i`` runs, in order.

    ``dependency`` holds job ids and ``after_runs`` the ids of trunks of this launch in another
    array, whose job ids are known once that array is submitted (:meth:`parameters`).
    """

    tasks: list[list[str]]
    params: dict[str, Any]
    dependency: list[str] = field(default_factory=list)  # job ids (after: started)
    after_runs: list[str] = field(default_factory=list)  # run ids of this launch (after: started)
    throttle: int = 1

    def parameters(self, jobs: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The executor parameters of this sbatch (throttle and dependency included); ``jobs``
        maps the ``after_runs`` to their job ids (a dry run shows ``<job-of-RUN>``)."""
        params = {**self.params, "array_parallelism": self.throttle}
        # submitted held, released once the runs' events are written (see SlurmBackend.launch)
        extra = {**params["additional_parameters"], "hold": True}
        known = jobs or {}
        after = [*self.dependency, *(known.get(r, f"<job-of-{r}>") for r in self.after_runs)]
        if after:
            extra["dependency"] = "after:" + ":".join(after)
        params["additional_parameters"] = extra
        return params


@dataclass
class Submission:
    """What one launch submits: new arrays, new throttles of live arrays, refused runs."""

    arrays: list[ArrayJob]
    retune: dict[str, int]  # live array job id -> its new ArrayTaskThrottle
    refused: dict[str, str]  # run id -> why it is not submitted

    @property
    def sbatch_calls(self) -> int:
        """One sbatch per array."""
        return len(self.arrays)


@dataclass(frozen=True)
class Queue:
    """What the launch needs to know about the sweep beyond its runs.

    Attributes:
        completed: Ids of completed runs (a branch of such a trunk can start at once).
        parent_jobs: Trunk id -> its queued/running SLURM job id.
        parent_states: Trunk id -> its state (for the reason a branch is refused).
        live_arrays: Array job id -> unfinished tasks, for the sweep's arrays in the queue.
        live_jobs: Number of the sweep's plain (non-array) jobs in the queue.
    """

    completed: frozenset[str] = frozenset()
    parent_jobs: dict[str, str] = field(default_factory=dict)
    parent_states: dict[str, str] = field(default_factory=dict)
    live_arrays: dict[str, int] = field(default_factory=dict)
    live_jobs: int = 0


@dataclass
class _Group:
    """The runs of one resource group: ``free`` start at once (trunks, single runs, branches of
    completed trunks), ``branches`` fork from a trunk of this launch, ``later`` from a trunk of an
    earlier launch that is still queued or running (``(run, trunk job)``)."""

    params: dict[str, Any]
    free: list[str] = field(default_factory=list)
    branches: list[tuple[str, str]] = field(default_factory=list)
    later: list[tuple[str, str]] = field(default_factory=list)


def plan_arrays(
    runs: list[RunRecord],
    cfg: SlurmConfig,
    job_name: str,
    *,
    parallel: int,
    max_array: int,
    queue: Queue,
) -> Submission:
    """The arrays that submit ``runs``; see the module docstring."""
    groups, refused = _group(runs, cfg, job_name, queue)
    own: dict[str, list[ArrayJob]] = {}  # per group: its arrays of trunks and single runs
    home: dict[str, ArrayJob] = {}  # run id -> the array of this launch that runs it
    for key, g in groups.items():
        chunks = _chunks(pack(_units(g.free), cfg.runs_per_job), max_array)
        own[key] = [ArrayJob(c, g.params) for c in chunks]
        home.update((rid, a) for a in own[key] for task in a.tasks for rid in task)
    arrays: list[ArrayJob] = []
    elsewhere: dict[str, list[tuple[str, str]]] = {}  # per group: branches of another array's trunk
    for key, g in groups.items():
        joining: dict[int, list[str]] = {id(a): [] for a in own[key]}
        for rid, trunk in g.branches:
            same = joining.get(id(home[trunk]))
            if same is not None and len(home[trunk].tasks) + len(same) < max_array:
                same.append(rid)  # a higher index than its trunk: starts after the trunk started
            else:
                elsewhere.setdefault(key, []).append((rid, trunk))
        for a in own[key]:
            a.tasks += pack(_units(joining[id(a)]), cfg.runs_per_job)
        arrays += own[key]
    for key, g in groups.items():
        arrays += _dependent(g.params, g.later, elsewhere.get(key, []), cfg.runs_per_job, max_array)
    live = dict(queue.live_arrays)
    shares = split_throttle(
        parallel - queue.live_jobs, [*live.values(), *(len(a.tasks) for a in arrays)]
    )
    for array, share in zip(arrays, shares[len(live) :], strict=True):
        array.throttle = share
    retune = dict(zip(live, shares[: len(live)], strict=True))
    return Submission(arrays, retune, refused)


def _group(
    runs: list[RunRecord], cfg: SlurmConfig, job_name: str, queue: Queue
) -> tuple[dict[str, _Group], dict[str, str]]:
    """The runs by resource group, and the branches refused (trunk neither done nor queued)."""
    groups: dict[str, _Group] = {}
    launched = {r.id for r in runs if r.parent is None or r.parent in queue.completed}
    refused: dict[str, str] = {}
    for r in runs:
        key = _key(r.resources)
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(sbatch_parameters(r.resources, cfg, job_name))
        if r.parent is None or r.parent in queue.completed:
            g.free.append(r.id)
        elif r.parent in launched:
            g.branches.append((r.id, r.parent))
        elif r.parent in queue.parent_jobs:
            g.later.append((r.id, queue.parent_jobs[r.parent]))
        else:
            state = queue.parent_states.get(r.parent, "missing")
            refused[r.id] = f"trunk {r.parent} is {state} and not in this launch"
    return groups, refused


def _units(ids: list[str]) -> list[list[str]]:
    return [[rid] for rid in ids]


def _dependent(
    params: dict[str, Any],
    later: list[tuple[str, str]],
    extra: list[tuple[str, str]],
    runs_per_job: int,
    max_array: int,
) -> list[ArrayJob]:
    """Arrays of branches whose trunk runs in another job: ``after:`` that trunk's job (``later``:
    a job id of an earlier launch; ``extra``: a trunk of this launch in another array)."""
    jobs = dict(later)
    trunks = dict(extra)
    units = _units([rid for rid, _ in [*later, *extra]])
    arrays = []
    for chunk in _chunks(pack(units, runs_per_job), max_array):
        ids = [rid for task in chunk for rid in task]
        dependency = sorted({jobs[r] for r in ids if r in jobs})
        after_runs = sorted({trunks[r] for r in ids if r in trunks})
        arrays.append(ArrayJob(chunk, params, dependency, after_runs))
    return arrays


def _key(res: Resources) -> str:
    return json.dumps(res.to_dict(), sort_keys=True)


def pack(units: list[list[str]], runs_per_job: int) -> list[list[str]]:
    """Consecutive units joined into tasks of at most ``runs_per_job`` runs (a longer unit is a
    task of its own)."""
    tasks: list[list[str]] = []
    for unit in units:
        if tasks and len(tasks[-1]) + len(unit) <= runs_per_job:
            tasks[-1] = tasks[-1] + unit
        else:
            tasks.append(list(unit))
    return tasks


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    size = max(1, size)
    return [items[i : i + size] for i in range(0, len(items), size)]


def split_throttle(budget: int, sizes: list[int]) -> list[int]:
    """Split ``budget`` running tasks over arrays of ``sizes`` unfinished tasks.

    Each array gets at least 1 and at most its size, in proportion to its size; the sum stays
    within ``budget`` whenever ``budget >= len(sizes)``.
    """
    if sum(sizes) <= budget:
        return [max(1, s) for s in sizes]
    total = sum(sizes)
    want = [budget * s / total for s in sizes]
    alloc = [max(1, min(s, math.floor(w))) for s, w in zip(sizes, want, strict=True)]
    while sum(alloc) > budget and max(alloc) > 1:  # the minimum of 1 overshot
        alloc[alloc.index(max(alloc))] -= 1
    order = sorted(range(len(sizes)), key=lambda i: alloc[i] - want[i])
    spare = budget - sum(alloc)
    for i in order:
        if spare <= 0:
            break
        if alloc[i] < sizes[i]:
            alloc[i] += 1
            spare -= 1
    return alloc


# ----------------------------------------------------------------------------------------- scripts


def python_command(cfg: SlurmConfig) -> str:
    """The shell command that starts Python on the nodes (submitit's ``python``)."""
    return cfg.python if cfg.python else shlex.quote(sys.executable)


def sbatch_script(
    array: ArrayJob, folder: Path, python: str, jobs: Mapping[str, str] | None = None
) -> str:
    """The sbatch file submitit writes for ``array`` (same builder, same arguments); ``jobs``
    as in :meth:`ArrayJob.parameters`."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    n = len(array.tasks)
    text: str = _make_sbatch_string(
        command=command, folder=folder, map_count=n if n > 1 else None, **array.parameters(jobs)
    )
    return text


def describe_submission(
    sub: Submission,
    records: dict[str, RunRecord],
    folder: Path,
    python: str,
    trainer_line: Callable[[RunRecord], list[str]],
    max_tasks: int = 20,
) -> str:
    """The dry-run text: a summary, then each array's tasks and exact sbatch script."""
    runs = sum(len(t) for a in sub.arrays for t in a.tasks)
    lines = [
        f"slurm: {runs} runs in {len(sub.arrays)} sbatch call(s); nothing is submitted (dry run)"
    ]
    for jid, n in sub.retune.items():
        lines.append(f"slurm: would set ArrayTaskThrottle={n} on live array {jid}")
    for rid, why in sub.refused.items():
        lines.append(f"slurm: would not submit {rid}: {why}")
    for i, array in enumerate(sub.arrays, 1):
        lines.append("")
        after = array.parameters()["additional_parameters"].get("dependency")
        lines.append(
            f"# ---- array {i} of {len(sub.arrays)}: {len(array.tasks)} task(s), at most "
            f"{array.throttle} at once" + (f", {after}" if after else "")
        )
        for t, task in enumerate(array.tasks[:max_tasks]):
            then = f" then {', '.join(task[1:])}" if len(task) > 1 else ""
            lines.append(f"#   task {t}: {task[0]}{then}")
        if len(array.tasks) > max_tasks:
            lines.append(f"#   ... {len(array.tasks) - max_tasks} more task(s)")
        first = records[array.tasks[0][0]]
        command = " ".join(map(shlex.quote, trainer_line(first)))
        lines.append(f"#   each run, through the worker, e.g.: {command}")
        lines.append(sbatch_script(array, folder, python))
    return "\n".join(lines)
