"""Bring your own trainer: the spec's ``[trainer]`` section and the command line the worker runs.

::

    [trainer]
    command = ["python", "train.py", "--lr", "{lr}", "--batch-size", "{batch_size}",
               "--steps", "{steps}", "--out", "{out_dir}", "--resume-from", "{resume_from}"]
    axes = {dropout = [0.1]}       # free-form values passed through as {dropout}

``command`` is an argument list, never a shell line: each element becomes one argv element after
its placeholders (:data:`PLACEHOLDERS`, plus the names of ``axes``) are substituted, so a value
with spaces or ``;`` stays one argument. Placeholders are checked at plan time. The section's
:meth:`TrainerSection.run_params` puts the command into every record's ``params["trainer"]``, and
:func:`sweeper.worker.trainer_command` renders it with :func:`render_command`.

The script follows the contract of ``trainer/schema.py`` (``sweeper.contract.RunWriter`` writes
it); docs/external-trainers.md has the whole story and ``examples/external_trainer/`` an example.
This module imports only the records layer, so the worker and the spec parser can both use it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.errors import SpecError
from sweeper.records import RecordError, RunRecord
from trainer.config import ConfigError
from trainer.schema import CKPT_DIR

SECTION = "trainer"
MAX_ARGS = 1000
MAX_ARG_CHARS = 10_000
MAX_AXIS_VALUES = 1000

# Every placeholder a command may use, with what it becomes (docs/external-trainers.md).
PLACEHOLDERS: dict[str, str] = {
    "run_id": "the run id (also the tracker id)",
    "slug": "the run's readable name",
    "sweep": "the sweep name",
    "model": "the [[models]] name",
    "kind": "single, trunk or branch",
    "lr": "the base learning rate",
    "lr_in": "lr * lr_scale_in (input layer)",
    "lr_hidden": "lr * lr_scale_hidden (hidden layers)",
    "lr_out": "lr * lr_scale_out (output layer)",
    "batch_size": "global batch in sequences",
    "micro_batch": "sequences per forward pass on one rank",
    "world_size": "ranks (nodes * procs_per_node)",
    "seq_len": "tokens per sequence",
    "tokens_per_step": "batch_size * seq_len",
    "steps": "optimizer steps to train (the last horizon)",
    "start_step": "the step the run starts from (a branch's fork, else 0)",
    "max_tokens": "the largest token budget",
    "horizons_tokens": "token budgets, comma-separated",
    "horizon_steps": "steps of the budgets, comma-separated (log a line at each)",
    "checkpoint_steps": "steps whose checkpoints must be kept forever (runs fork from them)",
    "seed": "the seed",
    "schedule": "constant, wsd or cosine",
    "warmup_steps": "linear warmup steps",
    "decay_fraction": "wsd: fraction of the steps that decays",
    "min_lr_ratio": "final lr / lr of a decay",
    "optimizer": "[optim] name",
    "momentum": "[optim] momentum",
    "weight_decay": "[optim] weight_decay",
    "d_model": "model width",
    "n_layers": "model depth",
    "n_heads": "attention heads",
    "vocab_size": "vocabulary size",
    "log_every": "[train] log_every",
    "checkpoint_every": "[train] checkpoint_every",
    "val_tokens": "[train] val_tokens",
    "branch_dir": "a branch's trunk run directory (absolute), else empty",
    "branch_step": "a branch's fork step, else empty",
    "out_dir": "the run directory to write (absolute; required)",
    "run_json": "trial.json: the whole run record as JSON",
    "resume_from": "the checkpoint to start from, else empty (see resume_checkpoint)",
}
_AXIS_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")


@dataclass(frozen=True, kw_only=True)
class TrainerSection:
    """``[trainer]``: the command template and free-form axes (name, values)."""

    command: tuple[str, ...]
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def run_params(self) -> dict[str, Any]:
        """What every record carries in ``params["trainer"]`` (part of its id)."""
        params: dict[str, Any] = {"command": list(self.command)}
        if self.axes:
            params["axes"] = self.axis_points()[0]
        return params

    def axis_points(self) -> list[dict[str, Any]]:
        """Every combination of the axes' values, in order (``[{}]`` without axes): what a
        planner that expands free-form axes crosses with the grid."""
        names = [name for name, _ in self.axes]
        combos = itertools.product(*(values for _, values in self.axes))
        return [dict(zip(names, combo, strict=True)) for combo in combos]


def axis_slug(values: Mapping[str, Any]) -> str:
    """The slug suffix of a point of the free-form axes (``_dropout0.1``), sorted by name."""
    return "".join(f"_{k}{format_value(values[k])}" for k in sorted(values))


# ------------------------------------------------------------------------------------------- spec


def parse_section(table: dict[str, Any], file: str) -> TrainerSection:
    """Validate ``[trainer]``.

    Raises:
        SpecError: an unknown key, a command that is not a list of strings, a malformed or
            unknown placeholder, no ``{out_dir}``, or bad axes (one line naming the key).
    """
    for key in sorted(set(table) - {"command", "axes"}):
        raise SpecError(file, f"{SECTION}.{key}", table[key], "unknown key (known: axes, command)")
    axes = _axes(table.get("axes", {}), file)
    command = table.get("command")
    key = f"{SECTION}.command"
    if not isinstance(command, list) or not command or len(command) > MAX_ARGS:
        raise SpecError(file, key, command, f"expected a list of 1..{MAX_ARGS} strings")
    known = set(PLACEHOLDERS) | {name for name, _ in axes}
    used: set[str] = set()
    for i, arg in enumerate(command):
        where = f"{key}[{i}]"
        if not isinstance(arg, str) or len(arg) > MAX_ARG_CHARS or (i == 0 and not arg):
            raise SpecError(file, where, arg, "expected a (non-empty) string")
        try:
            names = placeholders(arg)
        except ValueError as e:
            raise SpecError(file, where, arg, str(e)) from None
        for name in names:
            if name not in known:
                raise SpecError(
                    file,
                    where,
                    arg,
                    f"unknown placeholder {{{name}}} (known: {', '.join(sorted(known))})",
                )
        used.update(names)
    if "out_dir" not in used:
        raise SpecError(
            file, key, message="must pass {out_dir} (where the trainer writes its run files)"
        )
    return TrainerSection(command=tuple(command), axes=axes)


def _axes(raw: Any, file: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(raw, dict):
        raise SpecError(file, f"{SECTION}.axes", raw, "expected a table of name = [values]")
    out = []
    for name, values in raw.items():
        key = f"{SECTION}.axes.{name}"
        if not _AXIS_NAME.fullmatch(name) or name in PLACEHOLDERS:
            raise SpecError(
                file, key, message="axis names: lower-case letters, digits and _, not a placeholder"
            )
        if not isinstance(values, list) or not 0 < len(values) <= MAX_AXIS_VALUES:
            raise SpecError(file, key, values, f"expected a list of 1..{MAX_AXIS_VALUES} values")
        for v in values:
            if not _scalar(v):
                raise SpecError(file, key, v, "values must be strings, numbers or booleans")
        if len({json.dumps(v) for v in values}) != len(values):
            raise SpecError(file, key, values, "duplicate values")
        out.append((name, tuple(values)))
    return tuple(out)


def _scalar(v: Any) -> bool:
    if isinstance(v, str):
        return len(v) <= 200
    if isinstance(v, bool | int):
        return True
    return isinstance(v, float) and math.isfinite(v)


def placeholders(arg: str) -> list[str]:
    """The placeholder names of one argument (``{{`` and ``}}`` are literal braces).

    Raises:
        ValueError: unbalanced braces, ``{}``, or a format spec/conversion (``{lr:.3f}``).
    """
    names = []
    for _, name, spec, conversion in string.Formatter().parse(arg):
        if name is None:
            continue
        if not name:
            raise ValueError("empty placeholder {}")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}}: no format specs or conversions")
        names.append(name)
    return names


# ------------------------------------------------------------------------------------ rendering


def render_command(
    record: RunRecord, out_dir: str | Path, resume_from: str, trial_json: str | Path | None = None
) -> list[str]:
    """The argv of a run's external trainer: ``params["trainer"]["command"]`` with every
    placeholder substituted inside its own element (no shell, no splitting).

    ``trial_json`` (the worker's ``trial.json``) supplies the machine-resolved config when given:
    horizons added after planning and the trunk's absolute directory.

    Raises:
        RecordError: the record has no usable ``params["trainer"]`` or names an unknown
            placeholder.
    """
    section = (record.params or {}).get(SECTION)
    if not isinstance(section, dict):
        raise RecordError(f"params.{SECTION}: expected an object")
    command = section.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise RecordError(f"params.{SECTION}.command: expected a list of strings")
    values = placeholder_values(_resolved(record, trial_json), out_dir, resume_from, trial_json)
    axes = section.get("axes") or {}
    if not isinstance(axes, dict):
        raise RecordError(f"params.{SECTION}.axes: expected an object")
    values.update({name: format_value(v) for name, v in axes.items()})
    argv = []
    for arg in command:
        parts = []
        try:
            parsed = list(string.Formatter().parse(arg))
        except ValueError as e:
            raise RecordError(f"params.{SECTION}.command: {arg!r}: {e}") from None
        for literal, name, _, _ in parsed:
            parts.append(literal)
            if name is not None:
                if name not in values:
                    raise RecordError(f"params.{SECTION}.command: unknown placeholder {{{name}}}")
                parts.append(values[name])
        argv.append("".join(parts))
    return argv


def _resolved(record: RunRecord, trial_json: str | Path | None) -> RunRecord:
    """The record as ``trial.json`` resolved it for this machine (the record if unreadable)."""
    if trial_json is None:
        return record
    try:
        return RunRecord.from_dict(json.loads(Path(trial_json).read_text()))
    except (OSError, ValueError, RecordError, ConfigError):
        return record


def placeholder_values(
    record: RunRecord, out_dir: str | Path, resume_from: str, trial_json: str | Path | None = None
) -> dict[str, str]:
    """Every placeholder of :data:`PLACEHOLDERS` as the string it becomes."""
    t = record.train
    o, s, m = t.optim, t.schedule, t.model
    branch = t.branch
    out = Path(out_dir).resolve()
    branch_dir = ""
    if branch is not None:
        bd = Path(branch.run_dir)
        branch_dir = str(bd if bd.is_absolute() else (out.parent.parent / bd).resolve())
    raw: dict[str, Any] = {
        "run_id": record.id,
        "slug": record.slug,
        "sweep": record.sweep,
        "model": record.model,
        "kind": record.kind.value,
        "lr": o.lr,
        "lr_in": o.lr_in,
        "lr_hidden": o.lr_hidden,
        "lr_out": o.lr_out,
        "batch_size": t.batch_size,
        "micro_batch": t.micro_batch_size or t.batch_size // record.resources.world_size,
        "world_size": record.resources.world_size,
        "seq_len": m.seq_len,
        "tokens_per_step": t.tokens_per_step,
        "steps": t.total_steps,
        "start_step": record.start_step,
        "max_tokens": t.max_tokens,
        "horizons_tokens": t.horizons_tokens,
        "horizon_steps": t.horizon_steps,
        "checkpoint_steps": t.checkpoint_steps,
        "seed": t.seed,
        "schedule": s.kind,
        "warmup_steps": s.warmup_steps,
        "decay_fraction": s.decay_fraction,
        "min_lr_ratio": s.min_lr_ratio,
        "optimizer": o.name,
        "momentum": o.momentum,
        "weight_decay": o.weight_decay,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "vocab_size": m.vocab_size,
        "log_every": t.log_every,
        "checkpoint_every": t.checkpoint_every,
        "val_tokens": t.val_tokens,
        "branch_dir": branch_dir,
        "branch_step": branch.step if branch is not None else None,
        "out_dir": str(out),
        "run_json": str(Path(trial_json).resolve()) if trial_json is not None else "",
        "resume_from": resume_from,
    }
    return {name: format_value(value) for name, value in raw.items()}


def format_value(value: Any) -> str:
    """A value as one argument: ``repr`` of floats (round-trips), ``true``/``false``, lists
    comma-separated, None as an empty string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return ",".join(format_value(v) for v in value)
    return str(value)


def resume_checkpoint(record: RunRecord, out_dir: str | Path) -> str:
    """What ``{resume_from}`` becomes: the newest checkpoint of the run's own ``ckpt/``; else, for
    a run that starts from another run's checkpoint (a WSD branch, a continuation), that
    checkpoint (the parent's ``ckpt/`` entry numbered with the fork step); else ``""``.

    Raises:
        RecordError: the run forks from a checkpoint that is not there.
    """
    own = latest_checkpoint(out_dir)
    branch = record.train.branch
    if own or branch is None:
        return own
    parent = Path(branch.run_dir)
    if not parent.is_absolute():
        parent = Path(out_dir).resolve().parent.parent / parent  # relative to the sweep
    for path, step in _checkpoints(parent):
        if step == branch.step:
            return str(Path(path).resolve())
    raise RecordError(f"branch: no checkpoint for step {branch.step} in {parent / CKPT_DIR}")


def _checkpoints(run_dir: Path) -> list[tuple[str, int]]:
    """``(path, step)`` of the entries of ``<run_dir>/ckpt/`` (step -1 without digits), sorted
    oldest first (by step, then modification time); hidden and ``*.tmp`` entries left out."""
    found: list[tuple[tuple[int, int, str], str]] = []
    try:
        entries = list(os.scandir(run_dir / CKPT_DIR))
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or entry.name.endswith(".tmp"):
            continue
        digits = re.findall(r"\d+", entry.name)
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        except OSError:
            continue
        found.append(((int(digits[-1]) if digits else -1, mtime, entry.name), entry.path))
    return [(path, key[0]) for key, path in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> str:
    """The newest entry of ``<out_dir>/ckpt/`` (absolute), or ``""`` when there is none.

    Newest is the highest step number in the name (its last run of digits: ``step_00000120.npz``,
    ``ckpt-120/``), ties broken by modification time; hidden and ``*.tmp`` entries (a save in
    progress) are ignored.
    """
    found = _checkpoints(Path(out_dir))
    return str(Path(found[-1][0]).resolve()) if found else ""
