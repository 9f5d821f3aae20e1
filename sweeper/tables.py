"""Explicit pyarrow schemas of the result tables, and their atomic Parquet reader/writer.

``sweeper collect`` writes three tables into ``results/<sweep>/``:

* ``runs.parquet``: one row per run (configuration, state, progress, final numbers, provenance);
* ``horizons.parquet``: one row per (run, token budget D) the run reached (the analysis reads it);
* ``metrics.parquet``: every numeric metric of every logged step, in long format.

Each file carries ``sweeper.table`` and ``sweeper.schema_version`` in its Parquet key-value
metadata; :func:`read_table` refuses a file of another table or another schema version, so an
analysis never reads columns it does not understand. Column by column: ``docs/tables.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sweeper.errors import SweepError
from sweeper.fsutil import atomic_write
from trainer.schema import FLOAT_METRICS

# 2: runs gained source, lr_scales, steps/start_step/trained_tokens/flops, reason, problem, notes
# (error, total_steps, branch_step and started_at went); horizons carry every float metric of
# trainer.schema.METRICS at the horizon step and only rows of runs without a problem.
SCHEMA_VERSION = 2
META_TABLE = b"sweeper.table"
META_VERSION = b"sweeper.schema_version"
META_GENERATION = b"sweeper.collect_generation"

_str = pa.string()
_i64 = pa.int64()
_f64 = pa.float64()
_bool = pa.bool_()
_dict_str = pa.dictionary(pa.int32(), pa.string())


def _f(name: str, type_: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# Columns shared by runs and horizons: what the run is (so that the analysis needs no join).
# lr_in/lr_hidden/lr_out are the planned per-group rates (lr times the group's scale).
_RUN_KEY = [
    _f("run_id", _str, False),
    _f("sweep", _str),
    _f("kind", _str),
    _f("parent", _str),
    _f("source", _str),
    _f("model", _str),
    _f("n_params", _i64),
    _f("optimizer", _str),
    _f("lr", _f64),
    _f("lr_in", _f64),
    _f("lr_hidden", _f64),
    _f("lr_out", _f64),
    _f("momentum", _f64),
    _f("batch_size", _i64),
    _f("seq_len", _i64),
    _f("seed", _i64),
    _f("schedule", _str),
]
_RUN_KEY_NAMES = {f.name for f in _RUN_KEY}

RUNS_SCHEMA = pa.schema(
    _RUN_KEY
    + [
        _f("slug", _str),
        _f("lr_scales", pa.list_(_f64)),
        _f("n_params_non_embedding", _i64),
        _f("d_model", _i64),
        _f("n_layers", _i64),
        _f("n_heads", _i64),
        _f("vocab_size", _i64),
        _f("weight_decay", _f64),
        _f("optim_output_norm", _str),
        _f("warmup_steps", _i64),
        _f("tokens_per_step", _i64),
        _f("horizons_tokens", pa.list_(_i64)),
        _f("steps", _i64),
        _f("start_step", _i64),
        _f("max_tokens", _i64),
        _f("trained_tokens", _i64),
        _f("flops", _f64),
        _f("state", _str, False),
        _f("reason", _str),
        _f("problem", _str),
        _f("notes", _str),
        _f("attempts", _i64),
        _f("steps_done", _i64),
        _f("tokens_done", _i64),
        _f("horizons_reached", _i64),
        _f("final_loss", _f64),
        _f("final_output_norm", _f64),
        _f("diverged_step", _i64),
        _f("summary_status", _str),
        _f("wall_time_s", _f64),
        _f("exit_code", _i64),
        _f("stderr_tail", _str),
        _f("git_sha", _str),
        _f("git_dirty", _bool),
        _f("torch_version", _str),
        _f("python_version", _str),
        _f("device", _str),
        _f("device_name", _str),
        _f("world_size", _i64),
        _f("host", _str),
        _f("backend", _str),
        _f("job_id", _str),
        _f("updated_at", _f64),
    ]
)

# The metrics read at a horizon step: every float metric of the trainer's contract except the
# scheduled rates (their planned values are in the run key).
HORIZON_METRICS = tuple(k for k in FLOAT_METRICS if k not in _RUN_KEY_NAMES)

HORIZONS_SCHEMA = pa.schema(
    _RUN_KEY
    + [
        _f("tokens", _i64, False),
        _f("step", _i64, False),
        _f("is_final", _bool),
        _f("train_loss_smoothed", _f64),
        _f("train_loss_std", _f64),
        _f("smoothing_points", _i64),
        _f("window_complete", _bool),
        _f("output_norm_smoothed", _f64),
    ]
    + [_f(name, _f64) for name in HORIZON_METRICS]
    + [_f("state", _str)]
)

METRICS_SCHEMA = pa.schema(
    [
        _f("run_id", _dict_str, False),
        _f("step", _i64, False),
        _f("tokens", _i64),
        _f("metric", _dict_str, False),
        _f("value", _f64),
    ]
)

# Parquet settings per table. The long metrics table is most of the bytes: dictionary-encode only
# its two string columns, delta-encode the monotone step/tokens (smaller and faster to write), and
# keep min/max statistics only where a reader can skip row groups with them: every row group holds
# every metric, and a min/max over all metrics' values says nothing (15% of the write time).
_PARQUET_OPTS: dict[str, dict[str, Any]] = {
    "runs": {},
    "horizons": {},
    "metrics": {
        "use_dictionary": ["run_id", "metric"],
        "column_encoding": {"step": "DELTA_BINARY_PACKED", "tokens": "DELTA_BINARY_PACKED"},
        "write_statistics": ["run_id", "step", "tokens"],
    },
}

SCHEMAS: dict[str, pa.Schema] = {
    "runs": RUNS_SCHEMA,
    "horizons": HORIZONS_SCHEMA,
    "metrics": METRICS_SCHEMA,
}
TABLE_NAMES = tuple(SCHEMAS)


class TableError(SweepError, ValueError):
    """A table file that is missing, unreadable, or of another table or schema version."""


def table_path(sweep_dir: Path, name: str) -> Path:
    """Where collect writes table ``name`` (``runs``/``horizons``/``metrics``)."""
    return Path(sweep_dir) / f"{name}.parquet"


def from_rows(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Table ``name`` from row dicts; absent keys are null, unknown keys are a TableError."""
    schema = SCHEMAS[name]
    unknown = {k for row in rows for k in row} - set(schema.names)
    if unknown:
        raise TableError(f"{name}: unknown column(s) {', '.join(sorted(unknown))}")
    return pa.Table.from_pylist(rows, schema=schema)


def empty(name: str) -> pa.Table:
    """An empty table ``name`` with its schema."""
    return SCHEMAS[name].empty_table()


def conform(name: str, table: pa.Table) -> pa.Table:
    """Cast ``table`` to the exact schema of table ``name`` (same columns, same order)."""
    schema = SCHEMAS[name]
    missing = set(schema.names) - set(table.column_names)
    if missing:
        raise TableError(f"{name}: missing column(s) {', '.join(sorted(missing))}")
    return table.select(schema.names).cast(schema)


def _metadata(name: str, generation: str | None) -> dict[bytes, bytes]:
    meta = {META_TABLE: name.encode(), META_VERSION: str(SCHEMA_VERSION).encode()}
    if generation is not None:
        meta[META_GENERATION] = generation.encode()
    return meta


# Readers see the old or the new file, never a partial one (temp file, fsync, rename); kept under
# this name for the callers of the export and the collect.
atomic_write_bytes = atomic_write


def write_table(
    name: str, table: pa.Table, path: Path, generation: str | None = None, **parquet_opts: Any
) -> None:
    """Write table ``name`` to ``path`` atomically, with its schema version in the metadata.

    Args:
        name: ``runs``, ``horizons`` or ``metrics``.
        table: the rows; cast to the table's schema.
        path: the destination ``.parquet`` file.
        generation: optional collect generation recorded in the metadata (lets collect detect
            a table that is not the one it last wrote).
        parquet_opts: passed to ``pyarrow.parquet.write_table`` (default compression zstd).
    """
    table = conform(name, table)
    table = table.replace_schema_metadata(_metadata(name, generation))
    opts = {"compression": "zstd", **_PARQUET_OPTS[name], **parquet_opts}
    atomic_write_bytes(path, lambda f: pq.write_table(table, f, **opts))


def read_metadata(path: Path) -> dict[bytes, bytes]:
    """The key-value metadata of a Parquet file (no data read); TableError if unreadable."""
    try:
        return pq.read_schema(path).metadata or {}
    except FileNotFoundError:
        raise TableError(f"{path}: not found") from None
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None


def check_metadata(path: Path, name: str, meta: dict[bytes, bytes]) -> None:
    """TableError unless ``meta`` says table ``name`` at this module's schema version."""
    got_name = meta.get(META_TABLE, b"").decode()
    got_version = meta.get(META_VERSION, b"").decode()
    if got_name != name:
        raise TableError(f"{path}: {META_TABLE.decode()} = {got_name!r}, expected {name!r}")
    if got_version != str(SCHEMA_VERSION):
        raise TableError(
            f"{path}: {META_VERSION.decode()} = {got_version!r}, this sweeper reads version "
            f"{SCHEMA_VERSION} (run `sweeper collect` again to rebuild it)"
        )


def read_table(path: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read table ``name`` from ``path``, checking its table name and schema version.

    Raises:
        TableError: the file is missing, unreadable, or of another table or schema version.
    """
    path = Path(path)
    check_metadata(path, name, read_metadata(path))
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None


def read_sweep_table(sweep_dir: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read table ``name`` of a sweep directory (``results/<sweep>/<name>.parquet``)."""
    return read_table(table_path(sweep_dir, name), name, columns)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
