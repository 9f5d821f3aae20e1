"""What every backend does alike, run against each of them through the CLI, as users do: ``local``
on this host, ``slurm`` on the project's single-node SLURM (``bash scripts/slurm-cluster.sh
start``), ``ray`` on a local Ray head started here. A backend whose cluster is not there skips.

The contract, with the real (tiny) trainer:

* a 4-run sweep completes within its parallel limit, each run recorded submitted -> running ->
  completed, and collects into ``runs.parquet``;
* a run whose worker and trainer are killed at once (a node failure) ends completed exactly once,
  resumed exactly once from its periodic checkpoint (after ``sweeper resume``, unless the backend
  retries by itself);
* ``sweeper cancel`` stops running and queued runs (``cancelled``), and ``sweeper resume`` finishes
  them from the checkpoint the running one took on SIGTERM;
* a run whose trainer fails ends ``failed`` with the trainer's stderr tail (after the backend's
  own retries).

Backend-specific behaviour (preemption, requeue, packing, dry-run scripts, torchrun in one
allocation, Ray driver death, unreachable Ray addresses) lives in test_slurm.py and test_ray.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sweep_cli import (
    SWEEPER,
    Sweep,
    all_in,
    base_env,
    logged_steps,
    micro_spec,
    ray_head,
    slurm_problem,
    steps_after,
    wait_for,
)

from sweeper.records import RunState

pytestmark = pytest.mark.slow
BACKENDS = ["local", pytest.param("slurm", marks=pytest.mark.slurm)]
BACKENDS.append(pytest.param("ray", marks=pytest.mark.ray))


@dataclass
class Target:
    """One backend under test: its name, the CLI's environment, and its spec table."""

    name: str
    env: dict[str, str]

    def table(self, parallel: int) -> str:
        """``[backend.<name>]`` with at most ``parallel`` runs at once."""
        return {
            "local": f"max_parallel = {parallel}",
            "slurm": f"array_parallelism = {parallel}",
            "ray": f"max_concurrent = {parallel}\nnum_cpus = 1\nmax_retries = 1",
        }[self.name]

    def sweep(self, tmp_path: Path, name: str, parallel: int = 2, **kw: Any) -> Sweep:
        text = micro_spec(name, self.name, backend_table=self.table(parallel), **kw)
        return Sweep(tmp_path, self.env, name, text)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def ray_address(cache: Path) -> Iterator[str]:
    pytest.importorskip("ray.tune", reason="ray[tune] is not installed")
    with ray_head(base_env(cache)) as address:
        yield address


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, cache: Path) -> Target:
    env = base_env(cache)
    env.pop("RAY_ADDRESS", None)
    if request.param == "slurm" and (why := slurm_problem()) is not None:
        pytest.skip(why)
    if request.param == "ray":
        env["RAY_ADDRESS"] = request.getfixturevalue("ray_address")
    return Target(request.param, env)


def start(sw: Sweep, *args: str) -> subprocess.Popen[str]:
    """``sweeper <args>`` in the background (a local launch blocks until its runs ended)."""
    return subprocess.Popen(
        [SWEEPER, "--results", str(sw.results), *args, "--no-progress"],
        env=sw.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, d in points:
        now += d
        most = max(most, now)
    return most


# ------------------------------------------------------------------------------------------ tests


def test_four_run_sweep_completes_within_the_limit_and_collects(
    tmp_path: Path, target: Target
) -> None:
    sw = target.sweep(tmp_path, "four", parallel=2)
    sw.cli("launch", str(sw.spec), "--no-progress")
    states = sw.wait(all_in("completed"))
    assert len(states) == 4
    spans = []
    for rid in states:
        events = sw.events(rid)
        assert [e.state.value for e in events] == ["submitted", "running", "completed"], events
        assert {e.backend for e in events} == {target.name}
        spans.append((events[1].ts, events[2].ts))
    assert max_overlap(spans) <= 2
    sw.cli("collect", sw.name)
    runs = pq.read_table(sw.store.root / "runs.parquet").to_pandas()
    assert len(runs) == 4 and set(runs["state"]) == {"completed"}


def test_run_killed_mid_way_is_resumed_exactly_once(tmp_path: Path, target: Target) -> None:
    sw = target.sweep(
        tmp_path,
        "killed",
        horizon=128_000,
        lrs="[0.0078125]",
        batches="[4]",
        tokens=1_000_000,
        train="checkpoint_every = 25",
    )
    launcher = start(sw, "launch", str(sw.spec))
    wait_for(lambda: sw.store.exists() and len(sw.store.run_ids()) == 1, 60, "the sweep")
    (rid,) = sw.store.run_ids()
    rd = sw.store.run_dir(rid)
    wait_for(lambda: logged_steps(rd) >= 60, 240, "the run to pass step 60")
    running = sw.events(rid)[-1]
    assert running.state == RunState.RUNNING and running.pid
    # Like a node failure: worker and trainer die at once and nothing can checkpoint. The trainer
    # is frozen first so that the SIGTERM it gets when its parent dies is never handled.
    trainer = int(json.loads((rd / "trainer.pid").read_text())["pid"])
    os.kill(trainer, signal.SIGSTOP)
    os.kill(running.pid, signal.SIGKILL)
    os.kill(trainer, signal.SIGKILL)
    if target.name == "local":
        launcher.wait(30)  # the local worker is a thread of the launcher
    states = sw.wait(lambda s: s.get(rid) in ("failed", "cancelled", "completed"), timeout=120)
    if states[rid] != "completed":  # ray retries the trial itself
        sw.cli("resume", sw.name, "--no-progress")
    assert sw.wait(all_in("completed")) == {rid: "completed"}
    assert sw.kinds(rid).count("completed") == 1, sw.kinds(rid)
    err = (rd / "stderr.log").read_text()
    assert "checkpointed at step" not in err  # no signal checkpoint: the periodic one was used
    (resumed,) = steps_after(err, "resuming at step ")
    assert resumed >= 50 and resumed % 25 == 0
    launcher.communicate(timeout=60)


def test_cancel_stops_running_and_queued_runs_and_resume_finishes_them(
    tmp_path: Path, target: Target
) -> None:
    sw = target.sweep(
        tmp_path,
        "cancel",
        parallel=1,
        horizon=128_000,
        lrs="[0.0078125]",
        batches="[4, 8]",
        tokens=1_000_000,
        train="checkpoint_every = 1000",
    )
    launcher = start(sw, "launch", str(sw.spec))
    wait_for(lambda: sw.store.exists() and len(sw.store.run_ids()) == 2, 60, "the sweep")
    ids = sw.store.run_ids()
    wait_for(
        lambda: any(logged_steps(sw.store.run_dir(r)) >= 20 for r in ids), 240, "a run to start"
    )
    (first,) = [r for r in ids if logged_steps(sw.store.run_dir(r)) >= 20]
    sw.cli("cancel", sw.name)
    states = sw.wait(all_in("cancelled"), timeout=90)
    assert len(states) == 2
    launcher.communicate(timeout=60)
    (other,) = set(ids) - {first}
    assert "running" not in sw.kinds(other)  # it was queued: nothing ran
    t0 = time.monotonic()
    sw.cli("resume", sw.name, "--no-progress")
    assert sw.wait(all_in("completed")) == dict.fromkeys(ids, "completed")
    assert time.monotonic() - t0 < 600
    for rid in ids:
        assert sw.kinds(rid).count("completed") == 1, sw.kinds(rid)
    err = (sw.store.run_dir(first) / "stderr.log").read_text()
    # SIGTERM: the trainer checkpoints where it is and the resume starts there
    (resumed,) = steps_after(err, "resuming at step ")
    assert steps_after(err, "SIGTERM: checkpointed at step ") == [resumed] and resumed >= 20


def test_failing_run_ends_failed_with_the_stderr_tail(tmp_path: Path, target: Target) -> None:
    crash = "import sys; print('boom: the trainer broke', file=sys.stderr); sys.exit(1)"
    top = f"command = {json.dumps([sys.executable, '-c', crash])}"
    sw = target.sweep(tmp_path, "fails", lrs="[0.0078125]", batches="[4]", top=top)
    sw.cli("launch", str(sw.spec), "--no-progress", check=False)
    (rid,) = sw.wait(all_in("failed"))
    last = sw.events(rid)[-1]
    assert last.exit_code == 1 and "boom: the trainer broke" in (last.stderr_tail or ""), last
    assert last.backend == target.name
    assert sw.cli("status", sw.name, check=False).returncode == 1
