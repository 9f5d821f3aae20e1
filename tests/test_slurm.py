"""The SLURM backend: config, job arrays and sbatch scripts (no cluster needed), then SLURM-specific
behaviour against a real single-node SLURM (``bash scripts/slurm-cluster.sh start``): dry run,
WSD branches that start at their trunk's fork checkpoint, requeue, preemption, packing, 2-rank
torchrun. What every backend does alike (a sweep completes,
a killed run resumes once, cancel and resume) is in ``test_backend_contract.py``.

Every test that needs the cluster skips with the reason when it is not up. The runs are tiny
(``test-micro``, synthetic data, one thread), so each test takes seconds of training plus SLURM's
scheduling and requeue delays.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sweep_cli import (
    REPO,
    Sweep,
    all_in,
    base_env,
    fake_command,
    forked_while_trunk_ran,
    logged_steps,
    losses,
    micro_spec,
    sacct_ids,
    slurm_problem,
    squeue_ids,
    steps_after,
    wait_for,
)

from sweeper import Sweep as Sweep_
from sweeper.backends import LaunchOptions, slurm
from sweeper.backends.slurm import (
    FINAL_STATES,
    SlurmBackend,
    _ours,
    accounting,
    job_info,
    max_array_size,
)
from sweeper.backends.slurm_script import (
    ArrayJob,
    Queue,
    SlurmConfig,
    mem_string,
    pack,
    plan_arrays,
    sbatch_parameters,
    sbatch_script,
    split_throttle,
)
from sweeper.records import Resources, RunEvent, RunKind, RunRecord, RunState
from trainer.config import ConfigError, TrainConfig

_WHY_NOT = slurm_problem()


def on_cluster(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that needs the cluster; it skips, with the reason, when SLURM is not up."""
    test = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))(test)
    return pytest.mark.slurm(pytest.mark.slow(test))


# --------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("partition", "gpu\n#SBATCH --qos=free"),
        ("account", "proj\r"),
        ("qos", "hi\x00"),
        ("constraint", "a100\x1b[2J"),
        ("python", "python3\nrm -rf x"),
        ("setup", ("module load cuda", "echo ok\nsbatch evil.sh")),
        ("sbatch_extra", ("comment=a\nb",)),
        ("sbatch_extra", ("comm\tent=x",)),
        ("env", ("A=1\n#SBATCH --exclusive",)),
        ("env", ("A\n=1",)),
    ],
)
def test_control_characters_are_refused_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        SlurmConfig(**{key: value}).validate()
    msg = str(err.value)
    assert msg.startswith(f"backend.slurm.{key} = ") and "\n" not in msg
    assert "control characters" in msg or key in ("sbatch_extra", "env")


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("mail_type=END", "[A-Za-z-]+"),
        ("gres gpu=1", "[A-Za-z-]+"),
        ("x;y=1", "[A-Za-z-]+"),
        ("=1", "[A-Za-z-]+"),
        ("array=0-9", "set by the sweeper"),
        ("dependency=afterok:1", "set by the sweeper"),
        ("mem=4G", "resources.mem_gb"),
        ("partition=gpu", "backend.slurm.partition"),
    ],
)
def test_sbatch_extra_keys_are_checked(entry: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^backend\.slurm\.sbatch_extra = .*{re.escape(why)}"):
        SlurmConfig(sbatch_extra=(entry,)).validate()


@pytest.mark.parametrize(
    ("key", "value"),
    [("array_parallelism", 0), ("runs_per_job", 0), ("max_array_size", 0), ("signal_delay_s", -1)],
)
def test_bad_numbers_are_refused(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"^backend\.slurm\.{key} = {value}: "):
        SlurmConfig(**{key: value}).validate()


def test_good_config_validates_and_maps_options() -> None:
    cfg = SlurmConfig(
        partition="gpu",
        sbatch_extra=("exclusive", "--gres=gpu:a100:1", "comment=two words"),
        env=("NCCL_DEBUG=INFO", "EMPTY="),
        setup=("module load cuda/12.4",),
    )
    cfg.validate()
    assert cfg.extra_options() == {"exclusive": True, "gres": "gpu:a100:1", "comment": "two words"}
    assert cfg.env_vars() == {"NCCL_DEBUG": "INFO", "EMPTY": ""}


def test_spec_tables_build_the_config() -> None:
    from sweeper.backends import parse_config
    from sweeper.errors import SpecError

    raw = {"partition": "gpu", "setup": ["module load x"], "array_parallelism": 8}
    cfg = parse_config("slurm", raw, "s.toml")
    assert cfg == SlurmConfig(partition="gpu", setup=("module load x",), array_parallelism=8)
    with pytest.raises(SpecError, match=r"^s\.toml: backend\.slurm\.partition = 'a\\nb': "):
        parse_config("slurm", {"partition": "a\nb"}, "s.toml")
    with pytest.raises(SpecError, match=r"backend\.slurm\.nope: unknown key"):
        parse_config("slurm", {"nope": 1}, "s.toml")


@pytest.mark.parametrize(
    ("gb", "text"),
    [(64.0, "64G"), (1.0, "1G"), (1.5, "1536M"), (0.25, "256M"), (0.3, "308M"), (0.001, "2M")],
)
def test_mem_never_rounds_to_zero(gb: float, text: str) -> None:
    assert mem_string(gb) == text


# ------------------------------------------------------------------------------ arrays and scripts


def test_sbatch_script_follows_resources_and_config(tmp_path: Path) -> None:
    res = Resources(
        nodes=2, procs_per_node=4, gpus_per_node=4, cpus_per_task=8, mem_gb=64.0, time_min=120
    )
    cfg = SlurmConfig(
        partition="gpu",
        account="proj",
        qos="high",
        constraint="a100",
        sbatch_extra=("exclusive",),
        setup=("module load cuda/12.4", "source ~/venv/bin/activate"),
        env=("NCCL_DEBUG=INFO", "ODD=a b'c"),
    )
    tasks = [[f"r{i}"] for i in range(100)]
    params = sbatch_parameters(res, cfg, "sweeper-demo")
    array = ArrayJob(tasks, params, dependency=["7_3", "8"], after_runs=["t1"], throttle=16)
    text = sbatch_script(array, tmp_path, "python3", {"t1": "9_1"})
    for line in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--gpus-per-node=4",
        "--mem=64G",
        "--time=120",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=a100",
        "--exclusive",
        "--requeue",
        "--hold",
        "--signal=USR2@90",
        "--array=0-99%16",
        "--job-name=sweeper-demo",
        "--dependency=after:7_3:8:9_1",
    ):
        assert f"#SBATCH {line}\n" in text, line
    assert "kill-on-invalid-dep" not in text
    # the job of a trunk of the same launch is known once its array is submitted
    dry = sbatch_script(array, tmp_path, "python3")  # quoted by submitit: '<' is not shell-safe
    assert "#SBATCH --dependency='after:7_3:8:<job-of-t1>'\n" in dry
    setup = text.split("# setup\n")[1].split("\n\n")[0].splitlines()
    assert setup == [
        "export NCCL_DEBUG=INFO",
        "export ODD='a b'\"'\"'c'",
        "module load cuda/12.4",
        "source ~/venv/bin/activate",
    ]
    assert f"python3 -u -m submitit.core._submit {tmp_path}" in text
    single = sbatch_script(ArrayJob([["r0"]], array.params), tmp_path, "python3")
    assert "--array" not in single and "--dependency" not in single


def _record(rid: str, kind: RunKind = RunKind.SINGLE, parent: str | None = None) -> RunRecord:
    return RunRecord(
        id=rid, slug=rid, kind=kind, parent=parent, sweep="s", model="m", train=TrainConfig()
    )


def _wsd(trunks: int, branches: int) -> list[RunRecord]:
    runs = []
    for t in range(trunks):
        runs.append(_record(f"t{t}", RunKind.TRUNK))
        runs += [_record(f"t{t}b{b}", RunKind.BRANCH, f"t{t}") for b in range(branches)]
    return runs


def test_a_wsd_sweep_is_a_few_arrays_with_branches_after_their_trunks() -> None:
    runs = _wsd(540, 8)
    sub = plan_arrays(runs, SlurmConfig(), "j", parallel=9, max_array=1001, queue=Queue())
    assert not sub.refused and not sub.retune
    # 4860 runs, 540 trunks first: 5 sbatch calls, never one per trunk
    assert [len(a.tasks) for a in sub.arrays] == [1001, 1001, 1001, 1001, 856]
    first = sub.arrays[0]
    assert first.tasks[:540] == [[f"t{t}"] for t in range(540)] and first.dependency == []
    assert first.tasks[540] == ["t0b0"] and first.after_runs == []
    # branches that do not fit their trunk's array start after (not at the end of) their trunks
    parent = {r.id: r.parent for r in runs}
    for array in sub.arrays[1:]:
        trunks = {parent[rid] for task in array.tasks for rid in task}
        assert array.after_runs == sorted(trunks) and array.dependency == []
    assert sum(a.throttle for a in sub.arrays) == 9
    (one,) = plan_arrays(runs, SlurmConfig(), "j", parallel=9, max_array=5000, queue=Queue()).arrays
    assert len(one.tasks) == 4860 and one.tasks[540:542] == [["t0b0"], ["t0b1"]]


def test_a_branch_with_other_resources_than_its_trunk_waits_for_the_trunks_job() -> None:
    short = Resources(time_min=5)
    runs = [
        dataclasses.replace(_record("b0", RunKind.BRANCH, "t0"), resources=short),  # order-proof
        _record("t0", RunKind.TRUNK),
        _record("t0b1", RunKind.BRANCH, "t0"),
    ]
    sub = plan_arrays(runs, SlurmConfig(), "j", parallel=4, max_array=10, queue=Queue())
    trunks, other = sub.arrays  # the trunk's array (with its same-resource branch), then b0's
    assert trunks.tasks == [["t0"], ["t0b1"]] and trunks.after_runs == []
    assert other.tasks == [["b0"]] and other.after_runs == ["t0"] and not sub.refused
    assert other.parameters({"t0": "7_0"})["additional_parameters"]["dependency"] == "after:7_0"
    assert other.params["time"] == 5 and trunks.params["time"] == 60


def test_throttle_holds_across_arrays_and_live_arrays() -> None:
    runs = [_record(f"r{i}") for i in range(2500)]
    sub = plan_arrays(runs, SlurmConfig(), "j", parallel=64, max_array=1000, queue=Queue())
    assert [len(a.tasks) for a in sub.arrays] == [1000, 1000, 500]
    assert sum(a.throttle for a in sub.arrays) == 64
    # an earlier launch's array with 300 unfinished tasks and one plain job share the budget
    queue = Queue(live_arrays={"41": 300}, live_jobs=1)
    sub = plan_arrays(runs[:100], SlurmConfig(), "j", parallel=64, max_array=1000, queue=queue)
    assert sum(sub.retune.values()) + sum(a.throttle for a in sub.arrays) == 63
    assert sub.retune["41"] > sub.arrays[0].throttle >= 1


@pytest.mark.parametrize(
    ("budget", "sizes"),
    [(9, [540]), (3, [100, 1, 1]), (64, [1000, 1000, 500]), (10, [3, 4]), (5, [7] * 5), (4, [])],
)
def test_split_throttle_stays_within_the_budget(budget: int, sizes: list[int]) -> None:
    shares = split_throttle(budget, sizes)
    assert len(shares) == len(sizes)
    assert all(1 <= s <= max(1, n) for s, n in zip(shares, sizes, strict=True))
    assert sum(shares) <= max(budget, len(sizes))
    if sum(sizes) > budget >= len(sizes):
        assert sum(shares) == budget


def test_branches_of_earlier_trunks_depend_on_their_jobs_and_orphans_are_refused() -> None:
    runs = [
        _record("t0b0", RunKind.BRANCH, "t0"),  # trunk completed: starts at once
        _record("t1b0", RunKind.BRANCH, "t1"),  # trunk queued as 5_1
        _record("t2b0", RunKind.BRANCH, "t2"),  # trunk queued as 6
        _record("t1b1", RunKind.BRANCH, "t1"),
        _record("t3b0", RunKind.BRANCH, "t3"),  # trunk failed, not relaunched
    ]
    queue = Queue(
        completed=frozenset({"t0"}),
        parent_jobs={"t1": "5_1", "t2": "6"},
        parent_states={"t3": "failed"},
        live_arrays={"5": 1},
        live_jobs=1,
    )
    sub = plan_arrays(runs, SlurmConfig(), "j", parallel=8, max_array=1001, queue=queue)
    free, waiting = sub.arrays
    assert free.tasks == [["t0b0"]] and free.dependency == []
    assert waiting.tasks == [["t1b0"], ["t2b0"], ["t1b1"]]
    assert waiting.dependency == ["5_1", "6"]
    assert waiting.parameters()["additional_parameters"]["dependency"] == "after:5_1:6"
    assert sub.refused == {"t3b0": "trunk t3 is failed and not in this launch"}
    assert sub.sbatch_calls == 2


def test_packing_joins_units_up_to_runs_per_job() -> None:
    assert pack([["a"], ["b"], ["c"], ["d"], ["e"]], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert pack([["t", "b1", "b2"], ["s"], ["u"]], 2) == [["t", "b1", "b2"], ["s", "u"]]
    assert pack([["a"], ["b"]], 1) == [["a"], ["b"]]
    assert set(FINAL_STATES) >= {"PREEMPTED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "FAILED"}


def test_a_task_runs_only_runs_that_wait_for_its_job() -> None:
    def ev(state: RunState, job: str | None) -> RunEvent:
        return RunEvent(ts=0.0, state=state, job_id=job)

    assert _ours(None, "5_1")
    assert _ours(ev(RunState.SUBMITTED, "5_1"), "5_1")
    assert _ours(ev(RunState.RUNNING, "5_1"), "5_1")  # requeued after a kill
    assert not _ours(ev(RunState.SUBMITTED, "9_0"), "5_1")  # resubmitted elsewhere
    assert not _ours(ev(RunState.CANCELLED, "5_1"), "5_1")
    assert not _ours(ev(RunState.COMPLETED, "5_1"), "5_1")


def test_a_branch_waits_for_its_trunks_checkpoint_at_the_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = micro_spec(
        "wsd", "slurm", schedule="wsd", horizon=4096, lrs="[0.0078125]", batches="[4]"
    )
    (tmp_path / "wsd.toml").write_text(text)
    api = Sweep_.create(tmp_path / "wsd.toml", tmp_path / "results")
    store = api.store
    records = [store.load_record(r) for r in store.plan_order()]
    (trunk,) = [r for r in records if r.parent is None]
    (branch,) = [r for r in records if r.parent is not None]
    monkeypatch.setattr(slurm, "FORK_POLL_S", 0.01)
    monkeypatch.setattr(slurm, "FORK_GRACE_S", 0.2)
    store.append_event(branch.id, RunState.SUBMITTED, backend="slurm", job_id="5_1")
    store.append_event(trunk.id, RunState.SUBMITTED, backend="slurm", job_id="5_0")
    # the trunk is queued, not running: give the slot back
    assert slurm.wait_for_fork(store, branch, "5_1")[0] == "requeue"
    # the trunk runs: wait until its checkpoint at the fork exists, not until it ends
    store.append_event(trunk.id, RunState.RUNNING, backend="slurm", job_id="5_0")
    ckpt = store.run_dir(trunk.id) / "ckpt" / f"step_{branch.start_step:08d}.pt"
    ckpt.parent.mkdir()
    timer = threading.Timer(0.5, ckpt.write_bytes, [b""])
    timer.start()
    began = time.monotonic()
    assert slurm.wait_for_fork(store, branch, "5_1") == ("go", "")
    assert time.monotonic() - began >= 0.4 and store.status(trunk.id).state == RunState.RUNNING
    timer.join()
    # the trunk ended without the checkpoint: the branch is cancelled, naming the trunk
    ckpt.unlink()
    store.append_event(trunk.id, RunState.FAILED, backend="slurm", job_id="5_0")
    action, why = slurm.wait_for_fork(store, branch, "5_1")
    assert action == "cancel" and trunk.id in why and "failed" in why
    # the branch is no longer this job's (cancelled, or resubmitted elsewhere)
    store.append_event(branch.id, RunState.SUBMITTED, backend="slurm", job_id="9_0")
    assert slurm.wait_for_fork(store, branch, "5_1")[0] == "skip"


# ------------------------------------------------------------------------------ on the cluster


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of the CLI (SLURM jobs inherit it): one corpus cache for every test."""
    return base_env(tmp_path_factory.mktemp("corpus-cache"))


class SlurmSweep(Sweep):
    def diagnose(self) -> str:
        queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
        return queue + "\n" + super().diagnose()


def spec_text(name: str, **kw: Any) -> str:
    """A tiny SLURM sweep spec."""
    return micro_spec(name, "slurm", **kw)


def _scripts(text: str) -> list[str]:
    """The sbatch scripts in a dry run's output (each from ``#!/bin/bash`` to its end)."""
    parts = text.split("#!/bin/bash")[1:]
    return ["#!/bin/bash" + p.split("\n# ---- array")[0].rstrip("\n") for p in parts]


def _throttles(scripts: list[str]) -> list[int]:
    """The ``%N`` of each script's ``--array`` (1 for a plain job)."""
    return [int(m.group(1)) if (m := re.search(r"--array=\S+%(\d+)", s)) else 1 for s in scripts]


@on_cluster
def test_dry_run_prints_the_exact_scripts_and_submits_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    table = (
        "array_parallelism = 3\nmax_array_size = 3\n"
        'setup = ["echo setup-ran-here"]\nenv = ["FAKE_SLEEP=3"]'
    )
    text = spec_text(
        "dry", schedule="wsd", horizon=4096, top=fake_command(tmp_path), backend_table=table
    )
    sw = SlurmSweep(tmp_path, env, "dry", text)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    queued, accounted = squeue_ids(), sacct_ids(since)  # jobs of earlier tests may still end
    dry = sw.cli("launch", str(sw.spec), "--dry-run").stdout
    assert squeue_ids() <= queued and sacct_ids(since) <= accounted, "a dry run submitted a job"
    assert not sw.store.root.exists()
    scripts = _scripts(dry)
    # 4 trunks and their 4 branches, 3 tasks per array: [t0 t1 t2], [t3 b3], [b0 b1 b2]
    assert len(scripts) == 3 and dry.count("#   task ") == 8
    assert "#SBATCH --array=0-2%1\n" in scripts[0] and "#SBATCH --array=0-1%1\n" in scripts[1]
    assert sum(_throttles(scripts)) == 3  # array_parallelism holds across the arrays
    assert all("export FAKE_SLEEP=3\necho setup-ran-here\n" in s for s in scripts)
    assert all("--dependency" not in s for s in scripts[:2])
    (after,) = re.findall(r"#SBATCH --dependency='after:(\S+)'\n", scripts[2])
    trunks = re.findall(r"<job-of-([^>]+)>", after)
    tasks = dry.split("# ---- array 3")[1]
    branches = re.findall(r"#   task \d+: (\S+)", tasks)
    assert len(trunks) == 3 and "kill-on-invalid-dep" not in dry
    # the same launch for real submits exactly these files, with the trunks' job ids filled in
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("completed"))
    assert len(states) == 8
    assert sorted(sw.store.load_record(b).parent or "" for b in branches) == trunks
    jobs = sorted(
        {e.job_id.split("_")[0] for r in states for e in sw.events(r) if e.job_id}, key=int
    )
    folder = sw.store.root / "slurm"
    for t in trunks:
        job = next(e.job_id for e in sw.events(t) if e.job_id)
        scripts[2] = scripts[2].replace(f"<job-of-{t}>", str(job))
    scripts[2] = re.sub(r"--dependency='(\S+)'", r"--dependency=\1", scripts[2])
    assert [(folder / f"{j}_submission.sh").read_text().rstrip("\n") for j in jobs] == scripts
    for rid in states:
        record = sw.store.load_record(rid)
        if record.parent:  # a branch started after its trunk started
            trunk = next(e for e in sw.events(record.parent) if e.state == RunState.RUNNING)
            started = next(e for e in sw.events(rid) if e.state == RunState.RUNNING)
            assert started.ts >= trunk.ts
    assert "setup-ran-here" in (folder / f"{jobs[0]}_0_0_log.out").read_text()


@on_cluster
def test_resume_dry_run_honours_backend_and_extra_points(
    tmp_path: Path, env: dict[str, str]
) -> None:
    table = 'max_parallel = 1\n[backend.slurm]\nsetup = ["echo from-setup"]'
    text = micro_spec("extra", "local", lrs="[0.0078125]", batches="[4]", backend_table=table)
    sw = SlurmSweep(tmp_path, env, "extra", text)
    api = Sweep_.create(sw.spec, sw.results)
    (new,) = api.apply([{"model": "test-micro", "lr": 0.25, "batch_size": 4}])
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    queued, accounted = squeue_ids(), sacct_ids(since)
    before = sorted(p.name for p in sw.store.root.rglob("*"))
    dry = sw.cli("resume", "extra", "--dry-run", "--backend", "slurm").stdout
    assert squeue_ids() <= queued and sacct_ids(since) <= accounted, "a dry run submitted a job"
    assert sorted(p.name for p in sw.store.root.rglob("*")) == before, "a dry run wrote a file"
    (script,) = _scripts(dry)
    assert "#SBATCH --array=0-1%2\n" in script and "echo from-setup\n" in script
    assert f": {new}\n" in dry and dry.count("#   task ") == 2


@on_cluster
def test_a_branch_starts_at_its_trunks_checkpoint_not_at_the_trunks_end(
    tmp_path: Path, env: dict[str, str]
) -> None:
    table = 'array_parallelism = 2\nenv = ["FAKE_SLEEP=25", "FAKE_FORK_S=4"]'
    text = spec_text(
        "fork",
        schedule="wsd",
        horizon=4096,
        lrs="[0.0078125]",
        batches="[4]",
        top=fake_command(tmp_path),
        backend_table=table,
    )
    sw = SlurmSweep(tmp_path, env, "fork", text)
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("completed"), timeout=180)
    forked_while_trunk_ran(sw, states)
    jobs = {e.job_id for r in states for e in sw.events(r) if e.job_id}
    assert {j.split("_")[0] for j in jobs if j} == {next(iter(jobs)).split("_")[0]}  # one array


@on_cluster
def test_dry_run_of_branches_shows_dependencies_and_the_shared_throttle(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    table = 'array_parallelism = 4\nenv = ["FAKE_SLEEP=20"]'
    text = spec_text(
        "deps", schedule="wsd", horizon=4096, top=fake_command(tmp_path), backend_table=table
    )
    sw = SlurmSweep(tmp_path, env, "deps", text)
    api = Sweep_.create(sw.spec, sw.results)
    records = [sw.store.load_record(r) for r in sw.store.plan_order()]
    trunks = [r for r in records if r.kind == RunKind.TRUNK]
    branches = [r for r in records if r.kind == RunKind.BRANCH]
    backend = SlurmBackend(api.spec.backend.config("slurm"))
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    backend.launch(sw.store, trunks, LaunchOptions())  # the trunks only: an array of 4
    job = sw.events(trunks[0].id)[-1].job_id
    assert job and job.endswith("_0")
    try:
        queued = squeue_ids()
        dry = backend.describe(sw.store, branches, LaunchOptions())
        assert squeue_ids() <= queued, "a dry run submitted a job"
        (script,) = _scripts(dry)
        base = job.split("_")[0]
        deps = ":".join(sorted(f"{base}_{i}" for i in range(4)))
        assert f"#SBATCH --dependency=after:{deps}\n" in script  # started, not ended
        assert "kill-on-invalid-dep" not in script
        assert "#SBATCH --array=0-3%2\n" in script  # half of 4: the live array keeps the rest
        assert f"would set ArrayTaskThrottle=2 on live array {base}" in dry
    finally:
        subprocess.run(["scancel", job.split("_")[0]], check=False)


@on_cluster
def test_a_waiting_branch_gives_its_slot_back_while_its_trunk_is_queued(
    tmp_path: Path, env: dict[str, str]
) -> None:
    table = 'array_parallelism = 2\nenv = ["FAKE_SLEEP=20", "FAKE_FORK_S=15"]'
    text = spec_text(
        "slot",
        schedule="wsd",
        horizon=4096,
        lrs="[0.0078125]",
        batches="[4]",
        top=fake_command(tmp_path),
        backend_table=table,
    )
    sw = SlurmSweep(tmp_path, {**env, "SWEEPER_FORK_GRACE_S": "3"}, "slot", text)
    sw.cli("launch", str(sw.spec))
    records = {r: sw.store.load_record(r) for r in sw.store.run_ids()}
    (trunk,) = [r for r, rec in records.items() if rec.parent is None]
    (branch,) = [r for r in records if r != trunk]
    tjob, bjob = (str(sw.events(r)[-1].job_id) for r in (trunk, branch))

    def both_run() -> bool:
        return sw.store.status(trunk).state == RunState.RUNNING and (
            job_info(bjob).get("JobState") == "RUNNING"
        )

    wait_for(both_run, 120, "the trunk to run and the branch task to wait for it")
    subprocess.run(["scontrol", "requeuehold", tjob], check=True)  # the trunk is queued, held
    restarts = lambda: int(job_info(bjob).get("Restarts") or 0)  # noqa: E731
    wait_for(lambda: restarts() >= 1, 120, "the branch task to requeue itself")
    assert sw.store.status(branch).state == RunState.SUBMITTED
    subprocess.run(["scontrol", "release", tjob], check=True)
    sw.wait(all_in("completed"), timeout=300)
    assert [e.state for e in sw.events(branch)].count(RunState.RUNNING) == 1
    assert [e.state for e in sw.events(trunk)].count(RunState.RUNNING) == 2
    log = sw.store.root / "slurm" / f"{bjob}_0_log.out"
    assert "to give its slot back" in log.read_text()


@on_cluster
def test_real_wsd_branches_train_from_the_fork_while_the_trunk_runs(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text(
        "wsd",
        schedule="wsd",
        horizon=4096,
        lrs="[0.0078125]",
        batches="[4]",
        tokens=1_000_000,
        backend_table="array_parallelism = 3",
    ).replace("horizons_tokens = [4096]", "horizons_tokens = [4096, 131072]")
    sw = SlurmSweep(tmp_path, env, "wsd", text)
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("completed"), timeout=300)
    records = {r: sw.store.load_record(r) for r in states}
    (trunk,) = [r for r, rec in records.items() if rec.parent is None]
    branches = sorted((rec.start_step, r) for r, rec in records.items() if rec.parent)
    assert len(branches) == 2
    trunk_done = sw.events(trunk)[-1]
    assert trunk_done.state == RunState.COMPLETED
    for step, rid in branches:
        ckpt = sw.store.run_dir(trunk) / "ckpt" / f"step_{step:08d}.pt"
        started = next(e for e in sw.events(rid) if e.state == RunState.RUNNING)
        assert ckpt.stat().st_mtime <= started.ts, "a branch started before its fork checkpoint"
        assert [e.state for e in sw.events(rid)].count(RunState.RUNNING) == 1
    # the short branch forks at step 51 of 2048: it ends long before the trunk
    assert sw.events(branches[0][1])[-1].ts < trunk_done.ts
    assert len({e.job_id.split("_")[0] for r in states for e in sw.events(r) if e.job_id}) == 1


@on_cluster
def test_scontrol_requeue_keeps_the_run_submitted_and_runs_it_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text(
        "requeue",
        horizon=128_000,
        lrs="[0.0078125]",
        batches="[4]",
        tokens=1_000_000,
        train="checkpoint_every = 25",
    )
    sw = SlurmSweep(tmp_path, env, "requeue", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.store.run_ids()
    rd = sw.store.run_dir(rid)
    wait_for(lambda: logged_steps(rd) >= 40, 180, "the run to pass step 40")
    job = sw.events(rid)[-1].job_id
    assert job
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: sw.events(rid)[-1].exit_code == 75, 60, "the worker to record the requeue")
    last = sw.events(rid)[-1]
    assert last.state == RunState.SUBMITTED and last.job_id == job, last
    # resume right now must not start the run a second time
    resumed = sw.cli("resume", sw.name)
    assert sw.events(rid)[-1] == last, resumed.stdout
    assert sw.states() == {rid: "submitted"}
    states = sw.wait(all_in("completed"), timeout=300)
    assert states == {rid: "completed"}
    events = sw.events(rid)
    assert [e.state.value for e in events].count("completed") == 1
    running = [e for e in events if e.state == RunState.RUNNING]
    assert len(running) == 2 and {e.job_id for e in running} == {job}
    err = (rd / "stderr.log").read_text()
    (ckpt,) = steps_after(err, "SIGTERM: checkpointed at step ")
    assert steps_after(err, "resuming at step ") == [ckpt]


@on_cluster
def test_preempted_run_requeues_and_matches_an_uninterrupted_run(
    tmp_path: Path, env: dict[str, str]
) -> None:
    # no periodic checkpoints: the resume can only come from the checkpoint taken on USR2
    text = spec_text(
        "preempt",
        horizon=32_000,
        lrs="[0.0078125]",
        batches="[4]",
        tokens=1_000_000,
        train="checkpoint_every = 0",
    )
    sw = SlurmSweep(tmp_path, env, "preempt", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.store.run_ids()
    rd = sw.store.run_dir(rid)
    wait_for(lambda: logged_steps(rd) >= 40, 180, "the run to pass step 40")
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout
    # a job in the higher-priority partition that needs every CPU preempts ours (USR2, requeue)
    subprocess.run(
        ["sbatch", "-p", "high", "-c", cpus.split()[0].strip("+"), "-o", "/dev/null"]
        + ["--wrap", "sleep 1"],
        check=True,
        capture_output=True,
    )
    states = sw.wait(all_in("completed"), timeout=300)
    assert states == {rid: "completed"}
    events = sw.events(rid)
    requeued = [e for e in events if e.state == RunState.SUBMITTED and e.exit_code == 75]
    assert requeued, events
    assert [e.state for e in events].count(RunState.COMPLETED) == 1
    err = (rd / "stderr.log").read_text()
    assert "SIGUSR2: checkpointed at step" in err and "resuming at step" in err
    # the same run, uninterrupted, in another directory
    ref = tmp_path / "reference"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--run", str(rd / "trial.json"), "--out", str(ref)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    got, want = losses(rd), losses(ref)
    assert got.keys() == want.keys() and len(got) > 10
    assert got == want


@on_cluster
def test_scancelled_job_shows_cancelled_and_resume_continues_from_checkpoint(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text(
        "scancel",
        horizon=128_000,
        lrs="[0.0078125]",
        batches="[4]",
        tokens=1_000_000,
        train="checkpoint_every = 25",
    )
    sw = SlurmSweep(tmp_path, env, "scancel", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.store.run_ids()
    rd = sw.store.run_dir(rid)
    wait_for(lambda: logged_steps(rd) >= 60, 180, "the run to pass step 60")
    job = sw.events(rid)[-1].job_id
    assert job
    subprocess.run(["scancel", job], check=True)
    sw.wait(all_in("cancelled"), timeout=60)
    reason = sw.store.status(rid).reason
    assert reason and job in reason and "CANCELLED" in reason
    assert accounting({job})[job]["State"] == "CANCELLED"
    sw.cli("resume", sw.name)
    assert sw.wait(all_in("completed")) == {rid: "completed"}
    err = (rd / "stderr.log").read_text()
    # scancel sends SIGTERM: the trainer checkpoints where it is and the resume starts there
    (resumed,) = steps_after(err, "resuming at step ")
    assert steps_after(err, "SIGTERM: checkpointed at step ") == [resumed] and resumed >= 60


@on_cluster
def test_packed_runs_share_jobs_and_arrays_are_chunked(tmp_path: Path, env: dict[str, str]) -> None:
    # MaxArraySize 1 forces one job per pack: 4 runs -> 2 packs -> 2 plain jobs
    text = spec_text("packed", backend_table="runs_per_job = 2\nmax_array_size = 1")
    sw = SlurmSweep(tmp_path, env, "packed", text)
    assert max_array_size() >= 2  # read from `scontrol show config`
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("completed"))
    jobs = {rid: sw.events(rid)[-1].job_id for rid in states}
    assert sorted(Counter(jobs.values()).values()) == [2, 2]
    assert all(j and "_" not in j for j in jobs.values())  # chunks of one pack are plain jobs


@on_cluster
def test_job_dying_before_its_trial_is_reconciled_from_sacct(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text(
        "broken", lrs="[0.0078125]", batches="[4]", backend_table='python = "/nonexistent/python3"'
    )
    sw = SlurmSweep(tmp_path, env, "broken", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.wait(all_in("failed"), timeout=120)
    st = sw.store.status(rid)
    assert st.last_event and st.last_event.job_id and st.reason
    assert "FAILED" in st.reason and st.last_event.job_id in st.reason
    assert "/nonexistent/python3" in (st.last_event.stderr_tail or "")


@on_cluster
def test_two_rank_run_uses_torchrun_inside_one_allocation(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text("ddp", lrs="[0.0078125]", batches="[4]", resources="procs_per_node = 2")
    sw = SlurmSweep(tmp_path, env, "ddp", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.wait(all_in("completed"))
    job = sw.events(rid)[-1].job_id
    assert job
    cpus = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "AllocCPUS", "-j", job], capture_output=True, text=True
    ).stdout.split()
    assert cpus == ["2"]  # cpus_per_task for each of the 2 ranks
    provenance = json.loads((sw.store.run_dir(rid) / "provenance.json").read_text())
    assert provenance["world_size"] == 2


@on_cluster
def test_bad_partition_is_a_one_line_error_and_submits_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text("nopart", lrs="[0.0078125]", batches="[4]", backend_table='partition = "nope"')
    sw = SlurmSweep(tmp_path, env, "nopart", text)
    proc = sw.cli("launch", str(sw.spec), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "spec.toml: backend.slurm.partition = 'nope': no such partition" in error
    assert [sw.store.status(r).state.value for r in sw.store.run_ids()] == ["planned"]


@on_cluster
def test_cluster_script_start_is_idempotent_while_running() -> None:
    script = REPO / "scripts" / "slurm-cluster.sh"
    before = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True)
    assert before.returncode == 0 and "slurmctld: running" in before.stdout
    again = subprocess.run(
        ["bash", str(script), "start"], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    after = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True)
    assert after.stdout.splitlines()[:5] == before.stdout.splitlines()[:5]  # same daemon pids
