"""The library API from a notebook's point of view (issue 8): the demo sweep created, launched
locally, collected, read and analysed through ``sweeper`` alone, in a fresh interpreter that never
imports the command line (``sweeper.cli``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "sweeps" / "demo.toml"

# The demo, shrunk to five runs of 16 steps: what it computes stays the demo's (model, data,
# optimizer, schedule, backend), only the grid and the budgets are smaller.
SHRINK = {
    "lr = {log2_from = -6, log2_to = 0, log2_step = 1}": (
        "lr = {log2_from = -5, log2_to = -1, log2_step = 1}"
    ),
    "batch_size = [8, 32]": "batch_size = [8]",
    "log2_horizons = [16, 17, 18]": "log2_horizons = [12, 13]",
    "log_every = 16 ": "log_every = 4 ",
    "val_tokens = 4096": "val_tokens = 512",
}

NOTEBOOK = """
import json, sys
import sweeper
from sweeper import Sweep, load_spec, plan

spec = load_spec(sys.argv[1])
planned = plan(spec)
sweep = Sweep.create(spec, results=sys.argv[2])
assert [r.id for r in sweep.plan().runs] == [r.id for r in planned]
report = sweep.launch(max_parallel=2)
collected = sweep.collect()
horizons = sweep.table("horizons")
runs = sweep.table("runs")
analysis = sweep.analyze(plots=False, n_boot=20)
again = Sweep.open(spec.name, results=sys.argv[2])
print(json.dumps({
    "planned": len(planned),
    "states": report.states,
    "statuses": sorted({st.state.value for st in again.status()}),
    "n_runs": collected.n_runs,
    "problems": collected.problems,
    "horizon_rows": len(horizons),
    "horizon_tokens": sorted(set(int(t) for t in horizons["tokens"])),
    "horizon_columns": sorted(horizons.columns),
    "run_lrs": sorted(float(x) for x in runs["lr"]),
    "optima_ok": int((analysis.optima["status"] == "ok").sum()),
    "optima_tokens": sorted(set(int(t) for t in analysis.optima["tokens"])),
    "report": sorted(p.name for p in (sweep.root / "analysis").iterdir()),
    "cli_modules": sorted(m for m in sys.modules if m.split(".")[:2] == ["sweeper", "cli"]),
}))
"""


def shrunk_demo(tmp_path: Path) -> Path:
    text = DEMO.read_text()
    for old, new in SHRINK.items():
        assert old in text, f"sweeps/demo.toml changed: update SHRINK ({old!r})"
        text = text.replace(old, new)
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


def notebook(spec: Path, tmp_path: Path) -> dict[str, Any]:
    """Run :data:`NOTEBOOK` on ``spec`` in a fresh interpreter; what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NOTEBOOK), str(spec), str(tmp_path / "results")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cli_modules"] == []  # nothing of the command line was imported
    assert {"lr", "batch_size", "tokens", "train_loss", "output_norm", "schedule"} <= set(
        got["horizon_columns"]
    )
    assert "optima.parquet" in got["report"] and got["problems"] == {}
    return got


@pytest.mark.slow
def test_the_demo_sweep_through_the_api_without_the_cli(tmp_path: Path) -> None:
    """The demo (shrunk) with the real trainer on the local backend."""
    got = notebook(shrunk_demo(tmp_path), tmp_path)
    assert got["planned"] == 5 and got["states"] == {"completed": 5}
    assert got["statuses"] == ["completed"] and got["n_runs"] == 5
    assert got["horizon_rows"] == 10 and got["horizon_tokens"] == [2**12, 2**13]
    assert got["run_lrs"] == [2.0**e for e in range(-5, 0)]
    assert got["optima_ok"] >= 1 and set(got["optima_tokens"]) <= {2**12, 2**13}


def test_the_full_demo_grid_through_the_api_on_the_simulator(tmp_path: Path) -> None:
    """The same notebook on the whole demo grid, simulated (``[simulator]``, backend ``sim``):
    the inner loop's version of the test above."""
    text = DEMO.read_text().replace('name = "local"', 'name = "sim"')
    assert 'name = "sim"' in text
    spec = tmp_path / "demo.toml"
    spec.write_text(text + "\n[simulator]\nseed = 1\n")
    got = notebook(spec, tmp_path)
    assert got["planned"] == 14 and got["states"] == {"completed": 14}
    assert got["statuses"] == ["completed"] and got["n_runs"] == 14
    assert got["horizon_rows"] == 42 and got["horizon_tokens"] == [2**16, 2**17, 2**18]
    assert got["optima_ok"] >= 1
