"""Nothing outside the sweep is touched, nothing from a spec reaches a shell, files honour umask.

Items "Outside the sweep", "Injection" and "Shared filesystems" of the trust issue, each through
the real code path: the worker (``run_trial``), ``sweeper resume --restart``, ``sweeper export -o``,
a cancel's ``trainer.pid`` check, ``sweeper logs``, ``Sweep.create`` under a given umask, and one
sweep on the real single-node SLURM whose fields and results path are full of shell syntax. Spec
fields with control characters are refused at plan time (tests/test_hostile_specs.py).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sweep_cli import Sweep as CliSweep
from sweep_cli import all_in, base_env, fake_command, micro_spec, slurm_problem

from sweeper import Sweep
from sweeper.cli import main
from sweeper.records import RunState
from sweeper.store import SweepStore, process_start
from sweeper.worker import run_trial, signal_trainer

SPEC = """
name = "o"
[[models]]
preset = "test-micro"
[data]
kind = "synthetic"
synthetic_tokens = 200000
[grid]
lr = [0.0078125, 0.03125]
batch_size = [4]
horizons_tokens = [1024]
[train]
log_every = 4
val_tokens = 256
threads = 1
[backend]
command = [{python}, "-c", "raise SystemExit(1)"]
"""


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code: Any = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return int(code or 0), out, err


def tree(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` with its kind and content (links by target, never followed)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = f"link:{os.readlink(p)}"
            elif p.is_file():
                out[key] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            else:
                out[key] = "dir" if p.is_dir() else "special"
    return out


@pytest.fixture
def sweep(tmp_path: Path) -> Sweep:
    spec = tmp_path / "o.toml"
    spec.write_text(SPEC.format(python=json.dumps(sys.executable)))
    return Sweep.create(spec, tmp_path / "results")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the sweep holding files a symlink could lead a write to."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.txt").write_text("do not touch\n")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "step_00000008.pt").write_bytes(b"someone else's checkpoint")
    return d


# ---------------------------------------------------------------- the worker writes nothing outside

WRITTEN = [
    "events.jsonl",
    "heartbeat",
    "stdout.log",
    "stderr.log",
    "ckpt",
    "trial.json",
    "trainer.pid",
    "metrics.jsonl",
    "summary.json",
    "config.json",
    ".lock",
]


@pytest.mark.parametrize("name", [*WRITTEN, "<run dir>"])
def test_worker_never_writes_through_a_symlink(
    name: str, sweep: Sweep, outside: Path, tmp_path: Path
) -> None:
    rid = sweep.store.run_ids()[0]
    rd = sweep.store.run_dir(rid)
    if name == "<run dir>":
        (outside / "run").mkdir()
        (outside / "run" / "run.json").write_bytes((rd / "run.json").read_bytes())
        (rd / "run.json").unlink()
        rd.rmdir()
        rd.symlink_to(outside / "run")
    else:
        rd.joinpath(name).symlink_to(outside / ("ckpt" if name == "ckpt" else "precious.txt"))
    before = tree(outside)
    result = run_trial(sweep.root, rid, backend="local")  # never raises
    assert tree(outside) == before, "the worker wrote through a symlink"
    assert result["state"] in ("failed", "error"), result
    st = sweep.store.status(rid)
    if result["state"] == "failed":  # recorded in the run itself, with the link named
        assert st.state is RunState.FAILED and "symlink" in (st.reason or ""), st
    else:  # nothing could be recorded there: the run's status says why
        assert st.state is RunState.ERROR, st
    assert sweep.store.status(sweep.store.run_ids()[1]).state is RunState.PLANNED


def test_store_never_locks_or_appends_through_a_symlinked_run_dir(
    sweep: Sweep, outside: Path
) -> None:
    rid = sweep.store.run_ids()[0]
    rd = sweep.store.run_dir(rid)
    (rd / "run.json").unlink()
    rd.rmdir()
    rd.symlink_to(outside)
    before = tree(outside)
    with sweep.store.run_lock(rid) as got:
        assert not got
    assert not sweep.store.append_if(rid, RunState.CANCELLED, reason="x")
    with pytest.raises(Exception, match="symlink"):
        sweep.store.append_event(rid, RunState.SUBMITTED)
    assert tree(outside) == before


# ------------------------------------------------------------------- resume --restart and symlinks


def test_restart_through_a_symlinked_ckpt_is_refused_before_anything_is_deleted(
    sweep: Sweep, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Policy: a ``ckpt/`` symlink (e.g. to scratch) is refused with a clear error; nothing of any
    run is deleted, neither outside nor in the sweep (docs/clusters.md)."""
    first, second = sweep.store.run_ids()
    for rid in (first, second):
        sweep.store.append_event(rid, "failed", exit_code=1)
    (sweep.store.run_dir(first) / "metrics.jsonl").write_text('{"step": 0}\n')
    (sweep.store.run_dir(first) / "ckpt").mkdir()
    (sweep.store.run_dir(first) / "ckpt" / "step_00000004.pt").write_bytes(b"ours")
    (sweep.store.run_dir(second) / "ckpt").symlink_to(outside / "ckpt")
    before, inside = tree(outside), tree(sweep.root / "runs")
    code, _, err = run_cli(capsys, "resume", str(sweep.root), "--restart", "--no-progress")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "ckpt" in err and "symlink" in err and "docs/clusters.md" in err, err
    assert tree(outside) == before, "files outside the sweep were deleted"
    assert tree(sweep.root / "runs") == inside, "a restart deleted files before it was refused"


def test_restart_removes_links_inside_ckpt_but_not_what_they_point_to(
    sweep: Sweep, outside: Path
) -> None:
    rid = sweep.store.run_ids()[0]
    sweep.store.append_event(rid, "failed", exit_code=1)
    ckpt = sweep.store.run_dir(rid) / "ckpt"
    ckpt.mkdir()
    (ckpt / "step_00000008.pt").symlink_to(outside / "ckpt" / "step_00000008.pt")
    (ckpt / "sub").symlink_to(outside / "ckpt")
    before = tree(outside)
    sweep.restart_run(rid)
    assert not ckpt.exists() and tree(outside) == before


def test_restart_through_a_symlinked_run_dir_is_refused(sweep: Sweep, outside: Path) -> None:
    rid = sweep.store.run_ids()[0]
    rd = sweep.store.run_dir(rid)
    (rd / "run.json").unlink()
    rd.rmdir()
    rd.symlink_to(outside)
    with pytest.raises(Exception, match="symlink"):
        sweep.restart_run(rid)
    assert (outside / "ckpt" / "step_00000008.pt").exists()


# ------------------------------------------------------------------------------- sweeper logs


@pytest.mark.parametrize("kind", ["dev-zero", "outside", "fifo"])
def test_logs_never_follow_a_symlink_or_block(
    kind: str, sweep: Sweep, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rid = sweep.store.run_ids()[0]
    log = sweep.store.run_dir(rid) / "stdout.log"
    if kind == "fifo":
        os.mkfifo(log)
    else:
        log.symlink_to(
            os.devnull.replace("null", "zero") if kind == "dev-zero" else outside / "precious.txt"
        )
    code, out, err = run_cli(capsys, "logs", rid, "--sweep", str(sweep.root))
    assert code == 2 and len(err.splitlines()) == 1 and "stdout.log" in err, err
    assert "do not touch" not in out


def test_logs_print_stdout_by_default_and_stderr_on_request(
    sweep: Sweep, capsys: pytest.CaptureFixture[str]
) -> None:
    rid = sweep.store.run_ids()[0]
    (sweep.store.run_dir(rid) / "stdout.log").write_text("out 1\nout 2\n")
    (sweep.store.run_dir(rid) / "stderr.log").write_text("err 1\n")
    assert run_cli(capsys, "logs", rid, "--sweep", str(sweep.root), "-n", "1")[1] == "out 2\n"
    assert run_cli(capsys, "logs", rid, "--sweep", str(sweep.root), "--stderr")[1] == "err 1\n"


# ------------------------------------------------------------------------------------ export -o


@pytest.fixture
def collected(sweep: Sweep) -> Sweep:
    sweep.collect()
    return sweep


def _export(capsys: pytest.CaptureFixture[str], sweep: Sweep, out: str, fmt: str = "csv") -> int:
    code, _, err = run_cli(
        capsys, "export", str(sweep.root), "--table", "runs", "--format", fmt, "-o", out
    )
    assert code == 0, err
    return code


def test_export_onto_a_symlink_writes_its_target_and_keeps_the_link(
    collected: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "target.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    _export(capsys, collected, str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith('"run_id"')
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "new.csv")
    _export(capsys, collected, str(dangling))
    assert dangling.is_symlink() and (tmp_path / "new.csv").read_text().startswith('"run_id"')


def test_export_onto_a_device_writes_it_directly(
    collected: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "null"
    link.symlink_to(os.devnull)  # through a link: a regression replaces the link, not the device
    _export(capsys, collected, str(link))
    assert link.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert not list(Path(os.devnull).parent.glob(".null.*.tmp"))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_onto_a_fifo_streams_into_it(
    collected: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    _export(capsys, collected, str(fifo), fmt)
    reader.join(30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
    assert got and (got[0].startswith(b'"run_id"') if fmt == "csv" else got[0][:4] == b"PAR1")


@pytest.mark.parametrize("out", ["-", "/dev/stdout"])
def test_export_to_stdout(
    collected: Sweep, out: str, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    try:
        main(["export", str(collected.root), "--table", "runs", "-o", out])
    except SystemExit as e:
        assert not e.code
    assert capsysbinary.readouterr().out.startswith(b'"run_id"')


# --------------------------------------------------------------- cancel signals only our trainer


def test_cancel_signals_only_the_process_trainer_pid_still_names(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start(proc.pid)
        assert start is not None
        pid_file = tmp_path / "trainer.pid"
        for stale in (
            {"pid": proc.pid, "start": start + 1},  # pid reused by another process
            {"pid": proc.pid},  # no start time: cannot be told apart
            {"pid": str(proc.pid), "start": start},
            {"pid": 1, "start": process_start(1)},
            [proc.pid],
        ):
            pid_file.write_text(json.dumps(stale))
            assert not signal_trainer(tmp_path, signal.SIGTERM), stale
        pid_file.unlink()
        os.mkfifo(pid_file)  # must not block
        assert not signal_trainer(tmp_path, signal.SIGTERM)
        pid_file.unlink()
        pid_file.symlink_to(tmp_path / "elsewhere.json")
        (tmp_path / "elsewhere.json").write_text(json.dumps({"pid": proc.pid, "start": start}))
        assert not signal_trainer(tmp_path, signal.SIGTERM)
        assert proc.poll() is None, "an unrelated process was signalled"
        pid_file.unlink()
        pid_file.write_text(json.dumps({"pid": proc.pid, "start": start}))
        assert signal_trainer(tmp_path, signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


# -------------------------------------------------------------------------------------- injection


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "x\x1b[31m"])
def test_results_path_with_a_control_character_is_refused(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sweep directory is written into job scripts (``#SBATCH --output=<dir>/...``)."""
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "o.toml"
    spec.write_text(SPEC.format(python=json.dumps(sys.executable)))
    before = sorted(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, "launch", str(spec), "--results", bad, "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1 and "--results" in err, err
    assert sorted(os.listdir(tmp_path)) == before


_NO_SLURM = slurm_problem()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(_NO_SLURM is not None, reason=str(_NO_SLURM))
def test_shell_text_in_slurm_fields_and_paths_stays_text_on_the_real_slurm(tmp_path: Path) -> None:
    """Fields that may hold spaces and shell syntax (an sbatch option value, an ``env`` value) and
    a results path full of it reach the job script and the job as text: nothing runs, the run
    completes. (Control characters, which could end an ``#SBATCH`` line, are refused earlier.)"""
    marks = tmp_path / "marks"
    marks.mkdir()
    shell = f"$(touch {marks}/a);touch {marks}/b`touch {marks}/c`"
    table = "\n".join(
        [
            f"sbatch_extra = [{json.dumps('comment=x ' + shell)}]",
            f"env = [{json.dumps('SWEEPER_PROBE=' + shell)}]",
        ]
    )
    text = micro_spec("inj", "slurm", lrs="[0.0078125]", batches="[4]", backend_table=table,
                      top=fake_command(tmp_path))  # fmt: skip
    sw = CliSweep(tmp_path, base_env(tmp_path / "cache"), "inj", text)
    sw.results = tmp_path / f"res $(touch {marks}/d); `touch {marks}/e`"
    sw.store = SweepStore(sw.results / "inj")
    sw.cli("launch", str(sw.spec))
    states = sw.wait(all_in("completed", "failed", "cancelled"), timeout=240)
    assert set(states.values()) == {"completed"}, sw.diagnose()
    assert list(marks.iterdir()) == [], "shell text from the spec or the path was executed"
    script = next((sw.store.root / "slurm").glob("*.sh")).read_text()
    assert shell in script  # it did reach the script, as (quoted) text


# ------------------------------------------------------------------------------ shared filesystems

_WRITE_ALL = """
import os, sys
os.umask(int(sys.argv[1], 8))
from sweeper import Sweep
s = Sweep.create(sys.argv[2], sys.argv[3])
s.collect()
s.export("runs", "csv", __import__("pathlib").Path(sys.argv[3]) / "runs.csv")
"""


@pytest.mark.parametrize(("umask", "mode"), [(0o002, 0o664), (0o027, 0o640), (0o077, 0o600)])
def test_files_honour_the_umask(umask: int, mode: int, tmp_path: Path) -> None:
    """Every file the sweeper writes gets ``0o666 & ~umask``, as ``open()`` would."""
    spec = tmp_path / "o.toml"
    spec.write_text(SPEC.format(python=json.dumps(sys.executable)))
    results = tmp_path / "results"
    subprocess.run(
        [sys.executable, "-c", _WRITE_ALL, oct(umask), str(spec), str(results)],
        check=True,
        timeout=120,
    )
    files = [p for p in results.rglob("*") if p.is_file() and p.name != ".lock"]
    names = {p.name for p in files}
    assert {"plan.json", "spec.toml", "run.json", "runs.parquet", "runs.csv"} <= names, names
    wrong = {str(p.relative_to(results)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {k: v for k, v in wrong.items() if v != oct(mode)} == {}


def test_store_is_usable_by_a_group_member_under_umask_002(tmp_path: Path) -> None:
    """The events file and the locks are created 0o666 & ~umask too (another user of the group
    must append to them when ``resume`` runs as them)."""
    code = (
        "import os, sys; os.umask(0o002)\n"
        "from pathlib import Path\n"
        "from sweeper.store import append_event, SweepStore\n"
        "append_event(Path(sys.argv[1]), 'submitted')\n"
        "with SweepStore(Path(sys.argv[1])).lock(): pass\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    for name in ("events.jsonl", ".lock"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o664, name
