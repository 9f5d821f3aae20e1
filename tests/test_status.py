"""Live status: progress columns, the sweep summary, filters, natural sort, --watch, logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from test_local import _cli, _wait_for, fake_spec

from sweeper import LiveView, RunState, Sweep, filter_rows, natural_key
from sweeper.cli import main
from sweeper.cli.status import render, watch_view
from sweeper.live import last_metrics

SWEEPER = str(Path(sys.executable).with_name("sweeper"))


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture
def done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sweep:
    """A finished 4-run sweep with one failed run."""
    monkeypatch.setenv("FAKE_MODES", json.dumps({repr(0.25): "fail"}))
    spec = fake_spec(tmp_path, lrs="[0.125, 0.25]", batches="[4, 8]")
    sweep = Sweep.create(spec, tmp_path / "results")
    sweep.launch()
    return sweep


def test_status_rows_summary_and_filters(done: Sweep) -> None:
    view = LiveView(done)
    rows = view.refresh()
    assert len(rows) == 4 and view.reads == 4
    assert {r.state for r in rows} == {RunState.COMPLETED, RunState.FAILED}
    failed = [r for r in rows if r.state == RunState.FAILED]
    assert all(r.reason and "boom: something broke" in r.reason for r in failed)  # stderr's line
    summary = view.summary(rows)
    assert summary.counts == {"completed": 2, "failed": 2} and summary.flops_left == 0
    # a second refresh reads nothing: no file changed
    assert [r.run_id for r in view.refresh()] == [r.run_id for r in rows] and view.reads == 0
    assert {r.lr for r in filter_rows(rows, states=["failed"])} == {0.25}
    assert {r.batch_size for r in filter_rows(rows, batch_sizes=[8])} == {8}
    assert len(filter_rows(rows, lr_range=(0.1, 0.2))) == 2
    assert len(filter_rows(rows, where="lr > 0.2 and batch_size == 4")) == 1
    ordered = sorted(rows, key=natural_key)
    assert [(r.batch_size, r.lr) for r in ordered] == [(4, 0.125), (4, 0.25), (8, 0.125), (8, 0.25)]


def test_status_cli_columns_filters_and_exit(done: Sweep, capsys: pytest.CaptureFixture) -> None:
    root = str(done.root)
    code, out, _ = run_main(capsys, "status", root, "--format", "json", "--state", "failed")
    rows = json.loads(out)
    assert code == 1 and len(rows) == 2 and all(r["state"] == "failed" for r in rows)
    assert {"progress", "train_loss", "output_norm", "eta_s", "reason"} <= set(rows[0])
    code, out, _ = run_main(capsys, "status", root, "--where", "batch_size == 8", "--format", "csv")
    assert out.count("\n") == 3  # header + 2 runs
    code, out, err = run_main(capsys, "status", root, "--where", "nonsense ==")
    assert code == 2 and err.startswith("error: --where") and "Traceback" not in err


def test_watch_refreshes_a_running_sweep(tmp_path: Path) -> None:
    spec = fake_spec(tmp_path, lrs="[0.125, 0.25]", batches="[4]", max_parallel=2)
    results = tmp_path / "results"
    env = {"FAKE_MODE": "sleep", "FAKE_SLEEP": "6", "SWEEPER_HEARTBEAT_S": "0.2"}
    proc = _cli("--results", str(results), "launch", str(spec), "--no-progress", env=env)
    try:
        sweep_dir = results / "fake"
        _wait_for(lambda: (sweep_dir / "plan.json").exists())
        sweep = Sweep.open(sweep_dir)
        metrics = [sweep.store.run_dir(r) / "metrics.jsonl" for r in sweep.store.run_ids()]
        _wait_for(lambda: all(last_metrics(str(m)) for m in metrics))
        view = LiveView(sweep)
        console = Console(record=True, width=200, force_terminal=False)
        watch_view(view, lambda rows: sorted(rows, key=natural_key), 0.3, "fake",
                   console=console, max_refreshes=3)  # fmt: skip
        text = console.export_text()
        assert "2 running" in text and "refreshed in" in text
        rows = view.refresh()
        assert all(r.state == RunState.RUNNING and r.step and r.train_loss for r in rows)
        assert all(r.tokens_per_s == 640.0 and r.eta_s is not None for r in rows)
        assert view.summary(rows).eta_s is not None
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_logs_prints_and_follows(done: Sweep, capsys: pytest.CaptureFixture) -> None:
    failed = next(st.run_id for st in done.status() if st.state == RunState.FAILED)
    code, out, _ = run_main(capsys, "logs", failed[:20], "--sweep", str(done.root), "--stderr")
    assert code == 0 and "boom: something broke" in out
    code, _, err = run_main(capsys, "logs", "nope", "--results", str(done.root.parent))
    assert code == 2 and "no run" in err
    path = done.store.run_dir(failed) / "stderr.log"
    proc = subprocess.Popen([SWEEPER, "logs", failed, "--sweep", str(done.root), "--stderr",
                             "--follow", "-n", "0"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    got: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    try:
        # appended until the follower prints one: a line written before it started (its start-up
        # can take seconds on a loaded machine) is old news to it and is not printed
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            with open(path, "a") as f:
                f.write("a new line\n")
            reader.join(timeout=1.0)
        assert got and "a new line" in got[0]
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_render_limits_rows() -> None:
    from sweeper import RunProgress

    rows = [RunProgress(run_id=f"r{i}", state=RunState.PLANNED) for i in range(7)]
    console = Console(record=True, width=200)
    console.print(render("t", rows, limit=5))
    assert "2 more runs" in console.export_text()


# ------------------------------------------------------------------ the persisted status cache


@pytest.fixture
def idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sweep:
    """A 4-run sweep, never launched: one run completed, one running with a fresh heartbeat.
    Rows are persisted however recent their files (no racy window)."""
    import sweeper.live

    monkeypatch.setattr(sweeper.live, "_RACY_NS", 0)
    sweep = Sweep.create(fake_spec(tmp_path), tmp_path / "results")
    done, running = sweep.store.plan_order()[:2]
    for state in ("submitted", "running", "completed"):
        sweep.store.append_event(done, state)
    for state in ("submitted", "running"):
        sweep.store.append_event(running, state)
    rd = sweep.store.run_dir(running)
    (rd / "metrics.jsonl").write_text(
        json.dumps({"step": 3, "tokens": 96, "train_loss": 4.5, "tokens_per_s": 32.0}) + "\n"
    )
    (rd / "heartbeat").touch()
    return sweep


def _states(sweep: Sweep) -> tuple[dict[str, str], int]:
    """Each run's state from a fresh view (as a new ``status`` command sees it), and its reads."""
    view = LiveView(sweep)
    rows = view.refresh()
    return {r.run_id: r.state.value for r in rows}, view.reads


def test_status_cache_serves_unchanged_runs_and_sees_a_changed_file(idle: Sweep) -> None:
    truth, reads = _states(idle)
    assert reads == 4 and sorted(truth.values()) == ["completed", "planned", "planned", "running"]
    assert (idle.root / ".cache" / "status-rows.json").is_file()
    assert _states(idle) == (truth, 0)  # a new view: every row from the cache, no file read
    planned = [rid for rid, s in truth.items() if s == "planned"]
    idle.store.append_event(planned[0], "submitted")  # an append: size and mtime change
    states, reads = _states(idle)
    assert reads == 1 and states == {**truth, planned[0]: "submitted"}
    record = idle.store.run_dir(planned[1]) / "run.json"
    size = record.stat().st_size
    record.write_bytes(b"{" * size)  # damaged in place, same size
    states, reads = _states(idle)
    assert reads == 1 and states[planned[1]] == "error"
    row = next(r for r in LiveView(idle).refresh() if r.run_id == planned[1])
    assert row.reason and "run.json" in row.reason


def test_status_turns_a_running_run_stale_by_the_clock_alone(
    idle: Sweep, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth, _ = _states(idle)
    running = next(rid for rid, s in truth.items() if s == "running")
    row = next(r for r in LiveView(idle).refresh() if r.run_id == running)
    assert row.tokens_per_s == 32.0 and row.eta_s is not None
    later = time.time() + 3600  # nothing changes on disk; only the clock moves
    monkeypatch.setattr("sweeper.live.time.time", lambda: later)
    view = LiveView(idle)
    rows = {r.run_id: r for r in view.refresh()}
    assert view.reads == 0 and rows[running].state == RunState.STALE
    assert rows[running].tokens_per_s is None and rows[running].eta_s is None
    monkeypatch.undo()
    assert _states(idle)[0][running] == "running"  # the cache never stored "stale"


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00{not json")


def _wrong_types(p: Path) -> None:
    doc = json.loads(p.read_bytes())
    for entry in doc["runs"].values():
        entry[1] = [5] * len(entry[1])  # a state that is not a state, numbers for names
    p.write_text(json.dumps(doc))


def _lying(p: Path) -> None:
    doc = json.loads(p.read_bytes())
    for entry in doc["runs"].values():
        entry[0] = [1, 2, 3]  # signatures that match nothing: every row is read again
        entry[1][0] = "completed"
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", [_garbage, _wrong_types, _lying, _fifo, "symlink", "dir"])
def test_a_damaged_status_cache_is_ignored_and_rebuilt(
    idle: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture, damage: object
) -> None:
    truth, _ = _states(idle)
    cache = idle.root / ".cache" / "status-rows.json"
    outside = tmp_path / "outside.json"
    outside.write_bytes(cache.read_bytes().replace(b'"planned"', b'"completed"'))
    before = outside.read_bytes()
    cache.unlink()
    if damage == "symlink":
        cache.symlink_to(outside)  # a cache that lies, outside the sweep: never followed
    elif damage == "dir":
        (idle.root / ".cache").rename(tmp_path / "moved")
        (idle.root / ".cache").symlink_to(outside.parent)  # never written through
    elif damage is _fifo:
        _fifo(cache)  # never waited on
    else:
        cache.write_bytes(before)
        damage(cache)  # type: ignore[operator]
    states, reads = _states(idle)
    assert states == truth and reads == 4
    assert outside.read_bytes() == before
    assert not (tmp_path / "status-rows.json").exists()  # nothing written outside the sweep
    assert not (tmp_path / "status-index.json").exists()
    if damage != "dir":
        assert cache.is_file() and not cache.is_symlink()  # rebuilt in place
        assert _states(idle) == (truth, 0)
    code, out, _ = run_main(capsys, "status", str(idle.root), "--format", "json")
    assert code == 0 and {r["run_id"]: r["state"] for r in json.loads(out)} == truth


def test_concurrent_status_commands_leave_a_sound_cache(idle: Sweep) -> None:
    from sweeper.live import read_cache

    truth, _ = _states(idle)
    cache = idle.root / ".cache"
    seen: list[dict[str, str]] = []

    def status() -> None:
        for _ in range(3):
            (cache / "status-rows.json").unlink(missing_ok=True)  # every view writes it
            seen.append(_states(idle)[0])

    threads = [threading.Thread(target=status) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [truth] * 18
    assert len(read_cache(idle.store, LiveView.ROWS, 1)) == 4
    assert sorted(p.name for p in cache.iterdir()) == ["status-index.json", "status-rows.json"]
