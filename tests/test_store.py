"""Run store: typed events, derived states, safe run directories, damage isolation, locks."""

from __future__ import annotations

import json
import multiprocessing as mp
import multiprocessing.synchronize
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweeper.errors import StoreError
from sweeper.records import RunEvent, RunKind, RunRecord
from sweeper.store import (
    RunState,
    SweepStore,
    append_event,
    derive_state,
    read_event_log,
    read_events,
    read_json,
    write_json_atomic,
)
from trainer.config import TrainConfig


def _record(rid: str, kind: RunKind = RunKind.SINGLE) -> RunRecord:
    train = TrainConfig.from_dict(
        {"model": {"preset": "test-micro"}, "batch_size": 4, "horizons_tokens": [1024]}
    )
    return RunRecord(
        id=rid, slug=rid, kind=kind, parent=None, sweep="s", model="test-micro", train=train
    )


def test_append_and_read_typed_events(tmp_path: Path) -> None:
    append_event(tmp_path, "submitted", backend="local", job_id=None)
    ev = append_event(tmp_path, "running", host="h", pid=1)
    assert isinstance(ev, RunEvent) and ev.attempt == 1
    append_event(tmp_path, "failed", exit_code=1)
    append_event(tmp_path, "running")
    events = read_events(tmp_path)
    assert [e.state for e in events] == ["submitted", "running", "failed", "running"]
    assert [e.attempt for e in events] == [0, 1, 1, 2]
    first = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[0])
    assert "job_id" not in first  # None fields are left out


def test_torn_last_line_is_ignored_and_next_append_survives(tmp_path: Path) -> None:
    append_event(tmp_path, "running")
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"ts": 1, "state": "compl')  # writer killed mid-line
    log = read_event_log(tmp_path)
    assert [e.state for e in log.events] == ["running"] and log.error is None
    append_event(tmp_path, "completed")
    log = read_event_log(tmp_path)
    assert [e.state for e in log.events] == ["running", "completed"] and log.error is None


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"ts": "x", "state": "failed"}', "ts"),
        (b'{"ts": 1, "state": "failed", "pid": "7"}', "pid"),
        (b'{"ts": 1, "state": "failed", "attempt": -1}', "attempt"),
        (b'{"ts": 1, "state": "nope"}', "unknown state"),
        (b'{"ts": 1, "state": "stale"}', "derived"),
        (b"[1, 2]", "JSON object"),
        (b"garbage", "not a JSON event"),
        (b'{"ts": 1, "state": "failed",}', "not a JSON event"),  # complete but invalid JSON
    ],
)
def test_a_bad_line_is_damage_and_the_rest_still_reads(
    tmp_path: Path, line: bytes, why: str
) -> None:
    append_event(tmp_path, "running")
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(line + b"\n")
    append_event(tmp_path, "completed")
    log = read_event_log(tmp_path)
    assert [e.state for e in log.events] == ["running", "completed"]
    assert log.error is not None and "line 2" in log.error and why in log.error


@settings(max_examples=60, deadline=None)
@given(junk=st.lists(st.binary(max_size=40), max_size=6))
def test_read_events_never_fails_on_junk(
    tmp_path_factory: pytest.TempPathFactory, junk: list[bytes]
) -> None:
    d = tmp_path_factory.mktemp("junk")
    append_event(d, "running")
    with open(d / "events.jsonl", "ab") as f:
        f.write(b"\n".join(junk))
    events = read_events(d)
    assert events[0].state == "running"
    assert all(isinstance(e, RunEvent) for e in events)


def test_events_file_that_is_not_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "events.jsonl")  # must not block
    log = read_event_log(tmp_path)
    assert log.events == [] and "not a regular file" in (log.error or "")
    with pytest.raises(StoreError, match="not a regular file"):
        append_event(tmp_path, "running")


def test_derived_states_cannot_be_written(tmp_path: Path) -> None:
    for state in ("planned", "stale", "error"):
        with pytest.raises(StoreError, match="derived"):
            append_event(tmp_path, state)
    with pytest.raises(ValueError):
        append_event(tmp_path, "bogus")


def _ev(state: str, ts: float) -> RunEvent:
    return RunEvent(ts=ts, state=RunState(state))


@pytest.mark.parametrize(
    ("events", "beat", "expected"),
    [
        ([], None, "planned"),
        ([_ev("submitted", 0)], None, "submitted"),
        ([_ev("running", 95)], None, "running"),
        ([_ev("running", 0)], 95.0, "running"),
        ([_ev("running", 0)], 10.0, "stale"),
        ([_ev("running", 0)], None, "stale"),
        ([_ev("running", 0), _ev("completed", 1)], None, "completed"),
        ([_ev("failed", 0), _ev("running", 99)], 1.0, "running"),
    ],
)
def test_derive_state(events: list[RunEvent], beat: float | None, expected: str) -> None:
    assert derive_state(events, beat, now=100.0, stale_after_s=30.0) == expected


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "x" * 300, "a\nb", "/etc"])
def test_run_dir_refuses_escaping_ids(tmp_path: Path, bad: str) -> None:
    store = SweepStore(tmp_path)
    with pytest.raises(StoreError, match="run id"):
        store.run_dir(bad)


def test_records_statuses_and_no_overwrite(tmp_path: Path) -> None:
    store = SweepStore(tmp_path, stale_after_s=60)
    assert store.write_record(_record("b-1"))
    assert store.write_record(_record("a-1"))
    assert not store.write_record(_record("a-1", RunKind.TRUNK))
    assert store.load_record("a-1").kind == RunKind.SINGLE
    (store.runs_dir / "junk").mkdir()  # a directory without run.json: listed, in error
    (store.runs_dir / "notes.txt").write_text("x")  # a file: not a run, a stray
    (store.runs_dir / "bad name").mkdir()  # not a run id: a stray
    assert store.run_ids() == ["a-1", "b-1", "junk"]
    assert len(store.strays()) == 2 and "notes.txt" in store.strays()[1]
    store.append_event("a-1", "running", host="h", pid=5)
    (store.run_dir("a-1") / "heartbeat").touch()
    sts = store.statuses()
    assert sts["a-1"].state is RunState.RUNNING and sts["a-1"].state.is_active()
    assert sts["b-1"].state is RunState.PLANNED
    assert sts["junk"].state is RunState.ERROR and "run.json is missing" in (
        sts["junk"].reason or ""
    )
    assert sts["a-1"].to_dict()["host"] == "h"
    old = time.time() - 3600
    os.utime(store.run_dir("a-1") / "heartbeat", (old, old))
    # a fresh `running` event counts as a beat: an old heartbeat of an earlier attempt is not stale
    assert store.status("a-1").state is RunState.RUNNING
    events = store.run_dir("a-1") / "events.jsonl"
    events.write_text(json.dumps({**json.loads(events.read_text()), "ts": old}) + "\n")
    assert store.status("a-1").state is RunState.STALE


def test_damaged_completed_run_keeps_its_state_with_a_reason(tmp_path: Path) -> None:
    store = SweepStore(tmp_path)
    store.write_record(_record("c-1"))
    store.append_event("c-1", "completed", exit_code=0)
    (store.run_dir("c-1") / "run.json").unlink()
    st = store.status("c-1")
    assert st.state is RunState.COMPLETED and st.reason == "run.json is missing"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda p: p.write_text("{trunc"), "corrupt JSON"),
        (lambda p: p.write_text("[1]"), "JSON object"),
        (
            lambda p: p.write_text(json.dumps({"id": "other", "kind": "single", "train": {}})),
            "does not match",
        ),  # fmt: skip
        (lambda p: p.write_text(json.dumps({"id": "r-1", "kind": "x", "train": {}})), "kind"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: os.mkfifo(p), "not a regular file"),
        (lambda p: p.symlink_to("/etc/hostname"), "symlink"),
    ],
)
def test_damaged_record_is_an_error_with_a_reason(tmp_path: Path, make: object, why: str) -> None:
    store = SweepStore(tmp_path)
    store.write_record(_record("r-1"))
    store.append_event("r-1", "failed", exit_code=1)
    path = store.run_dir("r-1") / "run.json"
    path.unlink()
    make(path)  # type: ignore[operator]
    st = store.status("r-1")
    assert st.state is RunState.ERROR and why in (st.reason or ""), st.reason
    with pytest.raises(StoreError):
        store.load_record("r-1")


def test_symlinked_run_dir_is_never_written_through(tmp_path: Path) -> None:
    store = SweepStore(tmp_path / "sweep")
    outside = tmp_path / "outside"
    outside.mkdir()
    store.runs_dir.mkdir(parents=True)
    (store.runs_dir / "r-1").symlink_to(outside)
    assert not store.write_record(_record("r-1"))
    assert not store.add_horizons("r-1", (512,))
    assert list(outside.iterdir()) == []
    assert store.status("r-1").state is RunState.ERROR


def test_stale_after_comes_from_plan(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "plan.json", {"stale_after_s": 7.5, "runs": []})
    assert SweepStore(tmp_path).stale_after_s == 7.5
    assert SweepStore(tmp_path / "nowhere").stale_after_s == 120.0
    write_json_atomic(tmp_path / "plan.json", {"stale_after_s": "soon"})
    assert SweepStore(tmp_path).stale_after_s == 120.0


def test_damaged_plan_only_loses_the_order(tmp_path: Path) -> None:
    store = SweepStore(tmp_path)
    for rid in ("b-1", "a-1"):
        store.write_record(_record(rid))
    store.write_plan({"runs": ["b-1", "a-1", "../escape", "gone-1"]})
    assert store.plan_order() == ["b-1", "a-1"]
    (tmp_path / "plan.json").write_text('{"runs": 5}')
    assert store.plan_order() == ["a-1", "b-1"]
    (tmp_path / "plan.json").unlink()
    os.mkfifo(tmp_path / "plan.json")  # must not block
    assert store.plan_order() == ["a-1", "b-1"]
    with pytest.raises(StoreError, match="not a regular file"):
        store.write_plan({"runs": []})


def test_read_json_refuses_what_is_not_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"[" + b"1," * 100 + b"1]")
    for name, why in (("fifo", "not a regular file"), ("link", "symlink"), ("nope", "missing")):
        with pytest.raises(StoreError, match=why):
            read_json(tmp_path / name)
    with pytest.raises(StoreError, match="larger than"):
        read_json(tmp_path / "big", max_bytes=10)


def test_is_finished() -> None:
    finished = {s for s in RunState if s.is_finished()}
    assert finished == {
        RunState.COMPLETED,
        RunState.FAILED,
        RunState.DIVERGED,
        RunState.CANCELLED,
        RunState.STOPPED,
    }


def _appender(run_dir: str, n: int) -> None:
    for _ in range(n):
        append_event(Path(run_dir), "running", pid=os.getpid())


def test_concurrent_appends_from_processes_keep_every_line(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(tmp_path), 40)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == 160
    attempts = sorted(json.loads(line)["attempt"] for line in lines)
    assert attempts == list(range(1, 161))  # attempt numbering is serialised by the lock


def _hold_lock(
    root: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event
) -> None:
    with SweepStore(Path(root)).lock():
        ready.set()
        release.wait(30)


def test_sweep_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    p.start()
    assert ready.wait(30)
    with pytest.raises(StoreError, match="locked"):
        with SweepStore(tmp_path).lock(timeout_s=0.2):
            pass
    release.set()
    p.join(30)
    with SweepStore(tmp_path).lock(timeout_s=5):
        pass
