"""Backends: where and how runs execute. Each one ends up calling :func:`sweeper.worker.run_trial`.

Modules are imported lazily (``load_backend``) so that, e.g., ``ray`` is only imported when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from sweeper.errors import BackendError
from sweeper.store import SweepStore

BACKENDS: dict[str, str] = {
    "local": "sweeper.backends.local:LocalBackend",
    "slurm": "sweeper.backends.slurm:SlurmBackend",
    "ray": "sweeper.backends.ray:RayBackend",
}


@dataclass
class LaunchOptions:
    """Options of one ``launch``/``resume`` call, passed to :meth:`Backend.launch`.

    Attributes:
        max_parallel: Trials at once (local) or concurrent jobs/trials (cluster backends, 0 = spec).
        progress: Show a progress bar (local).
        dry_run: Print what would run, start nothing.
        on_interrupt: ``cancelled`` or ``requeue`` for a trainer that checkpointed on a signal.
        extra: Backend-specific options.
    """

    max_parallel: int = 1
    progress: bool = True
    dry_run: bool = False
    on_interrupt: str = "cancelled"
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """What every backend implements."""

    name: str

    def launch(self, store: SweepStore, runs: list[str], opts: LaunchOptions) -> None:
        """Run (local: to completion) or submit (cluster: append ``submitted`` with job ids) runs.

        ``runs`` is ordered so that a trunk comes before its branches; a branch must not start
        before its trunk (``run.json`` ``parent``) has completed.
        """

    def reconcile(self, store: SweepStore) -> None:
        """Refresh the states of submitted/running runs from the scheduler (append events)."""

    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """Stop queued/running runs; they end ``cancelled``."""


def load_backend(name: str, **kwargs: Any) -> Backend:
    """Instantiate backend ``name`` (``local``, ``slurm``, ``ray``); BackendError if unavailable."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendError(f"backend {name!r}: unknown (known: {', '.join(BACKENDS)})") from None
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendError(f"backend {name!r}: cannot import {module_name} ({e})") from None
    return getattr(module, cls_name)(**kwargs)
