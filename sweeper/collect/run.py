"""Read one run directory into its ``runs`` row, and decide whether its numbers can be trusted.

A run's row is built from its record (``run.json``, through :class:`~sweeper.records.RunRecord`),
its status (the store's, the same as ``sweeper status``), the trainer's files (``config.json``,
``summary.json``, ``provenance.json``, through ``trainer.schema``) and its metrics (read by
:mod:`sweeper.collect.metrics` for many runs at once). Cross-checks that fail go into the row's
``problem``; such a run gets no horizon rows (docs/tables.md):

* ``run.json`` missing, corrupt, invalid, or naming another id;
* ``config.json`` (what the trainer trained) differs from the record's ``train`` (the first
  differing key is named; the row then shows neither file's values), or is unreadable;
* ``summary.json`` says ``completed`` at a step other than the planned last one, or beyond the last
  step of ``metrics.jsonl``; says more steps than planned; disagrees with the events' ``completed``;
  is missing for a completed or diverged run, or is unreadable.

Nothing here raises for a broken file: every problem becomes a sentence in the row.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sweeper.collect.scan import WATCHED, file_signature, stat_signature
from sweeper.records import RecordError, RunRecord, RunState
from sweeper.spec_protocol import schedule_tag
from sweeper.store import EVENTS, HORIZONS, RECORD, RunStatus, SweepStore
from sweeper.store_read import MAX_RECORD_BYTES
from trainer.config import ConfigError, ModelConfig, TrainConfig
from trainer.schema import (
    CONFIG_FILE,
    METRICS_FILE,
    PROVENANCE_FILE,
    SUMMARY_FILE,
    SchemaError,
    Status,
    Summary,
)

_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
_FAILING = frozenset({RunState.FAILED, RunState.DIVERGED, RunState.CANCELLED, RunState.ERROR})
# Keys of config.json that may differ from the record's train on purpose: the worker resolves them
# for the machine the run ran on (sweeper.worker._write_trial).
_MACHINE_KEYS = frozenset({"threads", "branch.run_dir", "horizons_tokens"})
_UNREAD = RunStatus("", RunState.PLANNED)  # a RunInfo's status until its files are read


@dataclass(frozen=True)
class Context:
    """What every run of one collect shares."""

    store: SweepStore
    sweep_name: str
    now: float
    listed: frozenset[str]  # run ids in plan.json

    @functools.cached_property
    def runs_dir(self) -> str:
        return str(self.store.runs_dir)  # plain strings: pathlib costs ~10% of a large collect


@dataclass
class RunInfo:
    """Everything read from one run directory, before its metrics are known."""

    run_id: str
    status: RunStatus
    record: RunRecord | None = None
    horizons: tuple[int, ...] = ()  # record's horizons plus those of horizons.json
    planned_steps: int | None = None  # the last step of the config the trainer ran
    summary: Summary | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: bytes = b""
    config_mismatch: bool = False  # config.json disagrees with run.json: neither is believed
    files_read: bool = False  # False: the directory is missing or refused
    record_checked: bool = False  # run.json read and validated (the store need not read it)
    signature: str = ""  # the files as they were read (sweeper.collect.scan)


class _Unreadable(Exception):
    """A run file that exists but cannot be used (the message names it)."""


def read_run(ctx: Context, run_id: str) -> RunInfo:
    """Read one run's files (all but the parsing of its metrics); never raises for bad files."""
    files = RunFiles(f"{ctx.runs_dir}/{run_id}")
    files.stat(EVENTS)  # before the store reads it
    info = RunInfo(run_id, _UNREAD)
    try:
        _read_files(ctx, files, info)
    except OSError as e:  # e.g. a run directory that cannot be listed: this run only
        info.problems.append(f"run directory unreadable ({e.strerror})")
    # run.json was read and validated above: the store does not read it again
    info.status = ctx.store.status(run_id, now=ctx.now, record_checked=info.record_checked)
    info.signature = files.signature()
    return info


def _read_files(ctx: Context, files: RunFiles, info: RunInfo) -> None:
    run_id = info.run_id
    try:
        is_link = stat.S_ISLNK(os.lstat(files.rd).st_mode)
    except FileNotFoundError:
        where = "listed in plan.json" if run_id in ctx.listed else "gone"
        info.problems.append(f"run directory missing ({where})")
        return
    if is_link:
        info.problems.append("run directory is a symlink; refused")
        return
    info.files_read = True
    info.record, raw_train = _load_record(files, run_id, info.problems)
    if info.record is not None:
        # what the store checks of run.json, collect has just checked (the size bound aside)
        info.record_checked = int(files.sigs[RECORD].split(":")[0]) <= MAX_RECORD_BYTES
        extra = ctx.store.extra_horizons(run_id) if files.stat(HORIZONS) != "-" else ()
        info.horizons = _trained_horizons(info.record, extra, info.notes)
        info.planned_steps = _check_config(files, info, raw_train)
    info.summary = _load_summary(files, info.problems)
    info.provenance = files.load(PROVENANCE_FILE, info.notes) or {}
    try:
        info.metrics = files.read(METRICS_FILE) or b""
    except _Unreadable as e:
        info.notes.append(str(e))


def _trained_horizons(
    record: RunRecord, extra: tuple[int, ...], notes: list[str]
) -> tuple[int, ...]:
    """The horizons the run itself trains: its record's plus those of ``horizons.json``, inside
    its span (after its start step, up to its last planned horizon).

    A continuation or a decay branch starts at its parent's step: a horizon at or before that step
    was trained by the parent, and is read off the parent's run, never this one (``SweepStore.
    add_horizons`` never adds one; a hand-edited file may). Those left out are named in ``notes``.
    """
    start = record.start_step * record.tokens_per_step
    last = record.horizons_tokens[-1] if record.horizons_tokens else 0
    wanted = set(record.horizons_tokens) | set(extra)
    kept = tuple(sorted(h for h in wanted if start < h <= last))
    if len(kept) < len(wanted):
        left = sorted(wanted - set(kept))
        notes.append(
            f"horizons {left} outside the run's span ({start}, {last}] tokens ignored "
            f"(it starts at step {record.start_step})"
        )
    return kept


class RunFiles:
    """The files of one run directory, each read at most once.

    Remembers each file's signature (see :mod:`sweeper.collect.scan`) as it was when read (the
    ``fstat`` of the open file, before reading it), so a first collect needs no separate pass of
    ``stat`` calls, and a file that changes while it is read is read again next time.
    """

    def __init__(self, rd: str) -> None:
        self.rd = rd
        self.sigs: dict[str, str] = {}

    def signature(self) -> str:
        """The run's signature: as read, or (for a file not read) as it is now."""
        return ",".join([self.sigs.get(n) or self.stat(n) for n in WATCHED])

    def stat(self, name: str) -> str:
        """The file's signature without reading it."""
        self.sigs[name] = sig = file_signature(f"{self.rd}/{name}")
        return sig

    def read(self, name: str) -> bytes | None:
        """The file's bytes; None if it does not exist. Symlinks are not followed."""
        try:
            fd = os.open(f"{self.rd}/{name}", _NOFOLLOW)
        except FileNotFoundError:
            self.sigs[name] = "-"
            return None
        except OSError as e:
            raise _Unreadable(f"{name}: cannot read ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            self.sigs[name] = stat_signature(st)
            if not stat.S_ISREG(st.st_mode):
                raise _Unreadable(f"{name}: not a regular file")
            data = os.read(fd, st.st_size + 1)
            if len(data) <= st.st_size:
                return data
            parts = [data]  # it grew since the fstat (a live metrics file): read to the end
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        except OSError as e:
            raise _Unreadable(f"{name}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)

    def load(self, name: str, sink: list[str]) -> dict[str, Any] | None:
        """A JSON object file, None if it is missing; a bad one is described in ``sink``."""
        try:
            data = self.read(name)
            return None if data is None else _parse_object(data, name)
        except _Unreadable as e:
            sink.append(str(e))
            return None


def _parse_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise _Unreadable(f"{name}: corrupt JSON ({' '.join(str(e).split())})") from None
    if type(obj) is not dict:
        raise _Unreadable(f"{name}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _load_record(
    files: RunFiles, run_id: str, problems: list[str]
) -> tuple[RunRecord | None, dict[str, Any] | None]:
    """The run's record and the raw ``train`` dict of its ``run.json``."""
    raw = files.load(RECORD, problems)
    if raw is None:
        if not problems:
            problems.append(f"{RECORD}: missing")
        return None, None
    try:
        record = RunRecord.from_dict(raw)
    except RecordError as e:
        problems.append(f"{RECORD}: {e}")
        return None, None
    if record.id != run_id:
        problems.append(f"{RECORD}: id = {record.id!r}: does not match its directory")
        return None, None
    return record, raw["train"]


# ------------------------------------------------------------------------------- config.json


def _check_config(files: RunFiles, info: RunInfo, raw_train: dict[str, Any] | None) -> int | None:
    """Cross-check ``config.json`` against the record; return the planned last step.

    The trainer writes the config it resolved, so for an untouched run the two dicts are equal
    and one comparison settles it; otherwise both are resolved and compared key by key.
    """
    assert info.record is not None
    planned = info.record.steps
    raw = files.load(CONFIG_FILE, info.problems)
    if raw is None:
        return planned  # not started yet (or an external trainer that writes none)
    raw = {k: v for k, v in raw.items() if k != "schema_version"}
    if raw == raw_train:
        return planned
    try:
        trained = TrainConfig.from_dict(raw)
    except ConfigError as e:
        info.problems.append(f"{CONFIG_FILE}: {e}")
        return planned
    mismatch = config_mismatch(info.record.train, trained, info.horizons)
    if mismatch:
        info.problems.append(mismatch)
        info.config_mismatch = True
        return planned
    return trained.total_steps  # horizons added before the start may have lengthened the run


def config_mismatch(
    planned: TrainConfig, trained: TrainConfig, horizons: tuple[int, ...]
) -> str | None:
    """The first key where the config the trainer ran differs from the planned one, as a sentence
    (``config.json optim.lr = 0.01 but run.json says 0.02``); None if they agree.

    Keys the worker resolves per machine are compared for what they mean: ``threads`` not at all,
    ``branch.run_dir`` by the trunk directory's name, ``horizons_tokens`` as the record's or the
    record's plus ``horizons`` (horizons added before the run started join its config).
    """
    want, got = _flat(planned.to_dict()), _flat(trained.to_dict())
    for key in list(want) + [k for k in got if k not in want]:
        w, g = want.get(key), got.get(key)
        if key in _MACHINE_KEYS:
            if key == "threads":
                continue
            if key == "branch.run_dir" and w is not None and g is not None:
                w, g = Path(w).name, Path(g).name
            if key == "horizons_tokens" and g == sorted(horizons):
                continue
        if w != g:
            return f"{CONFIG_FILE} {key} = {_json(g)} but {RECORD} says {_json(w)}"
    return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _json(value: Any) -> str:
    return json.dumps(value)


# ------------------------------------------------------------------------------ summary.json


def _load_summary(files: RunFiles, problems: list[str]) -> Summary | None:
    raw = files.load(SUMMARY_FILE, problems)
    if raw is None:
        return None
    try:
        return Summary.from_dict(raw)
    except SchemaError as e:
        problems.append(str(e))
        return None


def summary_problem(info: RunInfo, last_step: int | None) -> str | None:
    """Why ``summary.json`` is not believed (None if it is, or if there is none to believe).

    ``last_step`` is the last step of the run's valid metrics lines.
    """
    s, state, planned = info.summary, info.status.state, info.planned_steps
    if not info.files_read:
        return None
    if s is None:
        bad_file = any(p.startswith(SUMMARY_FILE) for p in info.problems)
        if state in (RunState.COMPLETED, RunState.DIVERGED) and not bad_file:
            return f"{SUMMARY_FILE}: missing (state {state.value})"
        return None
    if s.status == Status.COMPLETED:
        if planned is not None and s.step != planned:
            return f"{SUMMARY_FILE} says completed at step {s.step} but the run plans {planned}"
        if last_step is None or s.step > last_step:
            ends = "has no valid line" if last_step is None else f"ends at step {last_step}"
            return f"{SUMMARY_FILE} says completed at step {s.step} but {METRICS_FILE} {ends}"
    elif planned is not None and s.step > planned:
        return f"{SUMMARY_FILE} says step {s.step}, beyond the {planned} steps the run plans"
    if state == RunState.COMPLETED and s.status != Status.COMPLETED:
        return f"{SUMMARY_FILE} says {s.status.value} but the events say completed"
    return None


# -------------------------------------------------------------------------------------- row


def runs_row(ctx: Context, info: RunInfo, last: tuple[int, int] | None) -> dict[str, Any]:
    """The run's ``runs`` row. ``last`` is (step, tokens) of its last valid metrics line."""
    problem = summary_problem(info, last[0] if last else None)
    if problem:
        info.problems.append(problem)
    believed = info.summary is not None and problem is None
    row: dict[str, Any] = {"run_id": info.run_id, "sweep": ctx.sweep_name}
    if info.record is not None:
        described = record_columns(info.record, info.horizons)
        if info.config_mismatch:  # which of the two files is true is unknown: show neither
            described = {k: described[k] for k in _IDENTITY}
        row.update(described)
    row.update(_status_columns(info, ctx.store.stale_after_s))
    row.update(_summary_columns(info.summary, believed, last))
    row.update(_provenance_columns(info.provenance))
    if row["host"] is None:
        row["host"] = _str(info.provenance.get("hostname"))
    row["problem"] = "; ".join(info.problems) or None
    row["notes"] = "; ".join(info.notes) or None
    return row


# The record's columns kept when config.json and run.json disagree: what the run is called and
# where it sits, not what it was trained with.
_IDENTITY = ("sweep", "kind", "parent", "source", "model", "slug")


def record_columns(record: RunRecord, horizons: tuple[int, ...]) -> dict[str, Any]:
    """The columns that describe what the run is, from its record's properties.

    ``schedule`` is the schedule's tag (``constant``, ``wsd0.2``, ``cosine``: the schedules axis,
    as in the slugs), so the analysis keeps each schedule a series of its own.
    """
    cfg, o = record.train, record.train.optim
    m = cfg.model
    n_params, n_non_embedding = _param_counts(m)
    return {
        "sweep": record.sweep,
        "kind": record.kind.value,
        "parent": record.parent,
        "source": record.source,
        "model": record.model,
        "slug": record.slug,
        "n_params": n_params,
        "n_params_non_embedding": n_non_embedding,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "vocab_size": m.vocab_size,
        "seq_len": m.seq_len,
        "optimizer": o.name,
        "lr": record.lr,
        "lr_scales": list(record.lr_scales),
        "lr_in": o.lr_in,
        "lr_hidden": o.lr_hidden,
        "lr_out": o.lr_out,
        "momentum": o.momentum,
        "weight_decay": o.weight_decay,
        "optim_output_norm": o.output_norm,
        "schedule": schedule_tag(cfg.schedule),
        "warmup_steps": cfg.schedule.warmup_steps,
        "batch_size": record.batch_size,
        "seed": record.seed,
        "tokens_per_step": record.tokens_per_step,
        "horizons_tokens": list(horizons),
        "steps": record.steps,
        "start_step": record.start_step,
        "max_tokens": max(horizons, default=None),
        "trained_tokens": record.trained_tokens,
        "flops": record.flops,
    }


@functools.lru_cache(maxsize=256)
def _param_counts(model: ModelConfig) -> tuple[int, int]:
    # a sweep has a few model shapes and thousands of runs
    return model.n_params(), model.n_params_non_embedding()


def _status_columns(info: RunInfo, stale_after_s: float) -> dict[str, Any]:
    st = info.status
    last, where = st.last_event, st.where
    tail = last.stderr_tail if last else None
    reason = st.reason
    if st.state == RunState.STALE:
        # no age in it: the row (and so the tables) must not change while nothing else does
        reason = f"stale: no heartbeat for over {stale_after_s:g} s"
    elif reason is None and info.summary is not None and info.summary.reason:
        reason = info.summary.reason
    if reason is None and tail and st.state in _FAILING:
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        reason = lines[-1] if lines else None
    return {
        "state": st.state.value,
        "reason": reason,
        "attempts": _int64(st.attempt),
        "exit_code": _int64(st.exit_code),
        "stderr_tail": tail,
        "backend": st.backend,
        "job_id": (last.job_id if last else None) or (where.job_id if where else None),
        "host": where.host if where else None,
        "updated_at": last.ts if last else None,
    }


def _summary_columns(
    s: Summary | None, believed: bool, last: tuple[int, int] | None
) -> dict[str, Any]:
    """Outcome columns; a summary that is not believed lends only its status."""
    row: dict[str, Any] = {"summary_status": s.status.value if s else None}
    if s is not None and believed:
        row.update(
            steps_done=_int64(s.step),
            tokens_done=_int64(s.tokens),
            final_loss=s.final_loss,
            final_output_norm=s.final_output_norm,
            wall_time_s=s.wall_time_s,
            diverged_step=_int64(s.diverged_step),
        )
    elif last is not None:
        row.update(steps_done=last[0], tokens_done=last[1])
    return row


def _provenance_columns(prov: dict[str, Any]) -> dict[str, Any]:
    dirty, world = prov.get("git_dirty"), prov.get("world_size")
    return {
        "git_sha": _str(prov.get("git_sha")),
        "git_dirty": dirty if type(dirty) is bool else None,
        "torch_version": _str(prov.get("torch")),
        "python_version": _str(prov.get("python")),
        "device": _str(prov.get("device")),
        "device_name": _str(prov.get("device_name")),
        "world_size": _int64(world) if type(world) is int else None,
    }


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int64(value: int | None) -> int | None:
    """``value`` if it fits the int64 columns (a hand-edited file may hold any JSON integer)."""
    return value if value is not None and -(2**63) <= value < 2**63 else None
