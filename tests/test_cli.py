"""The ``sweeper`` command line: end to end with the real trainer, errors, re-launch semantics."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from test_local import fake_spec

from sweeper.cli import COMMANDS, cli, main
from sweeper.store import SweepStore, read_events

REPO = Path(__file__).resolve().parents[1]
SWEEPER = str(Path(sys.executable).with_name("sweeper"))
SMOKE = REPO / "sweeps" / "smoke.toml"


def sweeper(
    *args: str, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SWEEPER, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.mark.slow
def test_end_to_end_with_the_real_trainer(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {"TRAINER_CACHE": str(tmp_path / "cache")}
    r = sweeper("--results", str(results), "plan", str(SMOKE), env=env)
    assert r.returncode == 0, r.stderr
    assert "4 runs" in r.stdout and not results.exists()  # plan writes nothing

    r = sweeper("--results", str(results), "launch", str(SMOKE), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    assert "train loss" in r.stdout  # the result summary table from the collected horizons

    r = sweeper("--results", str(results), "status", "smoke", "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 4 and {row["state"] for row in rows} == {"completed"}
    assert all(row["attempt"] == 1 and row["backend"] == "local" for row in rows)

    assert sweeper("--results", str(results), "collect", "smoke").returncode == 0
    out = tmp_path / "horizons.csv"
    r = sweeper("--results", str(results), "export", "smoke", "--table", "horizons",
                "--format", "csv", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(table) == 8  # 4 runs x 2 horizons
    assert {int(row["tokens"]) for row in table} == {1024, 2048}
    assert {float(row["lr"]) for row in table} == {0.0078125, 0.03125}
    assert {int(row["batch_size"]) for row in table} == {4, 8}
    for row in table:
        loss = float(row["train_loss"])
        assert math.isfinite(loss) and 0 < loss < 7  # byte vocabulary: log(256) = 5.5 at init

    r = sweeper(
        "--results", str(results), "export", "smoke", "--table", "runs", "--format", "jsonl"
    )
    assert r.returncode == 0, r.stderr
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(runs) == 4 and {x["state"] for x in runs} == {"completed"}
    # a second launch of the unchanged spec continues (nothing left to run) and runs nothing again
    r = sweeper("--results", str(results), "launch", str(SMOKE), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    store = SweepStore(results / "smoke")
    for rid in store.run_ids():
        assert sum(e.state == "running" for e in read_events(store.run_dir(rid))) == 1


BAD_ARGS = [
    (["plan", "nope.toml"], "nope.toml: no such spec file"),
    (["launch", "nope.toml"], "nope.toml: no such spec file"),
    (["plan", "{bad}"], "bad TOML"),
    (["launch", "{bad}", "--max-parallel", "0"], "--max-parallel"),
    (["status", "ghost"], "sweep 'ghost'"),
    (["resume", "ghost"], "sweep 'ghost'"),
    (["launch", "{good}", "--backend", "k8s"], "--backend = 'k8s': unknown backend"),
    (["plan", "{good}", "--format", "xml"], "--format"),
    (["frobnicate"], "No such command"),
]


@pytest.mark.parametrize(("args", "why"), BAD_ARGS, ids=[" ".join(a[0]) for a in BAD_ARGS])
def test_bad_arguments_subprocess(tmp_path: Path, args: list[str], why: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    good = fake_spec(tmp_path)
    args = [a.replace("{bad}", str(bad)).replace("{good}", str(good)) for a in args]
    results = tmp_path / "results"
    r = sweeper("--results", str(results), *args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert why in lines[0]
    assert "Traceback" not in r.stderr
    assert not (results / "fake").exists()  # nothing half-written


def test_bad_spec_through_cli_names_file_key_value(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    spec = fake_spec(tmp_path)
    spec.write_text(spec.read_text().replace("batch_size = [4, 8]", "batch_size = [4, 0]"))
    code, _, err = run_main(capsys, "--results", str(tmp_path / "r"), "launch", str(spec))
    assert code == 2
    assert err.strip() == f"error: {spec}: grid.batch_size = 0: must be in 1..16777216"
    assert not (tmp_path / "r").exists()


def _walk(group: click.Group, ctx: click.Context) -> list[tuple[str, click.Command]]:
    """Every command under ``group`` (subgroups included), by its full name."""
    out = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        out.append((name, cmd))
        if isinstance(cmd, click.Group):
            out += [(f"{name} {sub}", c) for sub, c in _walk(cmd, click.Context(cmd))]
    return out


def test_every_command_has_help_with_an_example(capsys) -> None:  # noqa: ANN001
    """Walks the commands (``cli.COMMANDS``, not a list written here): each has ``--help`` with
    an ``Example`` section whose lines run that very command, and accepts ``--results`` after
    its name as well as before it."""
    commands = _walk(cli, click.Context(cli))
    names = [name for name, _ in commands]
    assert {"plan", "launch", "status", "resume", "cancel", "collect", "export"} <= set(names)
    assert set(names) >= set(COMMANDS)
    for name, cmd in commands:
        code, out, _ = run_main(capsys, *name.split(), "--help")
        assert code == 0 and "Example" in out, name
        example = out.split("Example", 1)[1].splitlines()[1:]
        runs = [ln.strip() for ln in example if ln.strip().startswith("sweeper ")]
        assert runs and all(ln.startswith(f"sweeper {name}") for ln in runs[:1]), (name, runs)
        flags = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
        assert "--results" in flags, f"{name}: no --results after the subcommand"
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "Example" in out and "--results" in out


def test_results_before_or_after_the_subcommand(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    spec = fake_spec(tmp_path, lrs="[0.125]", batches="[4]")
    before, after = tmp_path / "before", tmp_path / "after"
    code, _, err = run_main(capsys, "--results", str(before), "launch", str(spec), "--no-progress")
    assert code == 0, err
    code, _, err = run_main(capsys, "launch", str(spec), "--no-progress", "--results", str(after))
    assert code == 0, err
    for results in (before, after):
        code, out, _ = run_main(capsys, "status", "fake", "--results", str(results),
                                "--format", "json")  # fmt: skip
        assert code == 0 and json.loads(out)[0]["state"] == "completed"
        code, out, err = run_main(capsys, "collect", "fake", "--results", str(results))
        assert code == 0 and "1 runs" in out + err, err
    code, _, err = run_main(capsys, "plan", str(spec), "--results", str(tmp_path / "none"))
    assert code == 0 and not (tmp_path / "none").exists(), err  # accepted; plan writes nothing


def test_plan_formats_write_nothing(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    spec = fake_spec(tmp_path)
    code, out, _ = run_main(capsys, "--results", str(tmp_path / "r"), "plan", str(spec),
                            "--runs", "--format", "json")  # fmt: skip
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 4 and {r["batch_size"] for r in rows} == {4, 8}
    code, out, _ = run_main(capsys, "plan", str(spec), "--runs", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("id,kind,model,lr")
    code, out, _ = run_main(capsys, "plan", str(spec), "--format", "json")  # cost per (model, B)
    rows = json.loads(out)
    assert [(r["batch_size"], r["runs"]) for r in rows] == [("4", 2), ("8", 2), ("", 4)]
    assert not (tmp_path / "r").exists()


def test_relaunch_with_changed_spec_adds_only_new_runs(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    results = str(tmp_path / "results")
    spec = fake_spec(tmp_path, lrs="[0.125]", batches="[4]")
    code, _, err = run_main(capsys, "--results", results, "launch", str(spec), "--no-progress")
    assert code == 0, err
    store = SweepStore(Path(results) / "fake")
    (first,) = store.run_ids()
    spec.write_text(spec.read_text().replace("lr = [0.125]", "lr = [0.125, 0.5]"))
    code, _, err = run_main(capsys, "--results", results, "launch", str(spec), "--no-progress")
    assert code == 0, err
    assert len(store.run_ids()) == 2 and first in store.run_ids()
    assert sum(e.state == "running" for e in read_events(store.run_dir(first))) == 1
    archived = list(store.root.glob("spec.*.toml"))
    assert len(archived) == 1 and "lr = [0.125]\n" in archived[0].read_text()
    assert "0.5" in (store.root / "spec.toml").read_text()
    # adding a smaller horizon keeps the finished run and records the new horizon for it
    spec.write_text(spec.read_text().replace("[1024, 2048]", "[512, 1024, 2048]"))
    code, _, err = run_main(capsys, "--results", results, "launch", str(spec), "--no-progress")
    assert code == 0, err
    assert len(store.run_ids()) == 2
    assert store.extra_horizons(first) == (512,)  # recorded beside the record
    assert store.load_record(first).horizons_tokens == (1024, 2048)  # run.json is never edited


def test_failed_runs_exit_status_resume_and_restart(tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    results = str(tmp_path / "results")
    spec = fake_spec(tmp_path)
    monkeypatch.setenv("FAKE_MODES", json.dumps({repr(0.25): "fail"}))
    code, _, _ = run_main(capsys, "--results", results, "launch", str(spec), "--no-progress")
    assert code == 1  # some runs failed
    code, out, _ = run_main(capsys, "--results", results, "status", "fake", "--format", "csv")
    assert code == 1 and out.count(",failed,") == 2
    code, out, err = run_main(capsys, "--results", results, "resume", "fake", "--dry-run")
    store = SweepStore(Path(results) / "fake")
    failed_ids = [r for r in store.run_ids() if store.status(r).state.value == "failed"]
    assert code == 0 and "would start 2 runs" in err
    assert all(rid in out for rid in failed_ids)
    failed = failed_ids[0]
    (store.run_dir(failed) / "ckpt").mkdir()
    completed = next(r for r in store.run_ids() if store.status(r).state.value == "completed")
    (store.run_dir(completed) / "ckpt").mkdir()
    monkeypatch.delenv("FAKE_MODES")
    code, _, err = run_main(capsys, "--results", results, "resume", "fake", "--restart",
                            "--no-progress")  # fmt: skip
    assert code == 0, err
    assert not (store.run_dir(failed) / "ckpt").exists()
    assert (store.run_dir(completed) / "ckpt").exists()  # a completed run is never touched
    assert {st.state.value for st in store.statuses().values()} == {"completed"}


def test_sweep_given_as_a_directory(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    results = tmp_path / "results"
    spec = fake_spec(tmp_path, lrs="[0.125]", batches="[4]")
    run_main(capsys, "--results", str(results), "launch", str(spec), "--no-progress")
    moved = tmp_path / "elsewhere"
    shutil.move(results / "fake", moved)
    code, out, _ = run_main(capsys, "status", str(moved), "--format", "json")
    assert code == 0 and json.loads(out)[0]["state"] == "completed"


@pytest.mark.slow
def test_sigkill_launch_then_resume_with_the_real_trainer(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {"TRAINER_CACHE": str(tmp_path / "cache"), "SWEEPER_HEARTBEAT_S": "0.5"}
    proc = subprocess.Popen(
        [SWEEPER, "--results", str(results), "launch", str(SMOKE), "--no-progress"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    store = SweepStore(results / "smoke")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st = [s.state.value for s in store.statuses().values()] if store.exists() else []
        if "completed" in st and "running" in st:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait(30)
    before = {rid: s.state.value for rid, s in store.statuses().items()}
    assert "completed" in before.values() and "running" in before.values()
    r = sweeper("--results", str(results), "resume", "smoke", "--no-progress", env=env)
    assert r.returncode == 0, r.stderr
    for rid in store.run_ids():
        events = read_events(store.run_dir(rid))
        assert [e.state for e in events].count("completed") == 1
        summary = json.loads((store.run_dir(rid) / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["step"] > 0
        if before[rid] == "completed":
            assert [e.state for e in events].count("running") == 1
