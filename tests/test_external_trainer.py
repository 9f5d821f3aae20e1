"""Bring your own trainer: the ``[trainer]`` section, the rendered command, the contract helper
(``sweeper.contract.RunWriter``) and ``examples/external_trainer/`` run as a sweep end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sweeper import Sweep, SweepError, load_spec, plan
from sweeper.contract import RunWriter, SchemaError
from sweeper.errors import SpecError
from sweeper.external import (
    PLACEHOLDERS,
    TrainerSection,
    axis_slug,
    latest_checkpoint,
    parse_section,
    render_command,
    resume_checkpoint,
)
from sweeper.records import RecordError, RunRecord
from sweeper.spec import parse_spec_text
from sweeper.store import SweepStore, pid_alive, read_events
from trainer.schema import Summary, parse_metrics_line

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "external_trainer" / "train.py"
SWEEPER = str(Path(sys.executable).with_name("sweeper"))
ARGS = [
    "--out", "{out_dir}", "--lr", "{lr}", "--batch-size", "{batch_size}", "--seq-len", "{seq_len}",
    "--steps", "{steps}", "--horizon-steps", "{horizon_steps}", "--seed", "{seed}",
    "--vocab", "{vocab_size}", "--width", "{d_model}", "--resume-from", "{resume_from}",
]  # fmt: skip


def spec_text(
    command: list[str],
    *,
    lrs: str = "[0.0078125, 0.03125]",
    batches: str = "[4]",
    horizons: str = "[512, 1024]",
    extra: str = "",
    name: str = "ext",
) -> str:
    """A spec running ``command`` through ``[trainer]`` (JSON arrays are TOML arrays)."""
    return (
        textwrap.dedent(
            f"""
        name = "{name}"
        [[models]]
        preset = "test-micro"
        [grid]
        lr = {lrs}
        batch_size = {batches}
        horizons_tokens = {horizons}
        [backend]
        stale_after_s = 30
        [backend.local]
        max_parallel = 2
        [trainer]
        command = {json.dumps(command)}
        """
        )
        + extra
    )


def example_spec(tmp_path: Path, *, extra_args: tuple[str, ...] = (), **kw: Any) -> Path:
    path = tmp_path / "ext.toml"
    path.write_text(spec_text([sys.executable, str(EXAMPLE), *ARGS, *extra_args], **kw))
    return path


def records(command: list[str], **kw: Any) -> list[RunRecord]:
    return plan(parse_spec_text(spec_text(command, **kw), "t.toml"))


# ----------------------------------------------------------------------------------- the section


def test_section_puts_the_command_into_every_record() -> None:
    runs = records(["train", "--out", "{out_dir}", "--lr", "{lr}"])
    assert len(runs) == 2
    for r in runs:
        assert r.params == {"trainer": {"command": ["train", "--out", "{out_dir}", "--lr", "{lr}"]}}
    # the command is part of each run's identity
    other = records(["train", "--out", "{out_dir}", "--lr", "{lr}", "--fast"])
    assert {r.id for r in runs}.isdisjoint(r.id for r in other)


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"command": "train --lr {lr}"}, "trainer.command = 'train --lr {lr}': expected a list"),
        ({"command": []}, "expected a list of 1..1000 strings"),
        ({"command": ["train", 3]}, "trainer.command[1] = 3: expected a (non-empty) string"),
        ({"command": ["t", "--lr={lrr}", "{out_dir}"]}, "unknown placeholder {lrr} (known:"),
        ({"command": ["t", "{lr:.3f}", "{out_dir}"]}, "no format specs or conversions"),
        ({"command": ["t", "{lr!r}", "{out_dir}"]}, "no format specs or conversions"),
        ({"command": ["t", "{lr", "{out_dir}"]}, "trainer.command[1] = '{lr'"),
        ({"command": ["t", "{}", "{out_dir}"]}, "empty placeholder"),
        ({"command": ["t", "{lr.real}", "{out_dir}"]}, "unknown placeholder {lr.real}"),
        ({"command": ["t", "--lr", "{lr}"]}, "trainer.command: must pass {out_dir}"),
        ({"command": ["t", "{out_dir}"], "shell": True}, "trainer.shell = True: unknown key"),
        ({"command": ["t", "{out_dir}"], "axes": {"lr": [1]}}, "trainer.axes.lr: axis names"),
        ({"command": ["t", "{out_dir}"], "axes": {"p": 0.1}}, "expected a list of 1..1000"),
        ({"command": ["t", "{out_dir}"], "axes": {"p": [[1]]}}, "strings, numbers or booleans"),
        ({"command": ["t", "{out_dir}"], "axes": {"p": [1, 1]}}, "duplicate values"),
    ],
)
def test_bad_sections_are_one_line_spec_errors(table: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_section(table, "s.toml")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("s.toml: trainer")


def test_spec_error_names_the_file_through_the_spec_loader() -> None:
    with pytest.raises(SpecError, match=r"^t\.toml: trainer\.command\[2\] = '\{lrr\}'"):
        parse_spec_text(spec_text(["t", "{out_dir}", "{lrr}"]), "t.toml")


def test_axes_pass_through_as_placeholders(tmp_path: Path) -> None:
    section = parse_section({"command": ["t", "{out_dir}", "--p={p}"], "axes": {"p": [0.5]}}, "s")
    assert section.run_params() == {"command": ["t", "{out_dir}", "--p={p}"], "axes": {"p": 0.5}}
    run = records(["t", "{out_dir}", "--p={p}"], extra='axes = {p = ["a b"]}\n')[0]
    assert render_command(run, tmp_path, "")[-1] == "--p=a b"
    # what a planner expanding free-form axes would use
    grid = TrainerSection(command=("t",), axes=(("p", (1, 2)), ("q", ("x",))))
    assert grid.axis_points() == [{"p": 1, "q": "x"}, {"p": 2, "q": "x"}]
    assert axis_slug({"q": "x", "p": 0.1}) == "_p0.1_qx"


def test_free_form_axes_are_crossed_with_the_grid(tmp_path: Path) -> None:
    runs = records(["t", "{out_dir}", "--p={p}"], extra='axes = {p = [0.0, 0.1], q = ["x"]}\n')
    by_point: dict[tuple[float, int], list[Any]] = {}
    for r in runs:
        by_point.setdefault((r.lr, r.batch_size), []).append(r)
    for rs in by_point.values():  # every grid point once per axis value, each its own run
        assert sorted(r.params["trainer"]["axes"]["p"] for r in rs) == [0.0, 0.1]
        assert len({r.id for r in rs}) == 2 and all("_p0" in r.slug for r in rs)
    assert {render_command(r, tmp_path, "")[-1] for r in runs} == {"--p=0.0", "--p=0.1"}


def test_every_placeholder_is_documented() -> None:
    doc = (REPO / "docs" / "external-trainers.md").read_text()
    assert [name for name in PLACEHOLDERS if f"`{{{name}}}`" not in doc] == []


# ------------------------------------------------------------------------------------ rendering


def test_render_substitutes_each_placeholder_inside_its_own_argument(tmp_path: Path) -> None:
    command = ["train.py", "--out", "{out_dir}", "--lr={lr}", "{horizons_tokens}",
               "--resume", "{resume_from}", "a b; rm -rf /", "{{lr}}", "{steps}/{horizon_steps}",
               "{run_id}", "{branch_dir}", "{micro_batch}", "{lr_out}"]  # fmt: skip
    run = records(command, lrs="[0.0078125]")[0]
    out = tmp_path / "runs" / run.id
    argv = render_command(run, out, "")
    assert argv == [
        "train.py", "--out", str(out.resolve()), "--lr=0.0078125", "512,1024", "--resume", "",
        "a b; rm -rf /", "{lr}", "16/8,16", run.id, "", "4", "0.0078125",
    ]  # fmt: skip
    ckpt = str(tmp_path / "ckpt" / "step_8.npz")
    assert render_command(run, out, ckpt)[6] == ckpt


def test_render_uses_the_trial_file_for_horizons_added_later(tmp_path: Path) -> None:
    run = records(["t", "{out_dir}", "{horizons_tokens}"])[0]
    trial = tmp_path / "trial.json"
    doc = run.to_dict()
    doc["train"]["horizons_tokens"] = [256, 512, 1024]
    trial.write_text(json.dumps(doc))
    assert render_command(run, tmp_path, "", trial)[-1] == "256,512,1024"


def test_render_refuses_a_record_without_a_usable_command(tmp_path: Path) -> None:
    run = records(["t", "{out_dir}"])[0]
    bad = RunRecord.from_dict({**run.to_dict(), "params": {"trainer": {"command": ["{nope}"]}}})
    with pytest.raises(RecordError, match="unknown placeholder"):
        render_command(bad, tmp_path, "")


def test_latest_checkpoint_is_the_highest_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) == ""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert latest_checkpoint(tmp_path) == ""
    for name in ("step_00000008.npz", "step_00000016.npz", "ckpt-3"):
        (ckpt / name).write_text("x")
    (ckpt / ".step_00000024.npz.tmp").write_text("partial")
    (ckpt / "step_00000032.npz.tmp").write_text("partial")
    assert latest_checkpoint(tmp_path) == str((ckpt / "step_00000016.npz").resolve())


# ----------------------------------------------------------------------------------- RunWriter


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writer_writes_the_contract(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    for step in range(4):
        w.log(step=step, tokens=64 * step, train_loss=1.0 / (step + 1), output_norm=float("nan"))
    assert w.finish("completed") == 0
    rows = lines(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[0]["output_norm"] is None
    assert all(parse_metrics_line(r) is not None for r in rows)
    summary = Summary.from_dict(json.loads((tmp_path / "summary.json").read_text()))
    assert (summary.status, summary.step, summary.tokens) == ("completed", 3, 192)
    assert summary.final_loss == 0.25 and summary.wall_time_s is not None
    assert json.loads((tmp_path / "provenance.json").read_text())["trainer"] == "external"


def test_run_writer_resume_keeps_lines_before_the_checkpoint(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    for step in range(6):
        w.log(step=step, tokens=step, train_loss=1.0)
    assert w.finish("interrupted", step=5) == 75
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tok')  # a torn line from a kill
    w = RunWriter(tmp_path, start_step=4)
    assert not (tmp_path / "summary.json").exists()  # the old "interrupted" one
    assert [r["step"] for r in lines(tmp_path)] == [0, 1, 2, 3]
    with pytest.raises(SchemaError, match="not after"):
        w.log(step=3, tokens=3, train_loss=1.0)
    with pytest.raises(SchemaError, match="unknown key 'loss'"):
        w.log(step=4, tokens=4, loss=1.0)
    w.log(step=4, tokens=4, train_loss=0.5)
    assert w.finish("diverged", reason="nan") == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == 4


STOPPABLE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sweeper.contract import RunWriter
    out = Path(sys.argv[1])
    w = RunWriter(out, on_stop=lambda step: (out / "ckpt").write_text(str(step)))
    for step in range(100000):
        w.log(step=step, tokens=step, train_loss=1.0)
        time.sleep(0.01)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_run_writer_checkpoints_and_exits_75_on_a_stop_signal(tmp_path: Path, sig: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(tmp_path)])
    deadline = time.monotonic() + 30
    while not (tmp_path / "metrics.jsonl").exists() or len(lines(tmp_path)) < 3:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 75
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["reason"] == signal.Signals(sig).name
    assert int((tmp_path / "ckpt").read_text()) == summary["step"] == lines(tmp_path)[-1]["step"]


# ------------------------------------------------------------------------------- the example


def test_shipped_example_spec_plans() -> None:
    runs = plan(load_spec(REPO / "examples" / "external_trainer" / "sweep.toml"))
    argv = render_command(runs[0], Path("results/x/runs") / runs[0].id, "")
    assert argv[:2] == ["python", "examples/external_trainer/train.py"] and "" in argv


def test_example_sweep_end_to_end_through_the_api(tmp_path: Path) -> None:
    sweep = Sweep.create(example_spec(tmp_path), tmp_path / "results")
    report = sweep.launch()
    assert report.states == {"completed": 2}, [
        (sweep.root / "runs" / r / "stderr.log").read_text() for r in report.run_ids
    ]
    for rid in report.run_ids:
        run_dir = sweep.root / "runs" / rid
        assert [r["step"] for r in lines(run_dir)] == list(range(17))  # 1024 / (4 * 16) steps
    sweep.collect()
    horizons = sweep.table("horizons")
    assert len(horizons) == 4 and horizons["val_loss"].notna().all()
    assert sorted(set(horizons["tokens"])) == [512, 1024]
    runs = sweep.table("runs")
    assert set(runs["state"]) == {"completed"} and runs["problem"].isna().all()


def test_wsd_branches_start_from_the_trunk_checkpoint(tmp_path: Path) -> None:
    wsd = ("--schedule", "{schedule}", "--decay-fraction", "{decay_fraction}",
           "--keep-steps", "{checkpoint_steps}")  # fmt: skip
    spec = example_spec(tmp_path, lrs="[0.015625]", extra_args=wsd)
    spec.write_text(spec.read_text() + '[schedule]\nkind = "wsd"\ndecay_fraction = 0.25\n')
    sweep = Sweep.create(spec, tmp_path / "results")
    report = sweep.launch()
    assert report.states == {"completed": 3}  # a trunk and a branch per horizon
    for run in sweep.plan().runs:
        run_dir = sweep.root / "runs" / run.id
        steps = [r["step"] for r in lines(run_dir)]
        assert steps == list(range(run.start_step, run.steps + 1))
        if run.kind == "branch":
            assert f"resuming from step {run.start_step}" in (run_dir / "stdout.log").read_text()
    trunk = next(r for r in sweep.plan().runs if r.kind == "trunk")
    kept = sorted(p.name for p in (sweep.root / "runs" / trunk.id / "ckpt").iterdir())
    assert [f"step_{s:08d}.npz" for s in trunk.train.checkpoint_steps] == kept[:2]
    sweep.collect()
    horizons = sweep.table("horizons")
    branches = {r.id for r in sweep.plan().runs if r.kind == "branch"}
    assert set(horizons["run_id"]) >= branches and horizons["val_loss"].notna().all()


def test_resume_from_is_the_own_newest_checkpoint_else_the_fork(tmp_path: Path) -> None:
    spec = parse_spec_text(
        spec_text(["t", "{out_dir}"], lrs="[0.0078125]", extra='[schedule]\nkind = "wsd"\n'),
        "s.toml",
    )
    trunk, branch, _ = plan(spec)
    assert branch.kind == "branch" and branch.start_step > 0
    out = tmp_path / "runs" / branch.id
    with pytest.raises(RecordError, match=f"no checkpoint for step {branch.start_step}"):
        resume_checkpoint(branch, out)
    fork = tmp_path / "runs" / trunk.id / "ckpt" / f"step_{branch.start_step:08d}.npz"
    fork.parent.mkdir(parents=True)
    fork.write_text("x")
    (fork.parent / "step_99999999.npz").write_text("x")
    assert resume_checkpoint(branch, out) == str(fork.resolve())
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "step_00000009.npz").write_text("x")
    assert resume_checkpoint(branch, out) == str((out / "ckpt" / "step_00000009.npz").resolve())
    assert resume_checkpoint(trunk, tmp_path / "runs" / trunk.id) == str(
        (fork.parent / "step_99999999.npz").resolve()
    )


def test_a_failing_external_trainer_is_a_failed_run(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    code = "import sys; print('no such optimizer', file=sys.stderr); sys.exit(2)"
    spec.write_text(spec_text([sys.executable, "-c", code, "{out_dir}"], lrs="[0.0078125]"))
    sweep = Sweep.create(spec, tmp_path / "results")
    report = sweep.launch()
    assert report.states == {"failed": 1}
    status = sweep.status()[0]
    assert "no such optimizer" in (status.reason or "")


# --------------------------------------------------------------------- SIGKILL, then resume


def _wait_for(cond: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _logged(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _trainer_pid(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_sigkill_launch_then_resume_completes_every_run_once(tmp_path: Path) -> None:
    spec = example_spec(
        tmp_path,
        lrs="[0.0078125, 0.015625, 0.03125]",
        batches="[4, 8]",
        horizons="[1024, 2048]",
        extra_args=("--step-sleep", "0.04", "--checkpoint-every", "4"),
    )
    results = tmp_path / "results"
    env = {**os.environ, "SWEEPER_HEARTBEAT_S": "0.2"}
    launch = [SWEEPER, "--results", str(results), "launch", str(spec), "--no-progress"]
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = SweepStore(results / "ext")

    def states() -> dict[str, str]:
        return {rid: st.state.value for rid, st in store.statuses().items()}

    def mid_sweep() -> bool:
        """A run completed, and a live trainer is past its first checkpoint (step 4)."""
        if not store.exists():
            return False
        live = [
            pid_alive(_trainer_pid(p)) and _logged(p.parent) > 6
            for p in store.runs_dir.glob("*/trainer.pid")
        ]
        return "completed" in states().values() and any(live)

    _wait_for(mid_sweep)
    proc.kill()
    proc.communicate(timeout=30)
    before = states()
    pids = [_trainer_pid(p) for p in store.runs_dir.glob("*/trainer.pid")]
    _wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=30)  # checkpointed, exited 75
    resume = [SWEEPER, "--results", str(results), "resume", "ext", "--no-progress"]
    res = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert set(states().values()) == {"completed"}
    resumed = 0
    for rid in store.run_ids():
        events = [e.state for e in read_events(store.run_dir(rid))]
        assert events.count("completed") == 1
        if before[rid] == "completed":
            assert events.count("running") == 1
        record = store.load_record(rid)
        assert [r["step"] for r in lines(store.run_dir(rid))] == list(range(record.steps + 1))
        resumed += "resuming from step" in (store.run_dir(rid) / "stdout.log").read_text()
    assert resumed >= 1  # at least one run continued from its checkpoint
    sweep = Sweep.open("ext", results)
    sweep.collect()
    assert len(sweep.table("horizons")) == 2 * len(store.run_ids())
    with pytest.raises(SweepError):
        sweep.restart_run(store.run_ids()[0])  # a completed run keeps its data
