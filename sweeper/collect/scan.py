"""What changed since the last collect: file signatures and the incremental cache.

``results/<sweep>/.collect/`` holds what the last collect left:

* ``manifest.json``: per run ``[signature, state, problem]`` and the *generation* (a random id)
  of the cached tables;
* ``<table>.arrow``: the rows of the last collect (Arrow IPC with lz4: reading it back is ~30x
  faster than decoding the Parquet file), recording that generation, as do the published
  ``<sweep>/<table>.parquet``.

A run's signature joins ``size:mtime_ns:inode`` of each file in :data:`WATCHED` (``-`` for a
missing one): appending, rewriting, replacing or touching any of them changes it. Runs whose state
depends on the clock (:data:`VOLATILE`) are read again by every collect.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sweeper import tables
from sweeper.errors import StoreError
from sweeper.fsutil import write_bytes_atomic
from sweeper.records import RunState
from sweeper.store import EVENTS, HORIZONS, RECORD, SweepStore, check_run_id
from trainer.schema import CONFIG_FILE, METRICS_FILE, PROVENANCE_FILE, SUMMARY_FILE

CACHE_DIR = ".collect"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 3  # 3: schedule tags, span-checked horizons, mismatch rows
WATCHED = (RECORD, HORIZONS, CONFIG_FILE, PROVENANCE_FILE, EVENTS, METRICS_FILE, SUMMARY_FILE)
# States that can change without any watched file changing: a heartbeat ages into ``stale``.
VOLATILE = frozenset({RunState.RUNNING.value, RunState.STALE.value})


def run_ids(store: SweepStore, listed: list[str]) -> list[str]:
    """Every run directory and every run id ``listed`` in plan.json, sorted."""
    return sorted(set(store.run_ids()).union(listed))


def listed_ids(store: SweepStore) -> list[str]:
    """The valid run ids of plan.json (none if it is missing or damaged)."""
    try:
        listed = store.load_plan()["runs"]
    except StoreError:
        return []
    out = []
    for rid in listed:
        with contextlib.suppress(StoreError):
            out.append(check_run_id(rid))  # refuses a name that is not a run id
    return out


def signatures(store: SweepStore, ids: list[str]) -> dict[str, str]:
    """``run_id -> signature`` (see the module docstring)."""
    runs_dir = str(store.runs_dir)
    return {
        rid: ",".join([file_signature(f"{runs_dir}/{rid}/{name}") for name in WATCHED])
        for rid in ids
    }


def file_signature(path: str) -> str:
    """One file's part of a signature (``-`` if it does not exist); symlinks are not followed."""
    try:
        return stat_signature(os.stat(path, follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return "-"


def stat_signature(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


@dataclass
class Cache:
    """The manifest and the cached tables of the last collect (read only when needed)."""

    cache_dir: Path
    generation: str
    runs: dict[str, list[Any]]  # run_id -> [signature, state, problem]
    rows: dict[str, int]

    @classmethod
    def load(cls, cache_dir: Path) -> Cache | None:
        """The cache, or None if it is missing, damaged or of another version."""
        try:
            doc = json.loads((cache_dir / MANIFEST).read_bytes())
            if doc.get("version") != MANIFEST_VERSION or doc.get("schema") != tables.SCHEMA_VERSION:
                return None
            cache = cls(cache_dir, str(doc["generation"]), dict(doc["runs"]), dict(doc["rows"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        for name in tables.TABLE_NAMES:
            if generation_of(cache.path(name)) != cache.generation:
                return None
        return cache

    @classmethod
    def build(cls, cache_dir: Path, merged: dict[str, pa.Table], sigs: dict[str, str]) -> Cache:
        """A new cache (a new generation) describing the tables ``merged``."""
        runs = merged["runs"]
        cols = [runs.column(c).to_pylist() for c in ("run_id", "state", "problem")]
        entries = {rid: [sigs[rid], state, prob] for rid, state, prob in zip(*cols, strict=True)}
        rows = {name: t.num_rows for name, t in merged.items()}
        return cls(cache_dir, uuid.uuid4().hex, entries, rows)

    def path(self, name: str) -> Path:
        return self.cache_dir / f"{name}.arrow"

    def table(self, name: str) -> pa.Table:
        """Cached table ``name`` (schema metadata stripped)."""
        with pa.memory_map(str(self.path(name))) as source:
            table = pa.ipc.open_file(source).read_all()
        return tables.conform(name, table.replace_schema_metadata(None))

    def save(self, merged: dict[str, pa.Table]) -> None:
        """Write the cached tables, then the manifest naming their generation (the commit point)."""
        meta = {tables.META_GENERATION: self.generation.encode()}
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        for name, table in merged.items():
            table = table.replace_schema_metadata(meta)

            def write(f: Any, table: pa.Table = table) -> None:
                with pa.ipc.new_file(f, table.schema, options=options) as writer:
                    writer.write_table(table)

            tables.atomic_write_bytes(self.path(name), write)
        doc = {
            "version": MANIFEST_VERSION,
            "schema": tables.SCHEMA_VERSION,
            "generation": self.generation,
            "rows": self.rows,
            "runs": self.runs,
        }
        write_bytes_atomic(
            self.cache_dir / MANIFEST, json.dumps(doc, separators=(",", ":")).encode()
        )


def generation_of(path: Path) -> str | None:
    """The generation recorded in a cached (Arrow IPC) or published (Parquet) table, if readable."""
    meta: dict[bytes, bytes]
    try:
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                meta = pa.ipc.open_file(source).schema.metadata or {}
        else:
            meta = tables.read_metadata(path)
    except (OSError, pa.ArrowException, tables.TableError):
        return None
    return str(meta.get(tables.META_GENERATION, b"").decode())
