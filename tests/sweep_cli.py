"""Helpers for tests that drive a sweep through the `sweeper` console script in subprocesses
(the backend tests: the CLI must work from any shell, so they use it as users do), plus the two
real clusters they run against: the project's single-node SLURM and a local Ray head."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sweeper.records import RunEvent, RunState
from sweeper.store import SweepStore

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SWEEPER = str(BIN / "sweeper")


class Sweep:
    """A sweep directory driven through the CLI in subprocesses."""

    def __init__(self, tmp_path: Path, env: dict[str, str], name: str, text: str) -> None:
        self.results = tmp_path / "results"
        self.env = env
        self.name = name
        self.spec = tmp_path / f"{name}.toml"
        self.spec.write_text(text)
        self.store = SweepStore(self.results / name)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [SWEEPER, "--results", str(self.results), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and proc.returncode:
            raise AssertionError(f"sweeper {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc

    def states(self) -> dict[str, str]:
        out = self.cli("status", self.name, "--refresh", "--format", "json", check=False)
        return {r["run_id"]: r["state"] for r in json.loads(out.stdout or "[]")}

    def wait(self, done: Callable[[dict[str, str]], bool], timeout: float = 240) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if done(states):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; states: {states}\n{self.diagnose()}")
            time.sleep(1)

    def diagnose(self) -> str:
        """What to print when a wait times out: every run's events."""
        lines = []
        for rid in self.store.run_ids():
            rd = self.store.run_dir(rid)
            events = rd / "events.jsonl"
            lines.append(f"{rid}: {events.read_text() if events.exists() else ''}")
        return "\n".join(lines)

    def events(self, rid: str) -> list[RunEvent]:
        return self.store.events(rid)

    def kinds(self, rid: str) -> list[str]:
        """The states of the run's events, oldest first."""
        return [e.state.value for e in self.events(rid)]


def forked_while_trunk_ran(sw: Sweep, states: dict[str, str]) -> tuple[str, str]:
    """The trunk and the branch of a one-branch WSD sweep that completed, once checked that the
    branch started after the trunk wrote its fork checkpoint and before the trunk ended."""
    (trunk,) = [r for r in states if sw.store.load_record(r).parent is None]
    (branch,) = [r for r in states if r != trunk]
    step = sw.store.load_record(branch).start_step
    ckpt = sw.store.run_dir(trunk) / "ckpt" / f"step_{step:08d}.pt"
    started = next(e for e in sw.events(branch) if e.state == RunState.RUNNING)
    ended = sw.events(trunk)[-1]
    assert ended.state == RunState.COMPLETED
    assert ckpt.stat().st_mtime <= started.ts < ended.ts  # at the fork, while the trunk ran
    return trunk, branch


def all_in(*states: str) -> Callable[[dict[str, str]], bool]:
    """A `Sweep.wait` predicate: every run is in one of ``states``."""
    return lambda s: bool(s) and all(v in states for v in s.values())


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def logged_steps(run_dir: Path) -> int:
    """The last step in a run's metrics.jsonl (0 if none yet)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return int(json.loads(line)["step"])
    return 0


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def steps_after(log: str, marker: str) -> list[int]:
    """The step numbers that follow ``marker`` in a trainer log."""
    return [int(m) for m in re.findall(re.escape(marker) + r"(\d+)", log)]


def micro_spec(
    name: str,
    backend: str,
    *,
    resources: str = "",
    backend_table: str = "",
    horizon: int = 2048,
    lrs: str = "[0.0078125, 0.03125]",
    batches: str = "[4, 8]",
    tokens: int = 200_000,
    train: str = "",
    schedule: str = "constant",
    top: str = "",
) -> str:
    """A tiny sweep spec (``test-micro`` on synthetic data, one thread and one CPU per run) for
    ``backend``; ``resources`` is added to ``[resources]``, ``backend_table`` is the body of
    ``[backend.<backend>]`` and ``top`` goes into ``[backend]`` (e.g. ``command = [...]``)."""
    return f"""
name = "{name}"
[[models]]
preset = "test-micro"
[data]
kind = "synthetic"
synthetic_tokens = {tokens}
[grid]
lr = {lrs}
batch_size = {batches}
horizons_tokens = [{horizon}]
[schedule]
kind = "{schedule}"
[train]
log_every = 4
val_tokens = 256
threads = 1
{train}
[resources]
cpus_per_task = 1
mem_gb = 1
time_min = 30
{resources}
[backend]
name = "{backend}"
stale_after_s = 600
{top}
[backend.{backend}]
{backend_table}
"""


# --------------------------------------------------------------------------------------- clusters


def slurm_problem() -> str | None:
    """None if the project's SLURM answers (with accounting), else why not."""
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


def base_env(cache: Path) -> dict[str, str]:
    """Environment of the CLI (jobs and trials inherit it): one corpus cache, fast heartbeats."""
    return {
        **os.environ,
        "TRAINER_CACHE": str(cache),
        "PYTHONPATH": str(REPO),
        "SWEEPER_HEARTBEAT_S": "1",
        "RAY_AUTH_MODE": "disabled",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[str]:
    """A single-node Ray head (``ray start --head --block``, stopped by PID); yields its address."""
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay short
    port = free_port()
    log = Path(ray_tmp) / "head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--num-cpus={num_cpus}",
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
        yield f"127.0.0.1:{port}"
    finally:
        # `ray start --block` stops the processes it started when it gets SIGTERM
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def squeue_ids() -> set[str]:
    """Job ids in the SLURM queue, an array by its array job id (``%F``): a pending array splits
    into per-task ids as its tasks start, which is not a new submission."""
    out = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def sacct_ids(since: str) -> set[str]:
    """Ids of every job SLURM accounted since ``since`` (``sacct -S``)."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID", "-S", since],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


# A stand-in trainer: sleeps FAKE_SLEEP seconds (default 0.2), then writes a completed summary.json;
# SIGTERM makes it exit 75 like the real one after a checkpoint. Each start appends to starts.log.
# A WSD trunk writes (empty) checkpoints at its branch steps FAKE_FORK_S seconds after it started.
FAKE_TRAINER = """
import json, os, signal, sys, time
from pathlib import Path
a = sys.argv[1:]
run = json.loads(Path(a[a.index("--run") + 1]).read_text())
out = Path(a[a.index("--out") + 1])
with open(out / "starts.log", "a") as f:
    f.write(f"{os.getpid()} {time.time()}\\n")
t = run["train"]
steps = max(t["horizons_tokens"]) // (t["batch_size"] * t["model"]["seq_len"])
def summary(status, step):
    doc = {"status": status, "step": step, "tokens": 0, "final_loss": 1.0}
    (out / "summary.json").write_text(json.dumps(doc))
def on_term(signum, frame):
    summary("interrupted", 1)
    sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
def forks():
    (out / "ckpt").mkdir(exist_ok=True)
    for s in t.get("checkpoint_steps") or []:
        (out / "ckpt" / f"step_{s:08d}.pt").write_bytes(b"")
begin = time.time()
end = begin + float(os.environ.get("FAKE_SLEEP", "0.2"))
fork_at = begin + float(os.environ.get("FAKE_FORK_S", "0"))
forked = False
while time.time() < end:
    if not forked and time.time() >= fork_at:
        forks()
        forked = True
    time.sleep(0.02)
if not forked:
    forks()
summary("completed", steps)
"""


def fake_command(tmp_path: Path) -> str:
    """``command = [...]`` (for ``[backend]``) that runs :data:`FAKE_TRAINER`."""
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return f"command = {json.dumps([sys.executable, str(path)])}"
