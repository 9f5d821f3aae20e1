"""Proposals of new runs (`sweeper refine`) on synthetic surfaces with planted optima."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from sweeper.analysis import refine as rf
from sweeper.analysis import synthetic
from sweeper.analysis.api import AnalysisOptions, propose
from sweeper.analysis.tables import AnalysisError
from sweeper.cli import cli

PLANTED = synthetic.Surface(gamma=4.3, noise=0.01)
NO_BOOT = AnalysisOptions(n_boot=0, plots=False, c_fixed=PLANTED.loss_init)


def test_refine_extends_the_grid_on_the_edge_side() -> None:
    # Rates stop at 2^-4: for B = 256 the planted optimum (2^-1.7 at D = 2^22) is above the grid.
    h, _ = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-10, -4, 0.5), batch_sizes=(8, 256), horizons=(2**22,)
    )
    props = propose(h, NO_BOOT, rf.RefineOptions(densify=False, untried=False))
    assert props and all(p.batch_size == 256 and "above" in p.source for p in props)
    assert sorted(math.log2(p.lr) for p in props) == [-3.5, -3.0]
    # densify proposes half steps around the B = 8 optimum, never an existing rate
    dens = propose(h, NO_BOOT, rf.RefineOptions(extend=0, untried=False))
    have = {round(math.log2(v), 6) for v in h["lr"]}
    assert dens and all(round(math.log2(p.lr), 6) not in have for p in dens)
    assert all(p.batch_size == 8 for p in dens)


def test_refine_untried_batch_targets_the_optimal_norm() -> None:
    h, _ = synthetic.generate(
        PLANTED,
        lrs=synthetic.default_lrs(-10, 0, 0.5),
        batch_sizes=(16, 32, 64),
        horizons=(2**22, 2**24),
    )
    opts = rf.RefineOptions(extend=0, densify=False, untried=True, window=0)
    props = propose(h, NO_BOOT, opts)
    assert {p.batch_size for p in props} == {8, 128}
    for p in props:
        d = int(p.source.split("D=")[1].split(":")[0])
        planted = PLANTED.log2_lr_star(np.array(p.batch_size), np.array(d))
        assert abs(math.log2(p.lr) - planted) <= 0.75, p


def test_refine_optuna_proposals_are_new_grid_points() -> None:
    h, _ = synthetic.generate(
        PLANTED, lrs=synthetic.default_lrs(-8, -2, 0.5), batch_sizes=(16, 64), horizons=(2**22,)
    )
    opts = rf.RefineOptions(extend=0, densify=False, untried=False, optuna_trials=6)
    props = propose(h, NO_BOOT, opts)
    assert props and all("optuna" in p.source for p in props)
    have = {(m, lay, int(b), round(math.log2(lr), 6)) for m, lay, b, lr in
            zip(h["model"], ["1:1:1"] * len(h), h["batch_size"], h["lr"], strict=True)}  # fmt: skip
    assert all(p.key not in have for p in props)
    assert all(abs(math.log2(p.lr) * 2 - round(math.log2(p.lr) * 2)) < 1e-9 for p in props)
    assert all(p.batch_size in (8, 16, 32, 64, 128) for p in props)


def test_merge_points_deduplicates_and_checks_entries() -> None:
    p1 = rf.Proposal("m", 0.25, 8, "1:1:1", "extend")
    p2 = rf.Proposal("m", 0.5, 8, "1:0.125:1", "extend")
    merged, added = rf.merge_points([], [p1, p2, p1])
    assert added == [p1.to_point(), p2.to_point()] and merged == added
    assert added[1]["lr_scales"] == [1.0, 0.125, 1.0]
    again, none = rf.merge_points(merged, [p1, p2])
    assert none == [] and again == merged
    with pytest.raises(AnalysisError, match=r"x\.json: entry 0 has no 'lr'"):
        rf.check_points([{"model": "m", "batch_size": 8}], "x.json")
    with pytest.raises(AnalysisError, match="expected a JSON list"):
        rf.check_points({"model": "m"}, "x.json")


_SPEC = """
name = "refine-demo"

[[models]]
preset = "test-micro"

[data]
kind = "synthetic"

[grid]
lr = [0.0625, 0.125, 0.25]
batch_size = [4, 8]
horizons_tokens = [1024, 2048]
seeds = [30]
"""


def test_refine_apply_writes_extra_points_replans_and_deduplicates(tmp_path: Path) -> None:
    from sweeper import Sweep

    spec = tmp_path / "demo.toml"
    spec.write_text(_SPEC)
    sdir = Sweep.create(spec, tmp_path / "results").root
    before = {p.name for p in (sdir / "runs").iterdir()}
    # A horizons table whose B = 4 optimum sits on the high edge of the spec's rate grid.
    s = synthetic.Surface(gamma=7.5, seq_len=16, noise=0.002, k_data=4.0)
    h, m = synthetic.generate(
        s, models=("test-micro",), lrs=[0.0625, 0.125, 0.25], batch_sizes=(4, 8),
        horizons=(1024, 2048),
    )  # fmt: skip
    synthetic.write_sweep_tables(sdir, h, m)
    runner = CliRunner()
    args = ["--results", str(tmp_path / "results"), "refine", "refine-demo"]
    r = runner.invoke(cli, [*args, "--no-untried"])
    assert r.exit_code == 0, r.output
    assert "extend eta above" in r.output and not (sdir / "extra_points.json").exists()
    r = runner.invoke(cli, [*args, "--no-untried", "--no-densify", "--apply"])
    assert r.exit_code == 0, r.output
    points = json.loads((sdir / "extra_points.json").read_text())
    assert points and all(p["lr"] > 0.25 and p["model"] == "test-micro" for p in points)
    assert all(p["lr_scales"] == [1.0, 1.0, 1.0] and p["source"] == "refine_extend" for p in points)
    after = {p.name for p in (sdir / "runs").iterdir()}
    new = after - before
    assert new and all(i in r.output for i in new)
    # Applying again adds nothing: the points are in extra_points.json already.
    r = runner.invoke(cli, [*args, "--no-untried", "--no-densify", "--apply"])
    assert r.exit_code == 0, r.output
    assert json.loads((sdir / "extra_points.json").read_text()) == points
    assert {p.name for p in (sdir / "runs").iterdir()} == after
    assert "no proposals" in r.output


_E2E_SPEC = """
name = "e2e"

[[models]]
preset = "test-micro"

[data]
kind = "synthetic"
synthetic_tokens = 100000

[grid]
lr = [0.03125, 0.0625, 0.125]
batch_size = [4]
horizons_tokens = [512, 1024]
seeds = [30]

[train]
log_every = 4
val_tokens = 256
checkpoint_every = 0
threads = 1

[backend]
name = "local"

[backend.local]
max_parallel = 2
"""


@pytest.mark.slow
def test_real_sweep_launch_collect_analyze_refine(tmp_path: Path) -> None:
    """Real trainer runs, real collect, then analyze and refine --apply on its tables."""
    spec = tmp_path / "e2e.toml"
    spec.write_text(_E2E_SPEC)
    exe = str(Path(sys.executable).parent / "sweeper")
    res = str(tmp_path / "results")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, "--results", res, *args], capture_output=True, text=True, timeout=300
        )

    assert run("launch", str(spec), "--no-progress").returncode == 0
    assert run("collect", "e2e").returncode == 0
    p = run("analyze", "e2e", "--bootstrap", "20")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "results" / "e2e" / "analysis"
    optima = pd.read_parquet(out / "optima.parquet")
    assert sorted(optima["tokens"]) == [512, 1024] and (optima["n_valid"] == 3).all()
    fits = json.loads((out / "fits.json").read_text())
    # c is the real step-0 loss of the byte-vocabulary model, ~ln(256)
    assert abs(fits["options"]["c_fixed"] - math.log(256)) < 0.2
    # a single batch size: the B* law is reported as not identified, not as +- 0
    assert not fits["series"][0]["batch_law"]["identified"]
    assert {"norm_growth_test-micro.png", "loss_vs_lr_test-micro.png"} <= {
        f.name for f in out.iterdir()
    }
    runs_dir = tmp_path / "results" / "e2e" / "runs"
    before = {d.name for d in runs_dir.iterdir()}
    p = run("refine", "e2e", "--apply")
    assert p.returncode == 0, p.stderr
    points = json.loads((tmp_path / "results" / "e2e" / "extra_points.json").read_text())
    assert points
    new = {d.name for d in runs_dir.iterdir()} - before
    assert len(new) == len({(pt["lr"], pt["batch_size"]) for pt in points})
    assert all(i in p.stdout for i in new)
