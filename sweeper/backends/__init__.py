"""Backends: where and how runs execute. Each one ends up calling :func:`sweeper.worker.run_trial`.

This package's ``__init__`` is the registry: it names each backend's module, whose ``Backend``
class owns a frozen ``Config`` (``[backend.<name>]`` in the spec). The spec asks the registry to
build a config (:func:`parse_config`); modules are imported on first use, so that e.g. ``ray`` is
only imported by a sweep that runs on Ray.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from sweeper.errors import BackendError, SpecError
from sweeper.records import RunRecord, RunState
from sweeper.store import RunStatus, SweepStore, hostname
from trainer.config import ConfigError, _build

BACKENDS: dict[str, str] = {
    "local": "sweeper.backends.local",
    "slurm": "sweeper.backends.slurm",
    "ray": "sweeper.backends.ray",
    "sim": "sweeper.backends.sim",
}


@dataclass(frozen=True)
class LaunchOptions:
    """Options of one ``launch``/``resume`` call, passed to :meth:`Backend.launch`.

    Attributes:
        max_parallel: Trials (or jobs) at once; None keeps the backend config's own limit.
        progress: Show a progress bar (blocking backends).
        on_interrupt: ``cancelled`` or ``requeue`` for a trainer that checkpointed on a signal.
    """

    max_parallel: int | None = None
    progress: bool = True
    on_interrupt: str = "cancelled"


class BackendConfig(Protocol):
    """What every backend's frozen config provides."""

    def validate(self) -> None:
        """Raise ConfigError naming the key unless every value is usable."""


class Backend(Protocol):
    """What every backend implements.

    ``blocking`` backends (local) run the runs to completion inside :meth:`launch`, after the
    caller claimed them; the others submit them under the sweep lock and return.
    """

    name: ClassVar[str]
    blocking: ClassVar[bool]
    config: Any

    def launch(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> None:
        """Run (blocking) or submit (append ``submitted`` with job ids) ``runs``.

        ``runs`` is ordered so that a trunk comes before its branches; a branch must not start
        before its trunk (``parent``) has completed.
        """

    def describe(self, store: SweepStore, runs: list[RunRecord], opts: LaunchOptions) -> str:
        """What :meth:`launch` would submit, for a dry run; submits and writes nothing."""

    def reconcile(self, store: SweepStore) -> None:
        """Refresh the states of submitted/running runs from the scheduler (append events)."""

    def cancel(self, store: SweepStore, run_ids: list[str]) -> None:
        """Stop queued/running runs; they end ``cancelled``."""


def _module(name: str) -> Any:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendError(f"backend {name!r}: unknown (known: {', '.join(BACKENDS)})") from None
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise BackendError(f"backend {name!r}: cannot import {target} ({e})") from None


def config_type(name: str) -> type:
    """The frozen config dataclass of backend ``name``."""
    cls: type = _module(name).Backend.Config
    return cls


def default_config(name: str) -> Any:
    """Backend ``name``'s config with every default."""
    return config_type(name)()


def parse_config(name: str, raw: dict[str, Any], file: str) -> Any:
    """Build and validate ``[backend.<name>]``; SpecError naming the file, key and value."""
    where = f"backend.{name}"
    try:
        cfg = _build(config_type(name), raw, where)
        cfg.validate()
    except ConfigError as e:
        raise SpecError(file, None, message=str(e)) from None
    return cfg


def load_backend(name: str, config: Any = None) -> Backend:
    """Instantiate backend ``name`` with ``config`` (default: all defaults)."""
    cls = _module(name).Backend
    backend: Backend = cls(config if config is not None else cls.Config())
    return backend


def with_parallel(config: Any, field: str, value: int | None) -> Any:
    """``config`` with its parallelism ``field`` replaced by ``value`` (None: unchanged)."""
    if value is None:
        return config
    return dataclasses.replace(config, **{field: value})


# ------------------------------------------------------------------- shared by in-host backends


def reconcile_on_this_host(
    store: SweepStore, backend: str, what: str, alive: Callable[[str, int], bool]
) -> None:
    """End the runs that ``backend`` started on this host and whose process is gone.

    A submitted, running or stale run whose last event names ``backend``, this host and a pid,
    and for which ``alive(run_id, pid)`` is false, ends ``failed`` if it was running and
    ``cancelled`` if it never started; the reason names ``what`` (e.g. ``local process``) and
    the pid. Guarded by the last event, so a run that moved on meanwhile is left alone.
    """
    me = hostname()
    live = (RunState.SUBMITTED, RunState.RUNNING, RunState.STALE)
    for rid, st in store.statuses().items():
        ev = st.last_event
        if ev is None or st.state not in live:
            continue
        if ev.backend != backend or ev.host != me or ev.pid is None or alive(rid, ev.pid):
            continue
        state = RunState.FAILED if ev.state == RunState.RUNNING else RunState.CANCELLED
        why = f"{what} {ev.pid} on {me} is gone"
        store.append_if(rid, state, expect=ev, backend=backend, reason=why)


def cancel_queued(store: SweepStore, run_id: str, backend: str) -> RunStatus:
    """Mark ``run_id`` ``cancelled`` if it is still queued (guarded by its last event, so its
    launcher skips it); return the status it had."""
    st = store.status(run_id)
    if st.state == RunState.SUBMITTED:
        store.append_if(
            run_id, RunState.CANCELLED, expect=st.last_event, backend=backend,
            reason="cancelled by user",
        )  # fmt: skip
    return st
