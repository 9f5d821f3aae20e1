"""Worker and local backend with a stand-in trainer (a real subprocess that behaves like
``python -m trainer``: summary.json, exit codes, checkpoint on SIGTERM) so every path runs in ms."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sweeper import RunState, Sweep
from sweeper.backends import LaunchOptions
from sweeper.backends.local import LocalBackend
from sweeper.errors import SpecError
from sweeper.records import LAUNCHABLE, RESUMABLE
from sweeper.store import SweepStore, pid_alive, read_events
from sweeper.worker import run_trial

SWEEPER = str(Path(sys.executable).with_name("sweeper"))

# Behaviour per run from env: FAKE_MODES = {"<lr>": mode}, default FAKE_MODE; modes ok | diverge |
# fail | sleep (FAKE_SLEEP seconds, then ok). SIGTERM: write a checkpoint marker, exit 75.
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    a = sys.argv[1:]
    run = json.loads(Path(a[a.index("--run") + 1]).read_text())
    out = Path(a[a.index("--out") + 1])
    lr = repr(run["train"]["optim"]["lr"])
    mode = json.loads(os.environ.get("FAKE_MODES", "{}")).get(lr, os.environ.get("FAKE_MODE", "ok"))
    resumed = (out / "ckpt.marker").exists()
    with open(out / "starts.log", "a") as f:
        f.write(f"{os.getpid()} {'resumed' if resumed else 'fresh'}\\n")
    t = run["train"]
    steps = max(t["horizons_tokens"]) // (t["batch_size"] * t["model"]["seq_len"])
    def summary(status, step=steps):
        doc = {"status": status, "step": step, "tokens": 0, "final_loss": 1.0}
        (out / "summary.json").write_text(json.dumps(doc))
    def on_term(signum, frame):
        (out / "ckpt.marker").write_text("1")
        summary("interrupted", 1)
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    if mode == "sleep" and t.get("checkpoint_steps"):  # a trunk: its fork checkpoints come early
        (out / "ckpt").mkdir(exist_ok=True)
        for s in t["checkpoint_steps"]:
            (out / "ckpt" / f"step_{s:08d}.pt").write_text("fork")
    if mode == "sleep":
        end = time.time() + float(os.environ.get("FAKE_SLEEP", "1"))
        n = 0
        while time.time() < end:
            time.sleep(0.02)
            n += 1
            if n % 5 == 0:  # a metrics line now and then, like a trainer at its log cadence
                line = {"step": n // 5, "tokens": 64 * (n // 5), "train_loss": 5.0 - 0.01 * n,
                        "output_norm": 1.0 + 0.001 * n, "tokens_per_s": 640.0}
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\\n")
    if mode == "fail":
        print("boom: something broke", file=sys.stderr)
        sys.exit(1)
    if mode == "diverge":
        summary("diverged")
        sys.exit(3)
    summary("completed")
    """
)


def write_fake(tmp_path: Path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return path


def fake_spec(
    tmp_path: Path,
    *,
    lrs: str = "[0.125, 0.25]",
    batches: str = "[4, 8]",
    schedule: str = "constant",
    name: str = "fake",
    max_parallel: int = 2,
) -> Path:
    fake = write_fake(tmp_path)
    text = f"""
name = "{name}"
[[models]]
preset = "test-micro"
[grid]
lr = {lrs}
batch_size = {batches}
horizons_tokens = [1024, 2048]
[schedule]
kind = "{schedule}"
[backend]
command = [{json.dumps(sys.executable)}, {json.dumps(str(fake))}]
stale_after_s = 30
[backend.local]
max_parallel = {max_parallel}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> SweepStore:
    return Sweep.create(fake_spec(tmp_path), tmp_path / "results").store


def states(store: SweepStore) -> dict[str, str]:
    return {rid: st.state.value for rid, st in store.statuses().items()}


def count(store: SweepStore, rid: str, state: str) -> int:
    return sum(e.state == state for e in read_events(store.run_dir(rid)))


# -------------------------------------------------------------------------------------- worker


@pytest.mark.parametrize(
    ("mode", "state", "code"),
    [("ok", "completed", 0), ("diverge", "diverged", 3), ("fail", "failed", 1)],
)
def test_run_trial_records_outcome(
    sweep: SweepStore, monkeypatch: pytest.MonkeyPatch, mode: str, state: str, code: int
) -> None:
    monkeypatch.setenv("FAKE_MODE", mode)
    rid = sweep.run_ids()[0]
    result = run_trial(sweep.root, rid, backend="local", job_id="j1")
    assert result == {"run_id": rid, "state": state, "exit_code": code}
    events = read_events(sweep.run_dir(rid))
    assert [e.state for e in events] == ["running", state]
    assert events[0].job_id == "j1" and events[0].attempt == 1 and events[0].pid
    if state == "failed":
        assert "boom: something broke" in (events[1].stderr_tail or "")
        assert "boom: something broke" in (events[1].reason or "")  # the real error, in status
        assert events[1].exit_code == 1
    trial = json.loads((sweep.run_dir(rid) / "trial.json").read_text())
    assert trial["train"] == sweep.load_record(rid).train.to_dict()  # nothing machine-specific


def test_completed_run_is_never_run_again(sweep: SweepStore) -> None:
    rid = sweep.run_ids()[0]
    assert run_trial(sweep.root, rid, backend="local")["state"] == "completed"
    again = run_trial(sweep.root, rid, backend="local")
    assert again["skipped"] and again["state"] == "completed"
    assert (sweep.run_dir(rid) / "starts.log").read_text().count("\n") == 1


def test_locked_run_is_skipped(sweep: SweepStore) -> None:
    import fcntl

    rid = sweep.run_ids()[0]
    with open(sweep.run_dir(rid) / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        result = run_trial(sweep.root, rid, backend="local")
    assert result["skipped"] and result["state"] == "planned"
    assert not (sweep.run_dir(rid) / "starts.log").exists()


@pytest.mark.parametrize(
    ("on_interrupt", "state"),
    [(RunState.CANCELLED, "cancelled"), (RunState.SUBMITTED, "submitted")],
)
def test_stop_event_checkpoints_and_records(
    sweep: SweepStore, monkeypatch: pytest.MonkeyPatch, on_interrupt: RunState, state: str
) -> None:
    monkeypatch.setenv("FAKE_MODE", "sleep")
    monkeypatch.setenv("FAKE_SLEEP", "30")
    monkeypatch.setenv("SWEEPER_HEARTBEAT_S", "0.1")
    rid = sweep.run_ids()[0]
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t0 = time.monotonic()
    result = run_trial(sweep.root, rid, backend="local", stop_event=stop, on_interrupt=on_interrupt)
    assert time.monotonic() - t0 < 20
    assert result["state"] == state and result["exit_code"] == 75
    last = read_events(sweep.run_dir(rid))[-1]
    assert last.reason == "interrupted"
    assert (sweep.run_dir(rid) / "ckpt.marker").exists()
    assert time.time() - (sweep.run_dir(rid) / "heartbeat").stat().st_mtime < 10
    # the next attempt resumes from the checkpoint
    monkeypatch.setenv("FAKE_MODE", "ok")
    assert run_trial(sweep.root, rid, backend="local")["state"] == "completed"
    assert (sweep.run_dir(rid) / "starts.log").read_text().split()[-1] == "resumed"
    assert count(sweep, rid, "running") == 2


def test_worker_module_forwards_sigterm(sweep: SweepStore) -> None:
    rid = sweep.run_ids()[0]
    env = {**os.environ, "FAKE_MODE": "sleep", "FAKE_SLEEP": "30"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweeper.worker",
            str(sweep.root),
            rid,
            "--backend",
            "slurm",
            "--job-id",
            "42",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (sweep.run_dir(rid) / "starts.log").exists())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert json.loads(out)["state"] == "cancelled"
    events = read_events(sweep.run_dir(rid))
    assert events[-1].job_id == "42" and events[-1].backend == "slurm"


def test_worker_module_bad_run_id(sweep: SweepStore) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "sweeper.worker", str(sweep.root), "../../etc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------- local backend


def _launch(store: SweepStore, *, resume: bool = False, parallel: int = 2) -> list[str]:
    sweep = Sweep.open(store.root)
    wanted = RESUMABLE if resume else LAUNCHABLE
    with store.lock():
        LocalBackend().reconcile(store)
        runs = sweep._select(wanted)
        sweep._claim(runs, "local")
    LocalBackend().launch(store, runs, LaunchOptions(max_parallel=parallel, progress=False))
    return [r.id for r in runs]


def test_local_backend_runs_everything(sweep: SweepStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODES", json.dumps({repr(0.25): "fail"}))
    ids = _launch(sweep)
    assert len(ids) == 4
    st = states(sweep)
    assert sorted(st.values()) == ["completed", "completed", "failed", "failed"]
    # launch does not retry failures; resume does, and never touches a completed run
    assert _launch(sweep) == []
    monkeypatch.delenv("FAKE_MODES")
    rerun = _launch(sweep, resume=True)
    assert sorted(rerun) == sorted(r for r, s in st.items() if s == "failed")
    assert set(states(sweep).values()) == {"completed"}
    for rid in ids:
        assert count(sweep, rid, "completed") == 1


def test_trial_env_splits_cpu_threads() -> None:
    env = LocalBackend(cpu_count=8).trial_env(3, None)
    assert env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert LocalBackend(cpu_count=8).trial_env(3, "1") == {"CUDA_VISIBLE_DEVICES": "1"}


def test_omp_threads_reach_the_trainer_config(sweep: SweepStore) -> None:
    rid = sweep.run_ids()[0]
    run_trial(sweep.root, rid, backend="local", env={"OMP_NUM_THREADS": "3"})
    assert json.loads((sweep.run_dir(rid) / "trial.json").read_text())["train"]["threads"] == 3


def test_branches_start_once_their_fork_checkpoint_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Sweep.create(
        fake_spec(tmp_path, lrs="[0.125]", batches="[4]", schedule="wsd"), tmp_path / "results"
    ).store
    monkeypatch.setenv("FAKE_MODE", "sleep")
    monkeypatch.setenv("FAKE_SLEEP", "2")
    _launch(store, parallel=3)
    records = {rid: store.load_record(rid) for rid in store.run_ids()}
    trunk = next(r for r, rec in records.items() if rec.kind == "trunk")
    done = read_events(store.run_dir(trunk))[-1]
    assert done.state == "completed"
    early = 0
    for rid, rec in records.items():
        if rec.kind == "branch":
            started = next(e for e in read_events(store.run_dir(rid)) if e.state == "running")
            early += started.ts < done.ts  # started while the trunk still ran
            trial = json.loads((store.run_dir(rid) / "trial.json").read_text())
            assert trial["train"]["branch"]["run_dir"] == str(store.run_dir(trunk).resolve())
    assert early == 2  # both branches (the fake trunk writes its fork checkpoints first)
    assert set(states(store).values()) == {"completed"}


def test_branches_without_a_fork_checkpoint_wait_for_their_trunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Sweep.create(
        fake_spec(tmp_path, lrs="[0.125]", batches="[4]", schedule="wsd"), tmp_path / "results"
    ).store
    monkeypatch.setenv("FAKE_MODE", "ok")  # no checkpoint files: branches wait for completion
    _launch(store, parallel=3)
    records = {rid: store.load_record(rid) for rid in store.run_ids()}
    trunk = next(r for r, rec in records.items() if rec.kind == "trunk")
    done = read_events(store.run_dir(trunk))[-1]
    for rid, rec in records.items():
        if rec.kind == "branch":
            started = next(e for e in read_events(store.run_dir(rid)) if e.state == "running")
            assert started.ts >= done.ts


def test_branch_of_failed_trunk_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Sweep.create(
        fake_spec(tmp_path, lrs="[0.125]", batches="[4]", schedule="wsd"), tmp_path / "results"
    ).store
    monkeypatch.setenv("FAKE_MODE", "fail")
    _launch(store)
    for rid in store.run_ids():
        st = store.status(rid)
        if store.load_record(rid).kind == "branch":
            assert st.state.value == "cancelled" and "trunk" in st.reason
            assert count(store, rid, "running") == 0


def test_reconcile_marks_dead_local_processes(sweep: SweepStore) -> None:
    a, b = sweep.run_ids()[:2]
    dead = subprocess.Popen(["true"])
    dead.wait()
    from sweeper.store import hostname

    sweep.append_event(a, "running", backend="local", host=hostname(), pid=dead.pid)
    sweep.append_event(b, "submitted", backend="local", host=hostname(), pid=dead.pid)
    LocalBackend().reconcile(sweep)
    assert sweep.status(a).state.value == "failed" and "gone" in sweep.status(a).reason
    assert sweep.status(b).state.value == "cancelled"


# ------------------------------------------------------------------------- processes (CLI level)


def _wait_for(cond, timeout: float = 60.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def _pid(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return 0  # the worker removed or is replacing the file


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:  # noqa: ANN003
    return subprocess.Popen(
        [SWEEPER, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_sigkill_mid_sweep_then_resume_completes_each_run_once(tmp_path: Path) -> None:
    spec = fake_spec(tmp_path, lrs="[0.125, 0.25, 0.5]", batches="[4, 8]")
    results = tmp_path / "results"
    env = {"FAKE_MODE": "sleep", "FAKE_SLEEP": "1.5", "SWEEPER_HEARTBEAT_S": "0.2"}
    proc = _cli("--results", str(results), "launch", str(spec), "--no-progress", env=env)
    store = SweepStore(results / "fake")

    def progressed() -> bool:
        if not store.exists():
            return False
        st = list(states(store).values())
        # a live trainer too: between a trainer's exit and its final event the run still reads
        # "running" but has no trainer left to orphan
        live = any(pid_alive(_pid(p)) for p in store.runs_dir.glob("*/trainer.pid"))
        return "completed" in st and "running" in st and live

    _wait_for(progressed)
    proc.kill()
    proc.communicate(timeout=30)
    before = states(store)
    # parent-death signal: no orphan trainer keeps writing into a run directory
    pids = [_pid(p) for p in store.runs_dir.glob("*/trainer.pid")]
    assert pids
    _wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=20)
    completed_before = [r for r, s in before.items() if s == "completed"]
    assert completed_before and "running" in before.values()
    res = _cli("--results", str(results), "resume", "fake", "--no-progress", env=env)
    out, err = res.communicate(timeout=120)
    assert res.returncode == 0, err
    assert set(states(store).values()) == {"completed"}
    for rid in store.run_ids():
        assert count(store, rid, "completed") == 1
        starts = (store.run_dir(rid) / "starts.log").read_text().split("\n")[:-1]
        # a trainer killed by the launcher's death before it started writes no line
        assert 1 <= len(starts) <= count(store, rid, "running")
    for rid in completed_before:
        assert count(store, rid, "running") == 1
    # a trial the kill interrupted got SIGTERM (parent death), checkpointed, and was resumed
    interrupted = [r for r, s in before.items() if s == "running"]
    for rid in interrupted:
        starts = (store.run_dir(rid) / "starts.log").read_text().split()
        if (store.run_dir(rid) / "ckpt.marker").exists():
            assert starts[-1] == "resumed"


def test_two_concurrent_launches_never_run_a_run_twice(tmp_path: Path) -> None:
    spec = fake_spec(tmp_path, lrs="[0.125, 0.25, 0.5]", batches="[4, 8]", max_parallel=2)
    results = tmp_path / "results"
    env = {"FAKE_MODE": "sleep", "FAKE_SLEEP": "0.5"}
    a = _cli("--results", str(results), "launch", str(spec), "--no-progress", env=env)
    b = _cli("--results", str(results), "launch", str(spec), "--no-progress", env=env)
    c = _cli("--results", str(results), "resume", "fake", "--no-progress", env=env)
    for p in (a, b, c):
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, 2), err  # resume may find the sweep not yet created
    store = SweepStore(results / "fake")
    assert len(store.run_ids()) == 6
    assert set(states(store).values()) == {"completed"}
    for rid in store.run_ids():
        assert count(store, rid, "running") == 1
        assert (store.run_dir(rid) / "starts.log").read_text().count("\n") == 1


def test_sigint_stops_trials_cleanly(tmp_path: Path) -> None:
    spec = fake_spec(tmp_path, lrs="[0.125, 0.25]", batches="[4, 8]", max_parallel=2)
    results = tmp_path / "results"
    env = {"FAKE_MODE": "sleep", "FAKE_SLEEP": "60"}
    proc = _cli("--results", str(results), "launch", str(spec), "--no-progress", env=env)
    store = SweepStore(results / "fake")
    _wait_for(lambda: store.exists() and len(list(store.runs_dir.glob("*/starts.log"))) == 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # the documented exit status of an interrupted launch
    st = store.statuses()
    assert {s.state.value for s in st.values()} == {"cancelled"}, err
    reasons = sorted(s.reason for s in st.values())
    assert reasons == [
        "interrupted",
        "interrupted",
        "interrupted before start",
        "interrupted before start",
    ]


def test_cancel_command_stops_running_runs(tmp_path: Path) -> None:
    spec = fake_spec(tmp_path, lrs="[0.125]", batches="[4]", max_parallel=1)
    results = tmp_path / "results"
    env = {"FAKE_MODE": "sleep", "FAKE_SLEEP": "60"}
    proc = _cli("--results", str(results), "launch", str(spec), "--no-progress", env=env)
    store = SweepStore(results / "fake")
    _wait_for(
        lambda: (
            store.exists()
            and "running" in states(store).values()
            and (store.run_dir(store.run_ids()[0]) / "trainer.pid").exists()
        )
    )
    cancel = subprocess.run(
        [SWEEPER, "--results", str(results), "cancel", "fake"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cancel.returncode == 0, cancel.stderr
    proc.communicate(timeout=60)
    assert set(states(store).values()) == {"cancelled"}


def test_apply_adds_extra_points_once(sweep: SweepStore) -> None:
    s = Sweep.open(sweep.root)
    before = set(sweep.run_ids())
    points = [{"model": "test-micro", "lr": 0.03125, "batch_size": 8, "source": "refine"}]
    new = s.apply(points)
    assert len(new) == 1 and set(sweep.run_ids()) == before | set(new)
    rec = sweep.load_record(new[0])
    assert rec.source == "refine" and rec.horizons_tokens == (1024, 2048)
    assert new[0] in json.loads((sweep.root / "plan.json").read_text())["runs"]
    assert s.apply(points) == []  # idempotent
    with pytest.raises(SpecError, match="proposal"):
        s.apply([{"model": "nope", "lr": 1}])
    (sweep.root / "extra_points.json").write_text(json.dumps([{"model": "nope", "lr": 1}]))
    with pytest.raises(SpecError, match="extra_points.json"):
        s.replan()
