"""Overhead per run of the cluster backends (SLURM, Ray) against the local one, side by side.

Every backend runs the same sweep of trivial trials: ``backend.command`` replaces the trainer with
a Python one-liner that writes ``summary.json`` and exits, so what is measured is the backend:
submission, scheduling, the worker, events. Each sweep goes through the CLI (``sweeper launch``)
and is timed from the launch to the last ``completed`` event; per-run latencies come from the
events (``submitted`` -> ``running`` -> ``completed``).

    .venv/bin/python bench/bench_backends.py --runs 8 --parallel 2

SLURM must be up (``bash scripts/slurm-cluster.sh start``); Ray gets a local head started here
(not timed) and stopped by PID at the end. A backend that is unavailable is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The trivial trial: argv is [--run, RUN.json, --out, DIR]; write a completed summary and exit.
# One line: the spec refuses control characters (newlines) in backend.command.
TRIAL = "; ".join(
    [
        "import json,os,sys",
        "out=sys.argv[sys.argv.index('--out')+1]",
        "os.makedirs(out,exist_ok=True)",
        "s={'status':'completed','step':1,'tokens':64,'final_loss':1.0,'final_output_norm':1.0,"
        "'wall_time_s':0.0,'diverged_step':None,'reason':None}",
        "open(os.path.join(out,'summary.json'),'w').write(json.dumps(s))",
    ]
)


def spec(backend: str, runs: int, parallel: int) -> str:
    """A sweep of ``runs`` trivial trials for ``backend``, ``parallel`` at once."""
    lrs = ", ".join(str(2.0**-i) for i in range(4, 4 + runs))
    command = json.dumps([sys.executable, "-c", TRIAL])
    limit = {
        "local": f"max_parallel = {parallel}",
        "slurm": f"array_parallelism = {parallel}",
        "ray": f"max_concurrent = {parallel}\nnum_cpus = 1",
    }[backend]
    return f"""
name = "bench-{backend}"
[[models]]
preset = "test-micro"
[data]
kind = "synthetic"
[grid]
lr = [{lrs}]
batch_size = [4]
horizons_tokens = [64]
[resources]
cpus_per_task = 1
mem_gb = 1
time_min = 30
[backend]
name = "{backend}"
command = {command}
[backend.{backend}]
{limit}
"""


def run_backend(backend: str, runs: int, parallel: int, root: Path, env: dict[str, str]) -> dict:
    """Launch one sweep and wait for it; return the timings."""
    path = root / f"{backend}.toml"
    path.write_text(spec(backend, runs, parallel))
    results = root / "results"
    t0 = time.time()
    subprocess.run(
        [str(BIN / "sweeper"), "--results", str(results), "launch", str(path), "--no-progress"],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    launch_s = time.time() - t0
    runs_dir = results / f"bench-{backend}" / "runs"
    deadline = time.time() + 600
    while True:
        events = {d.name: _events(d) for d in runs_dir.iterdir() if d.is_dir()}
        if events and all(ev and ev[-1]["state"] == "completed" for ev in events.values()):
            break
        if time.time() > deadline:
            raise RuntimeError(f"{backend}: runs did not complete: {events}")
        time.sleep(0.2)
    last = max(ev[-1]["ts"] for ev in events.values())
    queue = [_ts(ev, "running") - _ts(ev, "submitted") for ev in events.values()]
    work = [_ts(ev, "completed") - _ts(ev, "running") for ev in events.values()]
    return {
        "backend": backend,
        "runs": len(events),
        "launch_s": launch_s,
        "total_s": last - t0,
        "first_s": min(_ts(ev, "running") for ev in events.values()) - t0,
        "queue_s": statistics.mean(queue),
        "worker_s": statistics.mean(work),
    }


def _events(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _ts(events: list[dict], state: str) -> float:
    """Time of the last event in ``state`` (the launch's ``submitted``, the final attempt)."""
    return max(e["ts"] for e in events if e["state"] == state)


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


@contextmanager
def ray_head(env: dict[str, str]) -> Iterator[str | None]:
    """A local Ray head for the benchmark; yields its address (None if ray is missing)."""
    if not (BIN / "ray").exists():
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="ray")
    log = Path(tmp) / "head.log"
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
                f"--temp-dir={tmp}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        t0 = time.time()
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if head.poll() is not None or time.time() - t0 > 120:
                raise RuntimeError(log.read_text(errors="replace"))
            time.sleep(0.5)
        print(f"ray head started in {time.time() - t0:.1f} s (not counted)")
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--backends", default="local,slurm,ray")
    args = p.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "disabled",
        "SWEEPER_HEARTBEAT_S": "1",
    }
    wanted = args.backends.split(",")
    rows = []
    head = ray_head(env) if "ray" in wanted else nullcontext(None)  # started only when wanted
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp, head as address:
        for backend in wanted:
            if backend == "slurm" and not _slurm_up():
                print("slurm: not running (bash scripts/slurm-cluster.sh start); skipped")
                continue
            if backend == "ray":
                if address is None:
                    print("ray: not installed; skipped")
                    continue
                env["RAY_ADDRESS"] = address
            rows.append(run_backend(backend, args.runs, args.parallel, Path(tmp), env))
    base = next((r for r in rows if r["backend"] == "local"), None)
    print(f"\n{args.runs} trivial runs, {args.parallel} at once; seconds")
    print(
        f"{'backend':8} {'launch':>8} {'1st run':>8} {'to done':>8} {'per run':>8} "
        f"{'x local':>8} {'queued':>8} {'worker':>8}"
    )
    for r in rows:
        per_run = r["total_s"] / r["runs"]
        ratio = f"{r['total_s'] / base['total_s']:.1f}" if base else "-"
        print(
            f"{r['backend']:8} {r['launch_s']:8.2f} {r['first_s']:8.2f} {r['total_s']:8.2f} "
            f"{per_run:8.2f} {ratio:>8} {r['queue_s']:8.2f} {r['worker_s']:8.2f}"
        )


if __name__ == "__main__":
    main()
