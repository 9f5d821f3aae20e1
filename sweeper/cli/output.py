"""Printing for a person: tables (rich, or plain text past a few hundred rows), JSON and CSV."""

from __future__ import annotations

import csv
import io
import sys
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = click.Choice(["table", "json", "csv"])
# Piped output (tests, `| less`) should not be wrapped at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 240)
_RICH_MAX_ROWS = 500  # rich lays out every cell; beyond this a plain aligned table is much faster


def emit(rows: list[dict[str, Any]], fmt: str, title: str, columns: list[str]) -> None:
    """Print ``rows`` as a table (with ``title``), JSON or CSV, keeping ``columns``."""
    if fmt == "json":
        data = [{c: r.get(c) for c in columns} for r in rows]
        click.echo(orjson.dumps(data, default=_plain, option=orjson.OPT_INDENT_2).decode())
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(buf.getvalue(), nl=False)
    elif len(rows) > _RICH_MAX_ROWS:
        plain_table(rows, title, columns)
    else:
        table = Table(title=title)
        for c in columns:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*(Text(cell(r.get(c))) for c in columns))  # values are never markup
        out.print(table)


def _plain(v: Any) -> Any:
    """A value orjson does not know (a numpy scalar, a path) as a plain one."""
    item = getattr(v, "item", None)
    return item() if callable(item) else str(v)


def plain_table(rows: list[dict[str, Any]], title: str, columns: list[str]) -> None:
    """An aligned text table (fast for thousands of rows)."""
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    click.echo("\n".join(line.rstrip() for line in lines))


def cell(v: Any) -> str:
    """One value as table text."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ",".join(map(str, v))
    return str(v)


def counts_line(counts: dict[str, int]) -> str:
    """``3 completed, 1 failed``."""
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"
