"""The Ray backend against a real local Ray cluster (``ray start --head --block``, stopped by PID).

Runs are tiny (``test-micro``, synthetic data, one thread); what takes time is Ray's own start-up.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sweep_cli import Sweep, all_in, logged_steps, micro_spec, steps_after, wait_for

pytest.importorskip("ray.tune", reason="ray[tune] is not installed")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A single-node Ray cluster with 2 CPUs; yields the environment that points at it."""
    cache = tmp_path_factory.mktemp("corpus-cache")
    # Ray's socket paths must stay short: its temp directory goes under a short one.
    ray_tmp = tempfile.mkdtemp(prefix="ray")
    port = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        "TRAINER_CACHE": str(cache),
        "PYTHONPATH": str(REPO),
        "SWEEPER_HEARTBEAT_S": "1",
    }
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={ray_tmp}",
            ],
            env={k: v for k, v in env.items() if k != "RAY_ADDRESS"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text(errors='replace')}")
            time.sleep(0.5)
        yield env
    finally:
        # `ray start --block` stops the processes it started when it gets SIGTERM
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def spec_text(name: str, *, resources: str = "", max_concurrent: int = 2, **kw: Any) -> str:
    """A tiny Ray sweep spec."""
    res = f"ray_num_cpus = 1\nmax_concurrent = {max_concurrent}\nmax_retries = 2\n{resources}"
    return micro_spec(name, "ray", res, **kw)


class RaySweep(Sweep):
    def diagnose(self) -> str:
        logs = [p.read_text()[-3000:] for p in (self.store.root / "ray").glob("*.log")]
        return "\n".join(logs)


def unlocked(run_dir: Path) -> bool:
    """True once no worker or trainer holds the run's lock."""
    with open(run_dir / ".lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, d in points:
        now += d
        most = max(most, now)
    return most


# ------------------------------------------------------------------------------------------ tests


def test_four_run_sweep_completes_within_the_concurrency_limit(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    sw = RaySweep(tmp_path, cluster, "four", spec_text("four"))
    t0 = time.monotonic()
    sw.cli("launch", str(sw.spec))
    assert time.monotonic() - t0 < 30, "launch must return once the driver started"
    states = sw.wait(all_in("completed"))
    assert len(states) == 4
    spans = []
    for rid in states:
        events = sw.events(rid)
        assert [e["state"] for e in events] == ["submitted", "running", "completed"]
        spans.append((events[1]["ts"], events[2]["ts"]))
    assert max_overlap(spans) <= 2  # resources.max_concurrent
    sw.cli("collect", sw.name)
    runs = pq.read_table(sw.store.root / "runs.parquet").to_pandas()
    assert len(runs) == 4 and set(runs["state"]) == {"completed"}


def test_trial_killed_mid_run_is_retried_from_its_checkpoint(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    text = spec_text(
        "killed",
        horizon=64_000,
        lrs="[0.0078125]",
        batches="[4]",
        tokens=1_000_000,
        train="checkpoint_every = 25",
    )
    sw = RaySweep(tmp_path, cluster, "killed", text)
    sw.cli("launch", str(sw.spec))
    (rid,) = sw.store.run_ids()
    rd = sw.store.run_dir(rid)
    wait_for(lambda: logged_steps(rd) >= 60, 240, "the run to pass step 60")
    running = sw.events(rid)[-1]
    assert running["state"] == "running"
    os.kill(int(running["pid"]), signal.SIGKILL)  # the Ray worker process running the trial
    states = sw.wait(all_in("completed"))
    assert states == {rid: "completed"}
    events = sw.events(rid)
    assert [e["state"] for e in events].count("completed") == 1
    assert max(e["attempt"] for e in events) == 2
    err = (rd / "stderr.log").read_text()
    (resumed,) = steps_after(err, "resuming at step ")
    assert resumed >= 60


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
    driver = sw.events(ids[0])[-1]["pid"]
    wait_for(
        lambda: any(logged_steps(sw.store.run_dir(r)) >= 40 for r in ids),
        240,
        "a run to pass step 40",
    )
    started = [r for r in ids if logged_steps(sw.store.run_dir(r)) >= 40]
    os.kill(int(driver), signal.SIGKILL)
    # Ray ends the dead driver's trials; their trainers checkpoint and exit
    wait_for(lambda: all(unlocked(sw.store.run_dir(r)) for r in ids), 120, "trials to stop")
    states = sw.states()
    assert set(states.values()) <= {"cancelled", "completed"}, states
    sw.cli("resume", sw.name)
    states = sw.wait(all_in("completed"))
    assert len(states) == 2
    for rid in ids:
        kinds = [e["state"] for e in sw.events(rid)]
        assert kinds.count("completed") == 1, kinds
    for rid in started:
        if "cancelled" in [e["state"] for e in sw.events(rid)]:
            err = (sw.store.run_dir(rid) / "stderr.log").read_text()
            assert steps_after(err, "resuming at step ")[0] >= 25


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
