"""The trainer's file contract, in one place. Imports no torch.

Any trainer a sweep runs (this package's, or an external script through ``sweeper.contract``)
writes a run directory in this shape, and ``sweeper.collect`` reads it through this module::

    RUN_DIR/config.json       the resolved TrainConfig plus "schema_version"
    RUN_DIR/provenance.json   code version, software, hardware, data manifest
    RUN_DIR/metrics.jsonl     one JSON object per logged step (METRICS below)
    RUN_DIR/summary.json      the run's outcome (Summary below), written last
    RUN_DIR/ckpt/             checkpoints (the trainer's own format)

Exit codes tell the worker what happened; ``summary.json`` must agree with them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 1

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CKPT_DIR = "ckpt"


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint after ``step`` steps, inside ``CKPT_DIR``."""
    return f"step_{step:08d}.pt"


# Exit codes of a trainer process; the sweeper maps them to run states.
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 75  # checkpointed on SIGTERM/SIGUSR2 and exited; run again to resume


class SchemaError(ValueError):
    """A file of a run directory does not follow the contract (one line, naming the key)."""


# Every key a metrics line may carry, with its type. ``step`` is the number of optimizer steps
# done (0: before any update), ``tokens`` the tokens trained so far; norms are post-update.
METRICS: dict[str, type] = {
    "step": int,
    "tokens": int,
    "train_loss": float,
    "val_loss": float,  # only on horizon steps
    "lr_in": float,
    "lr_hidden": float,
    "lr_out": float,
    "output_norm": float,  # ||W_out||_{RMS->inf}, the paper's output norm
    "output_norm_rms": float,  # ||W_out||_{RMS->RMS}
    "input_norm": float,  # ||W_in||_{1->RMS}
    "hidden_norm": float,  # RMS->RMS of the last block's w2
    "update_norm_in": float,
    "update_norm_hidden": float,
    "update_norm_out": float,
    "grad_norm": float,
    "tokens_per_s": float,
    "step_time_s": float,
    "horizon": bool,  # true on a horizon step
}
REQUIRED_METRICS = ("step", "tokens", "train_loss")
FLOAT_METRICS = tuple(k for k, t in METRICS.items() if t is float)


class Status(StrEnum):
    """``summary.json`` ``status``."""

    COMPLETED = "completed"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"


EXIT_BY_STATUS = {
    Status.COMPLETED: EXIT_OK,
    Status.DIVERGED: EXIT_DIVERGED,
    Status.INTERRUPTED: EXIT_INTERRUPTED,
}


def clean_float(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN/inf; a diverged loss is told by the status)."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metrics_line(**values: Any) -> dict[str, Any]:
    """A metrics line to append to ``metrics.jsonl``: known keys only, non-finite floats null.

    Raises:
        SchemaError: an unknown key, or a missing ``step``/``tokens``/``train_loss``.
    """
    unknown = sorted(set(values) - set(METRICS))
    if unknown:
        raise SchemaError(f"metrics: unknown key {unknown[0]!r} (known: {', '.join(METRICS)})")
    for key in ("step", "tokens"):
        if key not in values:
            raise SchemaError(f"metrics: {key!r} is required")
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = METRICS[key]
        out[key] = clean_float(value) if kind is float else value
    return out


def parse_metrics_line(obj: Any) -> dict[str, Any] | None:
    """The typed fields of one parsed metrics line, or None if it is not a valid line.

    Unknown keys are dropped; a float field of the wrong type becomes None; ``step`` and
    ``tokens`` must be non-negative integers.
    """
    if type(obj) is not dict:
        return None
    step, tokens = obj.get("step"), obj.get("tokens")
    if type(step) is not int or type(tokens) is not int or step < 0 or tokens < 0:
        return None
    row: dict[str, Any] = {"step": step, "tokens": tokens}
    for key in FLOAT_METRICS:
        row[key] = clean_float(obj.get(key))
    row["horizon"] = obj.get("horizon") is True
    return row


@dataclass(frozen=True, kw_only=True)
class Summary:
    """``summary.json``: how a run (or one attempt of it) ended."""

    status: Status
    step: int
    tokens: int
    final_loss: float | None = None
    final_output_norm: float | None = None
    wall_time_s: float | None = None
    diverged_step: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become null)."""
        d = asdict(self)
        d["status"] = self.status.value
        for key in ("final_loss", "final_output_norm", "wall_time_s"):
            d[key] = clean_float(d[key])
        return d

    @classmethod
    def from_dict(cls, raw: Any) -> Summary:
        """Validate a parsed ``summary.json``.

        Raises:
            SchemaError: not an object, an unknown status, or a bad step/tokens.
        """
        if type(raw) is not dict:
            raise SchemaError("summary.json: expected a JSON object")
        try:
            status = Status(str(raw.get("status")))
        except ValueError:
            raise SchemaError(f"summary.json: status = {raw.get('status')!r}: unknown") from None
        step, tokens = raw.get("step"), raw.get("tokens")
        for key, value in (("step", step), ("tokens", tokens)):
            if type(value) is not int or value < 0:
                raise SchemaError(f"summary.json: {key} = {value!r}: expected an integer >= 0")
        diverged = raw.get("diverged_step")
        reason = raw.get("reason")
        assert isinstance(step, int) and isinstance(tokens, int)  # checked above
        return cls(
            status=status,
            step=step,
            tokens=tokens,
            final_loss=clean_float(raw.get("final_loss")),
            final_output_norm=clean_float(raw.get("final_output_norm")),
            wall_time_s=clean_float(raw.get("wall_time_s")),
            diverged_step=diverged if type(diverged) is int else None,
            reason=reason if isinstance(reason, str) else None,
        )
