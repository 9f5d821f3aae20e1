"""Helpers for tests that drive a sweep through the `sweeper` console script in subprocesses
(the cluster backends' tests: the CLI must work from any shell, so they use it as users do)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sweeper.store import SweepStore

SWEEPER = str(Path(sys.executable).parent / "sweeper")


class Sweep:
    """A sweep directory driven through the CLI in subprocesses."""

    def __init__(self, tmp_path: Path, env: dict[str, str], name: str, text: str) -> None:
        self.results = tmp_path / "results"
        self.env = env
        self.name = name
        self.spec = tmp_path / f"{name}.toml"
        self.spec.write_text(text)
        self.store = SweepStore(self.results / name)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [SWEEPER, "--results", str(self.results), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        if check and proc.returncode:
            raise AssertionError(f"sweeper {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc

    def states(self) -> dict[str, str]:
        out = self.cli("status", self.name, "--refresh", "--format", "json", check=False)
        return {r["run_id"]: r["state"] for r in json.loads(out.stdout)}

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
            lines.append(f"{rid}: {(rd / 'events.jsonl').read_text() if rd.exists() else ''}")
        return "\n".join(lines)

    def events(self, rid: str) -> list[dict[str, Any]]:
        return self.store.events(rid)


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
    return json.loads(lines[-1])["step"] if lines else 0


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows}


def steps_after(log: str, marker: str) -> list[int]:
    """The step numbers that follow ``marker`` in a trainer log."""
    return [int(m) for m in re.findall(re.escape(marker) + r"(\d+)", log)]


def micro_spec(
    name: str,
    backend: str,
    resources: str,
    *,
    horizon: int = 2048,
    lrs: str = "[0.0078125, 0.03125]",
    batches: str = "[4, 8]",
    tokens: int = 200_000,
    train: str = "",
) -> str:
    """A tiny sweep spec (``test-micro`` on synthetic data, one thread per run) for ``backend``;
    ``resources`` is the body of its ``[resources]`` table."""
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
[train]
log_every = 4
val_tokens = 256
threads = 1
{train}
[resources]
{resources}
[backend]
name = "{backend}"
stale_after_s = 600
"""
