"""Typed, frozen records passed between the sweeper's stages.

* :class:`RunRecord` — one planned run (``runs/<id>/run.json``), written once and never edited;
  every derived quantity (tokens per step, steps, horizon steps, FLOPs) is a property computed
  from its :class:`~trainer.config.TrainConfig`.
* :class:`RunEvent` — one line of ``runs/<id>/events.jsonl``.
* :class:`RunState` and :func:`derive_state` — a run's state from its events and heartbeat.
* :func:`run_id` — the one content-addressed id function.

This module holds values only: it reads and writes no file and imports nothing of the sweeper but
its errors, so every layer above (store, plan, backends, collect, the API) can share it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

import orjson

from trainer.config import ConfigError, TrainConfig

RECORD_VERSION = 2
# Run ids and names that become directory names: no slashes, no leading dot, no "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.^+=-]{0,199}")


class RecordError(ValueError):
    """A record, event or plan entry that does not parse (one line naming the field)."""


def check_name(value: Any, what: str = "run id") -> str:
    """Return ``value`` if it is a safe file name (letters, digits, ``_.^+=-``, no ``..``)."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise RecordError(f"{what} {value!r}: not a valid name (letters, digits and _.^+=- only)")
    return value


# ------------------------------------------------------------------------------------------ states


class RunState(StrEnum):
    """Lifecycle of a run. ``STALE`` and ``ERROR`` are derived and never written."""

    PLANNED = "planned"
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # stopped early on purpose (autopilot); keeps its data
    STALE = "stale"  # running, but the heartbeat is too old
    ERROR = "error"  # the run's directory is damaged (bad record or event line)

    def is_finished(self) -> bool:
        """True for terminal states (nothing is running or queued for the run)."""
        return self in FINISHED

    def is_active(self) -> bool:
        """True while a backend owns the run (queued or running, heartbeat fresh)."""
        return self in (RunState.SUBMITTED, RunState.RUNNING)

    def is_written(self) -> bool:
        """True for states an event may carry (the others are derived)."""
        return self not in (RunState.PLANNED, RunState.STALE, RunState.ERROR)


FINISHED = frozenset(
    {RunState.COMPLETED, RunState.FAILED, RunState.DIVERGED, RunState.CANCELLED, RunState.STOPPED}
)
LAUNCHABLE = frozenset({RunState.PLANNED})
RESUMABLE = frozenset({RunState.PLANNED, RunState.FAILED, RunState.STALE, RunState.CANCELLED})


class RunKind(StrEnum):
    """How a run shares work: ``single`` (one run read off at every horizon), ``trunk`` (a
    constant-rate run that keeps branch checkpoints), ``branch`` (a decay forked from a trunk)."""

    SINGLE = "single"
    TRUNK = "trunk"
    BRANCH = "branch"


# ------------------------------------------------------------------------------------------ events


@dataclass(frozen=True, kw_only=True)
class RunEvent:
    """One state event of ``events.jsonl``."""

    ts: float
    state: RunState
    attempt: int = 0
    backend: str | None = None
    job_id: str | None = None
    host: str | None = None
    pid: int | None = None
    pid_start: int | None = None  # the process's start time (clock ticks), to rule out pid reuse
    exit_code: int | None = None
    reason: str | None = None
    stderr_tail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``events.jsonl`` (None fields left out)."""
        out: dict[str, Any] = {"ts": self.ts, "state": self.state.value, "attempt": self.attempt}
        for f in fields(self)[3:]:
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> RunEvent:
        """Validate one parsed event line.

        Raises:
            RecordError: not an object, an unknown state, or a field of the wrong type.
        """
        if type(raw) is not dict:
            raise RecordError("expected a JSON object")
        try:
            state = RunState(str(raw.get("state")))
        except ValueError:
            raise RecordError(f"state = {_short(raw.get('state'))}: unknown state") from None
        if not state.is_written():
            raise RecordError(f"state = {state.value!r}: derived, never written")
        ts = raw.get("ts")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            raise RecordError(f"ts = {_short(ts)}: expected a number")
        kwargs: dict[str, Any] = {"ts": float(ts), "state": state}
        for key, kind in _EVENT_TYPES.items():
            value = raw.get(key)
            if value is None:
                continue
            if type(value) is not kind:
                raise RecordError(f"{key} = {_short(value)}: expected {_WORDS[kind]}")
            kwargs[key] = value
        if kwargs.get("attempt", 0) < 0:
            raise RecordError(f"attempt = {kwargs['attempt']}: must be >= 0")
        return cls(**kwargs)


_EVENT_TYPES: dict[str, type] = {
    "attempt": int,
    "backend": str,
    "job_id": str,
    "host": str,
    "pid": int,
    "pid_start": int,
    "exit_code": int,
    "reason": str,
    "stderr_tail": str,
}
_WORDS = {int: "an integer", str: "a string", float: "a number"}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def derive_state(
    events: list[RunEvent], heartbeat_mtime: float | None, now: float, stale_after_s: float
) -> RunState:
    """A run's state from its events and heartbeat.

    ``planned`` without events; otherwise the last event's state, except that a ``running`` run
    whose heartbeat (or, before the first beat, its ``running`` event) is older than
    ``stale_after_s`` is ``stale``.
    """
    if not events:
        return RunState.PLANNED
    last = events[-1]
    if last.state == RunState.RUNNING:
        beat = max(heartbeat_mtime or 0.0, last.ts)
        if now - beat > stale_after_s:
            return RunState.STALE
    return last.state


def attempts(events: list[RunEvent]) -> int:
    """Number of attempts (``running`` events) so far."""
    return max((e.attempt for e in events if e.state == RunState.RUNNING), default=0)


# ----------------------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Generic compute per run, honoured by every backend (``[resources]``)."""

    nodes: int = 1
    procs_per_node: int = 1  # ranks per node; torchrun when nodes * procs_per_node > 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2  # per rank
    mem_gb: float = 8.0  # per node
    time_min: int = 60

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Resources:
        """Build from a dict already validated by the spec (or read back from a record)."""
        return cls(**{k: v for k, v in raw.items() if k in _RESOURCE_TYPES})


# Params that say how a run is watched, not what it computes: they never enter its id, so adding
# a tracking mirror to a spec keeps every run.
UNHASHED_PARAMS = frozenset({"tracking"})


def hashed_params(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The part of a record's params its id hashes."""
    if not params:
        return None
    kept = {k: v for k, v in params.items() if k not in UNHASHED_PARAMS}
    return kept or None


def run_id(
    slug: str, kind: str, train: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> str:
    """``<slug>-<8 hex>``: the sha256 of the canonical JSON (sorted keys, compact) of the run's
    kind, resolved TrainConfig dict and (when present) its free-form params. The only run-id
    function."""
    doc: dict[str, Any] = {"kind": kind, "train": train}
    if params:
        doc["params"] = params
    blob = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return f"{slug}-{hashlib.sha256(blob).hexdigest()[:8]}"


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One planned run: what to train and where it sits in the sweep.

    ``train`` is the resolved config the trainer receives (its ``horizons_tokens`` are the token
    budgets the run is read off at; a single run's id hashes only its largest). ``command``
    replaces ``python -m trainer`` when set.
    """

    id: str
    slug: str
    kind: RunKind
    parent: str | None
    sweep: str
    model: str
    train: TrainConfig
    resources: Resources = Resources()
    source: str = "grid"
    command: tuple[str, ...] | None = None
    # free-form, JSON-able values the planner passes through to the trainer unchanged (e.g. an
    # external trainer's own axes, the simulator's surface); part of the id
    params: Mapping[str, Any] | None = None

    # ---- derived quantities: one place, from the config
    @property
    def lr(self) -> float:
        return self.train.optim.lr

    @property
    def batch_size(self) -> int:
        return self.train.batch_size

    @property
    def seed(self) -> int:
        return self.train.seed

    @property
    def lr_scales(self) -> tuple[float, float, float]:
        o = self.train.optim
        return (o.lr_scale_in, o.lr_scale_hidden, o.lr_scale_out)

    @property
    def tokens_per_step(self) -> int:
        return self.train.tokens_per_step

    @property
    def steps(self) -> int:
        return self.train.total_steps

    @property
    def start_step(self) -> int:
        """The step the run starts from (a branch's fork step, else 0)."""
        return self.train.branch.step if self.train.branch is not None else 0

    @property
    def horizons_tokens(self) -> tuple[int, ...]:
        return self.train.horizons_tokens

    @property
    def horizon_steps(self) -> tuple[int, ...]:
        return self.train.horizon_steps

    @property
    def trained_tokens(self) -> int:
        """Tokens this run trains itself (a branch reuses its trunk's up to the fork)."""
        return (self.steps - self.start_step) * self.tokens_per_step

    @property
    def flops(self) -> float:
        """Training compute of this run's own steps (see ``TrainConfig.flops_per_token``)."""
        return self.train.flops_per_token() * self.trained_tokens

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``run.json``."""
        return {
            "record_version": RECORD_VERSION,
            "id": self.id,
            "slug": self.slug,
            "kind": self.kind.value,
            "parent": self.parent,
            "sweep": self.sweep,
            "model": self.model,
            "source": self.source,
            "train": self.train.to_dict(),
            "resources": self.resources.to_dict(),
            "command": list(self.command) if self.command else None,
            "params": dict(self.params) if self.params else None,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> RunRecord:
        """Validate a parsed ``run.json``.

        Raises:
            RecordError: a missing or bad field, naming it.
        """
        if type(raw) is not dict:
            raise RecordError("expected a JSON object")
        try:
            kind = RunKind(str(raw.get("kind")))
        except ValueError:
            raise RecordError(f"kind = {_short(raw.get('kind'))}: unknown kind") from None
        parent = raw.get("parent")
        if parent is not None:
            check_name(parent, "parent")
        train = raw.get("train")
        if type(train) is not dict:
            raise RecordError("train: expected an object")
        try:
            cfg = TrainConfig.from_dict(train)
        except ConfigError as e:
            raise RecordError(f"train: {e}") from None
        return cls(
            id=check_name(raw.get("id")),
            slug=_string(raw, "slug"),
            kind=kind,
            parent=parent,
            sweep=_string(raw, "sweep"),
            model=_string(raw, "model"),
            train=cfg,
            resources=_resources(raw.get("resources")),
            source=_string(raw, "source", "grid"),
            command=_command(raw.get("command")),
            params=_params(raw.get("params")),
        )


def _string(raw: dict[str, Any], key: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise RecordError(f"{key} = {_short(value)}: expected a string")
    return value


def _resources(raw: Any) -> Resources:
    if raw is None:
        return Resources()
    if type(raw) is not dict:
        raise RecordError("resources: expected an object")
    for name, kind in _RESOURCE_TYPES.items():
        value = raw.get(name)
        if value is None:
            continue
        ok = type(value) is int or (kind == "float" and type(value) is float)
        if not ok or value <= 0 and name != "gpus_per_node" or value < 0:
            raise RecordError(f"resources.{name} = {_short(value)}: bad value")
    return Resources.from_dict(raw)


_RESOURCE_TYPES = {f.name: f.type for f in fields(Resources)}


def _params(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if type(raw) is not dict:
        raise RecordError(f"params = {_short(raw)}: expected an object")
    return raw


def _command(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if type(raw) is not list or not raw or not all(isinstance(c, str) for c in raw):
        raise RecordError(f"command = {_short(raw)}: expected a list of strings")
    return tuple(raw)
