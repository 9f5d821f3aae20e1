"""Live status: progress columns, the sweep summary, filters, natural sort, --watch, logs."""

from __future__ import annotations

import json
import subprocess
import sys
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
    try:
        time.sleep(1.5)
        with open(path, "a") as f:
            f.write("a new line\n")
        deadline = time.monotonic() + 20
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "a new line" in line and time.monotonic() < deadline
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_render_limits_rows() -> None:
    from sweeper import RunProgress

    rows = [RunProgress(run_id=f"r{i}", state=RunState.PLANNED) for i in range(7)]
    console = Console(record=True, width=200)
    console.print(render("t", rows, limit=5))
    assert "2 more runs" in console.export_text()
