"""The training loop end to end on CPU: files, resume, signals, divergence, DDP, branches."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.__main__ import main as cli_main
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.config import EXIT_CONFIG, EXIT_DIVERGED, EXIT_INTERRUPTED, ConfigError, TrainConfig
from trainer.data import DataError
from trainer.metrics import MetricsWriter, read_metrics
from trainer.train import train

METRIC_KEYS = {
    "step",
    "tokens",
    "train_loss",
    "lr_in",
    "lr_hidden",
    "lr_out",
    "output_norm",
    "output_norm_rms",
    "input_norm",
    "hidden_norm",
    "update_norm_in",
    "update_norm_hidden",
    "update_norm_out",
    "grad_norm",
    "tokens_per_s",
    "step_time_s",
    "horizon",
}
SUMMARY_KEYS = {
    "status",
    "step",
    "tokens",
    "final_loss",
    "final_output_norm",
    "wall_time_s",
    "diverged_step",
    "reason",
}
# 100 and 200 steps of 4 x 16 tokens, a line per step, periodic checkpoints every 7 steps
LONG = {
    "horizons_tokens": [6400, 12800],
    "log_every": 1,
    "checkpoint_every": 7,
    "keep_checkpoints": 2,
}


def _losses(rows: list[dict[str, Any]], key: str = "train_loss") -> list[tuple[int, Any]]:
    return [(r["step"], r.get(key)) for r in rows]


@pytest.fixture(scope="module")
def reference(micro_run: Callable[..., dict], tmp_path_factory: pytest.TempPathFactory) -> list:
    """Metrics of the LONG run trained without interruption (in this process)."""
    out = tmp_path_factory.mktemp("reference")
    assert train(TrainConfig.from_dict(micro_run(**LONG)), out)["status"] == "completed"
    return read_metrics(out / "metrics.jsonl")


def _wait_for_step(out: Path, step: int, proc: Any, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(out / "metrics.jsonl")
        if rows and rows[-1]["step"] >= step:
            return
        assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()}"
        time.sleep(0.01)
    raise AssertionError(f"no metrics line for step {step} within {timeout} s")


def test_run_writes_the_contract_files(micro_run: Callable[..., dict], tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(micro_run())
    summary = train(cfg, tmp_path)
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "completed" and summary["step"] == 20
    assert summary["tokens"] == 1280 and summary["diverged_step"] is None
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("schema_version") == 1 and TrainConfig.from_dict(config) == cfg
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["world_size"] == 1 and prov["torch"] == torch.__version__ and "git_sha" in prov
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    for r in rows:
        assert set(r) - {"val_loss"} == METRIC_KEYS
        assert r["horizon"] == (r["step"] in (10, 20)) == ("val_loss" in r)
        assert r["tokens"] == 64 * r["step"]
    assert rows[0]["train_loss"] == pytest.approx(math.log(256), abs=0.05)  # uniform at init
    assert rows[0]["output_norm"] == pytest.approx(1.0, rel=1e-5)  # Scion init
    assert rows[0]["update_norm_out"] is None
    for r in rows[1:]:  # a RowNorm update moves W_out by exactly lr in the RMS->inf norm
        assert r["update_norm_out"] == pytest.approx(r["lr_out"], rel=1e-4)
    assert rows[-1]["train_loss"] == summary["final_loss"]
    assert rows[-1]["output_norm"] == summary["final_output_norm"]
    assert not (tmp_path / "ckpt").exists() or not list_checkpoints(tmp_path / "ckpt")
    # the same command again is a no-op that reports the completed run
    before = (tmp_path / "metrics.jsonl").read_text()
    assert train(cfg, tmp_path) == summary
    assert (tmp_path / "metrics.jsonl").read_text() == before
    other = TrainConfig.from_dict(micro_run(seed=31))
    with pytest.raises(ConfigError, match=r"^seed: differs from .*config\.json"):
        train(other, tmp_path)


@pytest.mark.slow  # 15 s: three subprocess trainings
def test_sigkill_sigterm_and_corrupt_checkpoint_resume_bit_identical(
    micro_run: Callable[..., dict], trainer_cli: Any, reference: list, tmp_path: Path
) -> None:
    """One run killed with SIGKILL at a random step, resumed, stopped with SIGTERM, its newest
    checkpoint corrupted, and resumed to the end: every logged value equals the reference."""
    cfg, out = micro_run(**LONG), tmp_path / "run"
    kill_at = random.randint(10, 60)
    proc = trainer_cli.start(cfg, out)
    _wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "summary.json").exists(), f"run finished before the kill at {kill_at}"
    resumed_from = list_checkpoints(out / "ckpt")[-1][0]

    proc = trainer_cli.start(cfg, out)  # resumes; stopped by SIGTERM a few steps later
    _wait_for_step(out, resumed_from + 10, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED
    assert f"resuming at step {resumed_from}" in proc.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["reason"] == "SIGTERM"
    ckpts = list_checkpoints(out / "ckpt")
    assert ckpts[-1][0] == summary["step"]  # saved on the signal
    assert len(ckpts) == 2  # the signal's checkpoint counts as one of keep_checkpoints
    state = load_checkpoint(ckpts[-1][1])
    assert state["step"] == summary["step"] and set(state) >= {"model", "optimizer", "rng"}
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == summary["step"] - 1

    ckpts[-1][1].write_bytes(b"garbage" * 100)  # the newest is corrupt: fall back to the previous
    done = trainer_cli.run(cfg, out)
    assert done.returncode == 0, done.stderr
    assert "unreadable" in done.stderr and f"resuming at step {ckpts[-2][0]}" in done.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    rows = read_metrics(out / "metrics.jsonl")
    assert _losses(rows) == _losses(reference), f"killed at step >= {kill_at}"
    for key in ("val_loss", "output_norm", "update_norm_hidden", "grad_norm"):
        assert _losses(rows, key) == _losses(reference, key), key


def test_sigusr2_in_process_checkpoints_and_returns_interrupted(
    micro_run: Callable[..., dict], tmp_path: Path
) -> None:
    cfg = TrainConfig.from_dict(micro_run(horizons_tokens=[64 * 1000], log_every=1))

    def signal_after_three_lines() -> None:
        while len(read_metrics(tmp_path / "metrics.jsonl")) < 3:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGUSR2)

    sender = threading.Thread(target=signal_after_three_lines, daemon=True)
    sender.start()
    summary = train(cfg, tmp_path)
    sender.join(timeout=10)
    assert summary["status"] == "interrupted" and summary["reason"] == "SIGUSR2"
    assert 3 <= summary["step"] < 1000
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt")] == [summary["step"]]
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # the handler is restored


def test_huge_lr_diverges_with_exit_3(micro_run: Callable[..., dict], tmp_path: Path) -> None:
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"id": "x", "train": micro_run(optim={"lr": 3000.0})}))
    out = tmp_path / "div"
    assert cli_main(["--run", str(run_json), "--out", str(out)]) == EXIT_DIVERGED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == summary["step"] >= 1
    assert "initial loss" in summary["reason"] or "nan" in summary["reason"]
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["step"] == summary["diverged_step"]  # the diverged step is logged
    assert cli_main(["--run", str(run_json), "--out", str(out)]) == EXIT_DIVERGED  # final


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"horizons_tokens": [1000]}, "horizons_tokens: 1000 is not a positive multiple"),
        ({"optim": {"lr": -1}}, "optim.lr = -1.0"),
        ({"bogus": 1}, "bogus: unknown key"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(
    micro_run: Callable[..., dict],
    trainer_cli: Any,
    tmp_path: Path,
    override: dict,
    message: str,
) -> None:
    out = tmp_path / "bad"
    done = trainer_cli.run(micro_run(**override), out)
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")
    assert re.search(message, done.stderr), done.stderr
    assert not out.exists()


def test_too_small_corpus_fails_before_writing_anything(
    micro_run: Callable[..., dict], tmp_path: Path
) -> None:
    data = {**micro_run()["data"], "synthetic_tokens": 1000}
    cfg = TrainConfig.from_dict(micro_run(data=data))
    with pytest.raises(DataError, match=r"too small: 58 windows .* 14 steps .* needs 21") as e:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


@pytest.mark.slow  # two torchrun ranks start and import torch: ~11 s
def test_two_rank_torchrun_matches_one_rank(
    micro_run: Callable[..., dict], trainer_cli: Any, tmp_path: Path
) -> None:
    common = {"log_every": 1, "checkpoint_at_horizons": True}
    one = tmp_path / "one"
    train(TrainConfig.from_dict(micro_run(**common)), one)
    two = tmp_path / "two"
    done = trainer_cli.run(micro_run(micro_batch_size=1, **common), two, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "provenance.json").read_text())["world_size"] == 2
    rows1, rows2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == list(range(21))
    for key in ("train_loss", "val_loss", "output_norm", "grad_norm"):
        a = [r.get(key) for r in rows1 if r.get(key) is not None]
        b = [r.get(key) for r in rows2 if r.get(key) is not None]
        assert b == pytest.approx(a, rel=1e-4), key
    final1 = load_checkpoint(one / "ckpt" / "step_00000020.pt")["model"]
    final2 = load_checkpoint(two / "ckpt" / "step_00000020.pt")["model"]
    for name, w in final1.items():
        torch.testing.assert_close(final2[name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_branch_from_trunk_checkpoint_equals_the_uninterrupted_run(
    micro_run: Callable[..., dict], tmp_path: Path
) -> None:
    wsd = {"kind": "wsd", "decay_fraction": 0.25}  # 40 steps: stable to 30, decay over 30..40
    base = {"log_every": 1, "horizons_tokens": [2560], "schedule": wsd}
    straight = tmp_path / "straight"
    train(TrainConfig.from_dict(micro_run(**base)), straight)
    trunk = tmp_path / "trunk"
    trunk_cfg = micro_run(
        log_every=1,
        horizons_tokens=[1920],
        checkpoint_steps=[20],
        checkpoint_every=5,
        keep_checkpoints=1,
    )
    train(TrainConfig.from_dict(trunk_cfg), trunk)
    assert [s for s, _ in list_checkpoints(trunk / "ckpt")] == [20, 30]  # 20 kept, 25 pruned
    branch = tmp_path / "branch"
    cfg = micro_run(**base, branch={"run_dir": str(trunk), "step": 20})
    summary = train(TrainConfig.from_dict(cfg), branch)
    assert summary["status"] == "completed" and summary["step"] == 40
    want = [r for r in read_metrics(straight / "metrics.jsonl") if r["step"] >= 20]
    got = read_metrics(branch / "metrics.jsonl")
    assert _losses(got) == _losses(want)
    assert _losses(got, "lr_hidden") == _losses(want, "lr_hidden")
    assert _losses(got, "val_loss") == _losses(want, "val_loss")
    missing = micro_run(**base, branch={"run_dir": str(trunk), "step": 15})
    with pytest.raises(ConfigError, match="no checkpoint for step 15"):
        train(TrainConfig.from_dict(missing), tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    deeper = micro_run(**base, model={"preset": "test-micro", "n_layers": 2})
    deeper["branch"] = {"run_dir": str(trunk), "step": 20}
    with pytest.raises(ConfigError, match="branch: model.n_layers differs from the trunk's"):
        train(TrainConfig.from_dict(deeper), tmp_path / "nowhere")


def test_metrics_writer_drops_lines_from_the_resumed_step_and_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 5}\n{"step": 10}\n{"step": 1')  # killed mid-write
    writer = MetricsWriter(path, resume_step=10)
    writer.write({"step": 10, "tokens": 160, "train_loss": float("nan")})
    writer.close()
    rows = read_metrics(path)
    assert rows[:2] == [{"step": 0}, {"step": 5}]
    assert rows[2]["step"] == 10 and rows[2]["tokens"] == 160 and rows[2]["train_loss"] is None
    assert len(rows) == 3
    assert path.read_text().endswith("\n")


@pytest.mark.slow
def test_stdlib_corpus_training_lowers_the_loss(data_cache: Path, tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(
        {
            "model": {"preset": "cpu-tiny"},
            "data": {"kind": "stdlib", "cache_dir": str(data_cache)},
            "optim": {"lr": 2**-3},
            "batch_size": 8,
            "horizons_tokens": [8 * 64 * 300],
            "log_every": 50,
            "val_tokens": 4096,
            "threads": 1,
        }
    )
    summary = train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert summary["status"] == "completed" and rows[-1]["step"] == 300
    assert rows[0]["train_loss"] == pytest.approx(math.log(256), abs=0.1)
    assert rows[-1]["train_loss"] < 3.0 and rows[-1]["val_loss"] < 3.0
