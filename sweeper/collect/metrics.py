"""``metrics.jsonl`` files to Arrow, read through the trainer's contract (``trainer.schema``).

:func:`read_metrics` reads the files of many runs with one ``pyarrow.json`` call: the first object
of each file is labelled with the file's index (a ``_file`` key), and the rows that follow belong
to that file until the next label, whatever blank lines or line endings the files have. Only the
keys of ``trainer.schema.METRICS`` are read. If ``pyarrow`` refuses the group, or a line has no
valid step, each file is read on its own, and a file ``pyarrow`` refuses is read line by line
with :func:`trainer.schema.parse_metrics_line`, which names the lines it skips. Both readers give
the same rows for a valid line (``pyarrow`` also reads two objects written on one line as two
rows). bench/README.md ("Collect as a package") has the measurements that chose ``pyarrow`` over
``orjson`` per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from sweeper import tables
from trainer.schema import FLOAT_METRICS, METRICS, parse_metrics_line

_ARROW_TYPE = {int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
# The wide table of metrics lines: one column per key of the contract, plus the file index.
WIDE_SCHEMA = pa.schema(
    [(key, _ARROW_TYPE[kind]) for key, kind in METRICS.items()] + [("_file", pa.int32())]
)
_PARSE = pj.ParseOptions(explicit_schema=WIDE_SCHEMA, unexpected_field_behavior="ignore")
_READ = pj.ReadOptions(block_size=1 << 24)  # one block per group: fewer, larger parse tasks


@dataclass(frozen=True)
class Metrics:
    """The metrics lines of several files.

    Attributes:
        table: One row per valid line (:data:`WIDE_SCHEMA`), sorted by (``_file``, ``step``); of
            a step logged twice (a resumed run) only the later line is kept.
        notes: Per file, what was skipped (``""`` if nothing).
    """

    table: pa.Table
    notes: list[str]

    def last_lines(self, n_files: int) -> list[tuple[int, int] | None]:
        """(step, tokens) of each file's last valid line (None if it has none)."""
        out: list[tuple[int, int] | None] = [None] * n_files
        if self.table.num_rows:
            file = self.table.column("_file").to_numpy()
            ends = np.flatnonzero(np.r_[file[1:] != file[:-1], True])
            step = self.table.column("step").to_numpy()[ends].tolist()
            tokens = self.table.column("tokens").to_numpy()[ends].tolist()
            for f, s, t in zip(file[ends].tolist(), step, tokens, strict=True):
                out[f] = (s, t)
        return out


def read_metrics(blobs: list[bytes]) -> Metrics:
    """Parse the contents of many ``metrics.jsonl`` files (one bytes object per file).

    A torn last line (no newline and not a complete JSON object: a writer killed mid-line) is
    ignored and noted; invalid lines are skipped and noted by number; the valid lines count.
    """
    bodies, notes = [], []
    for blob in blobs:
        body, note = _strip_torn(blob)
        bodies.append(body)
        notes.append(note)
    table = _fast(bodies)
    if table is None:  # a file is bad: each file on its own, line by line where pyarrow refuses
        parts = []
        for i, body in enumerate(bodies):
            if body:
                part = _fast([body], start=i)
                parts.append(_reference(i, body, notes) if part is None else part)
        table = pa.concat_tables(parts) if parts else WIDE_SCHEMA.empty_table()
    return Metrics(_sorted_last_wins(table), notes)


def _strip_torn(blob: bytes) -> tuple[bytes, str]:
    """The file without a torn last line, and a note if one was dropped."""
    if not blob or blob.endswith(b"\n"):
        return blob, ""
    cut = blob.rfind(b"\n") + 1
    tail = blob[cut:]
    if not tail.strip():
        return blob[:cut], ""
    try:
        complete = isinstance(json.loads(tail), dict)
    except ValueError:
        complete = False
    if complete:  # a last line written without its newline: keep it
        return blob + b"\n", ""
    return blob[:cut], "torn last line ignored"


def _fast(bodies: list[bytes], start: int = 0) -> pa.Table | None:
    """Files ``start``, ``start + 1``, ... in one ``pyarrow.json`` call; None if ``pyarrow``
    refuses a line or a line has no valid step.

    The first object of each file gets a ``_file`` key (the files are joined in order, so every
    later row of the file is the file's until the next label): one copy of the bytes, no scan.
    """
    parts: list[bytes | memoryview] = []
    labels = []
    for i, body in enumerate(bodies):
        first = body.find(b"{")
        if body[: max(first, 0)].strip() or (first < 0 and body.strip()):
            return None  # something before the first object: pyarrow would refuse it too
        if first >= 0:
            labels.append(start + i)
            parts += [body[:first], b'{"_file":%d,' % labels[-1], memoryview(body)[first + 1 :]]
    if not parts:
        return WIDE_SCHEMA.empty_table()
    try:
        table = pj.read_json(
            pa.BufferReader(b"".join(parts)), read_options=_READ, parse_options=_PARSE
        )
    except (pa.ArrowException, ValueError):
        return None  # a bad line somewhere
    file = table.column("_file")
    if file.drop_null().to_pylist() != labels:
        return None  # a line of its own carries the key: the file is read on its own
    i = table.schema.get_field_index("_file")
    table = table.set_column(i, "_file", pc.fill_null_forward(file))
    step, tokens = table.column("step"), table.column("tokens")
    if step.null_count or tokens.null_count:
        return None  # a line without a step or tokens: the fallback names it
    if table.num_rows and min(pc.min(step).as_py(), pc.min(tokens).as_py()) < 0:
        return None
    table = _null_non_finite(table)  # pyarrow reads NaN and Infinity; the contract has null
    i = table.schema.get_field_index("horizon")
    return table.set_column(i, "horizon", table.column("horizon").fill_null(False))


def _null_non_finite(table: pa.Table) -> pa.Table:
    """Non-finite floats become null, as :func:`parse_metrics_line` makes them (JSON has no NaN;
    a diverged loss is told by the summary)."""
    for key in FLOAT_METRICS:
        col = table.column(key)
        if col.null_count < len(col):
            finite = pc.is_finite(col)
            if not pc.all(finite.fill_null(True)).as_py():
                i = table.schema.get_field_index(key)
                table = table.set_column(i, key, pc.if_else(finite, col, pa.scalar(None, col.type)))
    return table


def _reference(index: int, body: bytes, notes: list[str]) -> pa.Table:
    """One file, line by line through :func:`parse_metrics_line`; bad lines are noted."""
    rows, bad = [], []
    for lineno, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = parse_metrics_line(json.loads(line))
        except (ValueError, RecursionError):
            row = None
        if row is None or row["step"] >= 2**63 or row["tokens"] >= 2**63:  # not an int64
            bad.append(lineno)
            continue
        row["_file"] = index
        rows.append(row)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        note = f"{len(bad)} invalid line(s) skipped (line {shown})"
        notes[index] = "; ".join(n for n in (notes[index], note) if n)
    return pa.Table.from_pylist(rows, schema=WIDE_SCHEMA)


def _sorted_last_wins(table: pa.Table) -> pa.Table:
    """Sort by (file, step); of repeated steps keep the line logged last."""
    if table.num_rows == 0:
        return table
    file = table.column("_file").to_numpy()
    step = table.column("step").to_numpy()
    order = np.lexsort((np.arange(len(file)), step, file))
    file, step = file[order], step[order]
    keep = np.r_[(file[1:] != file[:-1]) | (step[1:] != step[:-1]), True]
    return table.take(pa.array(order[keep]))


# ------------------------------------------------------------------------------- long format


def long_metrics(wide: pa.Table, run_ids: list[str]) -> pa.Table:
    """The ``metrics`` table: one row per (run, step, float metric) that has a value.

    ``wide`` is :attr:`Metrics.table`, whose ``_file`` indexes ``run_ids``. Rows of a run stay
    contiguous and in (step, metric) order.
    """
    names = list(FLOAT_METRICS)
    if wide.num_rows == 0:
        return tables.empty("metrics")
    values = np.empty((wide.num_rows, len(names)))
    valid = np.empty((wide.num_rows, len(names)), dtype=bool)
    for j, name in enumerate(names):
        col = wide.column(name)
        values[:, j] = col.to_numpy(zero_copy_only=False)
        valid[:, j] = ~col.is_null().to_numpy(zero_copy_only=False)
    # Repeat each line's columns by its count of values and mask a tiled metric index: sequential
    # work, several times cheaper than gathering with flat positions.
    mask = valid.ravel()
    per_row = valid.sum(axis=1)
    metric = np.tile(np.arange(len(names), dtype=np.int32), wide.num_rows)[mask]
    return pa.table(
        {
            "run_id": pa.DictionaryArray.from_arrays(
                pa.array(np.repeat(wide.column("_file").to_numpy(), per_row), pa.int32()),
                pa.array(run_ids, pa.string()),
            ),
            "step": np.repeat(wide.column("step").to_numpy(), per_row),
            "tokens": np.repeat(wide.column("tokens").to_numpy(), per_row),
            "metric": pa.DictionaryArray.from_arrays(pa.array(metric), pa.array(names)),
            "value": values.ravel()[mask],
        },
        schema=tables.METRICS_SCHEMA,
    )
