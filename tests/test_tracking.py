"""Tracking mirrors: the ``[tracking]`` section, and TensorBoard event files and W&B offline runs
written by the worker from a run's ``metrics.jsonl``, continued (not duplicated) on resume."""

from __future__ import annotations

import json
import os
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sweeper import Sweep, plan
from sweeper import tracking as tr
from sweeper.errors import SpecError
from sweeper.spec import parse_spec_text
from sweeper.store import read_events
from sweeper.worker import run_trial

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

# Stands in for `python -m trainer`: 10 steps of 4 x 16 tokens, one line per step (a horizon line
# with val_loss at steps 5 and 10). Like the real trainer, a resumed attempt rewrites metrics.jsonl
# without the lines at or after its checkpoint (ckpt.step) before logging them again.
# FAKE_CRASH_AT=n: checkpoint at step 4, log up to n, exit 1. FAKE_OFFSET shifts every loss.
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    a = sys.argv[1:]
    out = Path(a[a.index("--out") + 1])
    ckpt = out / "ckpt.step"
    start = int(ckpt.read_text()) if ckpt.exists() else 0
    path = out / "metrics.jsonl"
    old = path.read_text().splitlines() if path.exists() else []
    kept = [x for x in old if json.loads(x)["step"] < start]
    (out / ".m.tmp").write_text("".join(x + "\\n" for x in kept))
    os.replace(out / ".m.tmp", path)
    crash = int(os.environ.get("FAKE_CRASH_AT", "-1"))
    offset = float(os.environ.get("FAKE_OFFSET", "0"))
    with open(path, "a") as f:
        for s in range(start, 11):
            line = {"step": s, "tokens": 64 * s, "train_loss": 1 / (s + 1) + offset,
                    "output_norm": 1 + s / 10}
            if s in (5, 10):
                line.update(val_loss=2 / (s + 1), horizon=True)
            f.write(json.dumps(line) + "\\n")
            f.flush()
            if s == 4:
                ckpt.write_text("4")
            if s == crash:
                sys.exit(1)
            time.sleep(0.03)
    summary = {"status": "completed", "step": 10, "tokens": 640, "final_loss": 1 / 11}
    (out / "summary.json").write_text(json.dumps(summary))
    """
)


def spec_text(fake: Path, tracking: str, name: str = "tracked") -> str:
    return textwrap.dedent(
        f"""
        name = "{name}"
        [[models]]
        preset = "test-micro"
        [grid]
        lr = [0.0078125]
        batch_size = [4]
        horizons_tokens = [320, 640]
        [backend]
        command = [{json.dumps(sys.executable)}, {json.dumps(str(fake))}]
        [tracking]
        """
    ) + textwrap.dedent(tracking)


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and nothing written outside tmp_path by W&B."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def make_sweep(tmp_path: Path, tracking: str) -> tuple[Sweep, str, Path]:
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    spec = tmp_path / "tracked.toml"
    spec.write_text(spec_text(fake, tracking))
    sweep = Sweep.create(spec, tmp_path / "results")
    rid = sweep.store.run_ids()[0]
    return sweep, rid, sweep.store.run_dir(rid)


def tb_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a scalar, as TensorBoard's own event reader sees the directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a W&B ``.wandb`` file (a LevelDB-style log of protobuf ``Record``s:
    7-byte header, then 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if size == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):  # full or last chunk
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_run(run_dir: Path) -> list[dict[str, Any]]:
    """Each offline run directory of a run, oldest first: its id, tags, config and history."""
    runs = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        info: dict[str, Any] = {"history": []}
        for rec in wandb_records(next(d.glob("*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info["id"], info["tags"] = rec.run.run_id, list(rec.run.tags)
                info["config"] = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            elif kind == "history":
                items = rec.history.item
                info["history"].append({_key(i): json.loads(i.value_json) for i in items})
        runs.append(info)
    return runs


def _key(item: Any) -> str:
    return str(item.key or "/".join(item.nested_key))


# ------------------------------------------------------------------------------------- section


def test_section_is_parsed_and_reaches_every_record(tmp_path: Path) -> None:
    text = spec_text(tmp_path / "t.py", 'tensorboard = true\nwandb = {project = "p"}\n')
    spec = parse_spec_text(text, "s.toml")
    config = spec.section("tracking")
    assert config == tr.TrackingConfig(tensorboard=True, wandb=tr.WandbConfig(project="p"))
    (run,) = plan(spec)
    assert run.params is not None
    assert tr.TrackingConfig.from_params(run.params["tracking"]) == config
    assert tr.run_tags(run) == ["model:test-micro", "B:4", "lr:2^-7", "D:640"]
    assert tr.TrackingConfig.in_run_id is False  # observing a run is not part of what it trains


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"tensorbord": True}, "tracking.tensorbord = True: unknown key"),
        ({"tensorboard": "yes"}, "tracking.tensorboard = 'yes': expected true or false"),
        ({"wandb": True}, "tracking.wandb = True: expected {project"),
        ({"wandb": {"mode": "offline"}}, "tracking.wandb.project = None: expected a name"),
        ({"wandb": {"project": "a/b"}}, "tracking.wandb.project = 'a/b'"),
        ({"wandb": {"project": "p", "mode": "dryrun"}}, "expected one of offline, online"),
        ({"wandb": {"project": "p", "key": "x"}}, "tracking.wandb.key = 'x': unknown key"),
        ({"poll_s": 0}, "tracking.poll_s = 0: must be a number of seconds"),
    ],
)
def test_bad_sections_are_one_line_spec_errors(table: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as e:
        tr.parse_section(table, "s.toml")
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["wandb", "tensorboard"])
def test_a_missing_package_is_refused_at_plan_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setattr(tr, "_installed", lambda package: package != missing)
    text = spec_text(tmp_path / "t.py", 'tensorboard = true\nwandb = {project = "p"}\n')
    with pytest.raises(SpecError) as e:
        parse_spec_text(text, "s.toml")
    assert str(e.value) == (
        f"s.toml: tracking.{missing}: the {missing} package is not installed "
        "(pip install 'sweeper[tracking]')"
    )


def test_tail_follows_appends_replacements_and_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    tail = tr._Tail(path)
    assert tail.read() == []
    path.write_bytes(b"a\nb\npar")
    assert tail.read() == [b"a", b"b"]
    with open(path, "ab") as f:
        f.write(b"tial\n")
    assert tail.read() == [b"partial"]
    tmp = tmp_path / "new"
    tmp.write_bytes(b"a\nc\n")
    os.replace(tmp, path)  # a resumed trainer's rewrite: read again from the start
    assert tail.read() == [b"a", b"c"]


# ------------------------------------------------------------------------------------- mirrors


def test_mirrors_follow_the_run_and_resume_continues_the_same_tracker_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep, rid, run_dir = make_sweep(
        tmp_path, 'tensorboard = true\nwandb = {project = "sweeper-test"}\npoll_s = 0.1\n'
    )
    monkeypatch.setenv("FAKE_CRASH_AT", "6")  # checkpoint at 4, killed after logging 6
    assert run_trial(sweep.root, rid, backend="local")["state"] == "failed"
    assert json.loads((run_dir / "tracking.json").read_text()) == {"tensorboard": 6, "wandb": 6}
    assert [s for s, _ in tb_scalars(run_dir / "tb", "train_loss")] == list(range(7))
    monkeypatch.delenv("FAKE_CRASH_AT")
    assert run_trial(sweep.root, rid, backend="local")["state"] == "completed"

    # TensorBoard: one log dir, every step exactly once, the values of metrics.jsonl
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = tb_scalars(run_dir / "tb", "train_loss")
    assert [s for s, _ in got] == [m["step"] for m in metrics] == list(range(11))
    assert [v for _, v in got] == pytest.approx([m["train_loss"] for m in metrics])
    assert [s for s, _ in tb_scalars(run_dir / "tb", "val_loss")] == [5, 10]
    assert [v for _, v in tb_scalars(run_dir / "tb", "tokens")] == [64.0 * s for s in range(11)]

    # W&B: two offline directories of one run (`wandb sync` joins them), history continued
    first, second = wandb_run(run_dir)
    assert first["id"] == second["id"] == rid
    assert [h["_step"] for h in first["history"]] == list(range(7))
    assert [h["_step"] for h in second["history"]] == list(range(7, 11))
    assert second["history"][-1]["train_loss"] == pytest.approx(1 / 11)
    assert second["history"][-1]["val_loss"] == pytest.approx(2 / 11)
    assert first["tags"] == ["model:test-micro", "B:4", "lr:2^-7", "D:640"]
    config = first["config"]
    assert config["lr"] == 0.0078125 and config["batch_size"] == 4 and config["run_id"] == rid
    assert config["train"]["horizons_tokens"] == [320, 640]
    assert "sweeper: tracking" not in (run_dir / "stderr.log").read_text()
    assert [e.state for e in read_events(run_dir)] == ["running", "failed", "running", "completed"]


def test_restart_purges_tensorboard_from_step_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep, rid, run_dir = make_sweep(tmp_path, "tensorboard = true\npoll_s = 0.1\n")
    monkeypatch.setenv("FAKE_CRASH_AT", "6")
    assert run_trial(sweep.root, rid, backend="local")["state"] == "failed"
    sweep.restart_run(rid)  # deletes metrics.jsonl: the next attempt starts at step 0
    (run_dir / "ckpt.step").unlink()
    monkeypatch.delenv("FAKE_CRASH_AT")
    monkeypatch.setenv("FAKE_OFFSET", "1")
    assert run_trial(sweep.root, rid, backend="local")["state"] == "completed"
    got = tb_scalars(run_dir / "tb", "train_loss")
    assert [s for s, _ in got] == list(range(11))
    assert [v for _, v in got] == pytest.approx([1 / (s + 1) + 1 for s in range(11)])


def test_a_failing_tracker_never_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from torch.utils.tensorboard import SummaryWriter

    def no_network(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("no network\nat all")

    def broken(*_a: Any, **_k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(wandb, "init", no_network)
    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    sweep, rid, run_dir = make_sweep(
        tmp_path, 'tensorboard = true\nwandb = {project = "p"}\npoll_s = 0.1\n'
    )
    assert run_trial(sweep.root, rid, backend="local")["state"] == "completed"
    logged = [x for x in (run_dir / "stderr.log").read_text().splitlines() if "tracking" in x]
    assert logged == [
        "sweeper: tracking: wandb: cannot start (RuntimeError: no network at all); not mirrored",
        "sweeper: tracking: tensorboard: OSError: disk full; mirroring stopped",
    ]


def test_a_record_without_tracking_starts_no_mirror(tmp_path: Path) -> None:
    spec = parse_spec_text(spec_text(tmp_path / "t.py", ""), "s.toml")
    (run,) = plan(spec)
    assert tr.start_mirror(run, tmp_path) is None  # empty [tracking]: nothing enabled
    tr.stop_mirror(None)
