"""Exceptions of the sweeper. Every message is one line; the CLI prints ``error: <message>``."""

from __future__ import annotations

from typing import Any

_UNSET: Any = object()


class SweepError(Exception):
    """Base class of every error the sweeper reports to the user (exit status 2, no traceback)."""


class SpecError(SweepError, ValueError):
    """A bad key or value in a sweep spec (or a CLI argument), naming the file, key and value.

    Args:
        file: The spec file (or ``"<cli>"`` / ``"extra_points.json"``) the bad value came from.
        key: Dotted key, e.g. ``grid.lr``; None when the whole file is at fault (e.g. TOML syntax).
        value: The offending value (shown with ``repr``); omit when there is none to show.
        message: Why the value is rejected.
    """

    def __init__(self, file: str, key: str | None, value: Any = _UNSET, message: str = "") -> None:
        self.file, self.key, self.value, self.message = str(file), key, value, message
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.file]
        if self.key is not None:
            parts.append(self.key if self.value is _UNSET else f"{self.key} = {_short(self.value)}")
        parts.append(self.message)
        return ": ".join(p for p in parts if p).replace("\n", " ")


class StoreError(SweepError):
    """The run store is missing, corrupt, or a write would lose data."""


class BackendError(SweepError):
    """A backend could not launch, query or cancel runs (missing scheduler, bad address, ...)."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
