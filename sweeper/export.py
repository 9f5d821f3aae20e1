"""``sweeper export``: one of a sweep's tables as CSV, Parquet, JSON lines or Markdown.

Tables: ``runs``, ``horizons``, ``metrics`` (written by ``sweeper collect``; export runs a collect
first only when the table file does not exist yet, so an export never re-reads run directories
behind the user's back) and ``optima`` (``analysis/optima.parquet``, written by ``sweeper
analyze``). Without an output file the export goes to stdout (except Parquet, which is binary); an
output file is written atomically (temp file in the same directory, then rename). An output that
is not a regular file (a device, a FIFO, ``/dev/stdout``) is written directly and never replaced,
and a symlink keeps pointing where it did (its target is written).
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sweeper import tables
from sweeper.errors import SweepError

TABLES = ("runs", "horizons", "metrics", "optima")
FORMATS = ("csv", "parquet", "jsonl", "markdown")
OPTIMA = Path("analysis") / "optima.parquet"


class ExportError(SweepError):
    """A bad table or format name, a missing table, or an output that cannot be written."""


def export_table(
    sweep_dir: Path,
    table: str,
    fmt: str,
    out: Path | None,
    columns: list[str] | None = None,
) -> None:
    """Write table ``table`` of ``sweep_dir`` in format ``fmt`` to ``out`` (stdout when None).

    Args:
        sweep_dir: ``results/<sweep>``.
        table: ``runs``, ``horizons``, ``metrics`` or ``optima``.
        fmt: ``csv``, ``parquet``, ``jsonl`` or ``markdown``.
        out: Output file (written atomically), or None for stdout.
        columns: Only these columns, in this order (None: all).

    Raises:
        ExportError: unknown table, format or column, Parquet to stdout, ``optima`` before
            ``sweeper analyze``, or an output file that cannot be written.
    """
    sweep_dir = Path(sweep_dir)
    if table not in TABLES:
        raise ExportError(f"--table {table!r}: unknown table (known: {', '.join(TABLES)})")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: unknown format (known: {', '.join(FORMATS)})")
    if fmt == "parquet" and out is None:
        raise ExportError("--format parquet: binary output needs a file; use -o FILE")
    data = load_table(sweep_dir, table)
    if columns:
        unknown = [c for c in columns if c not in data.column_names]
        if unknown:
            raise ExportError(
                f"--columns {','.join(unknown)}: not in table {table} "
                f"(columns: {', '.join(data.column_names)})"
            )
        data = data.select(columns)
    if out is None:
        _write(data, fmt, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    _write_file(data, fmt, Path(out))


def load_table(sweep_dir: Path, table: str) -> pa.Table:
    """Read table ``table`` of a sweep, collecting first if a collected table does not exist."""
    if table == "optima":
        path = sweep_dir / OPTIMA
        if not path.is_file():
            raise ExportError(f"{path}: not found; run `sweeper analyze` on the sweep first")
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise ExportError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    path = tables.table_path(sweep_dir, table)
    if not path.is_file():
        from sweeper.collect import collect_sweep

        collect_sweep(sweep_dir)
    return tables.read_table(path, table)


_STREAMS = {"/dev/stdout": "stdout", "/dev/stderr": "stderr"}
_DESCRIPTORS = ("/dev/fd/", "/proc/")  # an open descriptor (e.g. a shell redirection) by name


def _write_file(data: pa.Table, fmt: str, out: Path) -> None:
    """Write to ``out`` without ever replacing something that is not a regular file.

    A regular file (or none) is replaced atomically; a symlink is followed and its target is
    replaced (the link stays); a device, FIFO or socket (``/dev/null``, a named pipe) is written
    directly, as a shell redirection would; ``/dev/stdout`` and ``/dev/stderr`` are the streams.
    """
    try:
        if str(out) in _STREAMS:
            sink = getattr(sys, _STREAMS[str(out)]).buffer
            _write(data, fmt, sink)
            sink.flush()
            return
        try:
            mode: int | None = os.stat(out).st_mode
        except FileNotFoundError:
            mode = None
        if stat.S_ISDIR(mode or 0):
            raise ExportError(f"-o {out}: is a directory")
        if mode is not None and (not stat.S_ISREG(mode) or str(out).startswith(_DESCRIPTORS)):
            flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_APPEND if stat.S_ISREG(mode) else 0)
            with os.fdopen(os.open(out, flags), "wb") as f:
                _write(data, fmt, f)
            return
        target = Path(os.path.realpath(out)) if os.path.islink(out) else out
        if not target.parent.is_dir():
            raise ExportError(f"-o {out}: directory {target.parent} does not exist")
        tables.atomic_write_bytes(target, lambda f: _write(data, fmt, f))
    except OSError as e:
        raise ExportError(f"-o {out}: cannot write ({e.strerror or e})") from None


def _write(data: pa.Table, fmt: str, sink: BinaryIO) -> None:
    if fmt == "parquet":
        pq.write_table(data, sink, compression="zstd")
    elif fmt == "csv":
        pacsv.write_csv(_flat(data), sink)
    elif fmt == "jsonl":
        _write_jsonl(data, sink)
    else:
        sink.write(to_markdown(data).encode())


def _flat(data: pa.Table) -> pa.Table:
    """CSV has no lists or dictionaries: lists become JSON text, dictionary columns plain values."""
    cols = []
    for col in data.columns:
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pa.array(
                [None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string()
            )
        cols.append(col)
    return pa.table(cols, names=data.column_names)


def _write_jsonl(data: pa.Table, sink: BinaryIO) -> None:
    """One JSON object per row; NaN and infinities become null (JSON has none)."""
    buf = io.StringIO()
    for batch in data.to_batches(max_chunksize=65_536):
        for row in batch.to_pylist():
            buf.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
        sink.write(buf.getvalue().encode())
        buf.seek(0)
        buf.truncate()


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def to_markdown(data: pa.Table) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned, floats to 6 significant digits)."""
    names = data.column_names
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) for t in data.schema.types]
    lines = [
        "| " + " | ".join(_md_escape(n) for n in names) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    for batch in data.to_batches(max_chunksize=65_536):
        for row in batch.to_pylist():
            cells = (_md_cell(row[n]) for n in names)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return _md_escape(json.dumps(v))
    return _md_escape(str(v))


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
