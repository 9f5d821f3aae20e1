"""File-system primitives every layer may use: atomic writes that honour the umask, JSON reads that
name the file, and writes that refuse to follow symlinks out of a directory.

This module imports nothing from the rest of the sweeper (it sits below the store, the collect and
the analysis alike).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sweeper.errors import StoreError


def _umask() -> int:
    # os.umask can only be read by setting it; do it once per process (the umask does not change
    # under a running sweeper) so threads never race a temporarily changed mask.
    global _UMASK
    if _UMASK is None:
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK = mask
    return _UMASK


_UMASK: int | None = None


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file atomically: ``write(f)`` fills a temp file in the same directory, which is
    flushed, fsync'd and ``os.replace``d onto ``path``, so readers see the old file or the new one.

    The file gets mode ``0o666 & ~umask``, as ``open()`` would give it (``mkstemp`` alone gives
    0600, which hides results from the rest of a group on a shared file system).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: Path, max_bytes: int = 64 << 20) -> Any:
    """Read a JSON file; StoreError naming the file if it is missing, not a regular file (a FIFO
    is refused without blocking), larger than ``max_bytes`` or corrupt."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO opens at once (and is then refused) instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
                raise StoreError(f"{path}: {kind}")
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except IsADirectoryError:
        raise StoreError(f"{path}: is a directory") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise StoreError(f"{path}: larger than {max_bytes} bytes")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{path}: corrupt JSON ({' '.join(str(e).split())})") from None


def is_regular_or_absent(path: Path) -> bool:
    """True if ``path`` does not exist or is a regular file (symlinks are not followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def inside(path: Path, root: Path) -> bool:
    """True if ``path`` resolves (following every symlink) to ``root`` or below it."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True
