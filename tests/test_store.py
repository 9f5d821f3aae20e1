"""Run store: events, derived states, safe run directories, locks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweeper.errors import StoreError
from sweeper.store import (
    RunState,
    SweepStore,
    append_event,
    derive_state,
    read_events,
    write_json_atomic,
)


def _record(rid: str) -> dict:
    return {"id": rid, "kind": "single", "parent": None, "train": {}, "derived": {}}


def test_append_and_read_events(tmp_path: Path) -> None:
    append_event(tmp_path, "submitted", backend="local", job_id=None)
    ev = append_event(tmp_path, "running", host="h", pid=1)
    assert ev["attempt"] == 1
    append_event(tmp_path, "failed", exit_code=1)
    append_event(tmp_path, "running")
    events = read_events(tmp_path)
    assert [e["state"] for e in events] == ["submitted", "running", "failed", "running"]
    assert [e["attempt"] for e in events] == [0, 1, 1, 2]
    assert "job_id" not in events[0]  # None fields are left out


def test_torn_last_line_is_ignored_and_next_append_survives(tmp_path: Path) -> None:
    append_event(tmp_path, "running")
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"ts": 1, "state": "compl')  # writer killed mid-line
    assert [e["state"] for e in read_events(tmp_path)] == ["running"]
    append_event(tmp_path, "completed")
    assert [e["state"] for e in read_events(tmp_path)] == ["running", "completed"]


@settings(max_examples=60, deadline=None)
@given(junk=st.lists(st.binary(max_size=40), max_size=6))
def test_read_events_never_fails_on_junk(
    tmp_path_factory: pytest.TempPathFactory, junk: list
) -> None:
    d = tmp_path_factory.mktemp("junk")
    append_event(d, "running")
    with open(d / "events.jsonl", "ab") as f:
        f.write(b"\n".join(junk))
    events = read_events(d)
    assert events[0]["state"] == "running"
    assert all(isinstance(e["state"], str) for e in events)


def test_derived_states_cannot_be_written(tmp_path: Path) -> None:
    for state in ("planned", "stale"):
        with pytest.raises(StoreError, match="derived"):
            append_event(tmp_path, state)
    with pytest.raises(ValueError):
        append_event(tmp_path, "bogus")


@pytest.mark.parametrize(
    ("events", "beat", "expected"),
    [
        ([], None, "planned"),
        ([{"state": "submitted", "ts": 0}], None, "submitted"),
        ([{"state": "running", "ts": 95}], None, "running"),
        ([{"state": "running", "ts": 0}], 95.0, "running"),
        ([{"state": "running", "ts": 0}], 10.0, "stale"),
        ([{"state": "running", "ts": 0}], None, "stale"),
        ([{"state": "running", "ts": 0}, {"state": "completed", "ts": 1}], None, "completed"),
        ([{"state": "failed", "ts": 0}, {"state": "running", "ts": 99}], 1.0, "running"),
    ],
)
def test_derive_state(events: list, beat: float | None, expected: str) -> None:
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
    assert not store.write_record({**_record("a-1"), "kind": "trunk"})
    assert store.load_record("a-1")["kind"] == "single"
    (store.runs_dir / "junk").mkdir()  # a directory without run.json is not a run
    assert store.run_ids() == ["a-1", "b-1"]
    store.append_event("a-1", "running", host="h", pid=5)
    (store.run_dir("a-1") / "heartbeat").touch()
    st = store.statuses()
    assert st["a-1"].state is RunState.RUNNING and st["a-1"].state.is_active()
    assert st["b-1"].state is RunState.PLANNED
    assert st["a-1"].to_dict()["host"] == "h"
    old = time.time() - 3600
    os.utime(store.run_dir("a-1") / "heartbeat", (old, old))
    # a fresh `running` event counts as a beat: an old heartbeat of an earlier attempt is not stale
    assert store.status("a-1").state is RunState.RUNNING
    events = store.run_dir("a-1") / "events.jsonl"
    events.write_text(json.dumps({**json.loads(events.read_text()), "ts": old}) + "\n")
    assert store.status("a-1").state is RunState.STALE


def test_stale_after_comes_from_plan(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "plan.json", {"backend": {"stale_after_s": 7.5}, "runs": []})
    assert SweepStore(tmp_path).stale_after_s == 7.5
    assert SweepStore(tmp_path / "nowhere").stale_after_s == 120.0


def test_is_finished() -> None:
    finished = {s for s in RunState if s.is_finished()}
    assert finished == {RunState.COMPLETED, RunState.FAILED, RunState.DIVERGED, RunState.CANCELLED}


def test_corrupt_record_is_a_store_error(tmp_path: Path) -> None:
    store = SweepStore(tmp_path)
    store.run_dir("r-1").mkdir(parents=True)
    (store.run_dir("r-1") / "run.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        store.load_record("r-1")


def _appender(run_dir: str, n: int) -> None:
    for i in range(n):
        append_event(Path(run_dir), "running", pid=os.getpid(), i=i)


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


def _hold_lock(root: str, ready: mp.synchronize.Event, release: mp.synchronize.Event) -> None:
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
