"""Shared fixtures: a tiny run configuration on the synthetic corpus and a trainer launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: small products on two threads of a shared machine mostly wait."""
    import torch  # here, not at the top: most tests never need torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory for built-in corpora, shared by all tests of one pytest run."""
    return tmp_path_factory.mktemp("trainer-cache")


@pytest.fixture(scope="session")
def micro_run(data_cache: Path) -> Callable[..., dict[str, Any]]:
    """Factory of TrainConfig dicts: ``test-micro`` model, synthetic data, 1 thread, 20 steps.

    Keyword arguments override top-level keys (``model``/``optim``/... replace whole sub-tables).
    """

    def make(**overrides: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "model": {"preset": "test-micro"},
            "data": {
                "kind": "synthetic",
                "synthetic_tokens": 100_000,
                "cache_dir": str(data_cache),
            },
            "batch_size": 4,
            "horizons_tokens": [640, 1280],  # 10 and 20 steps of 4 x 16 tokens
            "log_every": 5,
            "val_tokens": 256,
            "checkpoint_every": 0,
            "threads": 1,
        }
        cfg.update(overrides)
        return cfg

    return make


def trainer_command(run_json: Path, out_dir: Path, nproc: int = 1) -> list[str]:
    """``python -m trainer`` (or torchrun with ``nproc`` ranks) for a run file and directory."""
    if nproc == 1:
        return [sys.executable, "-m", "trainer", "--run", str(run_json), "--out", str(out_dir)]
    # "--" keeps torchrun's parser off "--run" (an ambiguous prefix of its --run-path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", "-m", "trainer", "--",
            "--run", str(run_json), "--out", str(out_dir)]  # fmt: skip


class TrainerCLI:
    """Runs ``python -m trainer`` (or torchrun) in subprocesses on config dicts."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}

    def _command(self, cfg: dict[str, Any], out_dir: Path, nproc: int) -> list[str]:
        run_json = self.tmp_path / f"run-{out_dir.name}.json"
        run_json.write_text(json.dumps(cfg))
        return trainer_command(run_json, out_dir, nproc)

    def run(
        self, cfg: dict[str, Any], out_dir: Path, nproc: int = 1, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run to the end; the completed process has ``returncode``, ``stdout``, ``stderr``."""
        return subprocess.run(
            self._command(cfg, out_dir, nproc),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=REPO,
        )

    def start(self, cfg: dict[str, Any], out_dir: Path) -> subprocess.Popen[str]:
        """Start one rank in the background (stderr to a pipe) and return the process."""
        return subprocess.Popen(
            self._command(cfg, out_dir, 1),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=REPO,
        )


@pytest.fixture
def trainer_cli(tmp_path: Path) -> TrainerCLI:
    """A :class:`TrainerCLI` writing its run files under ``tmp_path``."""
    return TrainerCLI(tmp_path)
