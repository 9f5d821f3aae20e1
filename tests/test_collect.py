"""``sweeper collect``: real run directories, broken files, cross-checks, incrementality,
concurrency."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweeper import RunState, Sweep, tables
from sweeper.collect import CACHE_DIR, CollectError, collect_sweep
from sweeper.collect import core as collect_core
from sweeper.collect.metrics import read_metrics
from sweeper.extend import continuation
from sweeper.fsutil import write_json_atomic
from sweeper.records import RunKind, RunRecord
from sweeper.store import SweepStore
from trainer.config import SCHEMA_VERSION, TrainConfig
from trainer.schema import FLOAT_METRICS, Status, Summary, metrics_line

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------ fixtures

TRAIN: dict[str, Any] = {
    "model": {"preset": "test-micro"},
    "optim": {"lr": 0.01, "lr_scale_hidden": 0.125},
    "batch_size": 4,
    "horizons_tokens": [640, 1280],  # steps 10 and 20 of 4 x 16 tokens
    "log_every": 5,
    "data": {"kind": "synthetic"},
}


def metric_line(step: int, loss: float | None, horizon: bool = False) -> dict[str, Any]:
    """A metrics line as the trainer writes it (``trainer.schema.metrics_line``)."""
    values: dict[str, Any] = dict(
        step=step,
        tokens=step * 64,
        train_loss=loss,
        lr_in=0.01,
        lr_hidden=0.00125,
        lr_out=0.01,
        output_norm=1.0 + step / 10,
        output_norm_rms=0.5,
        input_norm=1.0,
        hidden_norm=2.0,
        grad_norm=0.1,
        horizon=horizon,
    )
    if horizon and loss is not None:
        values["val_loss"] = loss + 0.5
    return metrics_line(**values)


def default_lines() -> list[dict[str, Any]]:
    """Steps 0, 5, ..., 20 with loss 5 - step/10; horizons at 10 and 20."""
    return [metric_line(s, 5.0 - s / 10, horizon=s in (10, 20)) for s in range(0, 21, 5)]


def make_record(rid: str, train: dict[str, Any] | None = None, sweep: str = "sw") -> RunRecord:
    return RunRecord(
        id=rid,
        slug=rid,
        kind=RunKind.SINGLE,
        parent=None,
        sweep=sweep,
        model="test-micro",
        train=TrainConfig.from_dict(train or TRAIN),
    )


def write_lines(rd: Path, lines: list[dict[str, Any]]) -> None:
    (rd / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_run(
    sweep: Path,
    rid: str,
    *,
    train: dict[str, Any] | None = None,
    lines: list[dict[str, Any]] | None = None,
    states: tuple[str, ...] = ("submitted", "running", "completed"),
    summary: bool = True,
    record: bool = True,
    config: bool = True,
    record_: RunRecord | None = None,
    **event_fields: Any,
) -> Path:
    """A run directory in the real formats: the record through the store, the trainer's files
    through ``trainer.schema``, events through the store's own writer. ``record_`` replaces the
    record made from ``train``."""
    store = SweepStore(sweep)
    rec = record_ or make_record(rid, train, sweep.name)
    rd = store.run_dir(rid)
    rd.mkdir(parents=True, exist_ok=True)
    if record:
        store.write_record(rec)
    if config:
        write_json_atomic(
            rd / "config.json", {**rec.train.to_dict(), "schema_version": SCHEMA_VERSION}
        )
    prov = {"git_sha": "abc123", "git_dirty": False, "python": "3.11.7", "torch": "2.13.0+cpu",
            "device": "cpu", "world_size": 1, "hostname": "n1"}  # fmt: skip
    write_json_atomic(rd / "provenance.json", prov)
    for state in states:
        fields = dict(event_fields) if state == states[-1] else {}
        store.append_event(rid, state, backend="local", **fields)
    lines = default_lines() if lines is None else lines
    write_lines(rd, lines)
    if summary and states and states[-1] in ("completed", "diverged"):
        last = max(lines, key=lambda x: x["step"])  # the run's end, as its summary tells it
        doc = Summary(
            status=Status(states[-1]),
            step=last["step"],
            tokens=last["tokens"],
            final_loss=last["train_loss"],
            final_output_norm=last["output_norm"],
            wall_time_s=1.5,
        ).to_dict()
        write_json_atomic(rd / "summary.json", doc)
    return rd


# The spec of the sweeps below (the Sweep API opens a directory by its spec.toml and plan.json).
SPEC = """
name = "sw"
[[models]]
preset = "test-micro"
[data]
kind = "synthetic"
[grid]
lr = [0.01]
batch_size = [4]
horizons_tokens = [640, 1280]
[train]
log_every = 5
"""


def make_sweep(tmp_path: Path, n: int = 3, **plan: Any) -> Path:
    sweep = tmp_path / "sw"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "spec.toml").write_text(SPEC)
    write_json_atomic(sweep / "plan.json", {"sweep": "sw", "runs": [], **plan})
    for i in range(n):
        write_run(sweep, f"run{i}")
    return sweep


def runs_by_id(sweep: Path) -> dict[str, dict[str, Any]]:
    rows = tables.read_sweep_table(sweep, "runs").to_pylist()
    return {r["run_id"]: r for r in rows}


def horizons_of(sweep: Path, rid: str) -> list[dict[str, Any]]:
    return [h for h in tables.read_sweep_table(sweep, "horizons").to_pylist() if h["run_id"] == rid]


def file_ids(sweep: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for name in tables.TABLE_NAMES:
        st = tables.table_path(sweep, name).stat()
        out[name] = (st.st_ino, st.st_mtime_ns)
    return out


def edit_json(path: Path, **changes: Any) -> None:
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        where = doc
        *parents, last = key.split(".")
        for p in parents:
            where = where[p]
        where[last] = value
    path.write_text(json.dumps(doc))


# ------------------------------------------------------------------------------ a real trainer


@pytest.mark.slow
def test_tables_from_a_real_trainer_run(tmp_path: Path, micro_run, trainer_cli) -> None:
    """A real (tiny) training run, collected: the columns carry the trainer's values, and the
    trainer's own config.json passes the cross-check."""
    sweep = tmp_path / "sw"
    store = SweepStore(sweep)
    rid = "micro-1"
    cfg = micro_run(optim={"lr": 2**-6}, seed=7)
    record = make_record(rid, cfg)
    store.write_record(record)
    rd = store.run_dir(rid)
    store.append_event(rid, "running", host="h1", pid=1)
    proc = trainer_cli.run(record.to_dict(), rd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    store.append_event(rid, "completed", exit_code=0)

    result = collect_sweep(sweep)
    assert result.n_runs == 1 and result.problems == {} and result.written

    row = runs_by_id(sweep)[rid]
    summary = json.loads((rd / "summary.json").read_text())
    assert row["problem"] is None and row["notes"] is None and row["reason"] is None
    assert row["state"] == "completed" and row["attempts"] == 1 and row["host"] == "h1"
    assert row["n_params"] == record.train.model.n_params() and row["seed"] == 7
    assert row["lr"] == 2**-6 and row["batch_size"] == 4 and row["seq_len"] == 16
    assert row["lr_scales"] == [1.0, 1.0, 1.0] and row["source"] == "grid"
    assert row["steps"] == 20 and row["steps_done"] == 20 and row["tokens_done"] == 1280
    assert row["flops"] == record.flops and row["trained_tokens"] == 1280
    assert row["final_loss"] == summary["final_loss"] and row["horizons_reached"] == 2
    assert row["torch_version"] and row["world_size"] == 1

    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    by_step = {x["step"]: x for x in lines}
    hz = horizons_of(sweep, rid)
    assert [(h["tokens"], h["step"], h["is_final"]) for h in hz] == [
        (640, 10, False),
        (1280, 20, True),
    ]
    h10 = hz[0]
    for key in ("train_loss", "val_loss", "output_norm", "grad_norm"):
        assert h10[key] == by_step[10][key], key
    steps = sorted(by_step)
    i = steps.index(10)
    window = [by_step[s]["train_loss"] for s in steps[i - 1 : i + 2]]  # +-1 logged point
    assert h10["train_loss_smoothed"] == pytest.approx(np.mean(window))
    assert h10["train_loss_std"] == pytest.approx(np.std(window))
    assert h10["smoothing_points"] == 3 and h10["window_complete"]
    assert hz[1]["smoothing_points"] == 2 and not hz[1]["window_complete"]  # nothing after the end

    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    expected = sum(1 for x in lines for k in FLOAT_METRICS if x.get(k) is not None)
    assert len(metrics) == expected
    got = metrics[(metrics.step == 10) & (metrics.metric == "train_loss")].value.item()
    assert got == by_step[10]["train_loss"]


# ------------------------------------------------------------------------------ broken runs


def test_broken_runs_get_rows_that_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect_core, "GROUP", 3)  # several groups, bad runs among good ones
    sweep = make_sweep(tmp_path, n=1)  # run0 is fine
    # truncated events: a writer killed mid-append leaves a torn last line
    rd = write_run(sweep, "torn-events", states=("submitted", "running"))
    with open(rd / "events.jsonl", "ab") as f:
        f.write(b'{"ts": 1, "state": "compl')
    write_run(sweep, "no-summary", summary=False)
    rd = write_run(sweep, "bad-line")
    text = (rd / "metrics.jsonl").read_text().splitlines()
    text[2] = text[2][:40]  # a corrupt line in the middle
    (rd / "metrics.jsonl").write_text("\n".join(text) + '\n{"step": 25, "tokens": 1600, "train_l')
    write_run(sweep, "no-record", record=False)
    (sweep / "runs" / "empty").mkdir()
    rd = write_run(sweep, "bad-config", config=False)
    edit_json(rd / "run.json", **{"train.optim.lr": -1.0})
    (sweep / "runs" / "bad-json").mkdir()
    (sweep / "runs" / "bad-json" / "run.json").write_text("{not json")
    rd = write_run(sweep, "metrics-dir")
    (rd / "metrics.jsonl").unlink()
    (rd / "metrics.jsonl").mkdir()

    result = collect_sweep(sweep)
    rows = runs_by_id(sweep)
    assert set(rows) == {"run0", "torn-events", "no-summary", "bad-line", "no-record", "empty",
                         "bad-config", "bad-json", "metrics-dir"}  # fmt: skip
    assert rows["run0"]["problem"] is None and rows["run0"]["notes"] is None
    assert rows["bad-config"]["problem"].startswith("run.json: train: optim.lr = -1.0: must be")
    assert rows["bad-config"]["state"] == "completed" and rows["bad-config"]["lr"] is None
    assert rows["torn-events"]["state"] == "running" and rows["torn-events"]["problem"] is None
    assert rows["no-summary"]["problem"] == "summary.json: missing (state completed)"
    assert rows["no-summary"]["steps_done"] == 20  # from the last metrics line
    notes = rows["bad-line"]["notes"]
    assert "metrics.jsonl" in notes and "line 3" in notes and "torn last line" in notes
    assert rows["bad-line"]["problem"] is None  # skipped lines are a note, not distrust
    assert rows["no-record"]["problem"] == "run.json: missing"
    assert rows["no-record"]["state"] == "completed"  # the store keeps a completed run's state
    assert rows["empty"]["state"] == "error" and rows["empty"]["problem"] == "run.json: missing"
    assert rows["empty"]["reason"] == "run.json is missing"
    assert rows["bad-json"]["problem"].startswith("run.json: corrupt JSON")
    assert rows["metrics-dir"]["notes"] == "metrics.jsonl: not a regular file"
    assert set(result.problems) == {"no-summary", "no-record", "empty", "bad-config", "bad-json",
                                    "metrics-dir"}  # fmt: skip

    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    steps = sorted(set(metrics[metrics.run_id == "bad-line"].step))
    assert steps == [0, 5, 15, 20]  # line 3 (step 10) skipped, the valid lines still count
    assert [h["tokens"] for h in horizons_of(sweep, "bad-line")] == [1280]  # step 10 is gone
    assert rows["bad-line"]["horizons_reached"] == 1 and rows["run0"]["horizons_reached"] == 2
    for rid in result.problems:  # distrusted runs give no horizon rows
        assert horizons_of(sweep, rid) == [] and rows[rid]["horizons_reached"] == 0
    # the signatures taken while reading are the ones a scan finds: nothing is read again but
    # the running run (its state ages with the clock)
    assert collect_sweep(sweep).reread == ("torn-events",)


def test_a_symlinked_run_directory_is_refused(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    outside = write_run(tmp_path / "elsewhere", "run7")
    (sweep / "runs" / "run7").symlink_to(outside)
    collect_sweep(sweep)
    row = runs_by_id(sweep)["run7"]
    assert row["problem"] == "run directory is a symlink; refused"  # its files are not read
    assert row["lr"] is None and horizons_of(sweep, "run7") == []
    assert collect_sweep(sweep).reread == ()


def test_out_of_range_numbers_stay_in_their_run(tmp_path: Path) -> None:
    """Integers no table column can hold (hand-edited files) cost their run a value, never the
    collect."""
    sweep = make_sweep(tmp_path, n=1)
    rd = write_run(sweep, "huge")
    edit_json(rd / "summary.json", tokens=2**63 + 5)
    edit_json(rd / "provenance.json", world_size=2**64 - 1)
    with open(rd / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2**64, "tokens": 0, "train_loss": 1.0}) + "\n")
    with open(rd / "events.jsonl", "a") as f:
        f.write(json.dumps({"ts": 1.0, "state": "completed", "exit_code": 2**63}) + "\n")
    result = collect_sweep(sweep)
    row = runs_by_id(sweep)["huge"]
    assert row["tokens_done"] is None and row["world_size"] is None and row["exit_code"] is None
    assert row["notes"] == "metrics.jsonl: 1 invalid line(s) skipped (line 6)"
    assert result.n_runs == 2 and runs_by_id(sweep)["run0"]["problem"] is None


def test_failed_and_diverged_runs_carry_their_reason(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=0)
    write_run(
        sweep,
        "crash",
        states=("running", "failed"),
        exit_code=1,
        stderr_tail="Traceback ...\nRuntimeError: boom\n",
    )
    lines = default_lines()[:3] + [metric_line(15, None)]  # the trainer writes NaN as null
    write_run(
        sweep,
        "div",
        lines=lines,
        states=("running", "diverged"),
        exit_code=3,
        reason="loss is NaN at step 15",
    )
    collect_sweep(sweep)
    rows = runs_by_id(sweep)
    assert rows["crash"]["state"] == "failed" and rows["crash"]["exit_code"] == 1
    assert rows["crash"]["reason"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in rows["crash"]["stderr_tail"]
    assert rows["div"]["state"] == "diverged" and rows["div"]["reason"] == "loss is NaN at step 15"
    assert rows["div"]["problem"] is None and rows["div"]["final_loss"] is None
    div = horizons_of(sweep, "div")
    assert [h["tokens"] for h in div] == [640] and [h["state"] for h in div] == ["diverged"]
    assert div[0]["smoothing_points"] == 2  # step 15's loss is missing, not zero


def test_resumed_run_keeps_the_last_line_of_a_repeated_step(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=0)
    lines = default_lines()
    lines.insert(2, metric_line(10, 99.0, horizon=True))  # step 10 logged twice; the later wins
    write_run(sweep, "resumed", lines=lines)
    collect_sweep(sweep)
    assert [h["train_loss"] for h in horizons_of(sweep, "resumed")][0] == 4.0
    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    assert len(metrics[(metrics.step == 10) & (metrics.metric == "train_loss")]) == 1


def test_plan_run_without_directory_and_not_a_sweep(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    edit_json(sweep / "plan.json", runs=["run0", "ghost"])
    collect_sweep(sweep)
    ghost = runs_by_id(sweep)["ghost"]
    assert ghost["state"] == "error"
    assert ghost["problem"] == "run directory missing (listed in plan.json)"
    with pytest.raises(CollectError, match="not a sweep directory"):
        collect_sweep(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- cross-checks


def test_config_json_that_differs_from_run_json_is_a_problem(tmp_path: Path) -> None:
    """run.json edited after the run (the tables would show an lr it never trained at)."""
    sweep = make_sweep(tmp_path, n=2)
    rd = sweep / "runs" / "run1"
    edit_json(rd / "config.json", **{"optim.lr": 0.02})
    result = collect_sweep(sweep)
    row = runs_by_id(sweep)["run1"]
    assert row["problem"] == "config.json optim.lr = 0.02 but run.json says 0.01"
    assert result.problems == {"run1": row["problem"]}
    assert row["state"] == "completed" and horizons_of(sweep, "run1") == []
    assert len(horizons_of(sweep, "run0")) == 2

    edit_json(rd / "config.json", **{"optim.lr": 0.01, "seed": 5})
    assert runs_by_id(sweep)["run1"]["problem"] is not None  # not re-read yet
    collect_sweep(sweep)
    assert runs_by_id(sweep)["run1"]["problem"] == "config.json seed = 5 but run.json says 30"

    (rd / "config.json").write_text("{torn")
    collect_sweep(sweep)
    assert runs_by_id(sweep)["run1"]["problem"].startswith("config.json: corrupt JSON")
    edit_json(sweep / "runs" / "run0" / "config.json", **{"optim.lr": -1})
    collect_sweep(sweep)
    assert runs_by_id(sweep)["run0"]["problem"].startswith("config.json: optim.lr = -1")


def test_what_the_worker_resolves_is_not_a_mismatch(tmp_path: Path) -> None:
    """Threads, the branch's absolute directory and horizons added before the start may differ."""
    sweep = make_sweep(tmp_path, n=1)
    store = SweepStore(sweep)
    rd = store.run_dir("run0")
    store.add_horizons("run0", (320,))
    edit_json(rd / "config.json", threads=2, horizons_tokens=[320, 640, 1280])
    collect_sweep(sweep)
    row = runs_by_id(sweep)["run0"]
    assert row["problem"] is None and row["horizons_tokens"] == [320, 640, 1280]
    assert [h["tokens"] for h in horizons_of(sweep, "run0")] == [320, 640, 1280]
    edit_json(rd / "config.json", horizons_tokens=[640, 2560])
    collect_sweep(sweep, full=True)
    assert runs_by_id(sweep)["run0"]["problem"] == (
        "config.json horizons_tokens = [640, 2560] but run.json says [640, 1280]"
    )


def test_horizons_added_later_are_read_off(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    SweepStore(sweep).add_horizons("run0", (320,))  # step 5 is a logged step
    collect_sweep(sweep)
    hz = horizons_of(sweep, "run0")
    assert [(h["tokens"], h["is_final"]) for h in hz] == [(320, False), (640, False), (1280, True)]
    assert runs_by_id(sweep)["run0"]["horizons_tokens"] == [320, 640, 1280]


@pytest.mark.parametrize(
    ("summary", "problem"),
    [
        (
            {"step": 10, "tokens": 640},
            "summary.json says completed at step 10 but the run plans 20",
        ),
        ({"status": "diverged", "step": 25}, "summary.json says step 25, beyond the 20 steps"),
        ({"status": "diverged", "step": 15}, "summary.json says diverged but the events say"),
        ({"status": "bogus"}, "summary.json: status = 'bogus': unknown"),
    ],
)
def test_a_summary_is_believed_only_if_it_agrees(
    tmp_path: Path, summary: dict[str, Any], problem: str
) -> None:
    sweep = make_sweep(tmp_path, n=2)
    edit_json(sweep / "runs" / "run1" / "summary.json", **summary)
    collect_sweep(sweep)
    row = runs_by_id(sweep)["run1"]
    assert row["problem"].startswith(problem)
    assert row["final_loss"] is None and row["steps_done"] == 20  # from the metrics instead
    assert horizons_of(sweep, "run1") == [] and runs_by_id(sweep)["run0"]["problem"] is None


def test_a_completed_summary_beyond_the_metrics_is_not_believed(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    write_lines(sweep / "runs" / "run0", default_lines()[:3])  # the log stops at step 10
    collect_sweep(sweep)
    row = runs_by_id(sweep)["run0"]
    assert (
        row["problem"] == "summary.json says completed at step 20 but metrics.jsonl ends at step 10"
    )
    assert row["steps_done"] == 10


def test_a_deleted_run_json_keeps_its_row(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    (sweep / "runs" / "run1" / "run.json").unlink()
    result = collect_sweep(sweep)
    assert result.reread == ("run1",) and result.n_runs == 2
    row = runs_by_id(sweep)["run1"]
    assert row["problem"] == "run.json: missing" and row["state"] == "completed"
    assert horizons_of(sweep, "run1") == []
    statuses = {st.run_id: st for st in Sweep.open(sweep).status()}  # and status lists it
    assert set(statuses) == {"run0", "run1"}
    assert statuses["run1"].state == RunState.COMPLETED  # its data is kept, with the reason
    assert statuses["run1"].error == "run.json is missing"


def test_an_edited_run_json_puts_no_edited_value_in_the_tables(tmp_path: Path) -> None:
    """run.json edited after the run trained (issue 9): the trainer's config.json says what it
    trained; the edited rate appears nowhere in the tables, and the run gives no horizon rows."""
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    edit_json(sweep / "runs" / "run1" / "run.json", **{"train.optim.lr": 0.5})
    result = collect_sweep(sweep)
    assert result.reread == ("run1",)
    row = runs_by_id(sweep)["run1"]
    assert row["problem"] == "config.json optim.lr = 0.01 but run.json says 0.5"
    assert result.problems == {"run1": row["problem"]}
    assert row["lr"] is None and row["lr_in"] is None and row["batch_size"] is None
    assert row["slug"] == "run1" and row["model"] == "test-micro" and row["state"] == "completed"
    assert horizons_of(sweep, "run1") == [] and row["horizons_reached"] == 0
    assert 0.5 not in tables.read_sweep_table(sweep, "runs").column("lr").to_pylist()
    assert runs_by_id(sweep)["run0"]["lr"] == 0.01 and len(horizons_of(sweep, "run0")) == 2


def test_a_summary_completed_early_is_not_believed(tmp_path: Path) -> None:
    """Issue 9's case: "completed" at step 86 of 512."""
    train = {**TRAIN, "horizons_tokens": [512 * 64], "log_every": 43}
    lines = [metric_line(s, 5.0 - s / 1000) for s in (0, 43, 86)]
    sweep = make_sweep(tmp_path, n=0)
    write_run(sweep, "early", train=train, lines=lines)
    result = collect_sweep(sweep)
    row = runs_by_id(sweep)["early"]
    assert row["problem"] == "summary.json says completed at step 86 but the run plans 512"
    assert row["final_loss"] is None and row["wall_time_s"] is None
    assert row["summary_status"] == "completed" and row["steps_done"] == 86
    assert set(result.problems) == {"early"} and horizons_of(sweep, "early") == []


# --------------------------------------------------------------------------------- incremental


def test_collect_is_incremental(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=4)
    first = collect_sweep(sweep)
    assert sorted(first.reread) == ["run0", "run1", "run2", "run3"] and first.written
    before = file_ids(sweep)
    cache_before = sorted((p.name, p.stat().st_mtime_ns) for p in (sweep / CACHE_DIR).iterdir())

    second = collect_sweep(sweep)
    assert second.reread == () and not second.written and second.n_runs == 4
    assert file_ids(sweep) == before  # not rewritten
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (sweep / CACHE_DIR).iterdir()) == (
        cache_before
    )

    edit_json(sweep / "runs" / "run2" / "summary.json", final_loss=1.25)
    third = collect_sweep(sweep)
    assert third.reread == ("run2",) and third.written
    assert runs_by_id(sweep)["run2"]["final_loss"] == 1.25
    assert runs_by_id(sweep)["run1"]["final_loss"] == 3.0  # cached rows kept
    assert len(tables.read_sweep_table(sweep, "horizons")) == 8
    n_metrics = len(tables.read_sweep_table(sweep, "metrics"))

    os.utime(sweep / "runs" / "run3" / "metrics.jsonl")  # touch: re-read, same rows
    assert collect_sweep(sweep).reread == ("run3",)
    assert len(tables.read_sweep_table(sweep, "metrics")) == n_metrics

    SweepStore(sweep).add_horizons("run1", (320,))  # the sidecar is watched too
    assert collect_sweep(sweep).reread == ("run1",)
    assert len(tables.read_sweep_table(sweep, "horizons")) == 9

    write_run(sweep, "run9")
    (sweep / "runs" / "run0" / "summary.json").unlink()
    for p in (sweep / "runs" / "run1").iterdir():
        p.unlink()
    (sweep / "runs" / "run1").rmdir()
    fourth = collect_sweep(sweep)
    assert sorted(fourth.reread) == ["run0", "run9"] and fourth.removed == ("run1",)
    assert set(runs_by_id(sweep)) == {"run0", "run2", "run3", "run9"}
    assert set(tables.read_sweep_table(sweep, "metrics").column("run_id").to_pylist()) == {
        "run0",
        "run2",
        "run3",
        "run9",
    }


def test_deleted_table_is_restored_from_the_cache(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    expected = tables.read_sweep_table(sweep, "horizons")
    tables.table_path(sweep, "horizons").unlink()
    result = collect_sweep(sweep)
    assert result.reread == () and result.written
    assert tables.read_sweep_table(sweep, "horizons").equals(expected)


def test_running_run_turns_stale_without_any_file_changing(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1, stale_after_s=60)
    write_run(sweep, "live", states=("submitted", "running"), lines=default_lines()[:2])
    (sweep / "runs" / "live" / "heartbeat").touch()
    now = time.time()
    first = collect_sweep(sweep, now=now)
    assert runs_by_id(sweep)["live"]["state"] == "running"
    assert first.states == {"completed": 1, "running": 1}

    again = collect_sweep(sweep, now=now + 1)
    assert again.reread == ("live",) and not again.written  # volatile runs are re-derived

    later = collect_sweep(sweep, now=now + 3600)
    assert later.reread == ("live",) and later.written
    live = runs_by_id(sweep)["live"]
    assert live["state"] == "stale" and live["reason"] == "stale: no heartbeat for over 60 s"
    assert not collect_sweep(sweep, now=now + 7200).written  # the row does not age


def test_incompatible_cache_is_rebuilt(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    (sweep / CACHE_DIR / "manifest.json").write_text("{corrupt")
    result = collect_sweep(sweep)
    assert sorted(result.reread) == ["run0", "run1"] and result.written


def test_leftovers_of_a_killed_collect_are_removed(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    collect_sweep(sweep)
    junk = [sweep / CACHE_DIR / ".runs.arrow.x1.tmp", sweep / ".metrics.parquet.x2.tmp"]
    for p in junk:
        p.write_bytes(b"partial")
    collect_sweep(sweep)
    assert not any(p.exists() for p in junk)


# ------------------------------------------------------------------------------ metrics files


def _blob(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_metrics_files_are_isolated_from_each_other() -> None:
    """A bad file (a bad line, a wrong type, blank lines, two objects on a line, CRLF) keeps its
    valid lines and its own rows; its neighbours are not affected. Two objects on one line are
    two rows, unless the file has an invalid line: then it is read line by line, and such a line
    is invalid too."""
    good = _blob(default_lines())
    lines = good.split(b"\n")
    typed = good.replace(b'"train_loss": 5.0', b'"train_loss": "five"')
    blobs = [
        good,
        b"[1, 2]\n" + good,  # line 1 is not an object
        good.replace(b"\n", b"\n\n  \n", 2),  # blank and whitespace-only lines
        typed,  # a float of the wrong type becomes null (trainer.schema.parse_metrics_line)
        b"",
        good + b'{"step": 2',  # torn last line
        b"\n".join([lines[0] + b" " + lines[1], *lines[2:]]),  # two objects on line 1
        good.replace(b"\n", b"\r\n"),
        good[:-1],  # a complete last line without its newline
        good.replace(b'{"step": 20', b'{"_file": 0, "step": 20'),  # our label key, as data
        good.replace(b'"step": 15', b'"step": -15'),
        b"\n".join([lines[0] + lines[1], *lines[2:]]) + b"[3]\n",  # two objects, a bad line
    ]
    got = read_metrics(blobs)
    file = got.table.column("_file").to_numpy()
    rows = [int((file == i).sum()) for i in range(len(blobs))]
    assert rows == [5, 5, 5, 5, 0, 5, 5, 5, 5, 5, 4, 3]
    assert got.notes[1] == "1 invalid line(s) skipped (line 1)"
    assert got.notes[5] == "torn last line ignored"
    assert got.notes[10] == "1 invalid line(s) skipped (line 4)"
    assert got.notes[11] == "2 invalid line(s) skipped (line 1, 5)"
    assert [got.notes[i] for i in (0, 2, 3, 4, 6, 7, 8, 9)] == [""] * 8
    step = got.table.column("step").to_numpy()
    for i in (0, 1, 2, 3, 5, 6, 7, 8, 9):
        assert list(step[file == i]) == [0, 5, 10, 15, 20], i
    loss = got.table.column("train_loss").to_pylist()
    assert loss[int(np.flatnonzero(file == 3)[0])] is None
    assert got.table.schema.field("step").type == pa.int64()
    # without the invalid ones, all files are read in one call: each still gets its own rows
    again = read_metrics([good, blobs[2], blobs[6], blobs[7], blobs[8]])
    file = again.table.column("_file").to_numpy()
    assert [int((file == i).sum()) for i in range(5)] == [5] * 5 and again.notes == [""] * 5
    assert all(list(again.table.column("step").to_numpy()[file == i]) == [0, 5, 10, 15, 20]
               for i in range(5))  # fmt: skip


def test_unknown_metric_keys_are_ignored(tmp_path: Path) -> None:
    """The metric names are trainer.schema's; anything else on a line is not a metric."""
    sweep = make_sweep(tmp_path, n=0)
    rd = write_run(sweep, "extra")
    lines = [{**x, "mfu": 0.5, "note": "text"} for x in default_lines()]
    write_lines(rd, lines)
    collect_sweep(sweep)
    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    assert set(metrics.metric) <= set(FLOAT_METRICS) and "train_loss" in set(metrics.metric)
    assert runs_by_id(sweep)["extra"]["notes"] is None


def test_non_finite_values_are_null_like_the_schema_says(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=0)
    rd = write_run(sweep, "nan")
    text = (rd / "metrics.jsonl").read_text().replace('"grad_norm": 0.1', '"grad_norm": NaN')
    (rd / "metrics.jsonl").write_text(text)
    collect_sweep(sweep)
    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    assert "grad_norm" not in set(metrics.metric) and not metrics.value.isna().any()


def _reference_window(lines: list[dict[str, Any]], cfg: TrainConfig) -> list[tuple]:
    """Per-run computation of (tokens, smoothed loss, std, points) over the +-1 logged points."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in lines:
        by_step[row["step"]] = row  # the last line of a step wins
    steps = sorted(by_step)
    out = []
    for d in sorted(cfg.horizons_tokens):
        h = d // cfg.tokens_per_step
        if h not in by_step:
            continue
        i = steps.index(h)
        near = [by_step[s]["train_loss"] for s in steps[max(i - 1, 0) : i + 2]]
        window = [x for x in near if x is not None]
        out.append((d, float(np.mean(window)), float(np.std(window)), len(window)))
    return out


def test_smoothing_matches_a_per_run_reference(tmp_path: Path) -> None:
    """Random runs side by side (different log intervals, horizons, gaps, repeated steps, missing
    losses): no window may leak into a neighbouring run."""
    rng = np.random.default_rng(0)
    sweep = make_sweep(tmp_path, n=0)
    want = {}
    for i in range(25):
        log_every = int(rng.integers(1, 6))
        horizons = sorted({64 * int(h) for h in rng.integers(1, 40, size=3)})
        train = {**TRAIN, "log_every": log_every, "horizons_tokens": horizons}
        cfg = TrainConfig.from_dict(train)
        steps = sorted(set(range(0, cfg.total_steps + 1, log_every)) | set(cfg.horizon_steps))
        steps = [s for s in steps if rng.random() > 0.15 or s in cfg.horizon_steps]
        lines = [metric_line(s, float(rng.normal(4, 1)), s in cfg.horizon_steps) for s in steps]
        for line in lines[:-1]:
            if rng.random() < 0.1:
                line["train_loss"] = None
        lines += [metric_line(int(s), float(rng.normal(4, 1))) for s in rng.choice(steps[:-1], 2)]
        rid = f"r{i:02d}"
        write_run(sweep, rid, train=train, lines=lines)
        want[rid] = _reference_window(lines, cfg)
    collect_sweep(sweep)
    for rid, expected in want.items():
        got = [
            (h["tokens"], h["train_loss_smoothed"], h["train_loss_std"], h["smoothing_points"])
            for h in horizons_of(sweep, rid)
        ]
        assert len(got) == len(expected), rid
        for g, w in zip(got, expected, strict=True):
            assert g[0] == w[0] and g[3] == w[3], rid
            assert g[1] == pytest.approx(w[1]) and g[2] == pytest.approx(w[2], abs=1e-12), rid


# ------------------------------------------------------------------------------ tables, files


def test_schema_round_trip_and_version_check(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    assert set(tables.HORIZON_METRICS) <= set(tables.HORIZONS_SCHEMA.names)
    assert set(tables.HORIZON_METRICS) <= set(FLOAT_METRICS)
    for name, schema in tables.SCHEMAS.items():
        path = tables.table_path(sweep, name)
        table = tables.read_table(path, name)
        assert table.schema.remove_metadata().equals(schema), name
        meta = pq.read_schema(path).metadata
        assert meta[b"sweeper.schema_version"] == str(tables.SCHEMA_VERSION).encode()
        assert meta[b"sweeper.table"] == name.encode()
        copy = tmp_path / f"{name}.parquet"
        tables.write_table(name, table, copy)
        assert tables.read_table(copy, name).equals(table)
    with pytest.raises(tables.TableError, match="expected 'horizons'"):
        tables.read_table(tables.table_path(sweep, "runs"), "horizons")
    old = tables.read_table(tables.table_path(sweep, "runs"), "runs")
    pq.write_table(
        old.replace_schema_metadata({b"sweeper.table": b"runs", b"sweeper.schema_version": b"1"}),
        tmp_path / "old.parquet",
    )
    with pytest.raises(tables.TableError, match="schema_version = '1'"):
        tables.read_table(tmp_path / "old.parquet", "runs")
    with pytest.raises(tables.TableError, match="unknown column"):
        tables.from_rows("runs", [{"run_id": "x", "state": "planned", "bogus": 1}])


def test_metrics_parquet_keeps_statistics_only_for_the_run_and_step_columns(
    tmp_path: Path,
) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    meta = pq.ParquetFile(tables.table_path(sweep, "metrics")).metadata
    group = meta.row_group(0)
    stats = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(5)}
    assert stats == {"run_id": True, "step": True, "tokens": True, "metric": False, "value": False}


def test_result_summary_line(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    line = str(collect_sweep(sweep))
    assert line.startswith(
        "2 runs (2 read, 0 cached; 2 completed); 0 with problems; tables written"
    )
    assert "\n" not in line and not math.isnan(collect_sweep(sweep).elapsed_s)


def test_unwritable_table_is_a_one_line_error(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    tables.table_path(sweep, "horizons").mkdir()  # something that cannot be replaced by a file
    with pytest.raises(CollectError, match=r"horizons\.parquet: cannot write the collected tables"):
        collect_sweep(sweep)
    tables.table_path(sweep, "horizons").rmdir()
    assert collect_sweep(sweep).written  # the next collect publishes it
    assert len(tables.read_sweep_table(sweep, "horizons")) == 2


_COLLECT = "import sys; from sweeper.collect import collect_sweep; collect_sweep(sys.argv[1])"
_READ = """
import sys, time
from sweeper import tables
deadline = time.time() + float(sys.argv[2]); n = 0
while time.time() < deadline:
    for name in tables.TABLE_NAMES:
        try:
            tables.read_sweep_table(sys.argv[1], name)
        except tables.TableError as e:
            if "not found" not in str(e):
                raise
    n += 1
print(n)
"""


@pytest.mark.slow
def test_concurrent_collects_and_readers(tmp_path: Path) -> None:
    """Two collect processes at once plus a reader: no error, no partial table, no temp files."""
    sweep = make_sweep(tmp_path, n=40)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reader = subprocess.Popen(
        [sys.executable, "-c", _READ, str(sweep), "6"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for round_ in range(2):
        for i in range(0, 40, 3):  # change some runs so that both collects have work
            os.utime(sweep / "runs" / f"run{i}" / "metrics.jsonl", ns=(round_, round_ * 10**9))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _COLLECT, str(sweep)],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert int(out) > 0
    assert len(tables.read_sweep_table(sweep, "runs")) == 40
    assert len(tables.read_sweep_table(sweep, "horizons")) == 80
    leftovers = [p.name for p in sweep.rglob(".*.tmp")]
    assert leftovers == []
    assert collect_sweep(sweep).reread == ()


# ------------------------------------------------------------- continuations and schedules

SIM_SPEC = """name = "{name}"
[[models]]
preset = "cpu-tiny"
[grid]
lr = {{log2_from = -7, log2_to = -3, log2_step = 1}}
batch_size = [8]
log2_horizons = {horizons}
[train]
log_every = 4
checkpoint_every = 64
[backend]
name = "sim"
[simulator]
seed = 3
noise = 0.01
{schedules}
"""


def sim_spec(path: Path, horizons: list[int], schedules: str = "", name: str = "sim") -> Path:
    """A simulator sweep (``trainer.sim`` in-process: the trainer's files in milliseconds)."""
    path.write_text(SIM_SPEC.format(name=name, horizons=horizons, schedules=schedules))
    return path


def test_a_continuation_gives_rows_only_for_the_horizons_it_trains(tmp_path: Path) -> None:
    """Extending the horizons continues a run from its final checkpoint (sweeper/extend.py): the
    continuation starts at its parent's last step and logs a line there (the parent's state), but
    the horizons up to that step are the parent's rows, never the continuation's, even when a
    hand-edited horizons.json asks for them."""
    sweep = make_sweep(tmp_path, n=0)
    write_run(sweep, "par")  # steps 0..20, horizons 640 and 1280 (steps 10 and 20)
    parent = SweepStore(sweep).load_record("par")
    planned = make_record("x", {**TRAIN, "horizons_tokens": [640, 1280, 2560]})
    cont = continuation(planned, parent, 20)
    assert cont.parent == "par" and cont.start_step == 20 and cont.horizons_tokens == (2560,)
    lines = [metric_line(s, 3.0 - s / 100, horizon=s == 40) for s in range(20, 41, 5)]
    write_run(sweep, cont.id, record_=cont, lines=lines)
    write_json_atomic(  # by hand: SweepStore.add_horizons refuses horizons before the start
        sweep / "runs" / cont.id / "horizons.json", {"horizons_tokens": [640, 1280]}
    )
    result = collect_sweep(sweep)
    assert result.problems == {}
    assert [h["tokens"] for h in horizons_of(sweep, "par")] == [640, 1280]
    hz = horizons_of(sweep, cont.id)
    assert [(h["tokens"], h["step"], h["is_final"]) for h in hz] == [(2560, 40, True)]
    row = runs_by_id(sweep)[cont.id]
    assert row["horizons_tokens"] == [2560] and row["max_tokens"] == 2560
    assert row["horizons_reached"] == 1 and row["start_step"] == 20 and row["parent"] == "par"
    assert row["notes"] == (
        "horizons [640, 1280] outside the run's span (1280, 2560] tokens ignored "
        "(it starts at step 20)"
    )
    assert row["trained_tokens"] == 1280  # its own steps only


def test_schedules_are_separate_series_in_the_tables_and_the_optima(tmp_path: Path) -> None:
    """The schedules axis: each run's schedule tag (as in its slug) is a column of runs and
    horizons, and the analysis fits each schedule (and the WSD trunks, read at their fork points)
    as its own series. With wsd0.5, a trunk's fork at 2^15 tokens falls on the constant runs'
    horizon 2^15: its rows must not join their slice."""
    schedules = (
        '[[schedules]]\nkind = "constant"\n'
        '[[schedules]]\nkind = "wsd"\ndecay_fraction = 0.25\n'
        '[[schedules]]\nkind = "wsd"\ndecay_fraction = 0.5\n'
    )
    sweep = Sweep.create(sim_spec(tmp_path / "s.toml", [15, 16], schedules), tmp_path / "r")
    assert sweep.launch().states == {"completed": 5 * 7}  # a single; 2 x (trunk + 2 branches)
    sweep.collect()
    runs = sweep.table("runs")
    for row in runs.itertuples():
        tag = {"single": "constant", "trunk": "constant"}.get(row.kind, row.schedule)
        assert row.schedule == tag and row.schedule in {"constant", "wsd0.25", "wsd0.5"}
        assert row.kind == "trunk" or row.slug.split("_")[-1].split("-")[0] in (
            row.schedule,
            "D2^15",
            "D2^16",
        )
    hz = sweep.table("horizons")
    assert set(zip(hz.kind, hz.schedule, strict=True)) == {
        ("single", "constant"),
        ("trunk", "constant"),
        ("branch", "wsd0.25"),
        ("branch", "wsd0.5"),
    }
    assert ((hz.kind == "trunk") & (hz.tokens == 2**15)).any()  # the wsd0.5 trunk's fork
    from sweeper.analysis.api import AnalysisOptions, analyze_tables

    result = analyze_tables(sweep.root, AnalysisOptions(n_boot=0, plots=False))
    layouts = set(result.optima["layout"])
    assert layouts == {
        "1:1:1 constant",
        "1:1:1 constant trunk",
        "1:1:1 wsd0.25 branch",
        "1:1:1 wsd0.5 branch",
    }
    assert (result.points["n_seeds"] == 1).all()  # no slice mixes two runs at one rate
    constant = result.optima[result.optima["layout"] == "1:1:1 constant"]
    assert sorted(constant["tokens"]) == [2**15, 2**16]
