"""The width analysis against planted exponents: synthetic group scans whose optimal per-group rate
scales as width^-c with known c per optimizer; the fitted exponents must come back inside their
intervals, on the API and through ``analyze --from`` on a table made elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from sweeper.analysis import law_report
from sweeper.analysis import width as wa
from sweeper.cli import cli

WIDTHS = (64, 128, 256, 512)
PLANTED = {"adamw": (0.0, 1.0, 0.5), "scion": (0.0, 0.0, 0.0)}
ETA0 = {"adamw": (2.0**-6, 2.0**-7, 2.0**-7), "scion": (2.0**-2, 2.0**-3, 2.0**-4)}
CURV = (0.02, 0.05, 0.03)  # loss per squared octave, per group
FACTORS = [2.0**k for k in np.arange(-3, 3.5, 0.5)]


def group_scan_table(noise: float = 0.002, seed: int = 0) -> pd.DataFrame:
    """A horizons table of group scans at each width, as the planner lays them out (``-w<width>``
    members, scan centres planned with exponents 0.5 so the optima sit off-centre)."""
    rng = np.random.default_rng(seed)
    rows = []
    for opt, c in PLANTED.items():
        for w in WIDTHS:
            r = w / WIDTHS[0]
            centre = [e * r**-0.5 for e in ETA0[opt]]
            star = np.log2([e * r**-cg for e, cg in zip(ETA0[opt], c, strict=True)])
            scales = {tuple(centre)}
            for g in range(3):
                for f in FACTORS:
                    t = list(centre)
                    t[g] *= f
                    scales.add(tuple(t))
            for rates in sorted(scales):
                x = np.log2(rates)
                loss = 3.0 - 0.1 * np.log2(r) + float(np.sum(np.asarray(CURV) * (x - star) ** 2))
                rows.append({"model": f"fam-w{w}", "optimizer": opt, "lr": centre[1],
                             "lr_in": rates[0], "lr_hidden": rates[1], "lr_out": rates[2],
                             "batch_size": 32, "tokens": 2**20, "output_norm": 1.0,
                             "train_loss": loss + noise * rng.standard_normal()})  # fmt: skip
    return pd.DataFrame(rows)


def _check(exps: pd.DataFrame) -> None:
    for opt, c in PLANTED.items():
        for g, cg in zip(wa.GROUPS, c, strict=True):
            r = exps[(exps["optimizer"] == opt) & (exps["group"] == g)].iloc[0]
            assert r["identified"], r["reason"]
            assert r["c_lo"] <= cg <= r["c_hi"], (opt, g, cg, r["c_lo"], r["c_hi"])
            assert r["c"] == pytest.approx(cg, abs=0.1)
            assert r["n_widths"] == len(WIDTHS)


def test_planted_exponents_come_back_within_their_intervals() -> None:
    w = wa.analyze_width(group_scan_table(seed=0))
    assert w is not None
    _check(w.exponents)
    adam_hidden = w.exponents.query("optimizer == 'adamw' and group == 'hidden'").iloc[0]
    assert "muP (Adam)" in adam_hidden["consistent_with"]
    assert "SP" not in adam_hidden["consistent_with"]


def test_scan_line_holds_the_other_groups() -> None:
    df = wa.with_widths(group_scan_table(noise=0.0))
    assert df is not None
    s = df[(df["optimizer"] == "scion") & (df["width"] == 64)]
    line = wa.scan_line(s, "hidden", "train_loss")
    assert len(line) == len(FACTORS)  # only the hidden scan, not the other groups' scans
    fit = wa.vertex_fit(line["x"].to_numpy(), line["y"].to_numpy(), 5)
    assert fit["status"] == "ok" and fit["x0"] == pytest.approx(-3.0, abs=1e-6)


def test_edge_optima_are_left_out() -> None:
    df = group_scan_table(noise=0.0)
    # at the widest width, scan the hidden group only above its optimum: not bracketed
    wide = (df["model"] == "fam-w512") & (df["optimizer"] == "adamw")
    star = np.log2(ETA0["adamw"][1] * 8.0**-1.0)
    df = df[~(wide & (np.log2(df["lr_hidden"]) < star + 0.75))]
    w = wa.analyze_width(df)
    assert w is not None
    o = w.optima.query("optimizer == 'adamw' and width == 512 and group == 'hidden'").iloc[0]
    assert o["status"] == "edge"
    r = w.exponents.query("optimizer == 'adamw' and group == 'hidden'").iloc[0]
    assert r["n_widths"] == 3 and "512 (edge)" in r["left_out"]


def test_no_width_design_means_no_width_analysis() -> None:
    df = group_scan_table().assign(model="one")
    assert wa.analyze_width(df) is None


def test_analyze_from_a_table_made_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "widths.csv"
    group_scan_table(seed=2).to_csv(path, index=False)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["analyze", "--from", str(path), "--bootstrap", "0", "--no-plots",
                                 "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "width law adamw fam B=32 D=1048576 hidden: c = " in r.output
    doc = json.loads((out / "fits.json").read_text())["width"]
    _check(pd.DataFrame(doc["exponents"]))
    assert "exponents across width" in (out / "report.html").read_text()


def test_figure() -> None:
    w = wa.analyze_width(group_scan_table(seed=3))
    assert w is not None
    (name, _, png), *_ = law_report.width_figures(w)
    assert name == "width_B32_D1048576.png" and png[:4] == b"\x89PNG"


def test_interval_coverage_over_noise_seeds() -> None:
    """The t intervals (2 degrees of freedom) cover the planted exponents about 95 % of the time
    (measured 173 of 180 over 30 seeds)."""
    hits = n = 0
    for seed in range(100, 120):
        w = wa.analyze_width(group_scan_table(seed=seed))
        assert w is not None
        for r in w.exponents.itertuples(index=False):
            planted = PLANTED[str(r.optimizer)][wa.GROUPS.index(str(r.group))]
            hits += bool(r.c_lo <= planted <= r.c_hi)
            n += 1
    assert hits / n >= 0.85
