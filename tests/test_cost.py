"""Cost before submit: FLOPs and GPU-hours per (model, B), calibration, launch confirmation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_local import fake_spec

from sweeper import cost_rows, load_spec, needs_confirmation, plan
from sweeper.cost import run_cost, time_limit_min

SWEEPER = str(Path(sys.executable).with_name("sweeper"))
REPO = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, cost: str) -> Path:
    path = fake_spec(tmp_path, lrs="[0.125, 0.25]", batches="[4, 8]")
    path.write_text(path.read_text() + "\n[cost]\n" + cost)
    return path


def test_cost_rows_from_a_declared_throughput(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "throughput = {test-micro = 1000.0}\nmargin = 2.0\n"))
    runs = plan(spec)
    rows = cost_rows(runs, spec.section("cost"))
    assert [(r["model"], r["batch_size"], r["runs"]) for r in rows] == [
        ("test-micro", "4", 2), ("test-micro", "8", 2), ("total", "", 4),
    ]  # fmt: skip
    # 2048 tokens per run at 1000 tokens/s, one device each
    assert rows[-1]["gpu_hours"] == pytest.approx(4 * 2048 / 1000 / 3600)
    r = runs[0]
    assert run_cost(r, spec.section("cost")).flops == r.train.flops_per_token() * 2048
    assert time_limit_min(r, spec.section("cost")) == 5  # never below five minutes


def test_flops_fallback_from_device_peak(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "device_flops = 1e12\nmfu = 0.5\n"))
    r = plan(spec)[0]
    tps = 1e12 * 0.5 / r.train.flops_per_token()
    assert run_cost(r, spec.section("cost")).wall_hours == pytest.approx(2048 / tps / 3600)


def test_confirmation_thresholds(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "confirm_runs = 3\n"))
    assert "4 runs" in (needs_confirmation(plan(spec), spec.section("cost")) or "")
    spec = load_spec(_spec(tmp_path, "throughput = {test-micro = 1.0}\nconfirm_gpu_hours = 1\n"))
    assert "GPU-hours" in (needs_confirmation(plan(spec), spec.section("cost")) or "")


def test_launch_refuses_without_yes_when_not_interactive(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "confirm_runs = 3\n")
    results = tmp_path / "results"
    cmd = [SWEEPER, "launch", str(spec), "--results", str(results), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 2 and "pass --yes" in r.stderr and "Traceback" not in r.stderr
    assert not results.exists()
    r = subprocess.run([SWEEPER, "launch", str(spec), "--results", str(results), "--no-progress",
                        "--yes"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_bad_cost_section_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([SWEEPER, "plan", str(_spec(tmp_path, "mfu = 7\n"))],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "cost.mfu = 7" in r.stderr


@pytest.mark.slow
def test_calibrate_feeds_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    r = subprocess.run([SWEEPER, "calibrate", str(REPO / "sweeps" / "smoke.toml"), "--steps", "6",
                        "-o", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["tokens_per_s"]["test-micro"] > 0
    spec = tmp_path / "s.toml"
    spec.write_text((REPO / "sweeps" / "smoke.toml").read_text()
                    + f'\n[cost]\nthroughput_file = "{out}"\n')  # fmt: skip
    r = subprocess.run([SWEEPER, "plan", str(spec), "--format", "json"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    rows = json.loads(r.stdout)
    assert rows[-1]["model"] == "total" and rows[-1]["gpu_hours"] > 0
