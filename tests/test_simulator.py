"""The simulator: the trainer's file contract, resume, divergence, the in-process backend against
the subprocess, and collect + analysis reproducing the planted laws."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeper import RunState, SpecError, Sweep, plan
from sweeper.analysis.api import AnalysisOptions, analyze_tables
from sweeper.analysis.tables import load_sweep
from sweeper.autopilot import estimates
from sweeper.spec import parse_spec_text
from trainer.schema import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OK, Summary, parse_metrics_line
from trainer.sim import Surface, Trial, simulate

REPO = Path(__file__).resolve().parent.parent

SPEC = """name = "{name}"
[[models]]
preset = "cpu-tiny"
[grid]
lr = {{log2_from = {lo}, log2_to = {hi}, log2_step = {step}}}
batch_size = {batches}
log2_horizons = {horizons}
[train]
log_every = 4
checkpoint_every = 64
[backend]
name = "sim"
[simulator]
seed = 3
{surface}
"""


def spec_text(
    name: str = "sim", lo: float = -8, hi: float = -1, step: float = 0.5, **kw: object
) -> str:
    surface = "\n".join(f"{k} = {v!r}" for k, v in kw.pop("surface", {}).items())  # type: ignore[attr-defined]
    return SPEC.format(
        name=name,
        lo=lo,
        hi=hi,
        step=step,
        batches=kw.get("batches", [8, 32]),
        horizons=kw.get("horizons", [15, 16, 17]),
        surface=surface,
    )


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one (the store fsyncs every event)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = shm / f"sweeper-test-{os.getpid()}-{tmp_path.name}"
        d.mkdir()
        yield d
        subprocess.run(["rm", "-rf", str(d)], check=False)
    else:
        yield tmp_path


def trial(tmp_path: Path, **train: object) -> Path:
    cfg = {
        "model": {"preset": "cpu-tiny"},
        "optim": {"lr": 0.0625},
        "batch_size": 16,
        "horizons_tokens": [32768, 65536],
        "log_every": 8,
        "checkpoint_every": 32,
    }
    cfg.update(train)
    path = tmp_path / "trial.json"
    path.write_text(json.dumps({"train": cfg, "params": {"simulator": {"seed": 1}}}))
    return path


def run_sim(path: Path, out: Path, **popen: object) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "trainer.sim", "--run", str(path), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, **popen)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------- the surface


def test_surface_validation_names_the_key() -> None:
    with pytest.raises(SpecError, match="simulator.noise = -1"):
        parse_spec_text(spec_text(surface={"noise": -1.0}), "s.toml")
    with pytest.raises(SpecError, match="simulator.bogus: unknown key"):
        parse_spec_text(spec_text(surface={"bogus": 1}), "s.toml")
    with pytest.raises(SpecError, match="norm must grow with D"):
        parse_spec_text(spec_text(surface={"lr_d": 0.5}), "s.toml")
    assert Surface.from_dict({"x0": 6}).x0 == 6.0


def test_simulator_section_enters_params_ids_and_command() -> None:
    runs = plan(parse_spec_text(spec_text(), "sim.toml"))
    assert runs[0].params is not None and runs[0].params["simulator"]["seed"] == 3
    assert runs[0].command is not None and runs[0].command[1:] == ("-m", "trainer.sim")
    other = plan(parse_spec_text(spec_text().replace("seed = 3", "seed = 4"), "sim.toml"))
    assert {r.id for r in runs}.isdisjoint(r.id for r in other)


# ----------------------------------------------------------------------------- the trainer


def test_files_follow_the_trainer_contract(tmp_path: Path) -> None:
    path = trial(tmp_path)
    proc = run_sim(path, tmp_path / "run")
    assert proc.wait(30) == EXIT_OK, proc.stderr.read() if proc.stderr else ""
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(parse_metrics_line(x) is not None for x in lines)
    steps = [x["step"] for x in lines]
    assert steps == list(range(0, 65, 8))  # step 0, every log_every, the horizons (32, 64)
    horizon = [x for x in lines if x["horizon"]]
    assert [x["step"] for x in horizon] == [32, 64] and all("val_loss" in x for x in horizon)
    summary = Summary.from_dict(json.loads((out / "summary.json").read_text()))
    assert summary.status.value == "completed" and summary.step == 64
    assert json.loads((out / "config.json").read_text())["schema_version"] == 1
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [
        "step_00000032.json",
        "step_00000064.json",
    ]
    norms = [x["output_norm"] for x in lines]
    assert norms == sorted(norms) and norms[0] == 1.0


def test_sigterm_checkpoints_and_resume_matches(tmp_path: Path) -> None:
    path = trial(tmp_path, log_every=2)
    ref = tmp_path / "ref"
    simulate(json.loads(path.read_text()), ref)
    raw = json.loads(path.read_text())
    raw["params"]["simulator"]["sleep_s_per_step"] = 0.02
    path.write_text(json.dumps(raw))
    out = tmp_path / "run"
    proc = run_sim(path, out)
    deadline = time.time() + 20
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text()) < 500:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == EXIT_INTERRUPTED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["step"] < 64
    raw["params"]["simulator"]["sleep_s_per_step"] = 0.0
    path.write_text(json.dumps(raw))
    # the surface's sleep is not part of the train config: the same directory resumes
    assert run_sim(path, out).wait(30) == EXIT_OK
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_divergence_exits_3_with_a_null_loss(tmp_path: Path) -> None:
    raw = json.loads(trial(tmp_path).read_text())
    raw["params"]["simulator"].update(diverge_c=-6.0, diverge_log2_tokens=14.0)
    path = tmp_path / "div.json"
    path.write_text(json.dumps(raw))
    proc = run_sim(path, tmp_path / "run")
    assert proc.wait(30) == EXIT_DIVERGED
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == summary["step"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == summary["step"] and last["train_loss"] is None


def test_trial_refuses_bad_surface(tmp_path: Path) -> None:
    raw = json.loads(trial(tmp_path).read_text())
    raw["params"]["simulator"]["x0"] = -1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    proc = run_sim(path, tmp_path / "run")
    assert proc.wait(30) == 2
    assert b"simulator.x0" in (proc.stderr.read() if proc.stderr else b"")
    with pytest.raises(Exception, match="simulator.x0"):
        Trial.from_dict(raw)


# ----------------------------------------------------------------------------- the backends


def test_in_process_backend_writes_what_the_subprocess_writes(fast_dir: Path) -> None:
    text = spec_text(lo=-6, hi=-5, batches=[8, 32], horizons=[15, 16])
    sweeps = {}
    for backend in ("sim", "local"):
        s = Sweep.create(parse_spec_text(text, "s.toml"), fast_dir / backend)
        report = s.launch(backend=backend, max_parallel=2)
        assert report.states == {"completed": 6}
        sweeps[backend] = s
    a, b = sweeps["sim"], sweeps["local"]
    for rid in a.store.run_ids():
        da, db = a.store.run_dir(rid), b.store.run_dir(rid)
        for name in ("metrics.jsonl", "summary.json", "provenance.json"):
            assert (da / name).read_bytes() == (db / name).read_bytes(), (rid, name)
        ca, cb = (json.loads((d / "config.json").read_text()) for d in (da, db))
        ca.pop("threads"), cb.pop("threads")  # the local backend sets the trainer's threads
        assert ca == cb
        assert [e.state for e in a.store.events(rid)] == [e.state for e in b.store.events(rid)]


def test_sim_backend_reconciles_a_dead_launcher_and_resumes(fast_dir: Path) -> None:
    s = Sweep.create(parse_spec_text(spec_text(lo=-6, hi=-6), "s.toml"), fast_dir)
    rid = s.store.run_ids()[0]
    s.store.append_event(
        rid, RunState.SUBMITTED, backend="sim", host=os.uname().nodename, pid=2**22 + 7
    )
    s.store.append_event(
        rid, RunState.RUNNING, backend="sim", host=os.uname().nodename, pid=2**22 + 7
    )
    report = s.resume()
    assert report.states.get("completed") == 2
    assert [e.state.value for e in s.store.events(rid)][-2:] == ["running", "completed"]


# -------------------------------------------------------------- collect and analysis, laws


def test_collect_and_analysis_reproduce_the_planted_laws(fast_dir: Path) -> None:
    surface = {"lr_b": 0.5, "lr_d": -0.5, "lr_c": 2.5, "x0": 6.5, "noise": 0.02}
    text = spec_text(
        lo=-9, hi=-1, step=1, batches=[8, 16, 32], horizons=[16, 17, 18], surface=surface
    )
    s = Sweep.create(parse_spec_text(text, "s.toml"), fast_dir)
    assert s.launch().states == {"completed": 27}
    s.collect()
    # the analysis reads the collected tables as it reads a real sweep's, through its own API
    result = analyze_tables(load_sweep(s.root), AnalysisOptions(n_boot=50, plots=False))
    o = result.optima
    assert len(o) == 9 and (o["status"] == "ok").all() and (o["edge"] == "").all()
    truth = 0.5 * o["log2_B"] - 0.5 * o["log2_D"] + 2.5
    assert (o["log2_lr_star_interp"] - truth).abs().max() < 0.3
    assert (o["x0"] - 6.5).abs().max() < 0.3  # the optimal norm, the same at every (B, D)
    coef = result.laws["series"][0]["lr_law"]["coef"]
    assert math.isclose(coef["alpha"], 0.5, abs_tol=0.15)
    assert math.isclose(coef["beta"], -0.5, abs_tol=0.15)
    # the autopilot's snapshot of the same tables finds the same optima
    snap = estimates.take(s.root, 50).optima
    truth = 0.5 * snap["log2_B"] - 0.5 * snap["log2_D"] + 2.5
    assert len(snap) == 9 and (snap["log2_lr_star_interp"] - truth).abs().max() < 0.3


@pytest.mark.slow
def test_ten_thousand_runs_plan_launch_collect(fast_dir: Path) -> None:
    # 500 rates x 5 batch sizes x 4 seeds = 10,000 runs to 2^20 tokens, 3 to 33 lines each
    text = spec_text(
        name="big",
        lo=-12,
        hi=-12 + 499 * 0.02,
        step=0.02,
        batches=[8, 16, 32, 64, 128],
        horizons=[20],
        surface={"noise": 0.1},
    )
    text = text.replace("log_every = 4", "log_every = 64").replace(
        "[grid]", "[grid]\nseeds = [1, 2, 3, 4]"
    )
    t0 = time.perf_counter()
    s = Sweep.create(parse_spec_text(text, "big.toml"), fast_dir)
    assert len(s.new_ids) == 10_000
    report = s.launch()
    assert sum(report.states.values()) == 10_000
    s.collect()
    assert len(s.table("runs")) == 10_000
    print(f"10,000 simulated runs: create + launch + collect in {time.perf_counter() - t0:.1f} s")
