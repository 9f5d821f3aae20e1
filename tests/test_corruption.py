"""Damaged run and sweep directories: damage stays with its run.

A small finished sweep (three completed runs, one failed, one cancelled, one diverged) is written
through the real APIs (``Sweep.create``, ``append_event``, the trainer's file names); each case
damages one run (or one sweep-level file) and then drives the real CLI in-process:

* ``sweeper status`` (table and JSON) lists every other run with its state, and the damaged run as
  ``error`` (or its true state) with a reason naming the file;
* ``sweeper resume --dry-run`` and ``sweeper launch`` neither traceback nor select a completed or
  damaged run (a damaged sweep-level input may refuse with one line naming it);
* every completed run's files are byte-identical afterwards.

Summary and config cross-checks belong to ``collect`` and are tested there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sweeper import Sweep, tables
from sweeper.cli import main
from sweeper.store import SweepStore
from trainer.schema import CKPT_DIR, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

SPEC = """
name = "c"
[[models]]
preset = "test-micro"
[data]
kind = "synthetic"
synthetic_tokens = 200000
[grid]
lr = [0.0078125, 0.03125, 0.125]
batch_size = [4, 8]
horizons_tokens = [1024, 2048]
[train]
log_every = 4
val_tokens = 256
threads = 1
[backend]
command = [{python}, "-c", "raise SystemExit(1)"]
stale_after_s = 30
"""
# The template's runs, in sorted id order, end in these states.
STORIES = ["completed", "completed", "completed", "failed", "cancelled", "diverged"]
C, F = 0, 3  # the two runs the cases damage: a completed one and a failed one


# ------------------------------------------------------------------------------------ the template


def _finish(store: SweepStore, rid: str, state: str) -> None:
    """Events and files of a run that ended in ``state``."""
    store.append_event(rid, "submitted", backend="local", host="node1", pid=100)
    store.append_event(rid, "running", backend="local", host="node1", pid=101)
    rd = store.run_dir(rid)
    record = store.load_record(rid)
    last, per_step = record.steps, record.tokens_per_step
    lines = [
        {"step": s, "tokens": s * per_step, "train_loss": 5.0 - s / 100}
        for s in range(0, last + 1, 4)
    ]
    (rd / METRICS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (rd / CONFIG_FILE).write_text(json.dumps(record.train.to_dict()))
    (rd / CKPT_DIR).mkdir()
    (rd / CKPT_DIR / "step_8.pt").write_bytes(os.urandom(256))
    if state == "completed":
        summary = {"status": "completed", "step": last, "tokens": last * per_step}
        (rd / SUMMARY_FILE).write_text(json.dumps(summary))
    elif state == "diverged":
        summary = {"status": "diverged", "step": 8, "tokens": 8 * per_step, "diverged_step": 8}
        (rd / SUMMARY_FILE).write_text(json.dumps(summary))
    codes = {"completed": 0, "failed": 1, "cancelled": 75, "diverged": 3}
    store.append_event(rid, state, backend="local", exit_code=codes[state], reason=f"it {state}")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/results/c`` holding the finished sweep, and ``<tmp>/c.toml``."""
    root = tmp_path_factory.mktemp("template")
    spec = root / "c.toml"
    spec.write_text(SPEC.format(python=json.dumps(sys.executable)))
    store = Sweep.create(spec, root / "results").store
    ids = store.run_ids()
    assert len(ids) == len(STORIES)
    for rid, state in zip(ids, STORIES, strict=True):
        _finish(store, rid, state)
    result = Sweep.open(store.root).collect()  # each case's collect then re-reads only its damage
    assert result.problems == {}, result.problems
    return root


@dataclass
class World:
    """A fresh copy of the template for one case."""

    root: Path
    spec: Path
    results: Path
    store: SweepStore
    ids: list[str]
    outside: Path  # a directory outside the sweep that symlinks point into

    def rd(self, i: int) -> Path:
        return self.store.run_dir(self.ids[i])


@pytest.fixture
def world(template: Path, tmp_path: Path) -> World:
    shutil.copytree(template, tmp_path / "w", symlinks=True)
    root = tmp_path / "w"
    store = SweepStore(root / "results" / "c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not touch\n")
    return World(root, root / "c.toml", root / "results", store, store.run_ids(), outside)


# ------------------------------------------------------------------------------------ corruptions


def _event_line(**fields: Any) -> bytes:
    return json.dumps({"ts": time.time(), "state": "failed", "attempt": 1, **fields}).encode()


def append(raw: bytes) -> Callable[[World, Path], None]:
    """Append one raw line to the damaged run's events."""

    def apply(w: World, rd: Path) -> None:
        with open(rd / "events.jsonl", "ab") as f:
            f.write(raw + b"\n")

    return apply


def before_last(raw: bytes) -> Callable[[World, Path], None]:
    """Insert one raw line before the last event (a completed run stays completed)."""

    def apply(w: World, rd: Path) -> None:
        lines = (rd / "events.jsonl").read_bytes().splitlines()
        (rd / "events.jsonl").write_bytes(b"\n".join([*lines[:-1], raw, lines[-1]]) + b"\n")

    return apply


def replace(name: str, make: Callable[[Path, World], None]) -> Callable[[World, Path], None]:
    """Remove file ``name`` of the run and let ``make(path, world)`` put something in its place."""

    def apply(w: World, rd: Path) -> None:
        path = rd / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
        make(path, w)

    return apply


def at_sweep(name: str, make: Callable[[Path, World], None]) -> Callable[[World, Path], None]:
    """Damage a sweep-level file instead of a run's."""

    def apply(w: World, rd: Path) -> None:
        replace(name, make)(w, w.store.root)

    return apply


def text(data: str | bytes) -> Callable[[Path, World], None]:
    blob = data.encode() if isinstance(data, str) else data
    return lambda p, w: p.write_bytes(blob)


def json_of(obj: Any) -> Callable[[Path, World], None]:
    return lambda p, w: p.write_text(json.dumps(obj))


def nothing(p: Path, w: World) -> None:
    pass


def a_dir(p: Path, w: World) -> None:
    p.mkdir()


def a_fifo(p: Path, w: World) -> None:
    os.mkfifo(p)


def a_socket(p: Path, w: World) -> None:
    short = Path(tempfile.mkdtemp(dir=p.parent.anchor + "tmp")) / "s"  # AF_UNIX paths are short
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(short))
    s.close()
    os.rename(short, p)
    short.parent.rmdir()


def link_outside(p: Path, w: World) -> None:
    p.symlink_to(w.outside / "precious.txt")


def link_dev_zero(p: Path, w: World) -> None:
    p.symlink_to("/dev/zero")


def sparse_50mb(p: Path, w: World) -> None:
    with open(p, "wb") as f:
        f.write(b"garbage\x00" * 1024)
        f.truncate(50 << 20)


def record_edit(**changes: Any) -> Callable[[Path, World], None]:
    """The run's pristine ``run.json`` with top-level ``changes`` (``train.<key>`` reaches in)."""

    def make(p: Path, w: World) -> None:
        doc = json.loads(pristine(w, p.parent.name).read_text())
        for k, v in changes.items():
            if k.startswith("train."):
                doc["train"][k.removeprefix("train.")] = v
            else:
                doc[k] = v
        p.write_text(json.dumps(doc))

    return make


def pristine(w: World, rid: str) -> Path:
    """Where the test keeps a copy of a run's record before damaging it."""
    return w.root / f".{rid}.run.json"


def run_dir_outside(w: World, rd: Path) -> None:
    target = w.outside / "run"
    shutil.copytree(rd, target)
    shutil.rmtree(rd)
    rd.symlink_to(target)


def run_dir_file(w: World, rd: Path) -> None:
    shutil.rmtree(rd)
    rd.write_text("not a run\n")


def new_entry(name: str, make: Callable[[Path, World], None]) -> Callable[[World, Path], None]:
    """Add an entry ``runs/<name>`` (the damaged "run" is then that entry)."""

    def apply(w: World, rd: Path) -> None:
        make(w.store.runs_dir / name, w)

    return apply


@dataclass(frozen=True)
class Damage:
    """One corruption.

    Attributes:
        id: The case id.
        target: Index of the run damaged (C: completed, F: failed), or an entry name under runs/.
        apply: Does the damage.
        expect: ``error`` (the run's state), ``same`` (its true state), ``gone`` (no longer a run:
            reported on stderr), ``stray`` (an extra entry that is not a run), ``sweep`` (a
            sweep-level file: launch/resume may refuse with one line naming ``word``).
        word: What the reason (or the refusal) must name.
        selectable: Whether resume may pick the damaged run.
    """

    id: str
    target: int | str
    apply: Callable[[World, Path], None]
    expect: str
    word: str | None = None
    selectable: bool = False


EV = "events.jsonl"
REC = "run.json"
DAMAGES = [
    # ---- one bad event line (after the failed run's last event)
    Damage("event-ts-string", F, append(_event_line(ts="yesterday")), "error", EV),
    Damage("event-pid-string", F, append(_event_line(pid="123")), "error", EV),
    Damage("event-attempt-negative", F, append(_event_line(attempt=-1)), "error", EV),
    Damage("event-attempt-string", F, append(_event_line(attempt="2")), "error", EV),
    Damage("event-state-unknown", F, append(_event_line(state="exploded")), "error", EV),
    Damage("event-state-derived", F, append(_event_line(state="error")), "error", EV),
    Damage("event-state-missing", F, append(b'{"ts": 1.0, "attempt": 1}'), "error", EV),
    Damage("event-ts-bool", F, append(_event_line(ts=True)), "error", EV),
    Damage("event-exit-code-float", F, append(_event_line(exit_code=1.5)), "error", EV),
    Damage("event-reason-list", F, append(_event_line(reason=["a"])), "error", EV),
    Damage("event-host-int", F, append(_event_line(host=5)), "error", EV),
    Damage("event-not-an-event", F, append(b'{"foo": 1}'), "error", EV),
    Damage("event-ts-nan", F, append(b'{"ts": NaN, "state": "failed", "attempt": 1}'), "error", EV),
    Damage(
        "event-ts-overflow", F, append(_event_line(ts=1).replace(b"1,", b"1e999,")), "error", EV
    ),
    Damage("event-array", F, append(b"[1, 2]"), "error", EV),
    Damage("event-number", F, append(b"5"), "error", EV),
    Damage("event-plain-text", F, append(b"hello world"), "error", EV),
    Damage("event-nul-bytes", F, append(b"\x00\x00\x00"), "error", EV),
    Damage("event-invalid-utf8", F, append(b"\xff\xfe\xfd"), "error", EV),
    Damage("event-torn-last-line", F, append(b'{"ts": 1.0, "state": "compl'), "same"),
    Damage("event-markup-reason", F, append(_event_line(reason="[/oops] [bold red]x[/]")), "same"),
    Damage("event-bad-before-completed", C, before_last(_event_line(pid="x")), "same", EV),
    # ---- the events file itself
    Damage("events-directory", F, replace(EV, a_dir), "error", EV),
    Damage("events-fifo", F, replace(EV, a_fifo), "error", EV),
    Damage("events-socket", F, replace(EV, a_socket), "error", EV),
    Damage("events-symlink-outside", F, replace(EV, link_outside), "error", EV),
    Damage("events-symlink-dev-zero", F, replace(EV, link_dev_zero), "error", EV),
    Damage("events-50mb-garbage", F, replace(EV, sparse_50mb), "error", EV),
    Damage("events-50mb-garbage-completed", C, replace(EV, sparse_50mb), "error", EV),
    # ---- the record
    Damage("record-deleted", F, replace(REC, nothing), "error", REC),
    Damage("record-deleted-completed", C, replace(REC, nothing), "same", REC),
    Damage(
        "record-truncated", F, replace(REC, text('{"record_version": 2, "id": "x')), "error", REC
    ),  # fmt: skip
    Damage("record-empty", F, replace(REC, text("")), "error", REC),
    Damage("record-wrong-id", F, replace(REC, record_edit(id="other-1234")), "error", REC),
    Damage("record-not-an-object", F, replace(REC, json_of([1, 2, 3])), "error", REC),
    Damage("record-bad-kind", F, replace(REC, record_edit(kind="sideways")), "error", REC),
    Damage("record-train-not-object", F, replace(REC, record_edit(train=[])), "error", REC),
    Damage("record-symlink-outside", F, replace(REC, link_outside), "error", REC),
    Damage("record-directory", F, replace(REC, a_dir), "error", REC),
    Damage("record-fifo", F, replace(REC, a_fifo), "error", REC),
    Damage(
        "record-train-invalid", F, replace(REC, record_edit(**{"train.batch_size": "x"})), "same"
    ),  # fmt: skip
    # ---- the run directory and its neighbours
    Damage("run-dir-symlink-outside", F, run_dir_outside, "error", "symlink"),
    Damage("run-dir-is-a-file", F, run_dir_file, "gone", "a file"),
    Damage(
        "run-dir-without-anything", "zz-empty-0000", new_entry("zz-empty-0000", a_dir), "error", REC
    ),  # fmt: skip
    Damage(
        "run-entry-fifo", "zz-fifo-0000", new_entry("zz-fifo-0000", a_fifo), "error", "directory"
    ),  # fmt: skip
    Damage(
        "stray-dir-bad-name", "bad name!", new_entry("bad name!", a_dir), "stray", "bad name!"
    ),  # fmt: skip
    Damage("stray-file", "notes.txt", new_entry("notes.txt", text("hi")), "stray", "notes.txt"),
    Damage("stray-hidden", ".DS_Store", new_entry(".DS_Store", text("x")), "stray"),
    # ---- other files of a run
    Damage("heartbeat-directory", F, replace("heartbeat", a_dir), "same"),
    Damage("trainer-pid-garbage", F, replace("trainer.pid", text("\xff{garbage")), "same"),
    Damage("horizons-garbage", C, replace("horizons.json", text("[[[")), "same"),
    Damage("horizons-directory", C, replace("horizons.json", a_dir), "same"),
    Damage("horizons-fifo", C, replace("horizons.json", a_fifo), "same"),
    Damage("run-lock-directory", F, replace(".lock", a_dir), "error", ".lock"),
    Damage("run-lock-symlink-outside", F, replace(".lock", link_outside), "error", ".lock"),
    Damage("run-lock-completed", C, replace(".lock", a_fifo), "same", ".lock"),
    Damage("summary-corrupt", C, replace(SUMMARY_FILE, text("{nope")), "same"),
    Damage("metrics-garbage", C, replace(METRICS_FILE, text(b"\xff\x00[1,\n{}\n")), "same"),
    Damage("metrics-directory", C, replace(METRICS_FILE, a_dir), "same"),
    Damage("ckpt-is-a-file", C, replace(CKPT_DIR, text("x")), "same"),
    # ---- sweep-level files
    Damage("plan-runs-int", F, at_sweep("plan.json", json_of({"runs": 5})), "sweep"),
    Damage("plan-corrupt", F, at_sweep("plan.json", text("{{{")), "sweep"),
    Damage(
        "plan-stale-after-inf", F, at_sweep("plan.json", text('{"stale_after_s": 1e999}')), "sweep"
    ),
    Damage("plan-missing", F, at_sweep("plan.json", nothing), "sweep"),
    Damage("plan-directory", F, at_sweep("plan.json", a_dir), "sweep", "plan.json"),
    Damage("plan-fifo", F, at_sweep("plan.json", a_fifo), "sweep", "plan.json"),
    Damage(
        "plan-evil-ids", F, at_sweep("plan.json", json_of({"runs": ["../x", "nope"]})), "sweep"
    ),  # fmt: skip
    Damage(
        "plan-stale-after-string",
        F,
        at_sweep("plan.json", json_of({"stale_after_s": "x"})),
        "sweep",
    ),  # fmt: skip
    Damage(
        "extra-points-corrupt",
        F,
        at_sweep("extra_points.json", text("[{")),
        "sweep",
        "extra_points.json",
    ),  # fmt: skip
    Damage(
        "extra-points-bad-point",
        F,
        at_sweep("extra_points.json", json_of([{"model": "nope", "lr": -1, "batch_size": 4}])),
        "sweep",
        "extra_points.json",
    ),  # fmt: skip
    Damage(
        "extra-points-nan",
        F,
        at_sweep(
            "extra_points.json", text('[{"model": "test-micro", "lr": NaN, "batch_size": 4}]')
        ),
        "sweep",
        "extra_points.json",
    ),
    Damage(
        "extra-points-fifo", F, at_sweep("extra_points.json", a_fifo), "sweep", "extra_points.json"
    ),  # fmt: skip
    Damage("sweep-lock-directory", F, at_sweep(".lock", a_dir), "sweep", ".lock"),
    Damage("status-cache-garbage", F, at_sweep(".cache", a_dir), "sweep"),
]


# ----------------------------------------------------------------------------------------- checks


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``sweeper ARGS`` in-process; any exception but SystemExit fails the test (a traceback)."""
    try:
        main(list(args))
        code: Any = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return int(code or 0), out, err


def files_of(rd: Path) -> dict[str, str]:
    """Every entry under a run directory with a digest of its content (links and specials by
    kind, never followed or opened)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(rd):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p.relative_to(rd))] = f"link:{os.readlink(p)}"
            elif p.is_file():
                out[str(p.relative_to(rd))] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p.relative_to(rd))] = "dir" if p.is_dir() else "special"
    return out


def completed_files(w: World) -> dict[str, dict[str, str]]:
    return {
        w.ids[i]: files_of(w.rd(i))
        for i, state in enumerate(STORIES)
        if state == "completed" and w.rd(i).is_dir()
    }


def check_status(w: World, d: Damage, rows: list[dict[str, Any]], err: str) -> None:
    """Every undamaged run in its state; the damaged one as the case expects."""
    by_id = {r["run_id"]: r for r in rows}
    target = w.ids[d.target] if isinstance(d.target, int) else d.target
    for i, rid in enumerate(w.ids):
        if rid != target or d.expect in ("sweep", "stray"):
            assert by_id[rid]["state"] == STORIES[i], (rid, by_id[rid])
    if d.expect in ("error", "same"):
        row = by_id[target]
        want = "error" if d.expect == "error" else STORIES[d.target]  # type: ignore[index]
        assert row["state"] == want, row
        if d.word is not None:
            assert d.word in (row["reason"] or ""), row
    elif d.expect in ("gone", "stray"):
        assert target not in by_id
        if d.word is not None:
            assert d.word in err, err


def check_start(w: World, d: Damage, code: int, out: str, err: str) -> None:
    """A resume or launch: no completed (or damaged) run selected; a refusal is one line."""
    if code == 2:
        assert d.expect == "sweep" and d.word is not None, err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and d.word in lines[0], err
        return
    assert code in (0, 1), err
    for i, state in enumerate(STORIES):
        if state == "completed":
            assert w.ids[i] not in out, out
    if isinstance(d.target, int) and not d.selectable and d.expect != "sweep":
        if d.expect == "error" or d.id == "record-train-invalid":
            assert w.ids[d.target] not in out, out


def check_collect(w: World, d: Damage, code: int, err: str) -> None:
    """A collect: no traceback; every undamaged run keeps a row without a problem (a damaged
    sweep-level input may refuse with one line)."""
    if code == 2:
        assert d.expect == "sweep", err
        assert len([x for x in err.splitlines() if x.startswith("error: ")]) == 1, err
        return
    assert code in (0, 1), err
    rows = {r["run_id"]: r for r in tables.read_sweep_table(w.store.root, "runs").to_pylist()}
    target = w.ids[d.target] if isinstance(d.target, int) else d.target
    for i, rid in enumerate(w.ids):
        if rid != target or d.expect in ("sweep", "stray"):
            assert rows[rid]["state"] == STORIES[i] and rows[rid]["problem"] is None, rows[rid]
    if d.expect == "error" and target in rows:
        assert rows[target]["problem"] or rows[target]["state"] == "error", rows[target]


@pytest.mark.parametrize("d", DAMAGES, ids=[d.id for d in DAMAGES])
def test_damage_stays_with_its_run(
    d: Damage, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    w = world
    for rid in w.ids:  # for the cases that rewrite a record
        pristine(w, rid).write_bytes((w.store.run_dir(rid) / "run.json").read_bytes())
    rd = w.rd(d.target) if isinstance(d.target, int) else w.store.runs_dir / d.target
    d.apply(w, rd)
    kept = completed_files(w)
    outside = files_of(w.outside)
    res = ["--results", str(w.results)]

    code, out, err = run_cli(capsys, "status", "c", *res, "--format", "json")
    assert code in (0, 1), err
    check_status(w, d, json.loads(out), err)
    code, out, err = run_cli(capsys, "status", "c", *res)  # the rich table
    assert code in (0, 1), err

    code, out, err = run_cli(capsys, "resume", "c", *res, "--dry-run")
    check_start(w, d, code, out, err)
    code, out, err = run_cli(capsys, "launch", str(w.spec), *res, "--no-progress")
    check_start(w, d, code, out, err)

    code, out, err = run_cli(capsys, "collect", "c", *res)
    check_collect(w, d, code, err)

    assert completed_files(w) == kept, "a completed run's files changed"
    assert files_of(w.outside) == outside, "something was written outside the sweep"
    code, out, err = run_cli(capsys, "status", "c", *res, "--format", "json")
    assert code in (0, 1), err
    check_status(w, d, json.loads(out), err)


def test_at_least_forty_corruptions() -> None:
    assert len(DAMAGES) >= 40


# ------------------------------------------------------------------ silent wrong data (collect)


def _edit_lr(w: World, rd: Path) -> None:
    doc = json.loads((rd / "run.json").read_text())
    doc["train"]["optim"]["lr"] = 0.5  # what a careless edit after the run would do
    (rd / "run.json").write_text(json.dumps(doc))


def _summary_early(w: World, rd: Path) -> None:
    (rd / SUMMARY_FILE).write_text(json.dumps({"status": "completed", "step": 3, "tokens": 96}))


def _summary_late(w: World, rd: Path) -> None:
    (rd / SUMMARY_FILE).write_text(json.dumps({"status": "completed", "step": 10**6, "tokens": 1}))


def _record_deleted(w: World, rd: Path) -> None:
    (rd / "run.json").unlink()


WRONG_DATA = {
    "run-json-edited-after-the-run": (_edit_lr, "config.json optim.lr"),
    "summary-completed-early": (_summary_early, "summary.json says completed at step 3"),
    "summary-beyond-the-plan": (_summary_late, "summary.json says"),
    "run-json-deleted": (_record_deleted, "run.json: missing"),
}


@pytest.mark.parametrize("case", list(WRONG_DATA))
def test_collect_does_not_believe_wrong_data(
    case: str, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """The damaged completed run keeps its row (and its place in ``status``) with the reason, and
    lends no number to the tables; the other runs are untouched."""
    w, (damage, why) = world, WRONG_DATA[case]
    damage(w, w.rd(C))
    res = ["--results", str(w.results)]
    code, _, err = run_cli(capsys, "collect", "c", *res)
    assert code in (0, 1), err
    runs = tables.read_sweep_table(w.store.root, "runs").to_pylist()
    rows = {r["run_id"]: r for r in runs}
    bad = rows[w.ids[C]]
    assert bad["state"] == "completed" and why in (bad["problem"] or ""), bad
    assert bad["final_loss"] is None, bad
    assert 0.5 not in [r["lr"] for r in runs]
    horizons = tables.read_sweep_table(w.store.root, "horizons").to_pylist()
    assert w.ids[C] not in {h["run_id"] for h in horizons}
    for i, rid in enumerate(w.ids):
        if i != C:
            assert rows[rid]["problem"] is None and rows[rid]["state"] == STORIES[i], rows[rid]
    code, out, err = run_cli(capsys, "status", "c", *res, "--format", "json")
    assert {r["run_id"]: r["state"] for r in json.loads(out)}[w.ids[C]] == "completed"
