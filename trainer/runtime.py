"""What a training process needs from its environment: the torchrun ranks and the process group
(:class:`DistEnv`), CPU threads, the provenance of a run (versions, host, git state), and the
stop flag set by SIGTERM/SIGUSR2."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.config import ConfigError, TrainConfig

# ------------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env_from_environ(cfg: TrainConfig) -> DistEnv:
    """Read torchrun's environment and pick the device (``cuda:LOCAL_RANK`` on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda': CUDA is not available on this machine")
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


def configure_threads(cfg: TrainConfig, env: DistEnv) -> None:
    """On CPU: ``threads`` per rank, or the cores shared evenly among the ranks of this host."""
    if env.device.type != "cpu":
        return
    threads = cfg.threads
    if threads is None and env.local_world_size > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // env.local_world_size)
    if threads is not None:
        torch.set_num_threads(threads)


def init_process_group(env: DistEnv) -> bool:
    """Initialise torch.distributed when launched with several ranks; True if done here."""
    if not env.distributed or dist.is_initialized():
        return False
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
        dist.init_process_group("nccl", device_id=env.device)
    else:
        dist.init_process_group("gloo")
    return True


# ------------------------------------------------------------------------------------ provenance


def _git_state() -> tuple[str | None, bool | None]:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, bool(status.strip())


def provenance(env: DistEnv) -> dict[str, Any]:
    """Code version, software versions and hardware of this run (``provenance.json``)."""
    sha, dirty = _git_state()
    device_name = (
        torch.cuda.get_device_name(env.device)
        if env.device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(env.device),
        "device_name": device_name,
        "world_size": env.world_size,
        "hostname": socket.gethostname(),
        "threads": torch.get_num_threads(),
        "start_time": time.time(),
    }


# ------------------------------------------------------------------------------------------ signals


class StopFlag:
    """Set by SIGTERM/SIGUSR2 so the loop checkpoints at the next step boundary and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
