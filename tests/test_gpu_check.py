"""``bench/gpu_check.py`` without a GPU: its one-line "no CUDA" form, and its code paths on a CPU
with the tiny ``test-micro`` preset."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from trainer import optim
from trainer.config import TrainConfig, model_from_preset

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
SMOKE = ["--device", "cpu", "--presets", "test-micro", "--steps", "3", "--warmup", "1",
         "--ns-steps", "2"]  # fmt: skip


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_without_cuda_it_prints_one_line_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no CUDA") and done.stdout.count("\n") == 1, done.stdout
    assert done.stderr == ""


@pytest.mark.usefixtures("one_thread")
def test_cpu_smoke_mode_runs_every_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([*SMOKE, "--no-compile"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["bf16", "adamw", "fp32"]
    assert "Scion/AdamW step ratio (bf16, eager):" in out
    assert out.count("within the tolerance 2%") == 1 and out.rstrip().endswith(" s")
    bf16 = rows[1].split(" | ")
    assert bf16[6] != "-" and bf16[7].endswith("%")  # Newton-Schulz ms and share
    assert optim.newton_schulz is gpu_check.NewtonSchulzTimer(torch.device("cpu")).fn


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_cpu_smoke_mode_with_compile(capsys: pytest.CaptureFixture[str]) -> None:
    """``torch.compile`` with the ``eager`` backend: the compiled path without a C++ toolchain."""
    assert gpu_check.main([*SMOKE, "--compile-backend", "eager"]) == 0
    out = capsys.readouterr().out
    assert "| bf16+compile |" in out and "torch.compile speed-up" in out
    assert out.count("within the tolerance") == 2


@pytest.mark.usefixtures("one_thread")
def test_disagreeing_losses_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([*SMOKE, "--no-compile", "--tolerance", "1e-12"]) == 1
    out = capsys.readouterr().out
    assert "OUTSIDE the tolerance" in out and "FAILED" in out


def test_flops_mfu_and_agreement_helpers() -> None:
    cfg = model_from_preset("proxy")
    trainer, with_out = gpu_check.flops_per_token(cfg)
    assert trainer == TrainConfig(model=cfg).flops_per_token()
    assert with_out - trainer == 6 * 128256 * 256
    assert math.isclose(gpu_check.mfu(1e9, 5e5, 1000.0), 0.5)
    assert gpu_check.mfu(1e9, 5e5, None) is None
    assert gpu_check.peak_tflops_of(torch.device("cpu"), None) is None
    assert gpu_check.peak_tflops_of(torch.device("cpu"), 123.0) == 123.0
    assert gpu_check.loss_agreement(5.05, 5.0, 0.02) == pytest.approx((0.01, True))
    assert not gpu_check.loss_agreement(5.2, 5.0, 0.02)[1]
    assert not gpu_check.loss_agreement(float("nan"), 5.0, 0.02)[1]


def test_batches_are_shifted_windows_of_the_synthetic_chain() -> None:
    cfg = model_from_preset("test-micro")
    xs, ys = gpu_check.make_batches(cfg, 3, 2, 8)
    assert xs.shape == ys.shape == (3, 2, cfg.seq_len) and xs.dtype == torch.int64
    assert torch.equal(xs[:, :, 1:], ys[:, :, :-1])
    assert int(xs.max()) < cfg.vocab_size


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "tpu"])
    assert gpu_check.parse_args(["--steps", "4"]).loss_window == 4
