"""``sweeper collect``: real run directories, broken files, incrementality, concurrency."""

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

from sweeper import collect, store, tables
from sweeper.collect import (
    CACHE_DIR,
    CollectError,
    collect_sweep,
    parse_events,
    parse_metrics,
    scan_signatures,
)
from trainer.config import SCHEMA_VERSION, TrainConfig

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


def metric_line(step: int, loss: float, horizon: bool = False, **extra: Any) -> dict[str, Any]:
    line = {
        "step": step,
        "tokens": step * 64,
        "train_loss": loss,
        "lr_in": 0.01,
        "lr_hidden": 0.00125,
        "lr_out": 0.01,
        "output_norm": 1.0 + step / 10,
        "output_norm_rms": 0.5,
        "input_norm": 1.0,
        "hidden_norm": 2.0,
        "grad_norm": 0.1,
        "horizon": horizon,
    }
    if horizon:
        line["val_loss"] = loss + 0.5
    line.update(extra)
    return line


def default_lines() -> list[dict[str, Any]]:
    """Steps 0, 5, ..., 20 with loss 5 - step/10; horizons at 10 and 20."""
    return [metric_line(s, 5.0 - s / 10, horizon=s in (10, 20)) for s in range(0, 21, 5)]


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
    **event_fields: Any,
) -> Path:
    """A run directory in the documented formats (events appended with the store's own writer)."""
    rd = sweep / "runs" / rid
    rd.mkdir(parents=True, exist_ok=True)
    train = train or TRAIN
    cfg = TrainConfig.from_dict(train)
    if record:
        doc = {
            "id": rid,
            "slug": rid,
            "kind": "single",
            "parent": None,
            "sweep": sweep.name,
            "model_name": "test-micro",
            "train": train,
            "derived": {},
            "resources": {},
        }
        (rd / "run.json").write_text(json.dumps(doc, indent=1))
    if config:
        (rd / "config.json").write_text(
            json.dumps({**cfg.to_dict(), "schema_version": SCHEMA_VERSION})
        )
    (rd / "provenance.json").write_text(
        json.dumps(
            {
                "git_sha": "abc123",
                "git_dirty": False,
                "python": "3.11.7",
                "torch": "2.13.0+cpu",
                "device": "cpu",
                "world_size": 1,
                "hostname": "n1",
            }
        )
    )
    for state in states:
        fields = dict(event_fields) if state == states[-1] else {}
        store.append_event(rd, state, backend="local", **fields)
    lines = default_lines() if lines is None else lines
    (rd / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary and states and states[-1] in ("completed", "diverged"):
        last = lines[-1]
        (rd / "summary.json").write_text(
            json.dumps(
                {
                    "status": states[-1],
                    "step": last["step"],
                    "tokens": last["tokens"],
                    "final_loss": last["train_loss"],
                    "final_output_norm": last["output_norm"],
                    "wall_time_s": 1.5,
                    "diverged_step": None,
                    "reason": None,
                }
            )
        )
    return rd


def make_sweep(tmp_path: Path, n: int = 3) -> Path:
    sweep = tmp_path / "sw"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "plan.json").write_text(json.dumps({"sweep": "sw", "runs": []}))
    for i in range(n):
        write_run(sweep, f"run{i}")
    return sweep


def runs_by_id(sweep: Path) -> dict[str, dict[str, Any]]:
    rows = tables.read_sweep_table(sweep, "runs").to_pylist()
    return {r["run_id"]: r for r in rows}


def file_ids(sweep: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for name in tables.TABLE_NAMES:
        st = tables.table_path(sweep, name).stat()
        out[name] = (st.st_ino, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------- tests


def test_tables_from_a_real_trainer_run(tmp_path: Path, micro_run, trainer_cli) -> None:
    """A real (tiny) training run, collected: every documented column has the trainer's values."""
    sweep = tmp_path / "sw"
    rid = "micro-1"
    rd = sweep / "runs" / rid
    rd.mkdir(parents=True)
    cfg = micro_run(optim={"lr": 2**-6}, seed=7)
    record = {
        "id": rid,
        "slug": rid,
        "kind": "single",
        "parent": None,
        "sweep": "sw",
        "model_name": "test-micro",
        "train": cfg,
        "derived": {},
        "resources": {},
    }
    (rd / "run.json").write_text(json.dumps(record))
    store.append_event(rd, "running", host="h1", pid=1)
    proc = trainer_cli.run(record, rd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    store.append_event(rd, "completed", exit_code=0)

    result = collect_sweep(sweep)
    assert result.n_runs == 1 and result.errors == {} and result.written

    row = runs_by_id(sweep)[rid]
    summary = json.loads((rd / "summary.json").read_text())
    resolved = TrainConfig.from_dict(cfg)
    assert row["state"] == "completed" and row["attempts"] == 1 and row["host"] == "h1"
    assert row["n_params"] == resolved.model.n_params() and row["seed"] == 7
    assert row["lr"] == 2**-6 and row["batch_size"] == 4 and row["seq_len"] == 16
    assert row["total_steps"] == 20 and row["steps_done"] == 20 and row["tokens_done"] == 1280
    assert row["final_loss"] == summary["final_loss"] and row["horizons_reached"] == 2
    assert row["torch_version"].startswith("2.13.0") and row["world_size"] == 1

    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    by_step = {x["step"]: x for x in lines}
    hz = tables.read_sweep_table(sweep, "horizons").to_pylist()
    assert [(h["tokens"], h["step"], h["is_final"]) for h in hz] == [
        (640, 10, False),
        (1280, 20, True),
    ]
    h10 = hz[0]
    assert h10["train_loss"] == by_step[10]["train_loss"]
    assert h10["val_loss"] == by_step[10]["val_loss"]
    assert h10["output_norm"] == by_step[10]["output_norm"]
    window = [by_step[s]["train_loss"] for s in (5, 10, 15)]  # +-1 log interval (5 steps)
    assert h10["train_loss_smoothed"] == pytest.approx(np.mean(window))
    assert h10["train_loss_std"] == pytest.approx(np.std(window))
    assert h10["smoothing_points"] == 3 and h10["window_complete"]
    assert hz[1]["smoothing_points"] == 2 and not hz[1]["window_complete"]  # nothing after the end

    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    expected = sum(
        1
        for x in lines
        for k, v in x.items()
        if k not in ("step", "tokens", "horizon") and isinstance(v, float)
    )
    assert len(metrics) == expected
    got = metrics[(metrics.step == 10) & (metrics.metric == "train_loss")].value.item()
    assert got == by_step[10]["train_loss"]


def test_broken_runs_get_rows_that_say_why(tmp_path: Path) -> None:
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
    bad_cfg = {**TRAIN, "optim": {"lr": -1.0}}
    rd = write_run(sweep, "bad-config", config=False)
    doc = json.loads((rd / "run.json").read_text())
    (rd / "run.json").write_text(json.dumps({**doc, "train": bad_cfg}))
    (sweep / "runs" / "bad-json").mkdir()
    (sweep / "runs" / "bad-json" / "run.json").write_text("{not json")

    result = collect_sweep(sweep)
    rows = runs_by_id(sweep)
    assert rows["bad-config"]["error"].startswith(
        "runs/bad-config/run.json: train: optim.lr = -1.0: must be"
    )
    assert rows["bad-config"]["state"] == "completed" and rows["bad-config"]["lr"] is None
    assert set(rows) - {"bad-config"} == {
        "run0",
        "torn-events",
        "no-summary",
        "bad-line",
        "no-record",
        "empty",
        "bad-json",
    }
    assert rows["run0"]["error"] is None
    assert rows["torn-events"]["state"] == "running" and rows["torn-events"]["error"] is None
    assert rows["no-summary"]["error"] == "runs/no-summary/summary.json: missing (state completed)"
    assert rows["no-summary"]["steps_done"] == 20  # from the last metrics line
    err = rows["bad-line"]["error"]
    assert "runs/bad-line/metrics.jsonl" in err and "line 3" in err and "torn last line" in err
    assert rows["no-record"]["error"] == "runs/no-record/run.json: missing"
    assert rows["no-record"]["n_params"] is not None  # config.json still read
    assert rows["empty"]["state"] == "planned" and "run.json: missing" in rows["empty"]["error"]
    assert rows["bad-json"]["error"].startswith("runs/bad-json/run.json: corrupt JSON")
    assert set(result.errors) == {
        "bad-config",
        "no-summary",
        "bad-line",
        "no-record",
        "empty",
        "bad-json",
    }

    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    steps = sorted(set(metrics[metrics.run_id == "bad-line"].step))
    assert steps == [0, 5, 15, 20]  # line 3 (step 10) skipped, the valid lines still count
    hz = tables.read_sweep_table(sweep, "horizons").to_pandas()
    assert list(hz[hz.run_id == "bad-line"].tokens) == [1280]  # the step-10 horizon line is gone
    assert rows["bad-line"]["horizons_reached"] == 1 and rows["run0"]["horizons_reached"] == 2


def test_failed_and_diverged_runs_carry_their_reason(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=0)
    write_run(
        sweep,
        "crash",
        states=("running", "failed"),
        exit_code=1,
        stderr_tail="Traceback ...\nRuntimeError: boom\n",
    )
    lines = default_lines()[:3] + [metric_line(15, float("nan"))]
    lines[-1]["train_loss"] = None  # the trainer writes a non-finite loss as null
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
    assert rows["crash"]["error"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in rows["crash"]["stderr_tail"]
    assert rows["div"]["state"] == "diverged" and rows["div"]["error"] == "loss is NaN at step 15"
    hz = tables.read_sweep_table(sweep, "horizons").to_pandas()
    div = hz[hz.run_id == "div"]
    assert list(div.tokens) == [640] and list(div.state) == ["diverged"]
    assert div.smoothing_points.item() == 2  # step 15's loss is missing, not zero


def test_resumed_run_keeps_the_last_line_of_a_repeated_step(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=0)
    lines = default_lines()
    lines.insert(2, metric_line(10, 99.0, horizon=True))  # step 10 logged twice; the later wins
    write_run(sweep, "resumed", lines=lines)
    collect_sweep(sweep)
    hz = tables.read_sweep_table(sweep, "horizons").to_pandas()
    assert hz[hz.tokens == 640].train_loss.item() == 4.0
    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    assert len(metrics[(metrics.step == 10) & (metrics.metric == "train_loss")]) == 1


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

    summary = sweep / "runs" / "run2" / "summary.json"
    doc = json.loads(summary.read_text())
    doc["final_loss"] = 1.25
    summary.write_text(json.dumps(doc))
    third = collect_sweep(sweep)
    assert third.reread == ("run2",) and third.written
    assert runs_by_id(sweep)["run2"]["final_loss"] == 1.25
    assert runs_by_id(sweep)["run1"]["final_loss"] == 3.0  # cached rows kept
    assert len(tables.read_sweep_table(sweep, "horizons")) == 8
    n_metrics = len(tables.read_sweep_table(sweep, "metrics"))

    os.utime(sweep / "runs" / "run3" / "metrics.jsonl")  # touch: re-read, same rows
    assert collect_sweep(sweep).reread == ("run3",)
    assert len(tables.read_sweep_table(sweep, "metrics")) == n_metrics

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
    sweep = make_sweep(tmp_path, n=1)
    write_run(sweep, "live", states=("submitted", "running"), lines=default_lines()[:2])
    (sweep / "runs" / "live" / "heartbeat").touch()
    now = time.time()
    first = collect_sweep(sweep, stale_after_s=60, now=now)
    assert runs_by_id(sweep)["live"]["state"] == "running"
    assert first.states == {"completed": 1, "running": 1}

    again = collect_sweep(sweep, stale_after_s=60, now=now + 1)
    assert again.reread == ("live",) and not again.written  # volatile runs are re-derived

    later = collect_sweep(sweep, stale_after_s=60, now=now + 3600)
    assert later.reread == ("live",) and later.written
    live = runs_by_id(sweep)["live"]
    assert live["state"] == "stale" and live["error"].startswith("stale: no heartbeat for 36")


def test_plan_run_without_directory_and_not_a_sweep(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    (sweep / "plan.json").write_text(json.dumps({"sweep": "sw", "runs": ["run0", "ghost"]}))
    collect_sweep(sweep)
    ghost = runs_by_id(sweep)["ghost"]
    assert (
        ghost["state"] == "planned"
        and ghost["error"] == "runs/ghost/: missing (listed in plan.json)"
    )
    with pytest.raises(CollectError, match="not a sweep directory"):
        collect_sweep(tmp_path / "nowhere")


def test_parse_metrics_isolates_bad_files() -> None:
    good = b"".join(json.dumps(x).encode() + b"\n" for x in default_lines())
    typed = good.replace(b'"train_loss": 5.0', b'"train_loss": "five"')
    blank = good.replace(b"\n", b"\n\n  \n", 2)
    chunks = (
        [good] * 5 + [b"[1, 2]\n" + good] + [good] * 3 + [blank, typed, b"", good + b'{"step": 2']
    )
    wide, notes = parse_metrics(chunks)
    runs = wide.column("_run").to_numpy()
    assert [int((runs == i).sum()) for i in range(len(chunks))] == [5] * 5 + [5] * 5 + [4, 0, 5]
    assert notes[5] == "1 invalid line(s) skipped (line 1)" and notes[10].endswith("(line 1)")
    assert notes[12] == "torn last line ignored" and notes[:5] == [""] * 5 and notes[9] == ""
    assert wide.schema.field("step").type == pa.int64()


def test_extra_numeric_metrics_are_kept(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=0)
    lines = [metric_line(s, 4.0, horizon=s in (10, 20), mfu=0.5, note="text") for s in (0, 10, 20)]
    write_run(sweep, "extra", lines=lines)
    collect_sweep(sweep)
    metrics = tables.read_sweep_table(sweep, "metrics").to_pandas()
    assert set(metrics.metric) >= {"mfu", "train_loss", "val_loss"} and "note" not in set(
        metrics.metric
    )
    assert "horizon" not in set(metrics.metric)


def test_schema_round_trip_and_version_check(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
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
        old.replace_schema_metadata({b"sweeper.table": b"runs", b"sweeper.schema_version": b"0"}),
        tmp_path / "old.parquet",
    )
    with pytest.raises(tables.TableError, match="schema_version = '0'"):
        tables.read_table(tmp_path / "old.parquet", "runs")
    with pytest.raises(tables.TableError, match="unknown column"):
        tables.from_rows("runs", [{"run_id": "x", "state": "planned", "bogus": 1}])


def test_incompatible_cache_is_rebuilt(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    (sweep / CACHE_DIR / "manifest.json").write_text("{corrupt")
    result = collect_sweep(sweep)
    assert sorted(result.reread) == ["run0", "run1"] and result.written


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


def test_result_summary_line(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=2)
    line = str(collect_sweep(sweep))
    assert line.startswith("2 runs (2 read, 0 cached; 2 completed); 0 with errors; tables written")
    assert "\n" not in line and not math.isnan(collect_sweep(sweep).elapsed_s)


def test_unwritable_table_is_a_one_line_error(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path, n=1)
    tables.table_path(sweep, "horizons").mkdir()  # something that cannot be replaced by a file
    with pytest.raises(CollectError, match=r"horizons\.parquet: cannot write the collected tables"):
        collect_sweep(sweep)
    tables.table_path(sweep, "horizons").rmdir()
    assert collect_sweep(sweep).written  # the next collect publishes it
    assert len(tables.read_sweep_table(sweep, "horizons")) == 2


def _reference_horizons(rd: Path, cfg: TrainConfig) -> list[tuple[int, float, float, int]]:
    """Straightforward per-run computation of (tokens, smoothed loss, std, points) to check the
    vectorised one against."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in (rd / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row  # the last line of a step wins
    out = []
    for d in sorted(cfg.horizons_tokens):
        h = d // cfg.tokens_per_step
        if h not in by_step:
            continue
        window = [
            r["train_loss"]
            for s, r in by_step.items()
            if abs(s - h) <= cfg.log_every and r.get("train_loss") is not None
        ]
        out.append((d, float(np.mean(window)), float(np.std(window)), len(window)))
    return out


def test_vectorised_smoothing_matches_a_per_run_reference(tmp_path: Path) -> None:
    """Random runs side by side (different log intervals, horizons, gaps, repeated steps, missing
    losses): no window may leak into a neighbouring run."""
    rng = np.random.default_rng(0)
    sweep = make_sweep(tmp_path, n=0)
    configs = {}
    for i in range(25):
        log_every = int(rng.integers(1, 6))
        horizons = sorted({64 * int(h) for h in rng.integers(1, 40, size=3)})
        train = {**TRAIN, "log_every": log_every, "horizons_tokens": horizons}
        cfg = TrainConfig.from_dict(train)
        steps = sorted(set(range(0, cfg.total_steps + 1, log_every)) | set(cfg.horizon_steps))
        steps = [s for s in steps if rng.random() > 0.15 or s in cfg.horizon_steps]
        lines = [metric_line(s, float(rng.normal(4, 1)), s in cfg.horizon_steps) for s in steps]
        for line in lines:
            if rng.random() < 0.1:
                line["train_loss"] = None
        lines += [metric_line(int(s), float(rng.normal(4, 1))) for s in rng.choice(steps, size=2)]
        rid = f"r{i:02d}"
        write_run(sweep, rid, train=train, lines=lines)
        configs[rid] = cfg
    collect_sweep(sweep)
    hz = tables.read_sweep_table(sweep, "horizons").to_pylist()
    got: dict[str, list[tuple[int, float, float, int]]] = {}
    for h in hz:
        got.setdefault(h["run_id"], []).append(
            (h["tokens"], h["train_loss_smoothed"], h["train_loss_std"], h["smoothing_points"])
        )
    for rid, cfg in configs.items():
        want = _reference_horizons(sweep / "runs" / rid, cfg)
        assert len(got.get(rid, [])) == len(want), rid
        for g, w in zip(got.get(rid, []), want, strict=True):
            assert g[0] == w[0] and g[3] == w[3], rid
            assert g[1] == pytest.approx(w[1]) and g[2] == pytest.approx(w[2], abs=1e-12), rid


# ------------------------------------------------------------------------------- fast paths


def _mixed_sweep(tmp_path: Path) -> Path:
    """Good runs and broken ones (bad metrics line, no summary, corrupt run.json, no run.json,
    an unfinished run, a planned run without directory), for comparing the collect paths."""
    sweep = make_sweep(tmp_path, n=6)
    rd = write_run(sweep, "bad-line")
    text = (rd / "metrics.jsonl").read_text().splitlines()
    text[2] = text[2][:40]
    (rd / "metrics.jsonl").write_text("\n".join(text) + "\n")
    write_run(sweep, "no-summary", summary=False)
    write_run(sweep, "no-record", record=False)
    write_run(sweep, "live", states=("submitted", "running"), lines=default_lines()[:2])
    (sweep / "runs" / "bad-json").mkdir()
    (sweep / "runs" / "bad-json" / "run.json").write_text("{not json")
    (sweep / "plan.json").write_text(json.dumps({"sweep": "sw", "runs": ["run0", "ghost"]}))
    return sweep


def _contents(sweep: Path) -> dict[str, pa.Table]:
    """The three tables with dictionary columns decoded (each process builds its own
    dictionaries) and the metadata dropped."""
    out = {}
    for name in tables.TABLE_NAMES:
        t = tables.read_sweep_table(sweep, name).replace_schema_metadata(None)
        fields = [
            f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
            for f in t.schema
        ]
        out[name] = t.cast(pa.schema(fields))
    return out


def test_two_processes_give_the_same_tables(tmp_path: Path) -> None:
    sweep = _mixed_sweep(tmp_path)
    one = collect_sweep(sweep, parallel=False, now=time.time())
    want = _contents(sweep)
    manifest = json.loads((sweep / CACHE_DIR / "manifest.json").read_bytes())["runs"]
    two = collect_sweep(sweep, parallel=True, full=True, now=time.time())
    assert sorted(two.reread) == sorted(one.reread) and len(one.reread) == 12
    assert two.errors == one.errors and two.rows == one.rows and two.states == one.states
    got = _contents(sweep)
    for name in tables.TABLE_NAMES:
        assert got[name].equals(want[name]), name
    assert json.loads((sweep / CACHE_DIR / "manifest.json").read_bytes())["runs"] == manifest
    assert not [p.name for p in (sweep / CACHE_DIR).iterdir() if p.name.startswith(".")]
    third = collect_sweep(sweep, parallel=True)  # the cache of a two-process collect works
    assert third.reread == ("live",) and not third.written


def test_a_dead_worker_process_is_replaced_by_reading_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = _mixed_sweep(tmp_path)
    collect_sweep(sweep, parallel=False)
    want = _contents(sweep)
    parent, read_run = os.getpid(), collect._read_run

    def dies_in_the_worker(*args: Any) -> Any:
        if os.getpid() != parent:
            os._exit(9)  # as if killed (e.g. out of memory)
        return read_run(*args)

    monkeypatch.setattr(collect, "_read_run", dies_in_the_worker)  # the forked worker has it too
    result = collect_sweep(sweep, parallel=True, full=True)
    assert len(result.reread) == 12
    got = _contents(sweep)
    for name in tables.TABLE_NAMES:
        assert got[name].equals(want[name]), name


def test_signatures_taken_while_reading_match_the_scan(tmp_path: Path) -> None:
    """A first collect takes each file's signature from the open file instead of a stat pass:
    the manifest must hold what scan_signatures computes, or the next collect reads again."""
    sweep = _mixed_sweep(tmp_path)
    (sweep / "runs" / "run1" / "config.json").unlink()
    collect_sweep(sweep)
    runs = json.loads((sweep / CACHE_DIR / "manifest.json").read_bytes())["runs"]
    assert {rid: entry[0] for rid, entry in runs.items()} == scan_signatures(sweep)
    assert runs["ghost"][0] == "-,-,-,-,-,-" and runs["run1"][0].split(",")[1] == "-"
    assert collect_sweep(sweep).reread == ("live",)


def test_read_all_reads_a_file_that_grew_since_its_stat(tmp_path: Path) -> None:
    path = tmp_path / "grown"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert collect._read_all(fd, 100) == data
    finally:
        os.close(fd)


def test_parse_events_reads_like_the_store(tmp_path: Path) -> None:
    lines = [
        b'{"ts": 1, "state": "submitted", "attempt": 1}',
        b"",
        b'{"ts": 2, "state": "running", "attempt": 1, "host": "h\\u00e9"}\r',
        b"[1, 2]",
        b'{"ts": 3}',
        b'{"ts": 4, "state": 5}',
        b"\xef\xbb\xbf" + b'{"ts": 5, "state": "failed", "attempt": 1}',
        b"\xff\xfe",
        b'{"ts": 6, "state": "completed", "exit_code": 0}',
        b'{"ts": 7, "state": "compl',
    ]
    data = b"\n".join(lines)
    (tmp_path / store.EVENTS).write_bytes(data)
    want = store.read_events(tmp_path)
    assert [e["ts"] for e in want] == [1, 2, 5, 6]
    assert parse_events(data) == want


def test_parse_metrics_counts_blank_and_crlf_lines_per_file() -> None:
    """Files that parse but whose newline count is not their row count (blank lines, CRLF,
    whitespace-only lines) still get their own rows."""
    good = b"".join(json.dumps(x).encode() + b"\n" for x in default_lines())
    blank = b"\n" + good.replace(b"\n", b"\n \n\t\n", 3)
    crlf = good.replace(b"\n", b"\r\n")
    chunks = [good, blank, crlf, good[:-1], b"\n\n", good]
    wide, notes = parse_metrics(chunks)
    runs = wide.column("_run").to_numpy()
    assert [int((runs == i).sum()) for i in range(len(chunks))] == [5, 5, 5, 5, 0, 5]
    assert notes == [""] * len(chunks)
    steps = wide.column("step").to_numpy()
    assert all(list(steps[runs == i]) == [0, 5, 10, 15, 20] for i in (0, 1, 2, 3, 5))


def test_parse_metrics_never_shifts_rows_between_files() -> None:
    """pyarrow reads two objects on one line as two rows and skips blank lines: a file with one
    and a file with the other must not trade rows (their line counts would add up)."""
    good = b"".join(json.dumps(x).encode() + b"\n" for x in default_lines())
    lines = good.split(b"\n")
    two_on_a_line = b"\n".join([lines[0] + b" " + lines[1], *lines[2:]])
    blank = good.replace(b"\n", b"\n\n", 1)
    marker = good + b'{"sweeper.end_of_file": true}\n'
    chunks = [good, two_on_a_line, good, blank, good, marker, good]
    wide, notes = parse_metrics(chunks)
    runs = wide.column("_run").to_numpy()
    assert [int((runs == i).sum()) for i in range(len(chunks))] == [5, 3, 5, 5, 5, 5, 5]
    assert notes[1] == "1 invalid line(s) skipped (line 1)" and notes[3] == ""
    assert notes[5] == "1 invalid line(s) skipped (line 6)"  # no step, as any such line
    steps = wide.column("step").to_numpy()
    assert all(list(steps[runs == i]) == [0, 5, 10, 15, 20] for i in (0, 2, 3, 4, 5, 6))


def test_metrics_parquet_keeps_statistics_only_for_the_run_and_step_columns(
    tmp_path: Path,
) -> None:
    sweep = make_sweep(tmp_path, n=2)
    collect_sweep(sweep)
    meta = pq.ParquetFile(tables.table_path(sweep, "metrics")).metadata
    group = meta.row_group(0)
    stats = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(5)}
    assert stats == {"run_id": True, "step": True, "tokens": True, "metric": False, "value": False}


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1}',
        b'{"a": [1, 2.5, null, true]}\n\t ',
        b' {"a": 1}',
        b"12",
        b'{"a": 1} x',
        b"\xef\xbb\xbf" + b'{"b": 2}',
        '{"\u00e9": 1}'.encode("utf-16"),
        b'{"a": NaN}',
        b"",
        b"{bad",
        b'{"a": "\xff"}',
    ],
)
def test_fast_json_loads_is_json_loads(data: bytes) -> None:
    def outcome(loads: Any) -> tuple[str, Any]:
        try:
            return "ok", loads(data)
        except ValueError as e:
            return type(e).__name__, str(e)

    assert outcome(collect._json_loads) == outcome(json.loads)  # NaN: json's one constant


def test_reading_in_groups_gives_the_same_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs are read and parsed a group at a time; groups of 2 (extra metrics in one group
    only, a bad file in another) must give the tables of one group."""
    sweep = _mixed_sweep(tmp_path)
    lines = [metric_line(s, 4.0, horizon=s in (10, 20), mfu=0.5) for s in (0, 10, 20)]
    write_run(sweep, "run3", lines=lines)
    now = time.time()
    collect_sweep(sweep, parallel=False, now=now)
    want = _contents(sweep)
    monkeypatch.setattr(collect, "_READ_GROUP", 2)
    collect_sweep(sweep, parallel=False, full=True, now=now)
    got = _contents(sweep)
    for name in tables.TABLE_NAMES:
        assert got[name].equals(want[name]), name
    assert "mfu" in set(got["metrics"].column("metric").to_pylist())
