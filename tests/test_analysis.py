"""Scaling analysis on synthetic surfaces with planted laws: optima, censoring, laws, fit quality,
report, command line.

Truth comes from the planted surface (sweeper/analysis/synthetic.py) and from independent
computations written here (closed-form normal equations, a hand-written point selection); the
toolkit-parity tests are in tests/test_analysis_toolkit.py, the refine tests in
tests/test_analysis_refine.py.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from sweeper import tables
from sweeper.analysis import laws, optimum, synthetic
from sweeper.analysis.api import AnalysisOptions, analyze_tables
from sweeper.analysis.optimum import FitOptions
from sweeper.analysis.tables import AnalysisError, from_frames, load_file
from sweeper.cli import cli

PLANTED = synthetic.Surface(gamma=4.3, noise=0.01)
FAST = AnalysisOptions(n_boot=0, plots=False)


@pytest.fixture(scope="module")
def surface() -> tuple[pd.DataFrame, pd.DataFrame]:
    """One model, B = 8..512, D = 2^20..2^26, eta on a 2^0.5 grid; noise seed 1.

    A 95 % interval misses the truth in 1 of 20 seeds (seed 0 misses b): the single-seed checks
    below use seed 1, and the coverage over 50 seeds is checked by the slow test at the end.
    """
    return synthetic.generate(PLANTED, rng_seed=1)


@pytest.fixture(scope="module")
def surface_analysis(surface: tuple[pd.DataFrame, pd.DataFrame]) -> object:
    h, m = surface
    return analyze_tables(h, AnalysisOptions(n_boot=100, plots=False), metrics=m)


def _in_ci(fit: dict, name: str, value: float) -> bool:
    lo, hi = fit["ci"][name]
    return bool(lo <= value <= hi)


def _planted_eta(o: pd.DataFrame) -> np.ndarray:
    return PLANTED.log2_lr_star(o["batch_size"].to_numpy(), o["tokens"].to_numpy())


# ------------------------------------------------------------------------- planted-law recovery


def test_recovers_planted_laws_and_optimal_norm(surface_analysis) -> None:
    s = surface_analysis.laws["series"][0]
    head, grid = s["lr_law"], s["lr_law_alt"]
    assert head["eta_source"] == "log2_lr_star_interp" and head["se_type"] == "HC3"
    for name, value in (("alpha", PLANTED.alpha), ("beta", PLANTED.beta), ("gamma", 4.3)):
        assert _in_ci(head, name, value), head
    # The paper's grid-rounded eta* is close, but its intervals ignore the rounding.
    assert grid["eta_source"] == "log2_lr_star"
    assert abs(grid["coef"]["alpha"] - PLANTED.alpha) < 0.05
    assert abs(grid["coef"]["beta"] - PLANTED.beta) < 0.05
    assert s["batch_law"]["b_source"] == "log2_B_star_interp"
    assert _in_ci(s["batch_law"], "b", PLANTED.b), s["batch_law"]
    assert _in_ci(s["batch_law_alt"], "b", PLANTED.b), s["batch_law_alt"]
    ev = s["eta_vs_data"]
    assert abs(ev["exponent"] - (PLANTED.alpha * PLANTED.b + PLANTED.beta)) < 3 * ev["se"] + 0.02
    nt = surface_analysis.laws["norm_transfer"]
    assert abs(nt["all"]["mean"] - PLANTED.x_star) < 0.1
    assert all(abs(v["mean"] - PLANTED.x_star) < 0.1 for v in nt["per_tokens"].values())
    assert nt["all"]["n"] == len(surface_analysis.optima) == 49
    assert surface_analysis.censored.empty and surface_analysis.warnings == ()


def test_per_slice_optima_match_the_planted_rate(surface_analysis) -> None:
    ok = surface_analysis.optima
    assert (ok["status"] == "ok").all() and (ok["edge"] == "").all()
    planted = _planted_eta(ok)
    assert np.abs(ok["log2_lr_star"] - planted).max() <= 0.5 + 1e-9  # one grid step
    assert np.abs(ok["log2_lr_star_interp"] - planted).max() < 0.1
    assert np.abs(ok["log2_lr_quad"] - planted).max() < 0.3
    # bootstrap intervals of the optimal norm contain the estimate, and mostly the truth
    assert ((ok["x0_lo"] <= ok["x0"]) & (ok["x0"] <= ok["x0_hi"])).all()
    assert ((ok["x0_lo"] <= PLANTED.x_star) & (PLANTED.x_star <= ok["x0_hi"])).mean() > 0.8
    # on the planted surface the parabola is the true model: no fit-quality flag
    assert not ok["below_data"].any() and (ok["resid_rms"] < 0.05).all()


# ----------------------------------------------------- independent implementation of the fit


def _normal_equations(x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float | None) -> np.ndarray:
    """Closed-form weighted least squares: solve (X^T W X) beta = X^T W y."""
    X = np.column_stack([x**2, x]) if c is not None else np.column_stack([x**2, x, x**0])
    t = y - c if c is not None else y
    XtW = X.T * w
    beta = np.linalg.solve(XtW @ X, XtW @ t)
    return np.append(beta, c) if c is not None else beta


def _select_by_hand(x: np.ndarray, y: np.ndarray, k: int) -> set[int]:
    """k nearest in x to the argmin of y; if one-sided, swap the farthest for the nearest other."""
    m = int(np.argmin(y))
    dist = np.abs(x - x[m])
    chosen = sorted(range(len(x)), key=lambda i: (dist[i], i))[:k]
    for side in (-1, 1):
        if not any(np.sign(x[i] - x[m]) == side for i in chosen):
            others = [i for i in range(len(x)) if np.sign(x[i] - x[m]) == side]
            if others:
                near = min(others, key=lambda i: (dist[i], i))
                far = max((i for i in chosen if i != m), key=lambda i: (dist[i], i))
                chosen[chosen.index(far)] = near
    return set(chosen)


@pytest.mark.parametrize("c_fixed", [None, 5.545])
def test_fit_agrees_with_closed_form_normal_equations(c_fixed: float | None) -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(5, 15))
        x = np.sort(rng.uniform(0, 12, n))
        y = 2.0 + 0.04 * (x - rng.uniform(3, 9)) ** 2 + rng.normal(0, 0.02, n)
        std = rng.uniform(0.005, 0.05, n)
        sel = optimum.select_points(x, y, 7)
        assert set(sel.tolist()) == _select_by_hand(x, y, 7)
        w = optimum.weights_from_std(std[sel], floor=0.0)
        ours = optimum.fit_quadratic_batch(x[sel], y[sel], w, c_fixed)
        ref = _normal_equations(x[sel], y[sel], 1 / std[sel] ** 2, c_fixed)
        np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-9)
        vx, vy = optimum.vertex(ours)
        if ref[0] > 0:
            assert vx == pytest.approx(-ref[1] / (2 * ref[0]))
            assert vy == pytest.approx(ref[2] - ref[1] ** 2 / (4 * ref[0]))
        else:
            assert math.isnan(vx)


def test_selection_brackets_the_minimum() -> None:
    x = np.array([0.0, 5.0, 5.1, 5.2, 5.3, 5.4])
    y = np.array([3.0, 1.0, 1.1, 1.2, 1.3, 1.4])
    sel = optimum.select_points(x, y, 3)
    assert 0 in sel and 1 in sel and len(sel) == 3


def test_weight_floor_caps_a_lucky_tiny_std() -> None:
    std = np.array([0.01, 0.012, 1e-6, 0.011])
    floored = optimum.weights_from_std(std)
    assert floored[2] / floored[0] == pytest.approx((0.01 / (0.1 * 0.0105)) ** 2)
    raw = optimum.weights_from_std(std, floor=0.0)
    assert raw[2] / raw[0] == pytest.approx((0.01 / 1e-6) ** 2)


# ------------------------------------------------------------------------------- edges, censoring


def test_slice_edge_is_judged_per_slice_not_per_batch_size() -> None:
    """At D = 2^24, B = 256 only rates up to 1.5 below the planted optimum reached D (the others
    diverged earlier, say); other horizons tried the higher rates. The slice's best rate is its
    own highest: flagged, censored, left out of the law."""
    h, m = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-10, 0, 0.5), batch_sizes=(16, 64, 256),
        horizons=(2**22, 2**23, 2**24),
    )  # fmt: skip
    cut = float(PLANTED.log2_lr_star(256, 2**24)) - 1.5
    drop = (h["tokens"] == 2**24) & (h["batch_size"] == 256) & (np.log2(h["lr"]) > cut)
    res = analyze_tables(h[~drop], FAST, metrics=m)
    o = res.optima.set_index(["tokens", "batch_size"])
    bad = o.loc[(2**24, 256)]
    assert bad["edge"] == "high" and bad["censored"] == "best rate is the slice's highest rate"
    # its eta* is far off, which is why it must not enter the law unflagged
    assert abs(bad["log2_lr_star"] - PLANTED.log2_lr_star(256, 2**24)) > 1.0
    assert (o.drop(index=(2**24, 256))["censored"] == "").all()
    assert res.laws["series"][0]["lr_law"]["n"] == 8
    assert res.laws["series"][0]["lr_law"]["n_censored"] == 1
    assert _in_ci(res.laws["series"][0]["lr_law"], "beta", PLANTED.beta)
    assert any(w.startswith("cpu-tiny D=2^24 B=256: best rate 2^") for w in res.warnings)
    with_censored = analyze_tables(h[~drop], AnalysisOptions(n_boot=0, include_censored=True),
                                   metrics=m)  # fmt: skip
    assert with_censored.laws["series"][0]["lr_law"]["n"] == 9


def test_vertex_outside_its_points_is_censored() -> None:
    le = np.arange(8) * 0.5
    x = le + 3.0
    y = 3.0 - 0.1 * le + 0.002 * le**2  # still falling at the largest rate: vertex beyond
    s = optimum.Slice(le, x, y, np.full(8, np.nan), np.ones(8))
    out = optimum.slice_optimum(s, FitOptions(n_boot=0, k=5), np.random.default_rng(0))
    assert out["edge"] == "high"
    assert out["vertex_outside"] or out["status"] == "not_convex"
    y2 = y.copy()
    y2[-1] = y[-2] + 0.001  # now the argmin is one below the top, the vertex still beyond
    out = optimum.slice_optimum(
        optimum.Slice(le, x, y2, np.full(8, np.nan), np.ones(8)),
        FitOptions(n_boot=0, k=8),
        np.random.default_rng(0),
    )
    frame = pd.DataFrame([{**out, "status": "ok"}])
    assert out["edge"] == "" and out["vertex_outside"]
    assert optimum.censor_reasons(frame).iloc[0] == "vertex outside the fitted points"


def test_batch_star_on_the_grid_edge_is_flagged_and_censored() -> None:
    # B* grows from 2^4.2 to 2^6.9 over D: with B up to 64 it sits on the high edge at large D
    h, m = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-10, 0, 0.5), batch_sizes=(8, 16, 32, 64),
        horizons=tuple(2**d for d in range(20, 27)),
    )  # fmt: skip
    res = analyze_tables(h, FAST, metrics=m)
    bs = res.batch_star.set_index("tokens")
    assert bs.loc[2**26, "edge_batch"] == "high" and bs.loc[2**20, "edge_batch"] == ""
    assert "B* = 64 is the largest batch size tried (8..64)" in bs.loc[2**26, "censored"]
    n_edge = int((bs["edge_batch"] != "").sum())
    law = res.laws["series"][0]["batch_law"]
    assert law["n_censored"] == n_edge and law["n"] == len(bs) - n_edge
    assert any(w.startswith("cpu-tiny D=2^26: B* = 64 is the largest") for w in res.warnings)


# ---------------------------------------------------------------------------- degenerate laws


def test_demo_like_sweep_reports_the_batch_law_as_not_identified(tmp_path: Path) -> None:
    """Two batch sizes with B* at the same edge at every D (like sweeps/demo.toml): the B* law is
    not identified, with the reason; nothing is printed as +- 0."""
    h, m = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(16, 64),
        horizons=(2**22, 2**23, 2**24),
    )  # fmt: skip
    res = analyze_tables(h, FAST, metrics=m)
    law = res.laws["series"][0]["batch_law"]
    assert not law["identified"] and math.isnan(law["coef"]["b"]) and math.isnan(law["se"]["b"])
    assert "fewer than 2 distinct interior B*" in law["reason"]
    assert "edge of the batch grid at 3 of 3 horizons" in law["reason"]
    assert not res.laws["series"][0]["eta_vs_data"]["identified"]
    for d in (22, 23, 24):
        assert any(w.startswith(f"cpu-tiny D=2^{d}: B* = ") for w in res.warnings)
    assert any("the headline B* law on the refined B* is not identified" in w for w in res.warnings)
    doc = res.document()
    assert doc["series"][0]["batch_law"]["coef"]["b"] is None  # NaN is null in fits.json
    args = ["--from", str(_parquet(tmp_path, h)), "--out", str(tmp_path / "o"), "--no-plots"]
    r = CliRunner().invoke(cli, ["analyze", *args, "--bootstrap", "0"])
    assert r.exit_code == 0, r.output
    assert "b not identified (fewer than 2 distinct interior B*" in r.output
    assert "0.000 +- 0.000" not in r.output


def _parquet(tmp_path: Path, h: pd.DataFrame) -> Path:
    p = tmp_path / "h.parquet"
    h.to_parquet(p)
    return p


def test_single_batch_size_and_zero_residual_laws_are_not_identified() -> None:
    h, m = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(32,),
        horizons=(2**22, 2**23, 2**24),
    )  # fmt: skip
    res = analyze_tables(h, FAST, metrics=m)
    s = res.laws["series"][0]
    assert not s["lr_law"]["identified"]
    assert s["lr_law"]["reason"] == "log2 B (a single batch size) does not vary"
    assert not s["batch_law"]["identified"]
    assert s["batch_law"]["reason"] == "a single batch size: B* is not measured"
    exact = laws.ols(np.array([1.0, 2.0, 3.0, 4.0]), {"b": np.array([0.0, 1.0, 2.0, 3.0])})
    assert not exact["identified"] and exact["reason"].startswith("zero residual variance")
    assert math.isnan(exact["se"]["b"])
    few = laws.ols(np.array([1.0, 2.0]), {"b": np.array([0.0, 1.0])})
    assert few["reason"] == "2 points for 2 coefficients"


# -------------------------------------------------------------------------------- fit quality


def test_vertex_far_below_the_data_is_flagged_and_named() -> None:
    """An intercept that is not the loss at initialisation bends the parabolas: their vertices
    sink below every observed point, which the fit-quality check reports per slice."""
    quiet = synthetic.Surface(gamma=4.3, noise=0.003)
    h, m = synthetic.generate(
        quiet, lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(16, 64),
        horizons=(2**22, 2**24),
    )  # fmt: skip
    res = analyze_tables(h, AnalysisOptions(n_boot=0, c_fixed=quiet.loss_init + 3.0), metrics=m)
    o = res.optima
    assert o["below_data"].sum() >= 3
    assert (o["below_data"] == (o["gap"] > o["gap_allowance"] + 3 * o["noise"])).all()
    flagged = [w for w in res.warnings if "lies" in w and "below the lowest fitted loss" in w]
    assert len(flagged) == o["below_data"].sum()
    for r in o[o["below_data"]].itertuples():
        name = f"cpu-tiny D=2^{math.log2(r.tokens):g} B={r.batch_size}: the fitted optimum"
        assert any(w.startswith(name) for w in flagged), name
    good = analyze_tables(h, FAST, metrics=m).optima
    assert not good["below_data"].any()


def test_fit_quality_of_a_flat_bottomed_slice() -> None:
    """Points from a wide, flat valley that never reaches c near x = 0: a parabola through (0, c)
    must be steeper than the data, and its vertex falls below every point. The noise is the
    scatter about a free quadratic, so a loss offset shared by all rates does not count."""
    x = np.linspace(3.0, 9.0, 7)
    y = 2.0 + 0.02 * (x - 6.5) ** 2 + np.random.default_rng(0).normal(0, 0.003, 7)
    coef = optimum.fit_quadratic_batch(x, y, np.ones(7), 5.545)
    q = optimum.fit_quality(x, y, float("nan"), coef, 3.0)
    free = optimum.fit_quadratic_batch(x, y, np.ones(7), None)
    r = y - (free[0] * x * x + free[1] * x + free[2])
    assert q["noise"] == pytest.approx(np.sqrt(np.sum(r**2) / 4))
    assert q["below_data"] and q["gap"] > 0.1 > 3 * q["noise"]
    assert not optimum.fit_quality(x, y, float("nan"), free, 3.0)["below_data"]
    # with fewer than 5 points the noise of the logged losses is used
    few = optimum.fit_quality(x[2:6], y[2:6], 0.004, coef, 3.0)
    assert few["noise"] == 0.004
    d2 = np.array([0.01, -0.02, 0.015, 0.0])
    sigma = np.median(np.abs(d2)) / 0.6745 / np.sqrt(6)
    noise = optimum.point_noise(d2, np.full(4, 3.0), np.full(4, np.nan))
    assert noise == pytest.approx(sigma / np.sqrt(3))


# ---------------------------------------------------------------------------------- report


def test_report_has_warnings_first_laws_censoring_and_loss_curves(tmp_path: Path) -> None:
    h, m = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(16, 64),
        horizons=(2**22, 2**24),
    )  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "norm_fit_gone.png").write_bytes(b"old")  # from an earlier analysis
    (out / "mine.png").write_bytes(b"not ours")
    res = analyze_tables(h, AnalysisOptions(n_boot=20), metrics=m)
    files = res.write(out)
    assert not (out / "norm_fit_gone.png").exists() and (out / "mine.png").exists()
    names = {p.name for p in files}
    for kind in ("loss_vs_lr", "norm_fit", "fit_quality", "loss_surface", "lr_law", "norm_growth"):
        assert f"{kind}_cpu-tiny.png" in names
    assert {"batch_star.png", "norm_transfer.png", "optima.parquet", "fits.json"} <= names
    html = (out / "report.html").read_text()
    pngs = [p for p in files if p.suffix == ".png"]
    for p in pngs:
        assert base64.b64encode(p.read_bytes()).decode() in html, p.name
    headings = re.findall(r"<h3>(.*?)</h3>", html)
    assert "Loss against learning rate, one line per batch size (cpu-tiny)" in headings
    assert not any(h_.endswith(".png") for h_ in headings)  # headings in words
    pos = {k: html.find(k) for k in ("Warnings (", "<h2>Scaling laws", "<h2>Censored", "<h2>Fig")}
    assert -1 < pos["Warnings ("] < pos["<h2>Scaling laws"] < pos["<h2>Censored"] < pos["<h2>Fig"]
    assert "not identified: fewer than 2 distinct interior B*" in html
    assert "[95 % interval]" in html and "alpha = " in html
    assert html.index("Loss against learning rate") < html.index("Loss against output norm")
    fits = json.loads((out / "fits.json").read_text())
    assert fits["warnings"] == list(res.warnings) and "censored" in fits
    assert not list(out.glob(".*.tmp"))


# ------------------------------------------------------------------------------------- CLI


def test_analyze_sweep_by_name_reads_tables_with_their_schema_version(tmp_path: Path) -> None:
    h, m = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(32, 128), horizons=(2**22,)
    )
    sdir = tmp_path / "res" / "demo"
    synthetic.write_sweep_tables(sdir, h, m)
    base = ["--results", str(tmp_path / "res"), "analyze"]
    r = CliRunner().invoke(cli, [*base, "demo", "--bootstrap", "0", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert (sdir / "analysis" / "report.html").is_file()
    assert "optimal log2 output norm" in r.output and "c = 5.545" in r.output
    r = CliRunner().invoke(cli, [*base, "nope"])
    assert r.exit_code == 2 and "nope" in r.output
    # a horizons table of another schema version is refused, naming the file
    pd.DataFrame(h).to_parquet(sdir / "horizons.parquet")
    import pyarrow.parquet as pq

    t = pq.read_table(sdir / "horizons.parquet")
    meta = {tables.META_TABLE: b"horizons", tables.META_VERSION: b"0"}
    pq.write_table(t.replace_schema_metadata(meta), sdir / "horizons.parquet")
    r = CliRunner().invoke(cli, [*base, "demo", "--no-plots"])
    assert r.exit_code == 2 and "schema_version" in r.output and "horizons.parquet" in r.output


def test_missing_columns_is_one_line_error_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"lr": [0.1], "bs": [8], "step": [1], "train_loss": [3.0]}).to_csv(bad)
    r = CliRunner().invoke(cli, ["analyze", "--from", str(bad)])
    assert r.exit_code == 2
    err = r.output.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "bad.csv" in err and "horizon" in err and "output_norm" in err
    assert not (tmp_path / "bad-analysis").exists()
    p = tmp_path / "h.parquet"
    pd.DataFrame({"lr": [0.1], "batch_size": [8], "tokens": [1024]}).to_parquet(p)
    with pytest.raises(AnalysisError, match=r"h\.parquet: missing columns train_loss, output_norm"):
        load_file(p)


def test_cli_options_val_loss_free_c_and_bad_values(tmp_path: Path) -> None:
    h, _ = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(32, 128), horizons=(2**22,)
    )
    p = _parquet(tmp_path, h)
    out = tmp_path / "o"
    args = ["analyze", "--from", str(p), "--out", str(out), "--no-plots", "--bootstrap", "0"]
    r = CliRunner().invoke(cli, [*args, "--loss", "val_loss", "--free-c"])
    assert r.exit_code == 0, r.output
    fits = json.loads((out / "fits.json").read_text())
    assert fits["options"]["loss"] == "val_loss" and fits["options"]["c_fixed"] is None
    assert abs(fits["norm_transfer"]["all"]["mean"] - PLANTED.x_star) < 0.15
    assert not list(out.glob("*.png"))
    for bad, text in (
        (["--k", "2"], "--k = 2"),
        (["--free-c", "--c-fixed", "5"], "--free-c"),
        (["--smooth-window", "1:-1"], "smoothing window 1:-1"),
        (["--average-h", "2^3..12"], "--average-h"),
    ):
        r = CliRunner().invoke(cli, [*args, *bad])
        assert r.exit_code == 2 and text in r.output, (bad, r.output)


def test_initial_loss_per_model_from_step0_rows() -> None:
    """Models with different vocabularies start from different losses; each gets its own c."""
    grid = dict(lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(32, 128), horizons=(2**22,))
    parts = []
    for name, vocab in (("bytes", 256), ("big", 4096)):
        s = synthetic.Surface(gamma=4.3, noise=0.005, loss_init=math.log(vocab))
        h, _ = synthetic.generate(s, models=(name,), **grid)
        first = h.drop_duplicates("run_id").assign(tokens=0, step=0, train_loss=s.loss_init)
        parts += [h, first]
    res = analyze_tables(from_frames(pd.concat(parts, ignore_index=True)), FAST)
    c = res.optima.groupby("model")["c_fixed"].unique()
    assert c["bytes"] == pytest.approx([math.log(256)])
    assert c["big"] == pytest.approx([math.log(4096)])
    assert (res.optima["tokens"] > 0).all()
    assert (abs(res.optima["x0"] - PLANTED.x_star) < 0.1).all()


def test_per_group_layouts_are_separate_series() -> None:
    h, m = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-9, -1, 0.5), batch_sizes=(32, 128),
        horizons=(2**22, 2**24), layouts=((1.0, 1.0, 1.0), (1.0, 0.125, 1.0)),
    )  # fmt: skip
    res = analyze_tables(h, AnalysisOptions(n_boot=0, smooth=False), metrics=m)
    assert {s["layout"] for s in res.laws["series"]} == {"1:1:1", "1:0.125:1"}
    # the planted layout cost (0.045 in loss for hidden x 1/8) makes 1:1:1 win every slice
    assert res.laws["layouts"]["wins"] == {"1:1:1": 4}
    assert res.document()["options"]["smooth"] is False


# --------------------------------------------------------------------------- the pure layer


def test_analysis_package_is_a_pure_layer() -> None:
    """No click, no try-import, nothing that reads run directories, writes through the store or
    launches; no module over 600 lines (the CLI adapter lives in sweeper/cli/analysis.py)."""
    root = Path(__file__).resolve().parent.parent / "sweeper" / "analysis"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 600, path.name
        imports = re.findall(r"^\s*(?:from|import) (sweeper\.\w+|click)\b", text, re.M)
        assert not {"sweeper.store", "sweeper.collect", "sweeper.worker"} & set(imports), path
        assert not re.search(r"try:\s*\n\s*(from|import) ", text), path.name
        assert "click" not in imports and "sweeper.sweep" not in imports, path.name


# -------------------------------------------------------------------------------- slow checks


@pytest.mark.slow
def test_law_intervals_cover_the_planted_exponents_over_seeds() -> None:
    """Over 50 noise seeds the headline 95 % intervals cover alpha, beta and b 85-100 % of the
    time (bench/bench_coverage.py reports the figures; the grid-rounded law does far worse)."""
    hits = {"alpha": 0, "beta": 0, "b": 0, "alpha_grid": 0}
    n = 50
    for seed in range(n):
        h, m = synthetic.generate(PLANTED, rng_seed=seed)
        s = analyze_tables(h, FAST, metrics=m).laws["series"][0]
        hits["alpha"] += _in_ci(s["lr_law"], "alpha", PLANTED.alpha)
        hits["beta"] += _in_ci(s["lr_law"], "beta", PLANTED.beta)
        hits["b"] += _in_ci(s["batch_law"], "b", PLANTED.b)
        hits["alpha_grid"] += _in_ci(s["lr_law_alt"], "alpha", PLANTED.alpha)
    for name in ("alpha", "beta", "b"):
        assert 0.85 <= hits[name] / n <= 1.0, hits
    assert hits["alpha_grid"] / n < 0.85, hits
