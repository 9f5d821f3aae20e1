"""``sweeper calibrate SPEC``: time a few steps of each model of a spec on this machine's device
and write the throughput table that ``[cost] throughput_file`` reads.

Each model is timed at the batch size of one of its planned runs (the median B), through the real
trainer (``python -m trainer``, or ``torchrun`` for several ranks as a launch would), in a temporary
directory; the figure is the median ``tokens_per_s`` of the logged steps after the first.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sweeper.errors import BackendError
from sweeper.plan import plan_sweep
from sweeper.records import RunRecord
from sweeper.spec import SweepSpec


def calibration_runs(spec: SweepSpec, steps: int) -> list[RunRecord]:
    """One short run per model: its median planned batch size, ``steps`` steps, logging each."""
    by_model: dict[str, list[RunRecord]] = {}
    for r in plan_sweep(spec).runs:
        by_model.setdefault(r.model, []).append(r)
    runs = []
    for rs in by_model.values():
        rs.sort(key=lambda r: r.batch_size)
        r = rs[len(rs) // 2]
        train = dataclasses.replace(
            r.train,
            horizons_tokens=(steps * r.tokens_per_step,),
            branch=None,
            checkpoint_steps=(),
            checkpoint_every=0,
            log_every=1,
            log_every_tokens=None,
            val_every_tokens=None,
            schedule=dataclasses.replace(r.train.schedule, kind="constant", total_steps=None),
        )
        runs.append(dataclasses.replace(r, train=train))
    return runs


def measure(record: RunRecord, workdir: Path, timeout_s: float = 1800) -> float:
    """Median tokens/s of one short run of ``record`` (BackendError if the trainer fails)."""
    from sweeper.worker import trainer_command  # not at import: `python -m sweeper.worker` runs it

    run_json = workdir / f"{record.model}.json"
    out = workdir / record.model
    run_json.write_text(json.dumps(record.to_dict()))
    cmd = trainer_command(record, run_json, out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise BackendError(
            f"calibrate: model {record.model}: trainer exited {proc.returncode}: {last}"
        )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in lines if x.get("step", 0) > 1 and x.get("tokens_per_s")]
    if not rates:
        raise BackendError(f"calibrate: model {record.model}: no timed steps (raise --steps)")
    return float(statistics.median(rates))


def calibrate(spec: SweepSpec, steps: int = 20) -> dict[str, Any]:
    """Measure every model of ``spec``; the document ``[cost] throughput_file`` reads."""
    table: dict[str, float] = {}
    batch: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="sweeper-calibrate-") as tmp:
        for r in calibration_runs(spec, steps):
            table[r.model] = measure(r, Path(tmp))
            batch[r.model] = r.batch_size
    return {
        "tokens_per_s": table,
        "batch_size": batch,
        "steps": steps,
        "python": sys.version.split()[0],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
