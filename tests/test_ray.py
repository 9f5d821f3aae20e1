"""The Ray backend: config, resources, a branch's wait for its fork, cancel and reconcile (no
cluster), then Ray-specific behaviour against a real local Ray head (``ray start --head --block``,
stopped by PID): an address that does not answer, driver death, a driver-started local instance,
a branch that starts at its trunk's fork. What every backend does alike is in
``test_backend_contract.py``.

Runs are tiny (``test-micro``, synthetic data, one thread); what takes time is Ray's own start-up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sweep_cli import (
    Sweep,
    all_in,
    base_env,
    fake_command,
    forked_while_trunk_ran,
    logged_steps,
    micro_spec,
    ray_head,
    steps_after,
    wait_for,
)

from sweeper import Sweep as Sweep_
from sweeper.backends import LaunchOptions, parse_config, ray
from sweeper.backends.ray import RayBackend, RayConfig, probe, trial_resources
from sweeper.errors import BackendError, SpecError
from sweeper.records import Resources, RunRecord, RunState
from sweeper.store import SweepStore, hostname, pid_alive, process_start
from trainer.config import ConfigError

HAVE_RAY = all(importlib.util.find_spec(m) is not None for m in ("ray", "ray.tune"))


def with_ray(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that needs ray installed; it skips, with the reason, when it is not."""
    test = pytest.mark.skipif(not HAVE_RAY, reason="ray[tune] is not installed")(test)
    return pytest.mark.ray(test)


def on_ray(test: Callable[..., None]) -> Callable[..., None]:
    """A slow test that starts Ray."""
    return pytest.mark.slow(with_ray(test))


def spec_text(name: str, *, max_concurrent: int = 2, backend_table: str = "", **kw: Any) -> str:
    """A tiny Ray sweep spec."""
    table = f"num_cpus = 1\nmax_concurrent = {max_concurrent}\nmax_retries = 2\n{backend_table}"
    return micro_spec(name, "ray", backend_table=table, **kw)


class RaySweep(Sweep):
    def diagnose(self) -> str:
        logs = [p.read_text()[-3000:] for p in (self.store.root / "ray").glob("*.log")]
        return super().diagnose() + "\n" + "\n".join(logs)


# --------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("address", "host:1\nx", "control characters"),
        ("address", " ", "non-empty"),
        ("num_cpus", 0.0, "> 0"),
        ("num_gpus", -0.5, ">= 0"),
        ("max_concurrent", -1, "0..1000000"),
        ("max_retries", -1, "0..1000"),
        ("connect_timeout_s", 0.0, "(0, 3600]"),
        ("connect_timeout_s", float("inf"), "(0, 3600]"),
    ],
)
def test_bad_values_are_refused_naming_the_key(key: str, value: Any, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        RayConfig(**{key: value}).validate()
    msg = str(err.value)
    assert msg.startswith(f"backend.ray.{key} = {value!r}: ") and why in msg and "\n" not in msg


def test_spec_table_builds_the_config() -> None:
    raw = {"address": "127.0.0.1:6379", "num_gpus": 0.25, "connect_timeout_s": 5}
    cfg = parse_config("ray", raw, "s.toml")
    assert cfg == RayConfig(address="127.0.0.1:6379", num_gpus=0.25, connect_timeout_s=5.0)
    with pytest.raises(SpecError, match=r"^s\.toml: backend\.ray\.ray_num_cpus: unknown key"):
        parse_config("ray", {"ray_num_cpus": 1}, "s.toml")


def _record(**res: Any) -> RunRecord:
    from trainer.config import TrainConfig

    return RunRecord(
        id="r-1",
        slug="r",
        kind="single",  # type: ignore[arg-type]
        parent=None,
        sweep="s",
        model="m",
        train=TrainConfig(),
        resources=Resources(**res),
    )


def test_trial_resources_come_from_resources_unless_the_config_overrides() -> None:
    rec = _record(cpus_per_task=2, procs_per_node=2, gpus_per_node=1, mem_gb=1.5)
    assert trial_resources(rec, RayConfig()) == {"CPU": 4.0, "GPU": 1.0, "memory": 1.5 * 2**30}
    packed = trial_resources(rec, RayConfig(num_cpus=1, num_gpus=0.25))
    assert packed == {"CPU": 1.0, "GPU": 0.25, "memory": 1.5 * 2**30}
    assert "GPU" not in trial_resources(_record(), RayConfig())


def test_describe_lists_trial_resources_and_refuses_multi_node(tmp_path: Path) -> None:
    text = RayBackend(RayConfig(max_concurrent=3, num_gpus=0.5)).describe(
        SweepStore(tmp_path), [_record(mem_gb=2.0)], LaunchOptions()
    )
    assert "ray: 1 trials" in text and "at most 3 at once" in text
    assert "r-1  CPU=2 GPU=0.5 memory=2 GiB" in text
    assert not (tmp_path / "runs").exists()
    with pytest.raises(BackendError, match="multi-node"):
        RayBackend().describe(SweepStore(tmp_path), [_record(nodes=2)], LaunchOptions())


def test_probe_tells_a_refused_address_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        t0 = time.monotonic()
        assert probe(f"127.0.0.1:{port}", 5) == "connection refused"
        assert probe(f"ray://127.0.0.1:{port}", 5) == "connection refused"
        assert time.monotonic() - t0 < 2
        s.listen()
        assert probe(f"127.0.0.1:{port}", 5) is None
    assert probe("auto", 5) is None


# ------------------------------------------------------------------------------- WSD branches


def test_a_branch_waits_for_its_trunks_checkpoint_at_the_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = micro_spec("wsd", "ray", schedule="wsd", horizon=4096, lrs="[0.0078125]", batches="[4]")
    (tmp_path / "wsd.toml").write_text(text)
    store = Sweep_.create(tmp_path / "wsd.toml", tmp_path / "results").store
    records = [store.load_record(r) for r in store.plan_order()]
    (trunk,) = [r for r in records if r.parent is None]
    (branch,) = [r for r in records if r.parent is not None]
    assert ray._trunks_first(store, [branch.id, trunk.id]) == [trunk.id, branch.id]
    monkeypatch.setattr(ray, "FORK_POLL_S", 0.01)
    monkeypatch.setenv("SWEEPER_FORK_GRACE_S", "5")
    for rid in (trunk.id, branch.id):
        store.append_event(rid, RunState.SUBMITTED, backend="ray", job_id="launch-x")
    # the trunk runs: wait until its checkpoint at the fork exists, not until it ends
    store.append_event(trunk.id, RunState.RUNNING, backend="ray", job_id="t0")
    ckpt = store.run_dir(trunk.id) / "ckpt" / f"step_{branch.start_step:08d}.pt"
    ckpt.parent.mkdir()
    timer = threading.Timer(0.5, ckpt.write_bytes, [b""])
    timer.start()
    began = time.monotonic()
    assert ray.wait_for_fork(store, branch, "t1") is None
    assert time.monotonic() - began >= 0.4 and store.status(trunk.id).state == RunState.RUNNING
    timer.join()
    ckpt.unlink()
    # the trunk failed (Tune may retry it): wait; it runs again, then completes: go
    store.append_event(trunk.id, RunState.FAILED, backend="ray", job_id="t0")
    threading.Timer(0.1, store.append_event, [trunk.id, RunState.RUNNING]).start()
    threading.Timer(0.4, store.append_event, [trunk.id, RunState.COMPLETED]).start()
    assert ray.wait_for_fork(store, branch, "t1") is None
    assert store.status(branch.id).state == RunState.SUBMITTED
    # the branch was cancelled meanwhile: its trial skips it
    store.append_event(trunk.id, RunState.RUNNING, backend="ray", job_id="t0")
    threading.Timer(0.1, RayBackend().cancel, [store, [branch.id]]).start()
    assert ray.wait_for_fork(store, branch, "t1") == RunState.CANCELLED
    assert store.status(branch.id).reason == "cancelled by user"


@pytest.mark.parametrize(
    ("trunk_state", "why"),
    [
        (RunState.CANCELLED, "ended cancelled without a checkpoint at the fork"),
        (RunState.SUBMITTED, "is submitted, not running, for 0.2 s"),  # queued behind branches
        (RunState.FAILED, "is failed, not running, for 0.2 s"),  # Tune gave up on it
    ],
)
def test_a_branch_whose_trunk_cannot_give_the_fork_ends_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trunk_state: RunState, why: str
) -> None:
    text = micro_spec("wsd", "ray", schedule="wsd", horizon=4096, lrs="[0.0078125]", batches="[4]")
    (tmp_path / "wsd.toml").write_text(text)
    store = Sweep_.create(tmp_path / "wsd.toml", tmp_path / "results").store
    (branch,) = [r for r in map(store.load_record, store.run_ids()) if r.parent is not None]
    monkeypatch.setattr(ray, "FORK_POLL_S", 0.01)
    monkeypatch.setenv("SWEEPER_FORK_GRACE_S", "0.2")
    store.append_event(branch.id, RunState.SUBMITTED, backend="ray", job_id="launch-x")
    store.append_event(str(branch.parent), trunk_state, backend="ray", job_id="t0")
    assert ray.wait_for_fork(store, branch, "t1") == RunState.CANCELLED
    st = store.status(branch.id)
    assert st.state == RunState.CANCELLED and st.last_event and st.last_event.job_id == "t1"
    assert f"trunk {branch.parent} {why}" in (st.reason or "")
    if trunk_state != RunState.CANCELLED:
        assert "sweeper resume" in (st.reason or "")


# --------------------------------------------------------------------------- cancel and reconcile


@pytest.fixture
def store(tmp_path: Path) -> SweepStore:
    spec = tmp_path / "r.toml"
    spec.write_text(micro_spec("r", "ray", lrs="[0.0078125]", batches="[4]"))
    return Sweep_.create(spec, tmp_path / "results").store


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_cancel_signals_the_trainer_only_if_the_pid_is_still_ours(
    store: SweepStore, sleeper: subprocess.Popen[bytes]
) -> None:
    (rid,) = store.run_ids()
    store.append_event(rid, RunState.SUBMITTED, backend="ray", job_id="launch-x", pid=1)
    store.append_event(rid, RunState.RUNNING, backend="ray", host=hostname(), pid=os.getpid())
    pid_file = store.run_dir(rid) / "trainer.pid"
    start = process_start(sleeper.pid)
    assert start is not None
    # the pid was reused by another process: it started at another time
    pid_file.write_text(json.dumps({"pid": sleeper.pid, "start": start + 1}))
    RayBackend().cancel(store, [rid])
    time.sleep(0.2)
    assert sleeper.poll() is None
    pid_file.write_text(json.dumps({"pid": sleeper.pid, "start": start}))
    RayBackend().cancel(store, [rid])
    assert sleeper.wait(10) == -signal.SIGTERM


def test_cancel_of_a_queued_run_records_it(store: SweepStore) -> None:
    (rid,) = store.run_ids()
    store.append_event(rid, RunState.SUBMITTED, backend="ray", job_id="launch-x", pid=1)
    RayBackend().cancel(store, [rid])
    st = store.status(rid)
    assert st.state == RunState.CANCELLED and st.reason == "cancelled by user"


def test_reconcile_cancels_runs_of_a_dead_or_reused_driver_pid(
    store: SweepStore, sleeper: subprocess.Popen[bytes]
) -> None:
    (rid,) = store.run_ids()
    start = process_start(sleeper.pid)
    assert start is not None
    ev = dict(backend="ray", job_id="launch-x", host=hostname(), pid=sleeper.pid)
    store.append_event(rid, RunState.SUBMITTED, pid_start=start, **ev)
    RayBackend().reconcile(store)
    assert store.status(rid).state == RunState.SUBMITTED  # the driver lives
    store.append_event(rid, RunState.SUBMITTED, pid_start=start + 1, **ev)
    RayBackend().reconcile(store)
    st = store.status(rid)
    assert st.state == RunState.CANCELLED and f"pid {sleeper.pid}" in (st.reason or "")


# ------------------------------------------------------------------------------ on the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A single-node Ray cluster with 2 CPUs; yields the environment that points at it."""
    if not HAVE_RAY:
        pytest.skip("ray[tune] is not installed")
    env = base_env(tmp_path_factory.mktemp("corpus-cache"))
    with ray_head(env) as address:
        yield {**env, "RAY_ADDRESS": address}


@with_ray
def test_unreachable_address_is_a_bounded_one_line_error(tmp_path: Path) -> None:
    env = base_env(tmp_path / "cache")
    table = 'address = "127.0.0.1:1"\nconnect_timeout_s = 3'
    sw = RaySweep(tmp_path, env, "noray", spec_text("noray", backend_table=table))
    t0 = time.monotonic()
    proc = sw.cli("launch", str(sw.spec), check=False)
    assert time.monotonic() - t0 < 20 and proc.returncode != 0
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "127.0.0.1:1 (connection refused)" in error
    statuses = sw.store.statuses()
    assert len(statuses) == 4 and {s.state for s in statuses.values()} == {RunState.FAILED}
    assert all("127.0.0.1:1" in (s.reason or "") for s in statuses.values())


@pytest.fixture
def mute_listener() -> Iterator[str]:
    """An address that accepts TCP connections and never answers (a hung or foreign server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


@on_ray
def test_driver_gives_up_on_a_silent_address_within_the_timeout(
    tmp_path: Path, mute_listener: str
) -> None:
    table = f'address = "{mute_listener}"\nconnect_timeout_s = 4'
    env = base_env(tmp_path / "cache")
    sw = RaySweep(tmp_path, env, "mute", spec_text("mute", backend_table=table, lrs="[0.0078125]"))
    t0 = time.monotonic()
    sw.cli("launch", str(sw.spec))
    driver = sw.events(sw.store.run_ids()[0])[-1].pid
    assert driver
    states = sw.wait(all_in("failed"), timeout=60)
    wait_for(lambda: not _alive(driver), 20, "the driver to exit")
    assert time.monotonic() - t0 < 45, "the driver must give up after connect_timeout_s"
    for rid in states:
        reason = sw.store.status(rid).reason or ""
        assert f"no answer from {mute_listener} within 4 s" in reason


@on_ray
def test_sigterm_stops_a_driver_that_is_still_connecting(
    tmp_path: Path, mute_listener: str
) -> None:
    table = f'address = "{mute_listener}"\nconnect_timeout_s = 600'
    env = base_env(tmp_path / "cache")
    sw = RaySweep(tmp_path, env, "term", spec_text("term", backend_table=table, lrs="[0.0078125]"))
    sw.cli("launch", str(sw.spec))
    driver = sw.events(sw.store.run_ids()[0])[-1].pid
    assert driver
    time.sleep(8)  # past `import ray`, inside ray.init
    t0 = time.monotonic()
    os.kill(driver, signal.SIGTERM)
    wait_for(lambda: not _alive(driver), 15, "the driver to exit on SIGTERM")
    assert time.monotonic() - t0 < 15
    states = sw.wait(all_in("cancelled"), timeout=30)
    assert len(states) == 2


def _alive(pid: int) -> bool:
    if not pid_alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@on_ray
def test_driver_killed_mid_sweep_then_resume_completes_every_run_once(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    text = spec_text(
        "driver",
        horizon=32_000,
        lrs="[0.0078125]",
        batches="[4, 8]",
        tokens=1_000_000,
        train="checkpoint_every = 25",
        max_concurrent=1,
    )
    sw = RaySweep(tmp_path, cluster, "driver", text)
    sw.cli("launch", str(sw.spec))
    ids = sw.store.run_ids()
    driver = sw.events(ids[0])[-1].pid
    assert driver
    wait_for(
        lambda: any(logged_steps(sw.store.run_dir(r)) >= 40 for r in ids),
        240,
        "a run to pass step 40",
    )
    started = [r for r in ids if logged_steps(sw.store.run_dir(r)) >= 40]
    os.kill(driver, signal.SIGKILL)
    # Ray ends the dead driver's trials; their trainers checkpoint and exit
    wait_for(lambda: all(_unlocked(sw.store.run_dir(r)) for r in ids), 120, "trials to stop")
    states = sw.states()
    assert set(states.values()) <= {"cancelled", "completed"}, states
    sw.cli("resume", sw.name)
    states = sw.wait(all_in("completed"))
    assert len(states) == 2
    for rid in ids:
        assert sw.kinds(rid).count("completed") == 1, sw.kinds(rid)
    for rid in started:
        if "cancelled" in sw.kinds(rid):
            err = (sw.store.run_dir(rid) / "stderr.log").read_text()
            assert steps_after(err, "resuming at step ")[0] >= 25


def _unlocked(run_dir: Path) -> bool:
    """True once no worker or trainer holds the run's lock."""
    import fcntl

    with open(run_dir / ".lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


@on_ray
def test_without_an_address_the_driver_starts_a_local_cluster(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    env = {k: v for k, v in cluster.items() if k != "RAY_ADDRESS"}
    text = spec_text("local-ray", lrs="[0.0078125]", batches="[4, 8]")
    sw = RaySweep(tmp_path, env, "local-ray", text)
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("completed"))
    assert len(states) == 2
    log = next((sw.store.root / "ray").glob("*.log")).read_text()
    assert "Started a local Ray instance" in log


@on_ray
def test_a_branch_starts_at_its_trunks_checkpoint_not_at_the_trunks_end(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    # the stand-in trainer runs 20 s and writes the trunk's fork checkpoint after 3 s
    command = fake_command(tmp_path).replace(
        "command = [", 'command = ["env", "FAKE_SLEEP=20", "FAKE_FORK_S=3", '
    )
    text = spec_text(
        "fork", schedule="wsd", horizon=4096, lrs="[0.0078125]", batches="[4]", top=command
    )
    sw = RaySweep(tmp_path, cluster, "fork", text)
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("completed"), timeout=180)
    _, branch = forked_while_trunk_ran(sw, states)
    assert [e.state for e in sw.events(branch)].count(RunState.RUNNING) == 1
    experiments = [p.name for p in (sw.store.root / "ray").iterdir() if p.is_dir()]
    assert len(experiments) == 1, experiments  # trunk and branch in one Tune experiment
