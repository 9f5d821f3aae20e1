"""Turning a spec into a sweep directory, and choosing which runs to start.

``prepare_sweep`` writes ``spec.toml``, ``plan.json`` and one ``runs/<id>/run.json`` per new run,
all under the sweep lock and only after the whole spec validated. ``select_runs`` and ``claim`` pick
and mark the runs a launch/resume starts, under the same lock, so two launchers never start one run
twice.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sweeper.errors import SpecError, StoreError
from sweeper.plan import GridPoint, Plan, extra_point, plan_sweep
from sweeper.spec import SweepSpec, load_spec, parse_spec_text
from sweeper.store import (
    RunState,
    SweepStore,
    hostname,
    read_events,
    read_json,
    write_text_atomic,
)

SPEC_FILE = "spec.toml"
EXTRA_POINTS = "extra_points.json"
# Files a --restart removes; a completed run is never restarted.
_RESTART_FILES = ("metrics.jsonl", "summary.json", "config.json", "provenance.json", "heartbeat")


@dataclass
class Prepared:
    """The result of :func:`prepare_sweep`."""

    store: SweepStore
    spec: SweepSpec
    plan: Plan
    new_ids: list[str]
    spec_changed: bool


def sweep_dir_for(spec: SweepSpec, results: Path) -> Path:
    """``<results>/<spec name>``."""
    return Path(results) / spec.name


def read_extra_points(sweep_dir: Path, spec: SweepSpec) -> list[GridPoint]:
    """Validated points of ``extra_points.json`` (empty if the file is absent)."""
    path = Path(sweep_dir) / EXTRA_POINTS
    if not path.exists():
        return []
    raw = read_json(path)
    if not isinstance(raw, list):
        raise SpecError(str(path), None, raw, "expected a list of points")
    return [extra_point(p, spec, f"{path}[{i}]") for i, p in enumerate(raw)]


def prepare_sweep(spec_path: Path, results: Path) -> Prepared:
    """Validate ``spec_path``, plan it, and create or extend its sweep directory.

    A new sweep gets ``spec.toml``, ``plan.json`` and every run record. An existing sweep keeps
    every run; only runs not yet present are added. A changed spec replaces ``spec.toml`` atomically
    and the old one is kept as ``spec.<UTC timestamp>.toml``.
    """
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    text = spec_path.read_text(encoding="utf-8")
    store = SweepStore(sweep_dir_for(spec, results))
    with store.lock():
        plan = plan_sweep(spec, read_extra_points(store.root, spec))
        changed = _store_spec(store, text)
        new_ids = write_plan(store, spec, plan)
    return Prepared(store, spec, plan, new_ids, changed)


def replan(sweep_dir: Path) -> list[str]:
    """Re-read ``spec.toml`` + ``extra_points.json`` and write records for runs not yet present.

    Returns:
        Ids of the new runs (e.g. the points ``sweeper refine --apply`` added).
    """
    store = SweepStore(Path(sweep_dir))
    path = store.root / SPEC_FILE
    if not path.is_file():
        raise StoreError(f"{store.root}: not a sweep directory (no {SPEC_FILE})")
    spec = parse_spec_text(path.read_text(encoding="utf-8"), str(path))
    with store.lock():
        plan = plan_sweep(spec, read_extra_points(store.root, spec))
        return write_plan(store, spec, plan)


def _store_spec(store: SweepStore, text: str) -> bool:
    path = store.root / SPEC_FILE
    store.root.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if old == text:
            return False
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        write_text_atomic(store.root / f"spec.{stamp}.toml", old)
        write_text_atomic(path, text)
        return True
    write_text_atomic(path, text)
    return False


def write_plan(store: SweepStore, spec: SweepSpec, plan: Plan) -> list[str]:
    """Write records of new runs and ``plan.json``; extend horizon lists of existing single runs.

    Must be called under ``store.lock()``.
    """
    existing = set(store.run_ids())
    new_ids = []
    for run in plan.runs:
        if run.id not in existing:
            store.write_record(run.record(spec))
            new_ids.append(run.id)
        elif run.kind == "single":
            _merge_horizons(store, run.id, run.train["horizons_tokens"])
    old_ids: list[str] = []
    if store.exists():
        old_ids = [r for r in store.load_plan().get("runs", []) if r in existing]
    doc = plan.to_dict(spec)
    current = set(doc["runs"])
    # Runs of an earlier spec stay listed (after the current ones) so they are never orphaned.
    doc["runs"] = doc["runs"] + [r for r in old_ids if r not in current]
    store.write_plan(doc)
    return new_ids


def _merge_horizons(store: SweepStore, run_id: str, horizons: list[int]) -> None:
    """A single run's id only hashes its largest horizon; union in any new smaller horizons.

    A not-yet-started run gets them in its TrainConfig (the trainer then logs them); a started run
    keeps its config and records them in ``derived.horizons_tokens`` only.
    """
    record = store.load_record(run_id)
    have = record["derived"].get("horizons_tokens", record["train"]["horizons_tokens"])
    union = sorted(set(have) | set(horizons))
    if union == sorted(have):
        return
    tps = record["derived"]["tokens_per_step"]
    record["derived"]["horizons_tokens"] = union
    record["derived"]["horizon_steps"] = [d // tps for d in union]
    if not read_events(store.run_dir(run_id)):
        record["train"]["horizons_tokens"] = union
    store.write_record(record, overwrite=True)


# -------------------------------------------------------------------------------------- selection

LAUNCHABLE = frozenset({RunState.PLANNED})
RESUMABLE = frozenset({RunState.PLANNED, RunState.FAILED, RunState.STALE, RunState.CANCELLED})


def select_runs(
    store: SweepStore,
    *,
    resume: bool = False,
    diverged: bool = False,
    run_ids: Iterable[str] | None = None,
) -> list[str]:
    """Runs a launch (planned) or resume (planned, failed, stale, cancelled; diverged on request)
    should start, in ``plan.json`` order (trunks before branches). Never a completed one."""
    wanted = set(RESUMABLE if resume else LAUNCHABLE)
    if diverged:
        wanted.add(RunState.DIVERGED)
    order = list(run_ids) if run_ids is not None else _plan_order(store)
    statuses = store.statuses(order)
    return [rid for rid in order if statuses[rid].state in wanted]


def _plan_order(store: SweepStore) -> list[str]:
    ids = set(store.run_ids())
    listed = [r for r in store.load_plan().get("runs", []) if r in ids]
    seen = set(listed)
    return listed + [r for r in sorted(ids) if r not in seen]


def claim(store: SweepStore, run_ids: list[str], backend: str) -> None:
    """Mark runs as ``submitted`` by this process (call under ``store.lock()``)."""
    for rid in run_ids:
        store.append_event(rid, "submitted", backend=backend, host=hostname(), pid=os.getpid())


def restart_run(store: SweepStore, run_id: str) -> None:
    """Delete a non-completed run's checkpoints and metrics so it starts from step 0."""
    if store.status(run_id).state == RunState.COMPLETED:
        raise StoreError(f"run {run_id}: completed; refusing to delete its data")
    rd = store.run_dir(run_id)
    shutil.rmtree(rd / "ckpt", ignore_errors=True)
    for name in _RESTART_FILES:
        (rd / name).unlink(missing_ok=True)


def load_sweep_spec(store: SweepStore) -> SweepSpec:
    """The spec stored in a sweep directory."""
    path = store.root / SPEC_FILE
    if not path.is_file():
        raise StoreError(f"{store.root}: not a sweep directory (no {SPEC_FILE})")
    return parse_spec_text(path.read_text(encoding="utf-8"), str(path))


def plan_summary(plan: Plan) -> str:
    """One line: runs, compute and what sharing saved."""
    t = plan.totals
    return (
        f"{t['runs']} runs ({', '.join(f'{n} {k}' for k, n in t['kinds'].items())}), "
        f"{t['flops']:.3g} FLOPs, horizon sharing saved {100 * t['sharing_saved_fraction']:.0f}%"
    )
