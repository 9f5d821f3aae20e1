"""The planner: expands a :class:`~sweeper.spec.SweepSpec` into runs with derived quantities.

Horizon sharing, by schedule:

* ``constant``: one run per (model, lr, B, seed, lr_scales) trained to the largest horizon D and
  read off at every horizon on the way (kind ``single``).
* ``wsd``: one constant-LR ``trunk`` per point, keeping a permanent checkpoint at every branch
  point, plus one decay ``branch`` per D that forks from the trunk at ``floor((1 - f) * steps_D)``.
* ``cosine``: one ``single`` run per D (the schedule depends on D, nothing can be shared).

Run ids are ``<slug>-<8 hex>``, the hex being a hash of the canonical resolved TrainConfig JSON
plus the kind, so re-planning is idempotent. For a ``single`` run the hash sees only the largest
horizon: adding a smaller horizon keeps the run (its horizon list is extended, see
``sweeper.launch``), while a larger one makes a new run. A trunk's hash covers its branch points, so
a new horizon makes a new trunk (the old trunk lacks the checkpoint to branch from).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sweeper.spec import SweepSpec, branch_step

DEFAULT_SCALES = (1.0, 1.0, 1.0)


class GridPoint(NamedTuple):
    """One (model, lr, B, seed, lr_scales) point of the grid or of ``extra_points.json``."""

    model: str
    lr: float
    batch_size: int
    seed: int
    lr_scales: tuple[float, float, float] = DEFAULT_SCALES
    source: str = "grid"


@dataclass(slots=True)
class PlannedRun:
    """A run the planner wants: its id, kind and resolved TrainConfig dict (not yet validated as a
    whole; the spec validated every shared part)."""

    id: str
    slug: str
    kind: str  # single | trunk | branch
    parent: str | None
    model_name: str
    train: dict[str, Any]
    derived: dict[str, Any]
    source: str = "grid"

    def record(self, spec: SweepSpec) -> dict[str, Any]:
        """The run record written to ``runs/<id>/run.json``."""
        return {
            "id": self.id,
            "slug": self.slug,
            "kind": self.kind,
            "parent": self.parent,
            "sweep": spec.name,
            "model_name": self.model_name,
            "source": self.source,
            "train": self.train,
            "derived": self.derived,
            "resources": spec.resources.to_dict(),
            "backend": spec.backend.to_dict(),
        }


@dataclass
class Plan:
    """The expanded sweep."""

    name: str
    runs: list[PlannedRun]
    totals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, spec: SweepSpec) -> dict[str, Any]:
        """``plan.json``: sweep name, totals, backend settings and run ids in launch order."""
        return {
            "sweep": self.name,
            "schedule": spec.schedule.kind,
            "totals": self.totals,
            "backend": spec.backend.to_dict(),
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


def run_id(slug: str, kind: str, train: dict[str, Any]) -> str:
    """``<slug>-<8 hex of sha256(canonical {kind, train})>``."""
    blob = json.dumps({"kind": kind, "train": train}, sort_keys=True, separators=(",", ":"))
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------- points


def grid_points(spec: SweepSpec) -> Iterator[GridPoint]:
    """Every grid point, after the ``[window]`` filter (centred at the largest horizon)."""
    g = spec.grid
    d_ref = max(g.horizons_tokens)
    for m in spec.models:
        for b in g.batch_size:
            for lr in _window_lrs(spec, b, d_ref):
                for scales in g.lr_scales:
                    for seed in g.seeds:
                        yield GridPoint(m.name, lr, b, seed, scales)


def _window_lrs(spec: SweepSpec, batch: int, tokens: int) -> tuple[float, ...]:
    lrs = spec.grid.lr
    if spec.window is None:
        return lrs
    centre = spec.window.center_log2(batch, tokens)
    i = min(range(len(lrs)), key=lambda j: abs(math.log2(lrs[j]) - centre))
    k = spec.window.k
    return lrs[max(0, i - k) : i + k + 1]


# -------------------------------------------------------------------------------------------- plan


_SENTINEL = re.compile(r'"\\u0000(\w+)\\u0000"')
_LR_PATHS = ("optim.lr", "optim.lr_scale_in", "optim.lr_scale_hidden", "optim.lr_scale_out")
_POINT_PATHS = (*_LR_PATHS, "batch_size", "seed", "horizons_tokens")


class _Canon:
    """Canonical ``{kind, train}`` JSON of one model's runs of one kind, as a format template.

    Runs of a model differ only in a few fields (``paths``), so the rest of the sorted, compact JSON
    is serialised once and :meth:`hash8` fills in JSON-encoded values: exactly the bytes
    :func:`run_id` hashes with a full ``json.dumps``, at a fraction of the cost.
    """

    def __init__(self, proto: dict[str, Any], kind: str, paths: tuple[str, ...]) -> None:
        t = json.loads(json.dumps(proto))
        for path in paths:
            *parents, leaf = path.split(".")
            node = t
            for key in parents:
                node = node[key]
            node[leaf] = "\0" + path.replace(".", "__") + "\0"
        text = json.dumps({"kind": kind, "train": t}, sort_keys=True, separators=(",", ":"))
        pieces = _SENTINEL.split(text)
        fmt = []
        for i, piece in enumerate(pieces):
            fmt.append(
                piece.replace("{", "{{").replace("}", "}}") if i % 2 == 0 else f"{{{piece}}}"
            )
        text = "".join(fmt)
        # Fields before the first lr take few distinct values (batch, horizons): hash that prefix
        # once per distinct value and continue from a copy of the hash state. A branch's fields
        # (its trunk's run dir) sort before them and differ per run, so its prefix ends there.
        cut = text.index("{branch__") if "{branch__" in text else text.index("{optim__")
        self.prefix, self.suffix = text[:cut], text[cut:]
        keys = [f[1] for f in string.Formatter().parse(self.prefix) if f[1]]
        self._prefix_key = operator.itemgetter(*keys) if keys else (lambda _values: ())
        self._states: dict[tuple[str, ...], Any] = {}

    def hash8(self, values: dict[str, str]) -> str:
        """First 8 hex digits of the sha256 of the canonical JSON (``values``: JSON texts)."""
        key = self._prefix_key(values)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = hashlib.sha256(self.prefix.format_map(values).encode())
        h = state.copy()
        h.update(self.suffix.format_map(values).encode())
        return h.hexdigest()[:8]


def _ints(values: list[int]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


class _Planner:
    """Expands points into runs; everything shared by a model or a (model, B) pair is computed once
    so that a run costs a few dict copies and one hash."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.base = {m.name: spec.base_train(m).to_dict() for m in spec.models}
        self.params = {
            m.name: (m.config.n_params(), m.config.n_params_non_embedding()) for m in spec.models
        }
        self.seq = {m.name: m.config.seq_len for m in spec.models}
        self.horizons = list(spec.grid.horizons_tokens)
        self.unshared_flops = 0.0
        self.canon = {name: self._templates(base) for name, base in self.base.items()}
        self._shared: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._slugs: dict[tuple[Any, ...], str] = {}
        self._texts: dict[tuple[Any, ...], dict[str, str]] = {}
        self._horizon_sum = sum(self.horizons)

    @staticmethod
    def _templates(base: dict[str, Any]) -> dict[str, _Canon]:
        sched = base["schedule"]
        trunk = {**base, "schedule": {**sched, "kind": "constant", "total_steps": None}}
        branch = {
            **base,
            "schedule": {**sched, "kind": "wsd", "total_steps": 0},
            "branch": {"run_dir": "", "step": 0},
        }
        return {
            "single": _Canon(base, "single", _POINT_PATHS),
            "trunk": _Canon(trunk, "trunk", (*_POINT_PATHS, "checkpoint_steps")),
            "branch": _Canon(
                branch,
                "branch",
                (*_POINT_PATHS, "schedule.total_steps", "branch.run_dir", "branch.step"),
            ),
        }

    def expand(self, p: GridPoint) -> list[PlannedRun]:
        kind = self.spec.schedule.kind
        if kind == "constant":
            return [self._single(p, self.horizons, suffix="")]
        if kind == "cosine":
            return [self._single(p, [d], suffix=f"_D{tokens_tag(d)}") for d in self.horizons]
        return self._wsd(p)

    def _train(self, p: GridPoint, horizons: list[int]) -> dict[str, Any]:
        base = self.base[p.model]
        t = dict(base)
        optim = dict(base["optim"])
        optim["lr"] = p.lr
        optim["lr_scale_in"], optim["lr_scale_hidden"], optim["lr_scale_out"] = p.lr_scales
        t["optim"] = optim
        t["batch_size"] = p.batch_size
        t["seed"] = p.seed
        t["horizons_tokens"] = horizons
        return t

    def _values(self, p: GridPoint, hashed_horizons: list[int]) -> dict[str, str]:
        """JSON texts of the point's fields, for :meth:`_Canon.hash8`."""
        key = (p.lr, p.lr_scales, p.batch_size, tuple(hashed_horizons))
        common = self._texts.get(key)
        if common is None:
            s_in, s_hidden, s_out = p.lr_scales
            common = self._texts[key] = {
                "optim__lr": repr(p.lr),
                "optim__lr_scale_in": repr(s_in),
                "optim__lr_scale_hidden": repr(s_hidden),
                "optim__lr_scale_out": repr(s_out),
                "batch_size": str(p.batch_size),
                "horizons_tokens": _ints(hashed_horizons),
            }
        return {**common, "seed": str(p.seed)}

    def _shared_derived(self, p: GridPoint, horizons: list[int], start: int) -> dict[str, Any]:
        key = (p.model, p.batch_size, tuple(horizons), start)
        shared = self._shared.get(key)
        if shared is None:
            n, n_ne = self.params[p.model]
            tps = p.batch_size * self.seq[p.model]
            tokens = max(horizons)
            shared = self._shared[key] = {
                "tokens_per_step": tps,
                "steps": tokens // tps,
                "tokens": tokens,
                "trained_tokens": tokens - start,
                "horizons_tokens": list(horizons),
                "horizon_steps": [d // tps for d in horizons],
                "params": n,
                "params_non_embedding": n_ne,
                "flops": 6.0 * n * (tokens - start),
            }
        return shared

    def _derived(self, p: GridPoint, horizons: list[int], start_tokens: int = 0) -> dict[str, Any]:
        return {
            "lr": p.lr,
            "batch_size": p.batch_size,
            "seed": p.seed,
            "lr_scales": list(p.lr_scales),
            **self._shared_derived(p, horizons, start_tokens),
        }

    def _slug(self, p: GridPoint) -> str:
        key = (p.model, p.lr, p.batch_size)
        prefix = self._slugs.get(key)
        if prefix is None:
            prefix = self._slugs[key] = f"{p.model}_lr{log2_tag(p.lr)}_B{p.batch_size}"
        s = f"{prefix}_s{p.seed}"
        if p.lr_scales != DEFAULT_SCALES:
            s += "_ls" + "-".join(f"{v:g}" for v in p.lr_scales)
        return s

    def _single(self, p: GridPoint, horizons: list[int], suffix: str) -> PlannedRun:
        train = self._train(p, horizons)
        slug = self._slug(p) + suffix
        # Only the largest horizon enters the id: adding a smaller horizon keeps a finished run.
        rid = f"{slug}-{self.canon[p.model]['single'].hash8(self._values(p, horizons[-1:]))}"
        derived = self._derived(p, horizons)
        d_sum = self._horizon_sum if horizons is self.horizons else sum(horizons)
        self.unshared_flops += 6.0 * derived["params"] * d_sum
        return PlannedRun(rid, slug, "single", None, p.model, train, derived, p.source)

    def _wsd(self, p: GridPoint) -> list[PlannedRun]:
        sched = self.base[p.model]["schedule"]
        canon = self.canon[p.model]
        tps = p.batch_size * self.seq[p.model]
        points = {d: branch_step(d // tps, sched["decay_fraction"]) for d in self.horizons}
        trunk_steps = sorted(set(points.values()))
        trunk = self._train(p, [s * tps for s in trunk_steps])
        trunk["schedule"] = {**sched, "kind": "constant", "total_steps": None}
        trunk["checkpoint_steps"] = trunk_steps
        slug = self._slug(p)
        values = self._values(p, trunk["horizons_tokens"])
        values["checkpoint_steps"] = _ints(trunk_steps)
        tid = f"{slug}_trunk-{canon['trunk'].hash8(values)}"
        derived = self._derived(p, trunk["horizons_tokens"])
        runs = [PlannedRun(tid, slug + "_trunk", "trunk", None, p.model, trunk, derived, p.source)]
        n = derived["params"]
        for d in self.horizons:
            train = self._train(p, [d])
            train["schedule"] = {**sched, "kind": "wsd", "total_steps": d // tps}
            train["branch"] = {"run_dir": f"runs/{tid}", "step": points[d]}
            bslug = f"{slug}_D{tokens_tag(d)}"
            values = self._values(p, [d])
            values["schedule__total_steps"] = str(d // tps)
            values["branch__run_dir"] = f'"runs/{tid}"'  # ids are [A-Za-z0-9_.^-]: JSON-safe
            values["branch__step"] = str(points[d])
            bid = f"{bslug}-{canon['branch'].hash8(values)}"
            derived = self._derived(p, [d], points[d] * tps)
            runs.append(PlannedRun(bid, bslug, "branch", tid, p.model, train, derived, p.source))
            self.unshared_flops += 6.0 * n * d
        return runs


def plan_sweep(spec: SweepSpec, extra_points: Iterable[GridPoint] = ()) -> Plan:
    """Expand ``spec`` (plus ``extra_points``) into runs, trunks before their branches.

    Duplicate points (an extra point already on the grid) yield one run.
    """
    planner = _Planner(spec)
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for point in _chain(grid_points(spec), extra_points):
        for run in planner.expand(point):
            if run.id not in seen:
                seen.add(run.id)
                runs.append(run)
    return Plan(spec.name, runs, _totals(runs, planner.unshared_flops))


def _chain(*its: Iterable[GridPoint]) -> Iterator[GridPoint]:
    for it in its:
        yield from it


def _totals(runs: list[PlannedRun], unshared: float) -> dict[str, Any]:
    flops = sum(r.derived["flops"] for r in runs)
    kinds: dict[str, int] = {}
    for r in runs:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {
        "runs": len(runs),
        "kinds": kinds,
        "flops": flops,
        "tokens": sum(r.derived["trained_tokens"] for r in runs),
        "flops_without_sharing": unshared,
        "sharing_saved_fraction": (1.0 - flops / unshared) if unshared else 0.0,
    }


def extra_point(raw: Any, spec: SweepSpec, where: str) -> GridPoint:
    """Validate one entry of ``extra_points.json`` into a :class:`GridPoint`."""
    from sweeper.errors import SpecError

    if not isinstance(raw, dict):
        raise SpecError(where, None, raw, "expected an object")
    unknown = set(raw) - {"model", "lr", "batch_size", "seed", "lr_scales", "source"}
    if unknown:
        raise SpecError(where, sorted(unknown)[0], raw[sorted(unknown)[0]], "unknown key")
    model = next((m for m in spec.models if m.name == raw.get("model")), None)
    if model is None:
        known = spec.model_names()
        raise SpecError(where, "model", raw.get("model"), f"unknown model (known: {known})")
    lr = raw.get("lr")
    if (
        isinstance(lr, bool)
        or not isinstance(lr, int | float)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise SpecError(where, "lr", lr, "must be a finite number > 0")
    b = raw.get("batch_size")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise SpecError(where, "batch_size", b, "must be an integer >= 1")
    tps = b * model.config.seq_len
    for d in spec.grid.horizons_tokens:
        if d % tps:
            raise SpecError(
                where, "batch_size", b, f"horizon {d} is not a multiple of B*seq_len = {tps}"
            )
    if b % spec.resources.world_size:
        raise SpecError(
            where, "batch_size", b, f"not divisible by world size {spec.resources.world_size}"
        )
    seed = raw.get("seed", spec.grid.seeds[0])
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError(where, "seed", seed, "must be an integer >= 0")
    scales = raw.get("lr_scales", list(spec.grid.lr_scales[0]))
    if (
        not isinstance(scales, list)
        or len(scales) != 3
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in scales)
    ):
        raise SpecError(where, "lr_scales", scales, "must be [in, hidden, out] numbers > 0")
    source = raw.get("source", "extra")
    return GridPoint(
        model.name,
        float(lr),
        b,
        seed,
        tuple(float(v) for v in scales),  # type: ignore[arg-type]
        str(source),
    )
