"""Extending a sweep to a larger token budget without training anything twice.

A constant-rate run keeps its final checkpoint (the planner puts its last step in
``checkpoint_steps``). When a spec later asks for a larger horizon, the planner's new run for the
same point (a new id: its largest horizon changed) is replaced by a *continuation*: a new record
that names the old run as ``parent`` and starts from its final checkpoint (``train.branch``), so
ids stay content-addressed, no step is trained again and the old run is never touched. Horizons up
to the old run's last step are read from the old run; the continuation logs the ones after it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from sweeper.records import RunKind, RunRecord, hashed_params, run_id
from sweeper.store import SweepStore
from trainer.config import BranchConfig
from trainer.schema import checkpoint_name


def trajectory(r: RunRecord) -> str | None:
    """What makes two constant single runs the same trajectory (everything but horizons,
    checkpoint steps and start point); None for a run that cannot be continued."""
    if r.kind != RunKind.SINGLE or r.train.schedule.kind != "constant":
        return None
    d = r.train.to_dict()
    for key in ("horizons_tokens", "checkpoint_steps", "branch"):
        d.pop(key)
    return run_id("", "trajectory", d, hashed_params(r.params))


class Extender:
    """Maps the planner's runs onto a sweep directory's existing trajectories."""

    def __init__(self, store: SweepStore, existing: Iterable[RunRecord]) -> None:
        self.store = store
        self.chains: dict[str, list[RunRecord]] = {}
        for r in existing:
            key = trajectory(r)
            if key is not None:
                self.chains.setdefault(key, []).append(r)
        for chain in self.chains.values():
            chain.sort(key=lambda r: r.horizons_tokens[-1])

    def resolve(self, planned: RunRecord) -> tuple[RunRecord, list[tuple[str, tuple[int, ...]]]]:
        """The record to use for ``planned``, and the horizons to add to existing runs.

        Returns ``planned`` itself, the existing run with the same largest horizon (its new
        smaller horizons are added to the runs of the chain that span them), or a continuation of
        the longest existing run with a final checkpoint.
        """
        key = trajectory(planned)
        chain = self.chains.get(key or "", [])
        if not chain:
            return planned, []
        top = planned.horizons_tokens[-1]
        adds = self._spread(chain, planned.horizons_tokens)
        same = next((r for r in chain if r.horizons_tokens[-1] == top), None)
        if same is not None:
            return same, adds
        shorter = [r for r in chain if r.horizons_tokens[-1] < top]
        for old in reversed(shorter):
            step = self._final_checkpoint(old)
            if step is not None:
                cont = continuation(planned, old, step)
                self.chains.setdefault(key or "", []).append(cont)
                return cont, [(rid, h) for rid, h in adds if rid != cont.id]
        return planned, []

    def _spread(
        self, chain: list[RunRecord], horizons: tuple[int, ...]
    ) -> list[tuple[str, tuple[int, ...]]]:
        """Each existing run of the chain gets the new horizons inside its own token span."""
        out = []
        for r in chain:
            start = r.start_step * r.tokens_per_step
            mine = tuple(h for h in horizons if start < h <= r.horizons_tokens[-1])
            if mine:
                out.append((r.id, mine))
        return out

    def _final_checkpoint(self, old: RunRecord) -> int | None:
        """The step of the old run's kept final checkpoint, if it exists."""
        ckpt = self.store.run_dir(old.id) / "ckpt"
        for step in sorted(old.train.checkpoint_steps, reverse=True):
            if os.path.isfile(ckpt / checkpoint_name(step)):
                return step
        return None


def continuation(planned: RunRecord, old: RunRecord, step: int) -> RunRecord:
    """``planned`` started from ``old``'s checkpoint at ``step`` (horizons after it only)."""
    start = step * planned.tokens_per_step
    train = dataclasses.replace(
        planned.train,
        horizons_tokens=tuple(h for h in planned.horizons_tokens if h > start),
        branch=BranchConfig(run_dir=f"runs/{old.id}", step=step),
    )
    slug = f"{planned.slug}_cont"
    rid = run_id(slug, RunKind.SINGLE, train.to_dict(), hashed_params(planned.params))
    return dataclasses.replace(
        planned, id=rid, slug=slug, parent=old.id, train=train, source="extend"
    )
