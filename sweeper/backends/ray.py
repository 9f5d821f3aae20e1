"""Ray backend through Ray Tune: each run is a Tune trial calling :func:`sweeper.worker.run_trial`.

``launch`` checks that the cluster answers, starts a detached driver process
(``python -m sweeper.backends.ray``), records ``submitted`` (with the driver's pid) and returns
(``blocking = False``). The driver connects to the cluster (``[backend.ray] address``, else
``RAY_ADDRESS``, else it starts a local one) and runs one Tune experiment over the runs:

- resources per trial from the run's ``[resources]`` (CPUs = ``cpus_per_task * procs_per_node``,
  GPUs = ``gpus_per_node``, memory = ``mem_gb``), replaced by ``num_cpus`` / ``num_gpus``
  (fractional, to pack small models on one GPU) when set; at most ``max_concurrent`` trials at
  once (0: as many as fit); ``time_min`` is not enforced;
- a failed attempt raises, so Tune retries it (``max_retries``); the retry is just ``run_trial``
  again, and the trainer resumes from its checkpoint in the run directory;
- WSD branches start at the fork, not after the trunk: trunks and single runs come first in the
  experiment (Tune starts the trials in that order), and a branch's trial waits, running nothing,
  until its trunk's checkpoint at the branch step exists (or the trunk completed). It ends
  ``cancelled`` (with the reason) when the trunk ended without that checkpoint, or when the trunk
  has not been running for ``SWEEPER_FORK_GRACE_S`` (120 s): the trunk may wait for a slot that
  waiting branches hold, so the branch gives its slot back and ``sweeper resume`` runs it again.

An address that does not answer never leaves runs ``submitted``: ``launch`` refuses a ``host:port``
that refuses a TCP connection within ``connect_timeout_s`` (one-line error, runs ``failed``), and
the driver gives up on a ``ray.init`` that has not returned after ``connect_timeout_s`` (runs
``failed`` with the reason). A SIGTERM while it connects ends the driver at once (runs
``cancelled``).

The run directories and events are the only state: Tune's own experiment state is not needed to
resume. When the driver dies, ``reconcile`` records its unfinished runs as ``cancelled`` and
``sweeper resume`` starts a new driver for them.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from sweeper.backends import LaunchOptions
from sweeper.errors import BackendError
from sweeper.fsutil import read_json, write_json_atomic
from sweeper.records import RunEvent, RunRecord, RunState
from sweeper.store import SweepStore, hostname, process_start, same_process
from trainer.config import ConfigError
from trainer.schema import CKPT_DIR, checkpoint_name

NAME = "ray"
RAY_DIR = "ray"  # <sweep>/ray: launch files, driver logs, Tune's experiment directories
LOCK_WAIT_S = 120.0  # a retry waits this long for a killed attempt's trainer to checkpoint and exit
EXIT_NO_CLUSTER = 3  # the driver's exit status when the cluster does not answer
FORK_POLL_S = 1.0  # a branch's trial looks for its trunk's checkpoint at the fork this often
FORK_GRACE_S = 120.0  # ... and gives its slot back when the trunk has not been running this long
_LAUNCH_FILE_WAIT_S = 120.0
_FORWARDED_ENV = ("SWEEPER_", "TRAINER_")
_log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """``[backend.ray]``."""

    address: str | None = None  # "auto", "host:6379", "ray://host:10001"; None: RAY_ADDRESS
    num_cpus: float | None = None  # per trial; None: resources.cpus_per_task * procs_per_node
    num_gpus: float | None = None  # per trial, fractional allowed; None: resources.gpus_per_node
    max_concurrent: int = 0  # trials at once; 0: as many as fit
    max_retries: int = 2  # a failed attempt is retried (resuming from its checkpoint)
    connect_timeout_s: float = 30.0  # give up on a cluster that does not answer

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the key) for an unusable value."""
        if self.address is not None and (
            not self.address.strip() or any(ord(c) < 32 or ord(c) == 127 for c in self.address)
        ):
            _bad("address", self.address, "must be a non-empty address without control characters")
        if self.num_cpus is not None and not (math.isfinite(self.num_cpus) and self.num_cpus > 0):
            _bad("num_cpus", self.num_cpus, "must be a number > 0")
        if self.num_gpus is not None and not (math.isfinite(self.num_gpus) and self.num_gpus >= 0):
            _bad("num_gpus", self.num_gpus, "must be a number >= 0")
        if not 0 <= self.max_concurrent <= 1_000_000:
            _bad("max_concurrent", self.max_concurrent, "must be in 0..1000000 (0: no limit)")
        if not 0 <= self.max_retries <= 1000:
            _bad("max_retries", self.max_retries, "must be in 0..1000")
        if not (math.isfinite(self.connect_timeout_s) and 0 < self.connect_timeout_s <= 3600):
            _bad("connect_timeout_s", self.connect_timeout_s, "must be in (0, 3600] seconds")


def _bad(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"backend.ray.{key} = {value!r}: {why}")


def trial_resources(record: RunRecord, cfg: RayConfig) -> dict[str, float]:
    """The Tune bundle of one run: CPU, GPU (if any) and memory (bytes)."""
    res = record.resources
    cpu = cfg.num_cpus if cfg.num_cpus is not None else float(res.cpus_per_task)
    if cfg.num_cpus is None:
        cpu *= res.procs_per_node
    gpu = cfg.num_gpus if cfg.num_gpus is not None else float(res.gpus_per_node)
    bundle = {"CPU": cpu, "memory": float(int(res.mem_gb * 2**30))}
    if gpu > 0:
        bundle["GPU"] = gpu
    return bundle


# ------------------------------------------------------------------------------------ trial side


class TrialFailed(RuntimeError):
    """An attempt ended ``failed``: raised inside the trial so that Tune retries it."""


def ray_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one attempt of one run."""
    from ray import tune

    from sweeper.worker import run_trial

    sweep_dir, run_id = config["sweep_dir"], config["run_id"]
    store = SweepStore(Path(sweep_dir))
    job_id = tune.get_context().get_trial_id()
    ended = _ended(store, run_id)
    record = store.load_record(run_id)
    if ended is None and record.parent is not None:
        ended = wait_for_fork(store, record, job_id)
    if ended is not None:
        tune.report({"state": ended.value, "skipped": True})
        return
    res = run_trial(
        sweep_dir,
        run_id,
        backend=NAME,
        job_id=job_id,
        on_interrupt=RunState.CANCELLED,
        wait_lock_s=LOCK_WAIT_S,
    )
    if res["state"] == RunState.FAILED.value or (
        res.get("skipped") and res["state"] not in ("completed", "cancelled", "stopped")
    ):
        raise TrialFailed(f"run {run_id}: {res['state']} (exit code {res.get('exit_code')})")
    tune.report({"state": res["state"], "exit_code": res.get("exit_code")})


def _ended(store: SweepStore, run_id: str) -> RunState | None:
    """The state of a run that ended after this driver was started (cancelled, or completed by
    someone else), else None; ``failed`` does not count (that is Tune's retry)."""
    last = store.status(run_id).last_event
    if last is not None and last.state.is_finished() and last.state != RunState.FAILED:
        return last.state
    return None


def wait_for_fork(store: SweepStore, record: RunRecord, job_id: str) -> RunState | None:
    """Wait until branch ``record`` can start: None once its trunk's checkpoint at the fork exists
    (or the trunk completed); else the state the branch ended in: ``cancelled``, recorded here
    with the reason, when the trunk ended without that checkpoint or has not been running for
    the grace period, or whatever ended the branch meanwhile (``sweeper cancel``).

    A ``failed`` trunk counts as not running: Tune may retry it.
    """
    trunk = str(record.parent)
    ckpt = store.run_dir(trunk) / CKPT_DIR / checkpoint_name(record.start_step)
    grace = float(os.environ.get("SWEEPER_FORK_GRACE_S") or FORK_GRACE_S)
    running_at = time.monotonic()
    while not ckpt.is_file():
        ended = _ended(store, record.id)
        if ended is not None:
            return ended
        state = store.status(trunk).state
        if state == RunState.COMPLETED:
            return None
        why = None
        if state == RunState.RUNNING:
            running_at = time.monotonic()
        elif state.is_finished() and state != RunState.FAILED:
            why = f"trunk {trunk} ended {state.value} without a checkpoint at the fork"
        elif time.monotonic() - running_at > grace:
            why = (
                f"trunk {trunk} is {state.value}, not running, for {grace:g} s "
                "(SWEEPER_FORK_GRACE_S); the branch gave its slot back: `sweeper resume` runs it"
            )
        if why is not None:
            last = store.status(record.id).last_event
            fields = dict(backend=NAME, job_id=job_id, reason=why)
            if store.append_if(record.id, RunState.CANCELLED, expect=last, **fields):
                return RunState.CANCELLED
        time.sleep(FORK_POLL_S)
    return None


def run_experiment(
    store: SweepStore, run_ids: list[str], name: str, launch: dict[str, Any], cfg: RayConfig
) -> None:
    """Run ``run_ids`` as one Tune experiment (blocks until every trial ended)."""
    from ray import tune

    def resources(config: dict[str, Any]) -> Any:
        record = store.load_record(config["run_id"])
        return tune.PlacementGroupFactory([trial_resources(record, cfg)])

    tuner = tune.Tuner(
        tune.with_resources(ray_trial, resources),
        param_space={"sweep_dir": str(store.root), "run_id": tune.grid_search(run_ids)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=launch["max_concurrent"] or None,
            trial_name_creator=lambda t: t.config["run_id"],
            # a fresh worker process per trial costs seconds (imports); the trials are stateless
            reuse_actors=True,
            trial_dirname_creator=lambda t: f"{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(store.root / RAY_DIR),
            failure_config=tune.FailureConfig(max_failures=cfg.max_retries),
            verbose=0,
        ),
    )
    tuner.fit()


# ----------------------------------------------------------------------------------- the driver


def drive(sweep_dir: str, launch_file: str) -> int:
    """The driver: wait for the launch file, connect to Ray, run every run in one experiment."""
    store = SweepStore(Path(sweep_dir))
    path = Path(launch_file)
    deadline = time.monotonic() + _LAUNCH_FILE_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            print(f"error: {path}: never written; the launcher died", file=sys.stderr)
            return 2
        time.sleep(0.1)
    launch = read_json(path)
    cfg = RayConfig(**launch["config"])
    if not connect(store, launch, cfg):
        return EXIT_NO_CLUSTER
    import ray

    try:
        run_experiment(store, _trunks_first(store, launch["runs"]), launch["name"], launch, cfg)
    finally:
        ray.shutdown()
    return 0


def connect(store: SweepStore, launch: dict[str, Any], cfg: RayConfig) -> bool:
    """``ray.init`` bounded by ``connect_timeout_s``; False (runs ``failed``) if it raised.

    ``ray.init`` retries an address that does not answer for minutes and holds off SIGTERM, so it
    runs in a thread: on timeout the runs end ``failed`` and the process exits at once; a SIGTERM
    meanwhile ends it at once with the runs ``cancelled``.
    """
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
    done = threading.Event()
    errors: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(
                address=launch["address"] or None,
                log_to_driver=False,
                runtime_env={"env_vars": env} if env else None,
            )
        except BaseException as e:  # noqa: BLE001 - reported below, in the main thread
            errors.append(e)
            done.set()
            return
        done.set()
        # A local instance's processes die with the thread that started them (Ray sets their
        # parent-death signal), so this thread lives as long as the driver.
        threading.Event().wait()

    def on_term(_signum: int, _frame: Any) -> None:
        _abandon(store, launch, RunState.CANCELLED, "ray driver stopped while connecting")
        os._exit(128 + signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=init, name="ray-init", daemon=True).start()
    answered = done.wait(cfg.connect_timeout_s)
    signal.signal(signal.SIGTERM, old)
    where = launch["address"] or "a new local Ray instance"
    if not answered:
        why = f"ray: no answer from {where} within {cfg.connect_timeout_s:g} s (connect_timeout_s)"
        print(f"error: {why}", file=sys.stderr, flush=True)
        _abandon(store, launch, RunState.FAILED, why)
        os._exit(EXIT_NO_CLUSTER)  # the init thread cannot be stopped, and ray hangs at exit
    if errors:
        msg = " ".join(str(errors[0]).split())[:300] or type(errors[0]).__name__
        why = f"ray: cannot connect to {where}: {msg}"
        print(f"error: {why}", file=sys.stderr, flush=True)
        _abandon(store, launch, RunState.FAILED, why)
        return False
    return True


def _abandon(store: SweepStore, launch: dict[str, Any], state: RunState, why: str) -> None:
    """End this launch's runs that no trial has taken yet."""
    for rid in launch["runs"]:
        ev = store.status(rid).last_event
        if ev is not None and ev.state == RunState.SUBMITTED and ev.job_id == launch["name"]:
            store.append_if(rid, state, expect=ev, backend=NAME, job_id=ev.job_id, reason=why)


def _trunks_first(store: SweepStore, run_ids: list[str]) -> list[str]:
    """``run_ids`` with the branches last: Tune starts the trials in this order, so a branch takes
    a slot only after the trunks (and single runs) of the launch did."""
    branches = {r for r in run_ids if store.load_record(r).parent is not None}
    return [r for r in run_ids if r not in branches] + [r for r in run_ids if r in branches]


# -------------------------------------------------------------------------------- launcher side


def address_of(cfg: RayConfig) -> str | None:
    """The cluster address the driver uses: the config's, else ``RAY_ADDRESS``, else None (the
    driver starts a local instance)."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def probe(address: str, timeout_s: float) -> str | None:
    """Why ``address`` refuses a TCP connection within ``timeout_s``; None if it accepts, or if the
    address is not ``[ray://]host:port`` (``auto``: the driver's own timeout applies)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "/" in target:
        return None
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as e:
        return (e.strerror or str(e)).lower()


class RayBackend:
    """Runs as Ray Tune trials; see the module docstring."""

    name: ClassVar[str] = NAME
    blocking: ClassVar[bool] = False
    Config: ClassVar[type[RayConfig]] = RayConfig

    def __init__(self, config: RayConfig | None = None) -> None:
        self.config = config or RayConfig()

    def launch(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> None:
        """Start a driver for ``runs`` and record them ``submitted`` (``job_id`` = the launch)."""
        if not runs:
            return
        _check_runs(runs)
        _check_ray()
        address = address_of(self.config)
        why = probe(address, self.config.connect_timeout_s) if address else None
        if why is not None:
            msg = (
                f"ray: cannot reach the Ray cluster at {address} ({why}); start it "
                "(ray start --head) or fix backend.ray.address / RAY_ADDRESS"
            )
            for r in runs:
                store.append_if(r.id, RunState.FAILED, backend=NAME, reason=msg)
            raise BackendError(msg)
        name = f"launch-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        folder = store.root.resolve() / RAY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        launch = {
            "name": name,
            "runs": [r.id for r in runs],
            "address": address,
            "max_concurrent": opts.max_parallel or self.config.max_concurrent,
            "config": asdict(self.config),
        }
        driver = _start_driver(store, folder, name)
        # The driver starts trials only once the launch file exists, i.e. after these events.
        start = process_start(driver.pid)
        for r in runs:
            store.append_event(
                r.id,
                RunState.SUBMITTED,
                backend=NAME,
                job_id=name,
                host=hostname(),
                pid=driver.pid,
                pid_start=start,
            )
        write_json_atomic(folder / f"{name}.json", launch)

    def describe(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> str:
        """The trials a launch would start and their resources; starts and writes nothing."""
        _check_runs(runs)
        address = address_of(self.config) or "a local Ray instance started by the driver"
        limit = opts.max_parallel or self.config.max_concurrent
        lines = [
            f"ray: {len(runs)} trials on {address}; "
            f"{f'at most {limit}' if limit else 'as many as fit'} at once, "
            f"up to {self.config.max_retries} retries each, "
            f"connect timeout {self.config.connect_timeout_s:g} s"
        ]
        for r in runs:
            bundle = trial_resources(r, self.config)
            parts = [f"CPU={bundle['CPU']:g}"]
            if "GPU" in bundle:
                parts.append(f"GPU={bundle['GPU']:g}")
            parts.append(f"memory={bundle['memory'] / 2**30:g} GiB")
            after = f"  (forks trunk {r.parent} at step {r.start_step})" if r.parent else ""
            lines.append(f"  {r.id}  {' '.join(parts)}{after}")
        return "\n".join(lines)

    # ---- reconcile
    def reconcile(self, store: SweepStore) -> None:
        """Record the unfinished runs of a driver that died on this host as ``cancelled``.

        While the driver lives it owns its runs (Tune retries a trial whose worker died), so only
        a dead driver's runs change state here.
        """
        here = hostname()
        for rid, st in store.statuses().items():
            ev = st.last_event
            if (
                ev is None
                or ev.backend != NAME
                or not (st.state.is_active() or st.state == RunState.STALE)
            ):
                continue
            driver = _driver_event(store.events(rid))
            if driver is None or driver.host != here or driver.pid is None:
                continue
            if driver_alive(driver.pid, driver.pid_start):
                continue
            why = f"ray driver (pid {driver.pid}) exited"
            store.append_if(
                rid, RunState.CANCELLED, expect=ev, backend=NAME, job_id=ev.job_id, reason=why
            )

    # ---- cancel
    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """Queued runs are recorded ``cancelled`` (their trials then skip them); running ones on
        this host get SIGTERM if ``trainer.pid`` still names their trainer, checkpoint, and their
        worker records them ``cancelled``."""
        from sweeper.worker import signal_trainer

        for rid in run_ids:
            st = store.status(rid)
            ev = st.last_event
            if ev is None or ev.backend != NAME or not st.state.is_active():
                continue
            if ev.state == RunState.SUBMITTED:
                store.append_if(
                    rid,
                    RunState.CANCELLED,
                    expect=ev,
                    backend=NAME,
                    job_id=ev.job_id,
                    reason="cancelled by user",
                )
            elif ev.host != hostname():
                _log.warning("ray: %s runs on %s; cancel it there", rid, ev.host)
            elif not signal_trainer(store.run_dir(rid), signal.SIGTERM):
                _log.warning("ray: %s: no live trainer to stop", rid)


Backend = RayBackend


def _check_ray() -> None:
    # find_spec, not import: importing ray.tune takes seconds, and the driver does it anyway
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.tune") is None:
        raise BackendError("ray: not installed; pip install 'ray[tune]'")


def _check_runs(runs: list[RunRecord]) -> None:
    for r in runs:
        if r.resources.nodes > 1:
            raise BackendError(
                f"ray: run {r.id}: resources.nodes = {r.resources.nodes}: multi-node runs are "
                "not supported on Ray (use the slurm backend)"
            )


def _start_driver(store: SweepStore, folder: Path, name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "sweeper.backends.ray", str(store.root.resolve())]
    cmd.append(str(folder / f"{name}.json"))
    try:
        with open(folder / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
    except OSError as e:
        raise BackendError(f"ray: cannot start the driver: {e}") from None


def driver_alive(pid: int, start: int | None) -> bool:
    """True if the driver ``pid`` (started at ``start``) still runs on this host; a zombie (dead,
    not yet reaped by whoever adopted the detached driver) counts as dead."""
    if not same_process(pid, start):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal probe
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _driver_event(events: list[RunEvent]) -> RunEvent | None:
    """The ``submitted`` event of the launch that owns the run (it carries the driver's pid)."""
    for ev in reversed(events):
        if ev.state == RunState.SUBMITTED and ev.job_id:
            return ev if ev.backend == NAME and ev.pid is not None else None
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
