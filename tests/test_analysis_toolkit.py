"""`analyze --from` on the norm-transfer toolkit's CSV layout, against an independent
implementation of the toolkit's method.

The expected optima come from `toolkit_minima` below, written in this file from the toolkit's
documented method (spec section 4.4; the toolkit's `select_avg_window_at_horizon`,
`compute_optimum`, `build_minima_df`), not from the sweeper's code: a window of logged points by
position in each run's step order, applied only at the listed horizons and batch sizes; log2 norm
averaged, loss averaged with its population std as the weight; points at or above the initial loss
dropped; the k points nearest the minimum in x, bracketing it; weighted least squares with c fixed;
eta* the rate of the point nearest the vertex in (x, y).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from sweeper.analysis import synthetic
from sweeper.analysis.api import AnalysisOptions, analyze_tables
from sweeper.analysis.tables import from_frames, load_file, load_sweep
from sweeper.cli import cli

# A paper-like grid: sequences of 4096 tokens, a logged point every 2^26 tokens (2^14 / B steps),
# horizons 2^29..2^32. At 2^29 the logged neighbours are 12.5 % of D away.
SEQ = 4096
LOG_TOKENS = 2**26
HORIZONS = (2**29, 2**30, 2**31, 2**32)
BATCHES = (32, 64, 128, 256)
PAPER = synthetic.Surface(gamma=8.0, log2_a=-7.0, noise=0.01, seq_len=SEQ, k_data=64.0)


def toolkit_csv(rng_seed: int = 0) -> pd.DataFrame:
    """Every logged step of one run per (B, eta), in the toolkit's preprocessed layout."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for bs in BATCHES:
        every = LOG_TOKENS // (bs * SEQ)
        steps = np.arange(0, max(HORIZONS) // (bs * SEQ) + every, every)
        tokens = (steps * bs * SEQ).astype(float)
        centre = float(PAPER.log2_lr_star(bs, 2**31))
        for lr in 2.0 ** (np.round(centre * 2) / 2 + np.arange(-4, 4.5, 0.5)):
            loss = PAPER.loss(lr, bs, tokens) + rng.normal(0, PAPER.noise_std(bs), len(steps))
            loss[0] = PAPER.loss_init
            rows.append(
                pd.DataFrame(
                    {
                        "lr": lr,
                        "bs": bs,
                        "step": steps,
                        "horizon": tokens.astype(np.int64),
                        "train_loss": loss,
                        "output_norm": PAPER.norm(lr, bs, tokens),
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def _toolkit_point(g: pd.DataFrame, h: int, rel: tuple[int, int], apply: bool) -> dict | None:
    g = g.sort_values("step").reset_index(drop=True)
    hit = np.flatnonzero(g["horizon"].to_numpy() == h)
    if len(hit) == 0:
        return None
    pos = int(hit[0])
    lo, hi = (max(0, pos + rel[0]), min(len(g) - 1, pos + rel[1])) if apply else (pos, pos)
    win = g.iloc[lo : hi + 1]
    return {
        "x": float(np.mean(np.log2(win["output_norm"]))),
        "y": float(np.mean(win["train_loss"])),
        "std": float(np.std(win["train_loss"])) if apply else 0.0,
    }


def _toolkit_fit(x: np.ndarray, y: np.ndarray, std: np.ndarray, c: float, k: int) -> tuple:
    i_emp = int(np.argmin(y))
    order = np.argsort(np.abs(x - x[i_emp]))
    idx = list(order[:k])
    left, right = (x[idx] < x[i_emp]).any(), (x[idx] > x[i_emp]).any()
    for j in order[k:]:
        if left and right:
            break
        if (not left and x[j] < x[i_emp]) or (not right and x[j] > x[i_emp]):
            far = idx[int(np.argmax(np.abs(x[idx] - x[i_emp])))]
            idx = [t for t in idx if t != far] + [j]
            left, right = (x[idx] < x[i_emp]).any(), (x[idx] > x[i_emp]).any()
    xs, ys = x[idx], y[idx]
    sw = np.sqrt(1.0 / np.maximum(std[idx] ** 2, 1e-12))
    (a, b), *_ = np.linalg.lstsq(np.column_stack([xs**2, xs]) * sw[:, None], (ys - c) * sw)
    return -b / (2 * a), c - b * b / (4 * a)


def toolkit_minima(
    csv: pd.DataFrame,
    *,
    c: float,
    rel: tuple[int, int] = (-1, 1),
    average_h: tuple[int, ...] | None = None,
    average_bs: tuple[int, ...] | None = None,
    k: int = 7,
) -> pd.DataFrame:
    """The toolkit's minima table (horizon, bs, x0, y0, lr) for ``csv``."""
    out = []
    for h in HORIZONS:
        pts = []
        for (bs, lr), g in csv.groupby(["bs", "lr"]):
            apply = (average_h is None or h in average_h) and (
                average_bs is None or bs in average_bs
            )
            p = _toolkit_point(g, h, rel, apply)
            if p is not None:
                pts.append({"bs": bs, "lr": lr, **p})
        for bs, sub in pd.DataFrame(pts).groupby("bs"):
            sub = sub[sub["y"] < c].reset_index(drop=True)
            if len(sub) < 3:
                continue
            x, y = sub["x"].to_numpy(), sub["y"].to_numpy()
            x0, y0 = _toolkit_fit(x, y, sub["std"].to_numpy(), c, k)
            near = int(np.argmin((x - x0) ** 2 + (y - y0) ** 2))
            out.append({"tokens": h, "batch_size": bs, "x0": x0, "y0": y0, "lr": sub["lr"][near]})
    return pd.DataFrame(out)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    path = tmp_path_factory.mktemp("nt") / "lr-bs-scan-base-momentum-1.0-preprocessed-seed-30.csv"
    df = toolkit_csv()
    df.to_csv(path, index=False)
    return path, pd.read_csv(path)  # what the toolkit would read back


WINDOWS = {
    "window everywhere": dict(rel=(-1, 1)),
    "paper's AVERAGE_H / AVERAGE_BS": dict(
        rel=(-1, 1), average_h=(2**31, 2**32), average_bs=(32, 64)
    ),
    "one-sided window -2..0": dict(rel=(-2, 0)),
    "no window anywhere": dict(rel=(-1, 1), average_h=()),
}


@pytest.mark.parametrize("case", list(WINDOWS))
def test_from_toolkit_csv_matches_the_toolkit_method(
    case: str, csv_file: tuple[Path, pd.DataFrame]
) -> None:
    path, csv = csv_file
    w = WINDOWS[case]
    expected = toolkit_minima(csv, c=PAPER.loss_init, **w)
    opts = AnalysisOptions(
        c_fixed=PAPER.loss_init,
        weight_floor=0.0,  # the toolkit's rule exactly
        n_boot=0,
        plots=False,
        smooth_from=w["rel"][0],
        smooth_to=w["rel"][1],
        average_tokens=w.get("average_h"),
        average_batch=w.get("average_bs"),
    )
    got = analyze_tables(load_file(path, horizons=HORIZONS), opts).optima
    got = got[got["status"] == "ok"]
    m = expected.merge(got, on=["tokens", "batch_size"], suffixes=("_nt", ""))
    assert len(m) == len(expected) == len(got) == len(HORIZONS) * len(BATCHES)
    np.testing.assert_allclose(m["x0"], m["x0_nt"], atol=1e-8)
    np.testing.assert_allclose(m["y0"], m["y0_nt"], atol=1e-8)
    np.testing.assert_allclose(m["lr_star"], m["lr"], rtol=1e-12)


def test_no_smooth_is_raw_on_both_axes(csv_file: tuple[Path, pd.DataFrame]) -> None:
    path, csv = csv_file
    expected = toolkit_minima(csv, c=PAPER.loss_init, average_h=())
    opts = AnalysisOptions(c_fixed=PAPER.loss_init, smooth=False, n_boot=0, plots=False)
    got = analyze_tables(load_file(path, horizons=HORIZONS), opts).optima
    m = expected.merge(got, on=["tokens", "batch_size"], suffixes=("_nt", ""))
    np.testing.assert_allclose(m["x0"], m["x0_nt"], atol=1e-8)
    # and the smoothed analysis differs: the window is applied at every horizon (2^29 included)
    smoothed = analyze_tables(load_file(path, horizons=HORIZONS), AnalysisOptions(
        c_fixed=PAPER.loss_init, n_boot=0, plots=False)).optima  # fmt: skip
    assert (smoothed["x0"].to_numpy() != got["x0"].to_numpy()).all()


def test_cli_window_options_match_the_toolkit(
    csv_file: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    path, csv = csv_file
    expected = toolkit_minima(csv, c=PAPER.loss_init, average_h=(2**31, 2**32), average_bs=(32, 64))
    out = tmp_path / "out"
    args = ["analyze", "--from", str(path), "--out", str(out), "--c-fixed", str(PAPER.loss_init)]
    args += ["--horizons", "2^29..2^32", "--average-h", "2^31,2^32", "--average-bs", "32..64"]
    args += ["--weight-floor", "0", "--bootstrap", "0", "--no-plots"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    got = pd.read_parquet(out / "optima.parquet")
    m = expected.merge(got, on=["tokens", "batch_size"], suffixes=("_nt", ""))
    assert len(m) == len(expected)
    np.testing.assert_allclose(m["x0"], m["x0_nt"], atol=1e-8)
    fits = json.loads((out / "fits.json").read_text())
    assert fits["options"]["average_tokens"] == [2**31, 2**32]
    assert fits["options"]["average_batch"] == [32, 64]
    assert fits["series"][0]["model"] == "lr-bs-scan-base"


def test_one_smoothing_for_both_layouts(tmp_path: Path) -> None:
    """A sweep's own tables and the same runs as a toolkit CSV give the same optima."""
    surface = synthetic.Surface(gamma=4.3, noise=0.01)
    h, m = synthetic.generate(
        surface,
        lrs=synthetic.default_lrs(-9, -1, 0.5),
        batch_sizes=(16, 64),
        horizons=(2**22, 2**23, 2**24),
    )
    synthetic.write_sweep_tables(tmp_path / "sweep", h, m)
    csv = tmp_path / "same.csv"
    synthetic.to_nt_csv(h, m).to_csv(csv, index=False)
    opts = AnalysisOptions(n_boot=0, plots=False)
    own = analyze_tables(load_sweep(tmp_path / "sweep"), opts)
    assert own.intercept.c_fixed == pytest.approx(surface.loss_init)  # step 0 of the metrics
    own = own.optima
    nt = analyze_tables(load_file(csv, horizons=(2**22, 2**23, 2**24)), opts).optima
    np.testing.assert_allclose(own["x0"], nt["x0"], atol=1e-9)
    np.testing.assert_allclose(own["lr_star_interp"], nt["lr_star_interp"], rtol=1e-9)
    # without the per-step metrics, the table's own window columns (collect's) give the same
    opts = AnalysisOptions(n_boot=0, plots=False, c_fixed=surface.loss_init)
    table_only = analyze_tables(from_frames(h), opts).optima
    np.testing.assert_allclose(own["x0"], table_only["x0"], atol=1e-9)
