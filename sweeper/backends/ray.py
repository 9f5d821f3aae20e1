"""Ray backend through Ray Tune: each run is a Tune trial calling :func:`sweeper.worker.run_trial`.

``launch`` starts a detached driver process (``python -m sweeper.backends.ray``), records
``submitted`` (with the driver's pid) and returns; the driver connects to a running cluster
(``backend.ray_address``, or ``ray_address`` in the launch options) or starts a local one, and runs
one Tune experiment over the runs:

- resources per trial from ``[resources]`` (``ray_num_cpus``, fractional ``ray_num_gpus`` to pack
  small models on one GPU), at most ``max_concurrent`` trials at once (0: ``backend.max_parallel``);
- a failed attempt raises, so Tune retries it (``FailureConfig(max_failures=max_retries)``); the
  retry is just ``run_trial`` again, and the trainer resumes from its checkpoint in the run dir.

The run directories and events are the only state: Tune's own experiment state is not needed to
resume. When the driver dies, ``reconcile`` (run by ``sweeper status --refresh`` and ``resume``)
records its unfinished runs as ``cancelled`` and ``sweeper resume`` starts a new driver for them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sweeper.backends import LaunchOptions
from sweeper.backends.slurm import append_if_unchanged
from sweeper.errors import BackendError
from sweeper.store import RunState, SweepStore, hostname, pid_alive, read_json, write_json_atomic

NAME = "ray"
RAY_DIR = "ray"  # <sweep>/ray: launch files, driver logs, Tune's experiment directories
LOCK_WAIT_S = 120.0  # a retry waits this long for a killed attempt's trainer to checkpoint and exit
_LAUNCH_FILE_WAIT_S = 120.0
_FORWARDED_ENV = ("SWEEPER_", "TRAINER_")


class TrialFailed(RuntimeError):
    """An attempt ended ``failed``: raised inside the trial so that Tune retries it."""


# ------------------------------------------------------------------------------------ trial side


def ray_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one attempt of one run."""
    from ray import tune

    from sweeper.worker import run_trial

    sweep_dir, run_id = config["sweep_dir"], config["run_id"]
    store = SweepStore(Path(sweep_dir))
    last = store.status(run_id).last_event
    if last.get("state") in (RunState.CANCELLED.value, RunState.COMPLETED.value):
        # cancelled (or completed by someone else) after this driver was started
        tune.report({"state": last["state"], "skipped": True})
        return
    trial_id = tune.get_context().get_trial_id()
    res = run_trial(
        sweep_dir,
        run_id,
        backend=NAME,
        job_id=trial_id,
        on_interrupt="cancelled",
        wait_lock_s=LOCK_WAIT_S,
    )
    if res["state"] == RunState.FAILED.value or (
        res.get("skipped") and res["state"] not in ("completed", "cancelled")
    ):
        raise TrialFailed(f"run {run_id}: {res['state']} (exit code {res.get('exit_code')})")
    tune.report({"state": res["state"], "exit_code": res.get("exit_code")})


def _placement(store: SweepStore) -> Any:
    """Tune resources per trial, from each run's ``resources``."""
    from ray import tune

    def resources(config: dict[str, Any]) -> Any:
        res = store.load_record(config["run_id"]).get("resources") or {}
        bundle = {"CPU": float(res.get("ray_num_cpus", 1.0))}
        if float(res.get("ray_num_gpus", 0.0)) > 0:
            bundle["GPU"] = float(res["ray_num_gpus"])
        return tune.PlacementGroupFactory([bundle])

    return resources


def run_experiment(
    store: SweepStore, run_ids: list[str], name: str, settings: dict[str, Any]
) -> None:
    """Run ``run_ids`` as one Tune experiment (blocks until every trial ended)."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(ray_trial, _placement(store)),
        param_space={"sweep_dir": str(store.root), "run_id": tune.grid_search(run_ids)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=settings["max_concurrent"] or None,
            trial_name_creator=lambda t: t.config["run_id"],
            # a fresh worker process per trial costs seconds (imports); the trials are stateless
            reuse_actors=True,
            trial_dirname_creator=lambda t: f"{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(store.root / RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=settings["max_retries"]),
            verbose=0,
        ),
    )
    tuner.fit()


def drive(sweep_dir: str, launch_file: str) -> int:
    """The driver: wait for the launch file, connect to Ray, run trunks before their branches."""
    store = SweepStore(Path(sweep_dir))
    path = Path(launch_file)
    deadline = time.monotonic() + _LAUNCH_FILE_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            print(f"error: {path}: never written; the launcher died", file=sys.stderr)
            return 2
        time.sleep(0.1)
    launch = read_json(path)
    import ray

    # Workers are started by the cluster, not by this process: pass on the settings meant for them.
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
    ray.init(
        address=launch["address"] or None,
        log_to_driver=False,
        runtime_env={"env_vars": env} if env else None,
    )
    try:
        first, branches = _split(store, launch["runs"])
        if first:
            run_experiment(store, first, launch["name"], launch)
        ready = _ready_branches(store, branches)
        if ready:
            run_experiment(store, ready, f"{launch['name']}-branches", launch)
    finally:
        ray.shutdown()
    return 0


def _waits(store: SweepStore, record: dict[str, Any]) -> bool:
    parent = record.get("parent")
    return bool(parent) and store.status(parent).state != RunState.COMPLETED


def _split(store: SweepStore, run_ids: list[str]) -> tuple[list[str], list[str]]:
    """Runs that can start now, and branches whose parent trunk has not completed yet."""
    waiting = {r for r in run_ids if _waits(store, store.load_record(r))}
    return [r for r in run_ids if r not in waiting], [r for r in run_ids if r in waiting]


def _ready_branches(store: SweepStore, branches: list[str]) -> list[str]:
    """Branches whose parent completed in the first phase; the others end ``cancelled``."""
    ready = []
    for rid in branches:
        parent = store.load_record(rid)["parent"]
        state = store.status(parent).state
        if state == RunState.COMPLETED:
            ready.append(rid)
        else:
            append_if_unchanged(
                store,
                rid,
                RunState.CANCELLED,
                backend=NAME,
                reason=f"parent {parent} ended {state.value}",
            )
    return ready


# -------------------------------------------------------------------------------- launcher side


class RayBackend:
    """Runs as Ray Tune trials; see the module docstring.

    Args:
        address: Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``); None: the
            spec's ``backend.ray_address``, else a local cluster started by the driver.
        wait: Block until the driver has finished (default: return once it started).
    """

    name = NAME

    def __init__(self, address: str | None = None, wait: bool = False, **_: Any) -> None:
        self.address = address
        self.wait = wait

    def launch(self, store: SweepStore, runs: list[str], opts: LaunchOptions) -> None:
        """Start a driver for ``runs`` and record them ``submitted`` (``job_id`` = the launch)."""
        if not runs:
            return
        if opts.dry_run:
            for rid in runs:
                print(f"ray: would run {rid}")
            return
        self._check_ray()
        first = store.load_record(runs[0])
        res = first.get("resources") or {}
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
        name = f"launch-{stamp}"
        folder = store.root.resolve() / RAY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        launch = {
            "name": name,
            "runs": runs,
            "address": opts.extra.get("ray_address")
            or self.address
            or (first.get("backend") or {}).get("ray_address"),
            "max_concurrent": int(res.get("max_concurrent") or opts.max_parallel or 0),
            "max_retries": int(res.get("max_retries", 2)),
        }
        launch_file = folder / f"{name}.json"
        with open(folder / f"{name}.log", "ab") as log:
            driver = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sweeper.backends.ray",
                    str(store.root.resolve()),
                    str(launch_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        # The driver starts trials only once the launch file exists, i.e. after these events.
        for rid in runs:
            store.append_event(
                rid, RunState.SUBMITTED, backend=NAME, job_id=name, host=hostname(), pid=driver.pid
            )
        write_json_atomic(launch_file, launch)
        if self.wait or opts.extra.get("wait"):
            driver.wait()

    @staticmethod
    def _check_ray() -> None:
        # find_spec, not import: importing ray.tune takes seconds, and the driver does it anyway
        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.tune") is None:
            raise BackendError("ray: not installed; pip install 'ray[tune]'")

    # ---- reconcile
    def reconcile(self, store: SweepStore) -> None:
        """Record the unfinished runs of a driver that died on this host as ``cancelled``.

        While the driver lives it owns its runs (Tune retries a trial whose worker died), so only
        a dead driver's runs change state here.
        """
        here = hostname()
        for rid, st in store.statuses().items():
            ev = st.last_event
            if ev.get("backend") != NAME or not (
                st.state.is_active() or st.state == RunState.STALE
            ):
                continue
            driver = _driver_event(store.events(rid))
            if driver is None or driver.get("host") != here or process_alive(int(driver["pid"])):
                continue
            append_if_unchanged(
                store,
                rid,
                RunState.CANCELLED,
                expect=ev,
                backend=NAME,
                job_id=ev.get("job_id"),
                reason=f"ray driver (pid {driver['pid']}) exited",
            )

    # ---- cancel
    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """Queued runs are recorded ``cancelled`` (their trials then skip them); running ones on
        this host get SIGTERM, checkpoint, and their worker records them ``cancelled``."""
        for rid in run_ids:
            st = store.status(rid)
            ev = st.last_event
            if ev.get("backend") != NAME or not st.state.is_active():
                continue
            if ev["state"] == RunState.SUBMITTED.value:
                append_if_unchanged(
                    store,
                    rid,
                    RunState.CANCELLED,
                    expect=ev,
                    backend=NAME,
                    job_id=ev.get("job_id"),
                    reason="cancelled by user",
                )
                continue
            pid_file = store.run_dir(rid) / "trainer.pid"
            if ev.get("host") != hostname():
                print(f"ray: {rid} runs on {ev.get('host')}; cancel it there", file=sys.stderr)
                continue
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs on this host; a zombie (dead, not yet reaped by whoever adopted the
    detached driver) counts as dead."""
    if not pid_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal probe
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _driver_event(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``submitted`` event of the launch that owns the run (it carries the driver's pid)."""
    for ev in reversed(events):
        if ev["state"] == RunState.SUBMITTED.value:
            return ev if ev.get("backend") == NAME and "pid" in ev else None
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeper.backends.ray SWEEP_DIR LAUNCH_FILE``: the detached driver."""
    p = argparse.ArgumentParser(prog="python -m sweeper.backends.ray")
    p.add_argument("sweep_dir")
    p.add_argument("launch_file")
    args = p.parse_args(argv)
    return drive(args.sweep_dir, args.launch_file)


if __name__ == "__main__":
    sys.exit(main())
