"""The schedule law (Tissue et al. 2024) against planted coefficients: synthetic loss curves drawn
from L(s) = L0 + A S1^-alpha - C S2 with known values and noise; the fit must recover them within
its intervals, predict held-out schedules, and run through ``analyze --from``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from sweeper.analysis import schedule_law as sl
from sweeper.analysis.tables import from_frames
from sweeper.cli import cli
from trainer.config import ScheduleConfig

TRUE = {"L0": 2.0, "A": 1.5, "alpha": 0.6, "C": 0.8}
LAM = 0.99  # on the default grid
PEAK = 0.02
SEQ = 64
BATCH = 8


def _truth(eta: np.ndarray) -> np.ndarray:
    s1, s2 = sl.areas(eta, LAM)
    with np.errstate(divide="ignore"):
        return np.asarray(TRUE["L0"] + TRUE["A"] * s1 ** -TRUE["alpha"] - TRUE["C"] * s2)


def _schedules() -> dict[str, tuple[ScheduleConfig, int]]:
    return {
        "c": (ScheduleConfig(kind="constant"), 800),
        "w2": (ScheduleConfig(kind="wsd", decay_fraction=0.2), 600),
        "w2b": (ScheduleConfig(kind="wsd", decay_fraction=0.2), 800),
        "w5": (ScheduleConfig(kind="wsd", decay_fraction=0.5), 800),
        "cos": (ScheduleConfig(kind="cosine"), 800),
    }


def synthetic_tables(
    noise: float = 0.01, seed: int = 0, log_every: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Horizons and metrics frames of five runs whose losses follow the planted law."""
    rng = np.random.default_rng(seed)
    hz, met = [], []
    for rid, (cfg, total) in _schedules().items():
        eta = sl.schedule_rates(cfg, total, PEAK)
        loss = _truth(eta)
        loss[0] = 5.5
        steps = np.arange(0, total + 1, log_every)
        y = loss[steps] + noise * rng.standard_normal(len(steps))
        tok = steps * SEQ * BATCH
        for name, v in (("train_loss", y), ("lr_hidden", eta[steps])):
            met.append(pd.DataFrame({"run_id": rid, "step": steps, "tokens": tok,
                                     "metric": name, "value": v}))  # fmt: skip
        hz.append({"run_id": rid, "model": "m", "lr": PEAK, "batch_size": BATCH,
                   "tokens": int(tok[-1]), "step": total, "train_loss": float(y[-1]),
                   "output_norm": 1.0, "schedule": cfg.kind})  # fmt: skip
    return pd.DataFrame(hz), pd.concat(met, ignore_index=True)


def test_areas_of_a_wsd_schedule() -> None:
    eta = sl.schedule_rates(ScheduleConfig(kind="wsd", decay_fraction=0.5), 10, 1.0)
    s1, s2 = sl.areas(eta, 0.0)
    assert s1[-1] == pytest.approx(eta[1:].sum())
    # lam = 0: S2 is the total drop of the rate so far
    assert s2[-1] == pytest.approx(eta[1] - eta[-1])
    s1c, s2c = sl.areas(np.r_[0.0, np.full(10, 1.0)], 0.99)
    assert np.all(s2c == 0) and s1c[-1] == 10.0
    warm = sl.schedule_rates(ScheduleConfig(kind="constant", warmup_steps=4), 10, 1.0)
    assert np.all(sl.areas(warm, 0.9)[1] == 0)  # warmup is not annealing
    assert sl._label("constant", warm) == "constant-w4"
    cos = sl.schedule_rates(ScheduleConfig(kind="cosine", warmup_steps=3), 20, 1.0)
    assert sl._label("", cos) == "decay-w3"  # no schedule column: kind from the rates


def test_labels_from_the_logged_rates() -> None:
    hz, met = synthetic_tables()
    curves = sl.build_curves(from_frames(hz, met), sl.LawOptions())
    labels = {c.run_id: c.label for cs in curves.values() for c in cs}
    assert labels == {"c": "constant", "w2": "wsd0.2", "w2b": "wsd0.2", "w5": "wsd0.5",
                      "cos": "cosine"}  # fmt: skip


def test_recovers_planted_coefficients_within_intervals() -> None:
    hz, met = synthetic_tables(noise=0.01, seed=1)
    opts = sl.LawOptions(fit_schedules=("constant", "wsd0.2"), n_boot=60, seed=0)
    res = sl.fit_schedule_law(from_frames(hz, met), opts)
    (g,) = res.groups
    assert g.lam == LAM
    for p, v in TRUE.items():
        lo, hi = g.ci[p]
        assert lo <= v <= hi, (p, v, lo, hi)
        assert g.coef[p] == pytest.approx(v, rel=0.15)
    assert {c.run_id for c in g.curves if not c.fitted} == {"w5", "cos"}


def test_predicts_held_out_schedules() -> None:
    hz, met = synthetic_tables(noise=0.01, seed=2)
    opts = sl.LawOptions(fit_schedules=("constant", "wsd0.2"), n_boot=0)
    res = sl.fit_schedule_law(from_frames(hz, met), opts)
    held = res.held_out().set_index("run_id")
    assert set(held.index) == {"w5", "cos"}
    for rid, (cfg, total) in _schedules().items():
        if rid in held.index:
            true_final = float(np.mean(_truth(sl.schedule_rates(cfg, total, PEAK))[-3:]))
            assert held.loc[rid, "final_pred"] == pytest.approx(true_final, abs=0.01)
    # ranking at the 800-step horizon: the truth orders the schedules; the prediction agrees
    agree = res.agreement[res.agreement["final_step"] == 800].iloc[0]
    assert agree["kendall_tau"] == pytest.approx(1.0) and agree["best_agrees"]
    ranked = res.ranking
    truth = {
        name: float(np.mean(_truth(sl.schedule_rates(cfg, 800, PEAK))[-3:]))
        for name, cfg in (
            ("wsd0.5", ScheduleConfig(kind="wsd", decay_fraction=0.5)),
            ("constant", ScheduleConfig(kind="constant")),
        )  # fmt: skip
    }
    got = ranked.set_index("schedule")["final_pred"]
    for name, v in truth.items():
        assert got[name] == pytest.approx(v, abs=0.01)
    assert ranked["rank"].iloc[0] == 1 and ranked["schedule"].iloc[-1] == "constant"


def test_coarse_logging_interpolates_the_rates() -> None:
    hz, met = synthetic_tables(noise=0.005, seed=3, log_every=8)
    res = sl.fit_schedule_law(from_frames(hz, met), sl.LawOptions(n_boot=0))
    (g,) = res.groups
    assert g.coef["alpha"] == pytest.approx(TRUE["alpha"], rel=0.2)
    assert res.predictions["rel_error"].abs().max() < 0.01


def test_analyze_from_a_table_made_elsewhere(tmp_path: Path) -> None:
    hz, met = synthetic_tables(noise=0.01, seed=4)
    hz.to_csv(tmp_path / "curves.csv", index=False)
    met.to_parquet(tmp_path / "curves-metrics.parquet", index=False)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["analyze", "--from", str(tmp_path / "curves.csv"), "--metrics",
                                 str(tmp_path / "curves-metrics.parquet"), "--schedules",
                                 "--fit-schedules", "constant,wsd0.2", "--bootstrap", "20",
                                 "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "fits.json").read_text())["schedule_law"]
    (fit,) = doc["fits"]
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.02)
    assert fit["alpha_lo"] < fit["alpha"] < fit["alpha_hi"]
    assert doc["held_out_summary"]["held_out_runs"] == 2
    assert doc["held_out_summary"]["max_abs_rel_error"] < 0.01
    assert list(out.glob("schedule_law_*.png"))
    assert "Schedule law" in (out / "report.html").read_text()
    assert "schedule law" in r.output


def test_a_decay_branch_continues_its_trunk() -> None:
    """A WSD branch logs only from its fork step: its areas start from the trunk's rates."""
    hz, met = synthetic_tables(noise=0.0)
    fork = 640  # wsd0.2 at 800 steps decays from step 640
    whole = met[met["run_id"] == "w2b"]
    trunk = whole[whole["step"] <= fork].assign(run_id="trunk")
    branch = whole[whole["step"] >= fork]
    met2 = pd.concat([met[met["run_id"] != "w2b"], trunk, branch], ignore_index=True)
    row = hz[hz["run_id"] == "w2b"].iloc[0]
    hz2 = pd.concat([hz.assign(kind="single", parent=""),
                     pd.DataFrame([{**row, "run_id": "trunk", "tokens": fork * SEQ * BATCH,
                                    "schedule": "constant", "kind": "trunk", "parent": ""}])],
                    ignore_index=True)  # fmt: skip
    hz2.loc[hz2["run_id"] == "w2b", ["kind", "parent"]] = ["branch", "trunk"]
    curves = sl.build_curves(from_frames(hz2, met2), sl.LawOptions())
    by_id = {c.run_id: c for cs in curves.values() for c in cs}
    assert by_id["w2b"].label == "wsd0.2" and by_id["trunk"].label == "constant"
    assert by_id["w2b"].steps[0] == fork and len(by_id["w2b"].eta) == 801
    s1, s2 = sl.areas(by_id["w2b"].eta, LAM)
    cfg, total = _schedules()["w2b"]
    s1_true, s2_true = sl.areas(sl.schedule_rates(cfg, total, PEAK), LAM)
    assert np.allclose(s1, s1_true) and np.allclose(s2, s2_true)
