"""``sweeper export``: every table in every format, to stdout or atomically to a file."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweeper import tables
from sweeper.collect import collect_sweep
from sweeper.export import ExportError, export_table, to_markdown

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_collect import make_sweep  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    path = make_sweep(tmp_path, n=3)
    collect_sweep(path)
    return path


@pytest.mark.parametrize("table", ["runs", "horizons", "metrics"])
def test_csv_to_stdout_matches_the_table(sweep: Path, table: str, capsysbinary) -> None:
    export_table(sweep, table, "csv", None)
    rows = list(csv.DictReader(io.StringIO(capsysbinary.readouterr().out.decode())))
    expected = tables.read_sweep_table(sweep, table)
    assert len(rows) == expected.num_rows and list(rows[0]) == expected.column_names
    if table == "runs":
        assert json.loads(rows[0]["horizons_tokens"]) == [640, 1280]
        assert {r["state"] for r in rows} == {"completed"}


def test_jsonl_and_markdown(sweep: Path, capsysbinary) -> None:
    export_table(sweep, "horizons", "jsonl", None)
    lines = capsysbinary.readouterr().out.decode().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == 6 and rows[0]["tokens"] == 640 and rows[0]["run_id"] == "run0"
    export_table(sweep, "runs", "markdown", None)
    md = capsysbinary.readouterr().out.decode().splitlines()
    assert md[0].startswith("| run_id | sweep |") and md[1].startswith("|---|---|")
    assert len(md) == 2 + 3 and md[2].startswith("| run0 | sw |")


def test_columns_are_selected_in_order(sweep: Path, capsysbinary) -> None:
    export_table(sweep, "horizons", "csv", None, ["tokens", "run_id"])
    rows = list(csv.DictReader(io.StringIO(capsysbinary.readouterr().out.decode())))
    assert list(rows[0]) == ["tokens", "run_id"] and len(rows) == 6
    with pytest.raises(ExportError, match="--columns nope: not in table horizons"):
        export_table(sweep, "horizons", "csv", None, ["run_id", "nope"])


def test_markdown_escapes_and_formats() -> None:
    t = pa.table({"a": ["x|y", None], "b": [1.0 / 3, float("nan")], "c": [[1, 2], None]})
    assert to_markdown(t).splitlines() == [
        "| a | b | c |",
        "|---|---:|---|",
        "| x\\|y | 0.333333 | [1, 2] |",
        "|  | nan |  |",
    ]


def test_parquet_to_a_file_and_not_to_stdout(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "h.parquet"
    out.parent.mkdir()
    export_table(sweep, "horizons", "parquet", out)
    assert pq.read_table(out).equals(tables.read_sweep_table(sweep, "horizons"))
    assert [p.name for p in out.parent.iterdir()] == ["h.parquet"]  # no temp file left
    with pytest.raises(ExportError, match="use -o FILE"):
        export_table(sweep, "horizons", "parquet", None)


def test_output_file_is_replaced_atomically(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs.csv"
    out.write_text("old")
    inode = out.stat().st_ino
    export_table(sweep, "runs", "csv", out)
    assert out.read_text().startswith('"run_id"') and out.stat().st_ino != inode
    with pytest.raises(ExportError, match="does not exist"):
        export_table(sweep, "runs", "csv", tmp_path / "missing-dir" / "x.csv")


def test_optima_before_and_after_analyze(sweep: Path, tmp_path: Path, capsysbinary) -> None:
    with pytest.raises(
        ExportError, match=r"analysis/optima.parquet: not found; run `sweeper analyze`"
    ):
        export_table(sweep, "optima", "csv", None)
    (sweep / "analysis").mkdir()
    pq.write_table(
        pa.table({"tokens": [640], "batch_size": [4], "lr_star": [0.01]}),
        sweep / "analysis" / "optima.parquet",
    )
    export_table(sweep, "optima", "csv", None)
    assert capsysbinary.readouterr().out.decode().splitlines() == [
        '"tokens","batch_size","lr_star"',
        "640,4,0.01",
    ]


def test_collects_only_when_the_table_is_missing(tmp_path: Path, capsysbinary) -> None:
    sweep = make_sweep(tmp_path, n=2)
    export_table(sweep, "runs", "csv", None)  # no table yet: collected first
    assert len(capsysbinary.readouterr().out.decode().splitlines()) == 3
    mtime = tables.table_path(sweep, "runs").stat().st_mtime_ns
    os.utime(sweep / "runs" / "run0" / "summary.json", ns=(1, 1))
    export_table(sweep, "runs", "csv", None)  # table exists: exported as is, no collect
    assert tables.table_path(sweep, "runs").stat().st_mtime_ns == mtime
    assert not (tmp_path / "out.csv").exists()


def test_bad_names(sweep: Path) -> None:
    with pytest.raises(ExportError, match="--table 'bogus': unknown table"):
        export_table(sweep, "bogus", "csv", None)
    with pytest.raises(ExportError, match="--format 'xml': unknown format"):
        export_table(sweep, "runs", "xml", None)


def test_cli_export_errors_are_one_line(sweep: Path) -> None:
    """Through the console script: a clear one-line error and a non-zero exit, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    main = "import sys; from sweeper.cli import main; sys.argv[0] = 'sweeper'; main()"
    cmd = [sys.executable, "-c", main, "export", str(sweep), "--table", "optima"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "optima.parquet: not found" in proc.stderr and "Traceback" not in proc.stderr
    ok = subprocess.run(
        cmd[:-1] + ["horizons", "--format", "csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 7
