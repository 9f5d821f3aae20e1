"""The planner: expands a :class:`~sweeper.spec.SweepSpec` into runs with derived quantities.

Horizon sharing, by schedule:

* ``constant``: one run per (model, lr, B, seed, lr_scales) trained to the largest horizon D and
  read off at every horizon on the way (kind ``single``).
* ``wsd``: one constant-LR ``trunk`` per point, keeping a permanent checkpoint at every branch
  point, plus one decay ``branch`` per D that forks from the trunk at ``floor((1 - f) * steps_D)``.
* ``cosine``: one ``single`` run per D (the schedule depends on D, nothing can be shared).

Run ids are ``<slug>-<8 hex>`` from :func:`sweeper.records.run_id` (a hash of the canonical
resolved TrainConfig JSON plus the kind), so re-planning is idempotent. For a ``single`` run the
hash sees only the largest horizon: adding a smaller horizon keeps the run (the new horizon is
recorded in the run's ``horizons.json``, see ``sweeper.sweep``), while a larger one makes a new
run. A trunk's hash covers its branch points, so
a new horizon makes a new trunk (the old trunk lacks the checkpoint to branch from).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import orjson

from sweeper.cost import time_limit_min
from sweeper.external import axis_slug
from sweeper.records import Resources, RunKind, RunRecord, hashed_params, run_id
from sweeper.spec import (
    ModelSpec,
    SweepSpec,
    batch_value,
    branch_step,
    lr_scales_value,
    lr_value,
    seed_value,
)
from sweeper.spec_protocol import schedule_tag
from trainer.config import (
    BranchConfig,
    OptimConfig,
    ScheduleConfig,
    ScheduleKind,
    TrainConfig,
    _to_jsonable,
)

DEFAULT_SCALES = (1.0, 1.0, 1.0)
_T = TypeVar("_T")


class GridPoint(NamedTuple):
    """One (model, lr, B, seed, lr_scales) point of the grid or of ``extra_points.json``."""

    model: str
    lr: float
    batch_size: int
    seed: int
    lr_scales: tuple[float, float, float] = DEFAULT_SCALES
    source: str = "grid"
    axes: tuple[tuple[str, Any], ...] = ()  # free-form axes of a [trainer] section, by name
    schedule: int = 0  # index into spec.all_schedules()


@dataclass
class Plan:
    """The expanded sweep: run records in launch order (trunks before their branches)."""

    name: str
    runs: list[RunRecord]
    totals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, spec: SweepSpec) -> dict[str, Any]:
        """``plan.json``: sweep name, totals and run ids in launch order."""
        return {
            "sweep": self.name,
            "schedules": [schedule_tag(s) for s in spec.all_schedules()],
            "totals": self.totals,
            "stale_after_s": spec.backend.stale_after_s,
            "runs": [r.id for r in self.runs],
        }


# ------------------------------------------------------------------------------------------- names


def log2_tag(x: float) -> str:
    """``2^-6`` / ``2^-6.5`` for (half-)powers of two, else a short decimal."""
    e = math.log2(x)
    if abs(2 * e - round(2 * e)) < 1e-9:
        return f"2^{round(2 * e) / 2:g}"
    return f"{x:.4g}"


@functools.cache
def tokens_tag(d: int) -> str:
    """``2^20`` for powers of two, else the number."""
    e = math.log2(d)
    return f"2^{int(e)}" if e.is_integer() else str(d)


# ------------------------------------------------------------------------------------------- points


def grid_points(spec: SweepSpec) -> Iterator[GridPoint]:
    """Every grid point, after the ``[window]`` filter: a rate is kept at batch size B when it is
    inside the prior law's window at any horizon D (a constant-rate run and a WSD trunk serve
    every D; cosine runs, one per D, are filtered per D again by the planner)."""
    g = spec.grid
    trainer = spec.section("trainer")
    axes = [tuple(sorted(a.items())) for a in trainer.axis_points()] if trainer else [()]
    schedules = range(len(spec.all_schedules()))
    for m in spec.models:
        for b in spec.batches(m):
            for lr in window_lrs(spec, m, b, g.horizons_tokens):
                for scales in g.lr_scales:
                    for seed in g.seeds:
                        for ax in axes:
                            for s in schedules:
                                yield GridPoint(m.name, lr, b, seed, scales, axes=ax, schedule=s)


def window_lrs(
    spec: SweepSpec, model: ModelSpec, batch: int, horizons: tuple[int, ...]
) -> tuple[float, ...]:
    """``model``'s rates within ``k`` grid points of the law's optimum at ``batch`` for any of
    ``horizons`` (the union of the per-(B, D) windows), in order."""
    lrs = spec.lrs(model)
    if spec.window is None:
        return lrs
    keep: set[int] = set()
    k = spec.window.k
    for d in horizons:
        centre = spec.window.center_log2(batch, d)
        i = min(range(len(lrs)), key=lambda j: abs(math.log2(lrs[j]) - centre))
        keep.update(range(max(0, i - k), min(len(lrs), i + k + 1)))
    return tuple(lrs[i] for i in sorted(keep))


# -------------------------------------------------------------------------------------------- plan


class _Planner:
    """Expands points into records. Everything shared by a model, a (model, B) pair or a rate is
    built once (configs and their dicts); a run costs a shallow copy of its model's base config,
    a dict copy for its id, one hash and its record."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.models = {m.name: m for m in spec.models}
        self.schedules = spec.all_schedules()
        self.base = {
            (m.name, i): spec.base_train(m, s)
            for m in spec.models
            for i, s in enumerate(self.schedules)
        }
        self.base_dict = {key: cfg.to_dict() for key, cfg in self.base.items()}
        # what ids hash: the base dicts with their sub-configs as canonical JSON, written once
        self.id_base = {
            key: {k: _canonical(v) if type(v) is dict else v for k, v in d.items()}
            for key, d in self.base_dict.items()
        }
        self.flops_per_token = {key: cfg.flops_per_token() for key, cfg in self.base.items()}
        self._per_batch: dict[tuple[str, int], tuple[Resources, bool, int | None]] = {}
        self.cost = spec.section("cost")
        self.horizons = spec.grid.horizons_tokens
        # a [simulator] sweep runs the simulated trainer unless [backend] command is set
        self.command = spec.backend.command or (
            (sys.executable, "-m", "trainer.sim") if spec.section("simulator") else None
        )
        self.unshared_flops = 0.0
        self._slugs: dict[tuple[Any, ...], str] = {}
        self._optims: dict[tuple[Any, ...], tuple[OptimConfig, orjson.Fragment]] = {}
        self._schedules: dict[tuple[Any, ...], tuple[ScheduleConfig, orjson.Fragment]] = {}
        self.params = run_params(spec)
        self._point_params: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def expand(self, p: GridPoint) -> list[RunRecord]:
        kind = self.schedules[p.schedule].kind
        if kind == "constant":
            return [self._single(p, self.horizons, suffix="", keep_last=True)]
        if kind == "cosine":
            model = self.models[p.model]
            return [
                self._single(p, (d,), suffix=f"_D{tokens_tag(d)}")
                for d in self.horizons
                if p.source != "grid" or p.lr in window_lrs(self.spec, model, p.batch_size, (d,))
            ]
        return self._wsd(p)

    def _batch(self, p: GridPoint) -> tuple[Resources, bool, int | None]:
        """Resources, whether their time comes from the cost, and the micro-batch of (model, B)."""
        key = (p.model, p.batch_size)
        hit = self._per_batch.get(key)
        if hit is None:
            model = self.models[p.model]
            res, from_cost = self.spec.resources_for(model, p.batch_size)
            micro = self.spec.micro_batch(model, p.batch_size)
            hit = self._per_batch[key] = (res, from_cost, micro)
        return hit

    def _train(
        self,
        p: GridPoint,
        horizons: tuple[int, ...],
        id_horizons: tuple[int, ...],
        changes: dict[str, Any],
        json_changes: dict[str, Any],
    ) -> tuple[TrainConfig, dict[str, Any]]:
        """The run's TrainConfig and the dict its id hashes: the config's ``to_dict()`` with
        ``id_horizons`` as its horizons, built from the base dict, its sub-configs as canonical
        JSON (``to_dict()`` and serializing the sub-configs per run would dominate planning time;
        the ids, checked against ``to_dict()`` by a test, pin the two equal). ``json_changes``
        are ``changes`` as JSON."""
        key = (p.model, p.schedule)
        optim, optim_json = self._optim(p)
        micro = self._batch(p)[2]
        cfg = _replace(
            self.base[key],
            optim=optim,
            batch_size=p.batch_size,
            seed=p.seed,
            horizons_tokens=horizons,
            micro_batch_size=micro,
            **changes,
        )
        d = {
            **self.id_base[key],
            "optim": optim_json,
            "batch_size": p.batch_size,
            "seed": p.seed,
            "horizons_tokens": list(id_horizons),
            "micro_batch_size": micro,
            **json_changes,
        }
        return cfg, d

    def _optim(self, p: GridPoint) -> tuple[OptimConfig, orjson.Fragment]:
        """The point's optimizer config and its JSON, shared by every run with its rates."""
        key = (p.model, p.lr, p.lr_scales)
        hit = self._optims.get(key)
        if hit is None:
            axes = self.models[p.model].axes
            # a width family's member scales each group's rate by (width / base)^-c_group
            f_in, f_hidden, f_out = axes.width_factors()
            s_in, s_hidden, s_out = p.lr_scales
            rates: dict[str, float] = {
                "lr": p.lr,
                "lr_scale_in": s_in * f_in,
                "lr_scale_hidden": s_hidden * f_hidden,
                "lr_scale_out": s_out * f_out,
            }
            base = self.base[(p.model, 0)].optim  # the optimizer is the same for every schedule
            if axes.eps_factor() != 1.0:
                rates["adam_eps"] = base.adam_eps * axes.eps_factor()
            hit = self._optims[key] = (
                _replace(base, **rates),
                _canonical({**self.base_dict[(p.model, 0)]["optim"], **rates}),
            )
        return hit

    def _schedule(
        self, p: GridPoint, kind: ScheduleKind, total: int | None
    ) -> tuple[ScheduleConfig, orjson.Fragment]:
        """The point's schedule with ``kind`` and ``total`` steps, and its JSON, shared by every
        run (keyed by the schedule's index: hashing the config itself costs more per run)."""
        key = (p.model, p.schedule, kind, total)
        hit = self._schedules.get(key)
        if hit is None:
            base = self.base[(p.model, p.schedule)].schedule
            sched = dataclasses.replace(base, kind=kind, total_steps=total)
            hit = self._schedules[key] = (sched, _canonical(_to_jsonable(sched)))
        return hit

    def _params(self, p: GridPoint) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The point's params (the sweep's, with its free-form axis values) and the part of them
        its id hashes."""
        hit = self._point_params.get(p.axes)
        if hit is None:
            params = self.params
            if p.axes and params and "trainer" in params:
                params = {**params, "trainer": {**params["trainer"], "axes": dict(p.axes)}}
            hit = self._point_params[p.axes] = (params, hashed_params(params))
        return hit

    def _record(
        self, p: GridPoint, kind: RunKind, slug: str, train: tuple[TrainConfig, dict[str, Any]],
        parent: str | None,
    ) -> RunRecord:  # fmt: skip
        """The run's record, its id hashed from the ``train`` dict."""
        cfg, d = train
        params, hashed = self._params(p)
        resources, from_cost, _ = self._batch(p)
        record = _new(
            RunRecord,
            id=run_id(slug, kind, d, hashed),
            slug=slug,
            kind=kind,
            parent=parent,
            sweep=self.spec.name,
            model=p.model,
            train=cfg,
            resources=resources,
            source=p.source,
            command=self.command,
            params=params,
        )
        if from_cost:  # the time limit from the [cost] estimate x margin
            minutes = time_limit_min(record, self.cost)
            if minutes is not None:
                record = dataclasses.replace(
                    record, resources=dataclasses.replace(resources, time_min=minutes)
                )
        return record

    def _slug(self, p: GridPoint) -> str:
        key = (p.model, p.lr, p.batch_size)
        prefix = self._slugs.get(key)
        if prefix is None:
            prefix = self._slugs[key] = f"{p.model}_lr{log2_tag(p.lr)}_B{p.batch_size}"
        s = f"{prefix}_s{p.seed}"
        if p.lr_scales != DEFAULT_SCALES:
            s += "_ls" + "-".join(f"{v:g}" for v in p.lr_scales)
        if p.axes:
            s += axis_slug(dict(p.axes))
        if len(self.schedules) > 1:
            s += f"_{schedule_tag(self.schedules[p.schedule])}"
        return s

    def _single(
        self, p: GridPoint, horizons: tuple[int, ...], suffix: str, keep_last: bool = False
    ) -> RunRecord:
        """A run read off at ``horizons``; ``keep_last`` keeps its final checkpoint, so that a
        later, longer horizon continues it instead of training from step 0."""
        last = horizons[-1] // (p.batch_size * self.models[p.model].config.seq_len)
        changes: dict[str, Any] = {"checkpoint_steps": (last,)} if keep_last else {}
        as_json: dict[str, Any] = {"checkpoint_steps": [last]} if keep_last else {}
        # Only the largest horizon enters the id: adding a smaller horizon keeps a finished run.
        train = self._train(p, horizons, horizons[-1:], changes, as_json)
        self.unshared_flops += self.flops_per_token[(p.model, p.schedule)] * sum(horizons)
        return self._record(p, RunKind.SINGLE, self._slug(p) + suffix, train, None)

    def _wsd(self, p: GridPoint) -> list[RunRecord]:
        base = self.base[(p.model, p.schedule)]
        sched = base.schedule
        tps = p.batch_size * base.model.seq_len
        points = {d: branch_step(d // tps, sched.decay_fraction) for d in self.horizons}
        steps = tuple(sorted(set(points.values())))
        constant, constant_json = self._schedule(p, "constant", None)
        trunk_h = tuple(s * tps for s in steps)
        trunk = self._train(
            p,
            trunk_h,
            trunk_h,
            {"schedule": constant, "checkpoint_steps": steps},
            {"schedule": constant_json, "checkpoint_steps": list(steps)},
        )
        slug = self._slug(p)
        runs = [self._record(p, RunKind.TRUNK, f"{slug}_trunk", trunk, None)]
        tid = runs[0].id
        fpt = self.flops_per_token[(p.model, p.schedule)]
        for d in self.horizons:
            decay, decay_json = self._schedule(p, "wsd", d // tps)
            branch = _new(BranchConfig, run_dir=f"runs/{tid}", step=points[d])
            train = self._train(
                p,
                (d,),
                (d,),
                {"schedule": decay, "branch": branch},
                {"schedule": decay_json, "branch": {"run_dir": branch.run_dir, "step": points[d]}},
            )
            runs.append(self._record(p, RunKind.BRANCH, f"{slug}_D{tokens_tag(d)}", train, tid))
            self.unshared_flops += fpt * d
        return runs


def run_params(spec: SweepSpec) -> dict[str, Any] | None:
    """The free-form params every run of the sweep carries: each optional section that has a
    ``run_params()`` contributes its dict (e.g. the simulator's surface), keyed by section name."""
    params = {
        name: section.run_params()
        for name, section in spec.sections
        if hasattr(section, "run_params")
    }
    return params or None


def _replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` for the planner's frozen, already validated configs, without
    re-running ``__init__``: a third of planning time otherwise (bench/bench_plan.py). The
    configs have no ``__post_init__`` and no slots; a test pins the result equal to
    ``dataclasses.replace``."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


def _canonical(value: Any) -> orjson.Fragment:
    """``value`` as canonical JSON (what :func:`~sweeper.records.run_id` writes: sorted keys),
    which ``run_id`` inserts as is: a sub-config shared by many runs is serialized once instead of
    per run (half of an id's cost)."""
    return orjson.Fragment(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def _new(cls: type[_T], **fields: Any) -> _T:
    """``cls(**fields)`` for a frozen dataclass given every field, without its ``__init__``
    (a frozen ``__init__`` sets each field through ``object.__setattr__``: for ``RunRecord``, a
    fifth of planning time). ``cls`` has no ``__post_init__`` and no slots; the planner's round-trip
    test (``from_dict`` builds through ``__init__``) pins the result equal to ``cls(**fields)``."""
    new = object.__new__(cls)
    new.__dict__.update(fields)
    return new


def plan_sweep(spec: SweepSpec, extra_points: Iterable[GridPoint] = ()) -> Plan:
    """Expand ``spec`` (plus ``extra_points``) into runs, trunks before their branches.

    Duplicate points (an extra point already on the grid) yield one run.
    """
    planner = _Planner(spec)
    runs: list[RunRecord] = []
    seen: set[str] = set()
    for point in itertools.chain(grid_points(spec), extra_points):
        for run in planner.expand(point):
            if run.id not in seen:
                seen.add(run.id)
                runs.append(run)
    return Plan(spec.name, runs, _totals(runs, planner.unshared_flops))


def _totals(runs: list[RunRecord], unshared: float) -> dict[str, Any]:
    flops_per_token: dict[str, float] = {}  # by model name: one config per name in a sweep
    kinds: dict[RunKind, int] = {}
    flops: float = 0  # an int 0 for no runs, as sum() gives
    tokens = 0
    for r in runs:
        fpt = flops_per_token.get(r.model)
        if fpt is None:
            fpt = flops_per_token[r.model] = r.train.flops_per_token()
        trained = r.trained_tokens
        flops += fpt * trained  # r.flops, without asking the model twice per run
        tokens += trained
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {
        "runs": len(runs),
        "kinds": {k.value: n for k, n in kinds.items()},
        "flops": flops,
        "tokens": tokens,
        "flops_without_sharing": unshared,
        "sharing_saved_fraction": (1.0 - flops / unshared) if unshared else 0.0,
    }


_POINT_KEYS = {"model", "lr", "batch_size", "seed", "lr_scales", "source", "axes", "schedule"}


def extra_point(raw: Any, spec: SweepSpec, where: str) -> GridPoint:
    """Validate one entry of ``extra_points.json`` into a :class:`GridPoint`, through the same
    validators as the spec's axes (``where`` names the file and entry in errors)."""
    from sweeper.errors import SpecError

    if not isinstance(raw, dict):
        raise SpecError(where, None, raw, "expected an object")
    for key in sorted(set(raw) - _POINT_KEYS):
        raise SpecError(
            where, key, raw[key], f"unknown key (known: {', '.join(sorted(_POINT_KEYS))})"
        )
    model = next((m for m in spec.models if m.name == raw.get("model")), None)
    if model is None:
        raise SpecError(
            where, "model", raw.get("model"), f"unknown model (known: {spec.model_names()})"
        )
    lr = lr_value(raw.get("lr"), "lr", where)
    b = batch_value(raw.get("batch_size"), "batch_size", where)
    spec.check_batch(model, b, where, "batch_size")
    seed = seed_value(raw.get("seed", spec.grid.seeds[0]), "seed", where)
    scales = lr_scales_value(raw.get("lr_scales", list(spec.grid.lr_scales[0])), "lr_scales", where)
    source = raw.get("source", "extra")
    if not isinstance(source, str) or not source.isidentifier():
        raise SpecError(where, "source", source, "expected a short word")
    axes = _point_axes(raw, spec, where)
    return GridPoint(model.name, lr, b, seed, scales, source, axes, _schedule(raw, spec, where))


def extra_points(raw: Any, spec: SweepSpec, where: str) -> list[GridPoint]:
    """One entry of ``extra_points.json`` as grid points: once per schedule of the spec unless
    the entry names one (``"schedule": "wsd0.2"``)."""
    p = extra_point(raw, spec, where)
    if "schedule" in raw:
        return [p]
    return [p._replace(schedule=i) for i in range(len(spec.all_schedules()))]


def _schedule(raw: dict[str, Any], spec: SweepSpec, where: str) -> int:
    from sweeper.errors import SpecError

    tags = [schedule_tag(s) for s in spec.all_schedules()]
    tag = raw.get("schedule", tags[0])
    if tag not in tags:
        raise SpecError(where, "schedule", tag, f"not a schedule of the spec (known: {tags})")
    return tags.index(tag)


def _point_axes(raw: dict[str, Any], spec: SweepSpec, where: str) -> tuple[tuple[str, Any], ...]:
    """The free-form axis values of an extra point: one of the spec's axis points."""
    from sweeper.errors import SpecError

    trainer = spec.section("trainer")
    points = trainer.axis_points() if trainer else [{}]
    value = raw.get("axes", points[0])
    if value not in points:
        raise SpecError(where, "axes", value, f"not a point of [trainer] axes (known: {points})")
    return tuple(sorted(value.items()))
