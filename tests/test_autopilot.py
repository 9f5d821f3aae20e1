"""The autopilot on simulated surfaces: reaching the tolerance from a grid that misses the optimum,
never stopping a run that could still be optimal, and resuming after SIGKILL without repeating a
finished run or a decision."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from sweeper import SpecError, Sweep
from sweeper.autopilot import AutopilotConfig, estimates, proposals, rules
from sweeper.autopilot.journal import Journal, replay
from sweeper.spec import parse_spec_text
from trainer.sim import Model, Trial

REPO = Path(__file__).resolve().parent.parent

SPEC = """name = "{name}"
[[models]]
preset = "cpu-tiny"
[grid]
lr = {{log2_from = {lo}, log2_to = {hi}, log2_step = {step}}}
batch_size = [8, 32]
log2_horizons = [15, 16, 17, 18]
[train]
log_every = 4
checkpoint_every = 64
[backend]
name = "sim"
[backend.sim]
rounds_per_octave = 1
[simulator]
{surface}
[autopilot]
n_boot = 60
batch_proposals = false
{autopilot}
"""


def spec(name: str, surface: dict[str, Any], lo: float, hi: float, step: float = 2.0,
         **autopilot: Any) -> Any:  # fmt: skip
    text = SPEC.format(
        name=name,
        lo=lo,
        hi=hi,
        step=step,
        surface="\n".join(f"{k} = {v!r}" for k, v in surface.items()),
        autopilot="\n".join(f"{k} = {json.dumps(v)}" for k, v in autopilot.items()),
    )
    return parse_spec_text(text, f"{name}.toml")


def truth(s: dict[str, Any], batch: int, tokens: int) -> float:
    return s["lr_b"] * math.log2(batch) + s["lr_d"] * math.log2(tokens) + s["lr_c"]


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


SURFACE = {"seed": 5, "lr_b": 0.5, "lr_d": -0.5, "lr_c": 3.0, "x0": 6.0, "noise": 0.05}


# ------------------------------------------------------------------------------------ units


def test_config_is_validated() -> None:
    with pytest.raises(SpecError, match="autopilot.bogus = 1: unknown key"):
        spec("c", SURFACE, -8, 0, bogus=1)
    with pytest.raises(SpecError, match="autopilot.tolerance_log2 = -1.0: must be > 0"):
        spec("c", SURFACE, -8, 0, tolerance_log2=-1)
    with pytest.raises(SpecError, match="expected true or false"):
        spec("c", SURFACE, -8, 0, early_stop=1)
    cfg = spec("c", SURFACE, -8, 0, max_waves=3).section("autopilot")
    assert cfg.max_waves == 3 and cfg.replace(max_waves=5).max_waves == 5
    with pytest.raises(SpecError):
        AutopilotConfig().replace(side_points=0)


def test_journal_replay_finds_the_open_wave_and_the_stops(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append("start")
    j.append("wave", wave=0, proposals=[])
    j.append("stop", wave=0, run_id="a", rule="norm", reason="r", evidence={})
    j.append("wave_end", wave=0)
    j.append("wave", wave=1, proposals=[{"point": {"lr": 0.1}, "reason": "x"}])
    with open(j.path, "ab") as f:
        f.write(b'{"event": "applied", "wa')  # a torn last line
    p = replay(j.records())
    assert p.waves_done == 1 and p.open_wave is not None and p.open_wave["wave"] == 1
    assert not p.applied and set(p.stops) == {"a"}
    j.append("applied", wave=1, new_runs=[])
    assert replay(j.records()).applied


def test_fit_line_recovers_slope_and_scatter() -> None:
    rng = np.random.default_rng(0)
    d = np.repeat(np.arange(15.0, 20.0), 4)
    y = 7.0 + 0.2 * (d - 17) + rng.normal(0, 0.1, len(d))
    line = rules.fit_line([d], y, np.full(len(d), 0.1))
    assert line is not None
    mean, sd = line.predict(17.0)
    # errors as stated: no scatter between cells, the line's own uncertainty 0.1 / sqrt(20)
    assert abs(mean - 7.0) < 0.1 and abs(line.beta[1] - 0.2) < 0.05 and 0.01 < sd < 0.05
    scattered = y + rng.normal(0, 0.3, len(d))  # true scatter beyond the stated errors
    line = rules.fit_line([d], scattered, np.full(len(d), 0.1))
    assert line is not None and 0.15 < line.predict(17.0)[1] < 0.5
    assert rules.fit_line([d[:2]], y[:2], np.full(2, 0.1)) is None  # no residual freedom


def cell_snapshot(losses: dict[float, float], tokens: int = 2**16) -> estimates.Snapshot:
    """A snapshot of one (model, layout, B = 8) group with one usable point per rate at D."""
    rates = sorted(losses)
    runs = pd.DataFrame({"model": "m", "layout": "1:1:1", "batch_size": 8, "seed": 30,
                         "log2_lr": rates, "lr": [2.0**v for v in rates],
                         "lr_in": [2.0**v for v in rates], "lr_hidden": [2.0**v for v in rates],
                         "lr_out": [2.0**v for v in rates]})  # fmt: skip
    points = runs[["model", "layout", "batch_size", "log2_lr"]].assign(
        run_id=[f"r{i}" for i in range(len(rates))], tokens=tokens, x=6.0,
        y=[losses[v] for v in rates],
    )  # fmt: skip
    return estimates.Snapshot(runs, points)


def test_an_edge_is_extended_at_the_grid_spacing_and_a_short_side_filled() -> None:
    edge = cell_snapshot({-1.0: 3.0, 1.0: 3.5})
    cell = SimpleNamespace(why="optimum at the low edge", log2_lr_star=math.nan)
    group = proposals._Group(edge, AutopilotConfig(), "m", "1:1:1", 8, None)
    assert [p.log2_lr for p in group.for_cell(2**16, cell)] == [-3.0]  # side_points = 1
    cfg = AutopilotConfig(side_points=2)
    group = proposals._Group(edge, cfg, "m", "1:1:1", 8, None)
    props = group.for_cell(2**16, cell)
    # side_points rates past the edge at the grid's own 2-octave spacing, not one fine step
    assert [p.log2_lr for p in props] == [-3.0, -5.0]
    assert all("below at spacing 2" in p.reason for p in props)
    high = proposals._Group(cell_snapshot({-1.0: 3.5, 1.0: 3.0}), cfg, "m", "1:1:1", 8, None)
    assert [p.log2_lr for p in high.for_cell(2**16, cell)] == [3.0, 5.0]
    # one-sided inside the range: between the estimate and the far rate, at the design step
    snap = cell_snapshot({-6.0: 3.4, -2.0: 3.0, -1.5: 3.1, -1.0: 3.2, 0.0: 3.5})
    group = proposals._Group(snap, cfg, "m", "1:1:1", 8, None)
    cell = SimpleNamespace(why="1 rates below eta*, 3 above", log2_lr_star=-2.2)
    assert [p.log2_lr for p in group.for_cell(2**16, cell)] == [-2.75, -3.25]


def test_a_noisy_cell_is_widened_once_its_design_is_there() -> None:
    cfg = AutopilotConfig(side_points=1, min_step_log2=0.5)
    snap = cell_snapshot({-2.5: 3.02, -2.0: 3.0, -1.5: 3.01})
    group = proposals._Group(snap, cfg, "m", "1:1:1", 8, None)
    cell = SimpleNamespace(why="interval +-0.80 > 0.5", log2_lr_star=-2.2)
    # the design (-2.5, -2.0) has its points: the next rate outward on each side, one per wave,
    # up to max_side_points lattice rates per side
    props = group.for_cell(2**16, cell)
    assert [p.log2_lr for p in props] == [-3.0, -1.0]
    assert all("widened" in p.reason for p in props)
    group = proposals._Group(snap, cfg.replace(max_side_points=2), "m", "1:1:1", 8, None)
    assert [p.log2_lr for p in group.for_cell(2**16, cell)] == [-3.0]
    # the design's rate (-2.5) is already proposed this wave for another cell: wait for it
    snap = cell_snapshot({-3.0: 3.1, -2.0: 3.0, -1.0: 3.2})
    group = proposals._Group(snap, cfg, "m", "1:1:1", 8, None)
    group.tried.add((-2.5, 30))
    assert group.for_cell(2**16, cell) == []


# ------------------------------------------------------------------------------ the loop


@pytest.mark.slow
def test_reaches_the_tolerance_with_the_optimum_off_the_initial_grid(fast_dir: Path) -> None:
    # eta* lies between 2^-4.5 and 2^-2 (B 8 and 32, D 2^15 to 2^18); the initial grid is 2^-1,
    # 2^1: every cell's optimum is below its lowest rate
    s = Sweep.create(spec("off", SURFACE, -1, 1), fast_dir)
    report = s.autopilot(max_waves=6)
    assert report.finished == "tolerance", report.cells.to_string()
    cells = report.cells
    assert len(cells) == 8 and cells["identified"].all()
    err = [abs(c.log2_lr_star - truth(SURFACE, c.batch_size, c.tokens)) for c in cells.itertuples()]
    assert max(err) < 0.35
    waves = [r for r in Journal(s.root).records() if r["event"] == "wave"]
    assert waves[1]["proposals"] and all(p["reason"] for p in waves[1]["proposals"])
    lowest = min(truth(SURFACE, b, d) for b in (8, 32) for d in (2**15, 2**18))
    assert min(p["point"]["lr"] for w in waves for p in w["proposals"]) < 2**lowest


SURFACES = [
    SURFACE,
    {"seed": 11, "lr_b": 0.65, "lr_d": -0.35, "lr_c": 0.5, "x0": 7.5, "noise": 0.2,
     "curvature_high": 2.0},
    {"seed": 12, "lr_b": 0.4, "lr_d": -0.6, "lr_c": 4.5, "x0": 5.0, "noise": 0.1,
     "x0_drift": 0.15},
    {"seed": 13, "lr_b": 0.5, "lr_d": -0.45, "lr_c": 2.2, "x0": 6.0, "noise": 0.1,
     "diverge_b": 0.5, "diverge_c": -3.5, "diverge_log2_tokens": 14.0},
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(SURFACES)))
def test_early_stopping_never_stops_a_run_that_could_be_optimal(fast_dir: Path, i: int) -> None:
    s_ = SURFACES[i]
    s = Sweep.create(spec(f"never{i}", s_, -10, 0), fast_dir)
    report = s.autopilot(max_waves=4)
    stops = [r for r in Journal(s.root).records() if r["event"] == "stop"]
    assert report.stopped == len(stops) > 0
    for rec in stops:
        run = s.store.load_record(rec["run_id"])
        status = s.store.status(rec["run_id"])
        assert status.state.value == "stopped" and rec["rule"] in (status.reason or "")
        done = json.loads((s.store.run_dir(run.id) / "summary.json").read_text())["tokens"]
        for d in run.horizons_tokens:
            if d > done:  # a horizon it will not reach: its rate is not the optimum there
                gap = abs(math.log2(run.lr) - truth(s_, run.batch_size, d))
                assert gap > 0.5, (rec["run_id"], d, rec["evidence"])
                # nor is it the sweep's best run there (by the surface's noise-free loss)
                assert planted_best(s, run.batch_size, d) != run.id, (d, rec["evidence"])


def planted_best(sweep: Sweep, batch: int, tokens: int) -> str:
    """The run of the sweep with the lowest noise-free simulated loss at (B, D), among the runs
    that do not diverge before D."""
    best: tuple[float, str] = (math.inf, "")
    for rid in sweep.store.run_ids():
        path = sweep.store.run_dir(rid) / "trial.json"
        if not path.exists():
            continue
        t = Trial.from_dict(json.loads(path.read_text()))
        if t.cfg.batch_size != batch or tokens not in t.cfg.horizons_tokens:
            continue
        model = Model(t.surface, t.cfg)
        step = tokens // t.cfg.tokens_per_step
        if model.div_step is None or model.div_step > step:
            best = min(best, (model.point(step).loss, rid))
    return best[1]


def test_stopped_runs_keep_their_data(fast_dir: Path) -> None:
    s = Sweep.create(spec("keep", SURFACE, -10, 0), fast_dir)
    s.autopilot(max_waves=0)
    s.collect()
    runs = s.table("runs")
    stopped = runs[runs["state"] == "stopped"]
    assert len(stopped) > 0
    horizons = s.table("horizons")
    assert set(stopped["run_id"]) <= set(horizons["run_id"])  # read off before they stopped
    assert (stopped["tokens_done"] < stopped["max_tokens"]).all()


# ------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
def test_resumes_after_sigkill_without_repeating_a_run_or_a_decision(fast_dir: Path) -> None:
    surface = {**SURFACE, "sleep_s_per_step": 0.0005}
    text = SPEC.format(
        name="kill", lo=-10, hi=0, step=2.0,
        surface="\n".join(f"{k} = {v!r}" for k, v in surface.items()),
        autopilot="max_waves = 3",
    )  # fmt: skip
    (fast_dir / "kill.toml").write_text(text)
    cmd = [sys.executable, "-m", "sweeper.cli", "autopilot", str(fast_dir / "kill.toml"),
           "--results", str(fast_dir), "--quiet", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    journal = Journal(fast_dir / "kill")
    deadline = time.time() + 300
    while not any(r["event"] == "applied" and r["wave"] >= 1 for r in journal.records()):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # into the wave: some of its runs are running
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    sweep = Sweep.open(fast_dir / "kill")
    done_before = {
        rid for rid in sweep.store.run_ids()
        if any(e.state.value == "completed" and e.ts < killed_at for e in sweep.store.events(rid))
    }  # fmt: skip
    assert done_before
    rerun = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert rerun.returncode in (0, 1), rerun.stderr.decode()
    records = journal.records()
    waves = [r["wave"] for r in records if r["event"] == "wave"]
    assert len(waves) == len(set(waves))  # no wave proposed twice
    stops = Counter(r["run_id"] for r in records if r["event"] == "stop")
    assert all(n == 1 for n in stops.values())  # no stop decided twice
    applied = [r["wave"] for r in records if r["event"] == "applied"]
    assert len(applied) == len(set(applied))
    assert records[-1]["event"] == "finish"
    for rid in done_before:  # a finished run never ran again
        runs = [e for e in sweep.store.events(rid) if e.state.value == "running"]
        assert len(runs) == 1, rid
    for rid in stops:
        assert sweep.store.status(rid).state.value == "stopped"
