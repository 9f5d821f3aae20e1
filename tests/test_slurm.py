"""The SLURM backend against a real single-node SLURM (``bash scripts/slurm-cluster.sh start``).

Every test that needs the cluster skips with the reason when it is not up. The runs are tiny
(``test-micro``, synthetic data, one thread), so each test takes seconds of training plus SLURM's
scheduling and requeue delays.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sweep_cli import Sweep, all_in, logged_steps, losses, micro_spec, steps_after, wait_for

from sweeper.backends import LaunchOptions
from sweeper.backends.slurm import (
    FINAL_STATES,
    SlurmBackend,
    accounting,
    chunks,
    max_array_size,
    packs,
    sbatch_parameters,
)
from sweeper.launch import prepare_sweep, select_runs

REPO = Path(__file__).resolve().parent.parent


def _slurm_up() -> str | None:
    """None if the cluster answers, else why not."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (bash scripts/slurm-cluster.sh start)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10
        )
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "SLURM does not answer"
    if out.returncode or not out.stdout.strip():
        return f"SLURM is not running: {out.stderr.strip()} (bash scripts/slurm-cluster.sh start)"
    if acct.returncode:
        return "SLURM accounting (sacct) is not working"
    return None


_WHY_NOT = _slurm_up()


def on_cluster(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that needs the cluster; it skips, with the reason, when SLURM is not up."""
    test = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))(test)
    return pytest.mark.slurm(pytest.mark.slow(test))


# ----------------------------------------------------------------------------------- utilities


def spec_text(name: str, *, resources: str = "", **kw: Any) -> str:
    """A tiny SLURM sweep spec."""
    return micro_spec(
        name, "slurm", f"cpus_per_task = 1\nmem_gb = 1\ntime_min = 30\n{resources}", **kw
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of the CLI (SLURM jobs inherit it): one corpus cache for every test."""
    cache = tmp_path_factory.mktemp("corpus-cache")
    return {
        **os.environ,
        "TRAINER_CACHE": str(cache),
        "PYTHONPATH": str(REPO),
        "SWEEPER_HEARTBEAT_S": "1",
    }


class SlurmSweep(Sweep):
    def diagnose(self) -> str:
        queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
        return queue + "\n" + super().diagnose()


# --------------------------------------------------------------------------- without a cluster


def test_sbatch_parameters_follow_the_spec_resources() -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    res = {
        "nodes": 2,
        "procs_per_node": 4,
        "gpus_per_node": 4,
        "cpus_per_task": 8,
        "mem_gb": 64.0,
        "time_min": 120,
        "partition": "gpu",
        "account": "proj",
        "qos": "high",
        "constraint": "a100",
        "sbatch_extra": {"exclusive": True},
        "array_parallelism": 16,
    }
    params = sbatch_parameters(res, "sweeper-demo")
    text = _make_sbatch_string(command="run", folder="/x", map_count=100, **params)
    for line in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--gpus-per-node=4",
        "--mem=64GB",
        "--time=120",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=a100",
        "--exclusive",
        "--requeue",
        "--signal=USR2@90",
        "--array=0-99%16",
        "--job-name=sweeper-demo",
    ):
        assert f"#SBATCH {line}\n" in text + "\n", line
    half = sbatch_parameters({"mem_gb": 1.5}, "j")
    assert half["mem"] == "1536MB" and "gpus_per_node" not in half and "partition" not in half


def test_packs_and_array_chunks() -> None:
    ids = [f"r{i}" for i in range(7)]
    assert packs(ids, 3) == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
    assert packs(ids, 1) == [[i] for i in ids]
    assert chunks(packs(ids, 2), 3) == [[["r0", "r1"], ["r2", "r3"], ["r4", "r5"]], [["r6"]]]
    assert set(FINAL_STATES) >= {
        "PREEMPTED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "CANCELLED",
        "FAILED",
    }


# ------------------------------------------------------------------------------ on the cluster


@on_cluster
def test_four_run_sweep_completes_as_one_throttled_array_and_collects(
    tmp_path: Path, env: dict[str, str]
) -> None:
    sw = SlurmSweep(tmp_path, env, "four", spec_text("four", resources="array_parallelism = 2"))
    t0 = time.monotonic()
    sw.cli("launch", str(sw.spec))
    assert time.monotonic() - t0 < 30, "launch must return once the jobs are queued"
    states = sw.wait(all_in("completed"))
    assert len(states) == 4
    jobs = {sw.events(r)[-1]["job_id"] for r in states}
    assert len({j.split("_")[0] for j in jobs}) == 1 and len(jobs) == 4, jobs  # one array
    submission = next((sw.store.root / "slurm").glob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-3%2" in submission
    for rid in states:
        kinds = [e["state"] for e in sw.events(rid)]
        assert kinds == ["submitted", "running", "completed"], kinds
    sw.cli("collect", sw.name)
    runs = pq.read_table(sw.store.root / "runs.parquet").to_pandas()
    assert len(runs) == 4 and set(runs["state"]) == {"completed"}


@on_cluster
def test_packed_runs_share_jobs_and_arrays_are_chunked(tmp_path: Path, env: dict[str, str]) -> None:
    os.environ["TRAINER_CACHE"] = env["TRAINER_CACHE"]
    text = spec_text("packed", resources="runs_per_job = 2")
    spec = tmp_path / "packed.toml"
    spec.write_text(text)
    prep = prepare_sweep(spec, tmp_path / "results")
    ids = select_runs(prep.store)
    assert max_array_size() >= 2  # read from `scontrol show config`
    # MaxArraySize 1 forces one job per pack: 4 runs -> 2 packs -> 2 jobs
    SlurmBackend(max_array_size=1).launch(prep.store, ids, LaunchOptions())
    sw = SlurmSweep(tmp_path, env, "packed", text)
    states = sw.wait(all_in("completed"))
    jobs = {rid: sw.events(rid)[-1]["job_id"] for rid in states}
    assert sorted(jobs.values()).count(jobs[ids[0]]) == 2 and len(set(jobs.values())) == 2
    assert all("_" not in j for j in jobs.values())  # chunks of one pack are plain jobs


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
    job = sw.events(rid)[-1]["job_id"]
    subprocess.run(["scancel", job], check=True)
    states = sw.wait(all_in("cancelled"), timeout=60)
    assert sw.store.status(rid).reason and job in sw.store.status(rid).reason
    assert accounting({job})[job]["State"] == "CANCELLED"
    sw.cli("resume", sw.name)
    states = sw.wait(all_in("completed"))
    assert states == {rid: "completed"}
    err = (rd / "stderr.log").read_text()
    # scancel sends SIGTERM: the trainer checkpoints where it is and the resume starts there
    assert steps_after(err, "SIGTERM: checkpointed at step ") == steps_after(
        err, "resuming at step "
    )
    assert len(steps_after(err, "resuming at step ")) == 1
    assert steps_after(err, "resuming at step ")[0] >= 60
    kinds = [e["state"] for e in sw.events(rid)]
    assert kinds.count("completed") == 1 and "cancelled" in kinds


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
        [
            "sbatch",
            "-p",
            "high",
            "-c",
            cpus.split()[0].strip("+"),
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 1",
        ],
        check=True,
        capture_output=True,
    )
    states = sw.wait(all_in("completed"), timeout=300)
    assert states == {rid: "completed"}
    events = sw.events(rid)
    requeued = [e for e in events if e["state"] == "submitted" and e.get("exit_code") == 75]
    assert requeued, events
    assert [e["state"] for e in events].count("completed") == 1
    err = (rd / "stderr.log").read_text()
    assert "SIGUSR2: checkpointed at step" in err and "resuming at step" in err
    # the same run, uninterrupted, in another directory
    ref = tmp_path / "reference"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--run", str(rd / "run.json"), "--out", str(ref)],
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
def test_failing_trial_shows_failed_with_stderr_tail(tmp_path: Path, env: dict[str, str]) -> None:
    # a corpus too small for the horizon: the trainer rejects the run at start
    text = spec_text("fails", horizon=64_000, lrs="[0.0078125]", batches="[4]", tokens=20_000)
    sw = SlurmSweep(tmp_path, env, "fails", text)
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("failed"))
    (rid,) = states
    last = sw.events(rid)[-1]
    assert last["exit_code"] == 2 and "too small" in last["stderr_tail"]
    job = last["job_id"]
    wait_for(lambda: accounting({job}).get(job, {}).get("State") == "FAILED", 30, "sacct FAILED")
    assert sw.cli("status", sw.name, check=False).returncode == 1


@on_cluster
def test_job_dying_before_its_trial_is_reconciled_from_sacct(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text("broken", lrs="[0.0078125]", batches="[4]")
    spec = tmp_path / "broken.toml"
    spec.write_text(text)
    prep = prepare_sweep(spec, tmp_path / "results")
    ids = select_runs(prep.store)
    SlurmBackend(python="/nonexistent/python3").launch(prep.store, ids, LaunchOptions())
    sw = SlurmSweep(tmp_path, env, "broken", text)
    sw.wait(all_in("failed"), timeout=120)
    st = sw.store.status(ids[0])
    assert "FAILED" in st.reason and st.last_event["job_id"] in st.reason
    assert "/nonexistent/python3" in st.last_event["stderr_tail"]


@on_cluster
def test_sweeper_cancel_stops_running_and_queued_runs(tmp_path: Path, env: dict[str, str]) -> None:
    text = spec_text(
        "cancel",
        horizon=128_000,
        lrs="[0.0078125]",
        batches="[4, 8]",
        tokens=1_000_000,
        resources="array_parallelism = 1",
        train="checkpoint_every = 25",
    )
    sw = SlurmSweep(tmp_path, env, "cancel", text)
    sw.cli("launch", str(sw.spec))
    wait_for(
        lambda: any(logged_steps(sw.store.run_dir(r)) >= 10 for r in sw.store.run_ids()),
        180,
        "one run to start",
    )
    sw.cli("cancel", sw.name)
    states = sw.wait(all_in("cancelled"), timeout=60)
    assert len(states) == 2

    def queue_empty() -> bool:
        cmd = ["squeue", "-h", "-n", "sweeper-cancel"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        return out.stdout.strip() == ""

    # a cancelled job passes through COMPLETING (CG) while slurmd cleans up
    wait_for(queue_empty, 60, "the cancelled jobs to leave the queue")


@on_cluster
def test_two_rank_run_uses_torchrun_inside_one_allocation(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text("ddp", lrs="[0.0078125]", batches="[4]", resources="procs_per_node = 2")
    sw = SlurmSweep(tmp_path, env, "ddp", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.wait(all_in("completed"))
    job = sw.events(rid)[-1]["job_id"]
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
    text = spec_text("nopart", lrs="[0.0078125]", batches="[4]", resources='partition = "nope"')
    sw = SlurmSweep(tmp_path, env, "nopart", text)
    proc = sw.cli("launch", str(sw.spec), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "spec.toml: resources.partition = 'nope': no such partition" in proc.stderr
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


@on_cluster
def test_job_killed_without_warning_resumes_from_the_periodic_checkpoint(
    tmp_path: Path, env: dict[str, str]
) -> None:
    text = spec_text(
        "sigkill",
        horizon=128_000,
        lrs="[0.0078125]",
        batches="[4]",
        tokens=1_000_000,
        train="checkpoint_every = 25",
    )
    sw = SlurmSweep(tmp_path, env, "sigkill", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.store.run_ids()
    rd = sw.store.run_dir(rid)
    wait_for(lambda: logged_steps(rd) >= 60, 180, "the run to pass step 60")
    running = sw.events(rid)[-1]
    job = running["job_id"]
    # Like a node failure: worker and trainer die at once and nothing can checkpoint. The trainer
    # is frozen first so that the SIGTERM it gets when its parent dies is never handled.
    trainer = int((rd / "trainer.pid").read_text())
    os.kill(trainer, signal.SIGSTOP)
    os.kill(int(running["pid"]), signal.SIGKILL)
    os.kill(trainer, signal.SIGKILL)
    states = sw.wait(lambda s: s.get(rid) in ("failed", "cancelled"), timeout=90)
    st = sw.store.status(rid)
    assert job in st.reason and sw.events(rid)[-2]["state"] == "running", sw.events(rid)
    assert "FAILED" in st.reason
    sw.cli("resume", sw.name)
    states = sw.wait(all_in("completed"))
    assert states == {rid: "completed"}
    err = (rd / "stderr.log").read_text()
    assert "checkpointed at step" not in err  # no signal checkpoint: the periodic one was used
    (resumed,) = steps_after(err, "resuming at step ")
    assert resumed >= 50 and resumed % 25 == 0
