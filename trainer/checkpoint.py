"""Checkpoints: atomic save, newest-valid load, retention.

A checkpoint is ``ckpt/step_XXXXXXXX.pt`` holding only tensors, containers and plain values (model
and optimizer state dicts, step, RNG states, the initial loss and pending metrics), so it loads with
``torch.load(weights_only=True)``. It is written to a temp file in the same directory, fsync'd and
``os.replace``d, so a reader sees either the old set of files or the new one, never a partial file.
A file that still fails to load (a disk error, a truncated copy) is skipped in favour of the
previous one.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.schema import checkpoint_name

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    """The file name of the checkpoint at ``step``."""
    return ckpt_dir / checkpoint_name(step)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``ckpt_dir``, oldest first (temp files excluded)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically; return its path."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(ckpt_dir, step)
    tmp = ckpt_dir / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(ckpt_dir)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint on the CPU with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(ckpt_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that loads, as ``(step, state)``; None if there is none.

    A checkpoint that fails to load is logged and skipped, so a corrupt newest file falls back to
    the previous one.
    """
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except Exception as e:  # any unreadable file: fall back rather than lose the run
            log.warning(
                "checkpoint %s is unreadable (%s: %s); trying an older one",
                path,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            continue
        if state.get("step") != step:
            log.warning("checkpoint %s holds step %s; skipping it", path, state.get("step"))
            continue
        return step, state
    return None


def prune_checkpoints(ckpt_dir: Path, keep: int, is_permanent: Callable[[int], bool]) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints; permanent ones are never deleted."""
    periodic = [(s, p) for s, p in list_checkpoints(ckpt_dir) if not is_permanent(s)]
    for _, path in periodic[: max(0, len(periodic) - keep)]:
        path.unlink(missing_ok=True)
