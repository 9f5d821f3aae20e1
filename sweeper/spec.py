"""Sweep specs: a TOML file (``sweeps/*.toml``) validated into frozen dataclasses before anything is
written. The format is documented in docs/cli.md; a minimal spec::

    name = "demo"
    [[models]]
    preset = "cpu-tiny"
    [grid]
    lr = {log2_from = -8, log2_to = -4, log2_step = 1}
    batch_size = [8, 16]
    horizons_tokens = [65536, 131072]

Every error is a :class:`~sweeper.errors.SpecError` naming the file, key and value on one line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper.errors import SpecError
from trainer.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    _build,
    model_from_preset,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_GRID_OWNED_OPTIM = ("lr",)
_LR_SCALE_KEYS = ("lr_scale_in", "lr_scale_hidden", "lr_scale_out")
# TrainConfig fields the spec sets elsewhere (grid, models, ...) and [train] may not.
_TRAIN_OWNED = {
    "model",
    "optim",
    "schedule",
    "data",
    "branch",
    "batch_size",
    "seed",
    "horizons_tokens",
    "checkpoint_steps",
}


# ------------------------------------------------------------------------------------ dataclasses


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Compute per run (``[resources]``), read by every backend."""

    nodes: int = 1
    procs_per_node: int = 1  # ranks per node; torchrun when nodes * procs_per_node > 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float = 8.0
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # extra sbatch options
    array_parallelism: int = 64
    runs_per_job: int = 1  # pack this many tiny runs into one job
    ray_num_cpus: float = 1.0
    ray_num_gpus: float = 0.0  # fractional allowed
    max_concurrent: int = 0  # 0 = unlimited
    max_retries: int = 2

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class BackendSettings:
    """``[backend]``: which backend runs the sweep and how."""

    name: str = "local"
    max_parallel: int = 1
    command: tuple[str, ...] | None = None  # trainer command prefix, replaces `python -m trainer`
    ray_address: str | None = None
    stale_after_s: float = 120.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["command"] = list(self.command) if self.command else None
        return d


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One ``[[models]]`` entry: a name and its validated architecture."""

    name: str
    preset: str
    config: ModelConfig


@dataclass(frozen=True, kw_only=True)
class LawWindow:
    """``[window]``: keep lr within +-k grid points of log2 lr* = a*log2 B + b*log2 D + c."""

    a: float
    b: float
    c: float
    k: int = 4

    def center_log2(self, batch_size: int, tokens: int) -> float:
        return self.a * math.log2(batch_size) + self.b * math.log2(tokens) + self.c


@dataclass(frozen=True, kw_only=True)
class Grid:
    """``[grid]``: the axes; every value already validated."""

    lr: tuple[float, ...]
    batch_size: tuple[int, ...]
    horizons_tokens: tuple[int, ...]
    seeds: tuple[int, ...] = (30,)
    lr_scales: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 1.0),)


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A validated sweep spec."""

    name: str
    file: str
    models: tuple[ModelSpec, ...]
    grid: Grid
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    train: dict[str, Any]  # validated extra TrainConfig fields
    window: LawWindow | None
    backend: BackendSettings
    resources: Resources
    description: str = ""

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise SpecError(self.file, "model", name, f"unknown model (known: {self.model_names()})")

    def model_names(self) -> str:
        return ", ".join(m.name for m in self.models)

    def base_train(self, model: ModelSpec) -> TrainConfig:
        """The TrainConfig shared by every run of ``model`` (axes at their first value)."""
        return TrainConfig(
            model=model.config,
            optim=self.optim,
            schedule=self.schedule,
            data=self.data,
            batch_size=self.grid.batch_size[0],
            seed=self.grid.seeds[0],
            horizons_tokens=self.grid.horizons_tokens,
            **self.train,
        )


# ---------------------------------------------------------------------------------------- loading

_TOP_KEYS = {
    "name",
    "description",
    "models",
    "data",
    "optim",
    "schedule",
    "grid",
    "window",
    "train",
    "backend",
    "resources",
}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file.

    Raises:
        SpecError: on a missing file, bad TOML or any bad key/value (one line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), None, message="no such spec file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(str(path), None, message=f"cannot read: {e}") from None
    return parse_spec_text(text, str(path))


def parse_spec_text(text: str, file: str) -> SweepSpec:
    """Validate spec TOML text (``file`` only names it in errors)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(file, None, message=f"bad TOML: {e}") from None
    return parse_spec(raw, file)


def parse_spec(raw: dict[str, Any], file: str) -> SweepSpec:
    """Validate a parsed spec dict into a :class:`SweepSpec`."""
    _no_unknown(raw, _TOP_KEYS, "", file)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(file, "name", name, "required; letters, digits and _.- only (max 64)")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SpecError(file, "description", description, "expected a string")
    data = _section(DataConfig, raw, "data", file)
    optim_raw = _table(raw, "optim", file)
    for k in _GRID_OWNED_OPTIM:
        if k in optim_raw:
            raise SpecError(file, f"optim.{k}", optim_raw[k], "set the learning rate in [grid] lr")
    optim = _section(OptimConfig, raw, "optim", file)
    schedule = _section(ScheduleConfig, raw, "schedule", file)
    if schedule.total_steps is not None:
        raise SpecError(
            file,
            "schedule.total_steps",
            schedule.total_steps,
            "derived from each horizon; leave it out",
        )
    grid = _grid(_table(raw, "grid", file), file, optim)
    if "lr_scales" in _table(raw, "grid", file):
        for k in _LR_SCALE_KEYS:
            if k in optim_raw:
                raise SpecError(file, f"optim.{k}", optim_raw[k], "conflicts with grid.lr_scales")
    else:
        grid = dataclasses.replace(
            grid, lr_scales=((optim.lr_scale_in, optim.lr_scale_hidden, optim.lr_scale_out),)
        )
    spec = SweepSpec(
        name=name,
        file=file,
        description=description,
        models=_models(raw.get("models"), file),
        grid=grid,
        data=data,
        optim=optim,
        schedule=schedule,
        train=_train(_table(raw, "train", file), file),
        window=_window(raw, file),
        backend=_backend(_table(raw, "backend", file), file),
        resources=_resources(_table(raw, "resources", file), file),
    )
    _validate_runs(spec)
    return spec


# ------------------------------------------------------------------------------------- sections


def _table(raw: dict[str, Any], key: str, file: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(file, key, value, "expected a table")
    return value


def _no_unknown(raw: dict[str, Any], known: set[str], where: str, file: str) -> None:
    for k in sorted(set(raw) - known):
        raise SpecError(
            file, f"{where}{k}", raw[k], f"unknown key (known: {', '.join(sorted(known))})"
        )


def _section(cls: type, raw: dict[str, Any], key: str, file: str) -> Any:
    table = _table(raw, key, file)
    try:
        obj = _build(cls, table, key)
        obj.validate()
    except ConfigError as e:
        raise _config_error(file, e) from None
    return obj


def _config_error(file: str, e: ConfigError) -> SpecError:
    return SpecError(file, None, message=str(e))


def _models(raw: Any, file: str) -> tuple[ModelSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, "models", raw, "need at least one [[models]] table")
    models, seen = [], set()
    for i, entry in enumerate(raw):
        key = f"models[{i}]"
        if not isinstance(entry, dict):
            raise SpecError(file, key, entry, "expected a table")
        entry = dict(entry)
        preset = entry.pop("preset", None)
        if not isinstance(preset, str) or preset not in PRESETS:
            raise SpecError(
                file, f"{key}.preset", preset, f"unknown preset (known: {', '.join(PRESETS)})"
            )
        name = entry.pop("name", preset)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SpecError(file, f"{key}.name", name, "letters, digits and _.- only (max 64)")
        if name in seen:
            raise SpecError(file, f"{key}.name", name, "duplicate model name")
        seen.add(name)
        try:
            cfg = model_from_preset(preset, **entry)
            cfg.validate()
        except ConfigError as e:
            raise SpecError(file, key, message=str(e).replace("model.", f"{key}.", 1)) from None
        models.append(ModelSpec(name=name, preset=preset, config=cfg))
    return tuple(models)


_GRID_KEYS = {"lr", "batch_size", "horizons_tokens", "log2_horizons", "seeds", "lr_scales"}


def _grid(raw: dict[str, Any], file: str, optim: OptimConfig) -> Grid:
    _no_unknown(raw, _GRID_KEYS, "grid.", file)
    lr = _lr_axis(raw.get("lr"), file)
    batch = _int_list(raw.get("batch_size"), "grid.batch_size", file, minimum=1)
    if "horizons_tokens" in raw and "log2_horizons" in raw:
        raise SpecError(
            file,
            "grid.log2_horizons",
            raw["log2_horizons"],
            "give horizons_tokens or log2_horizons, not both",
        )
    if "log2_horizons" in raw:
        exps = _int_list(raw["log2_horizons"], "grid.log2_horizons", file, minimum=1)
        if max(exps) > 62:
            raise SpecError(file, "grid.log2_horizons", max(exps), "must be <= 62")
        horizons = tuple(2**e for e in exps)
    else:
        horizons = _int_list(raw.get("horizons_tokens"), "grid.horizons_tokens", file, minimum=1)
    seeds = _int_list(raw.get("seeds", [30]), "grid.seeds", file, minimum=0)
    scales = ((optim.lr_scale_in, optim.lr_scale_hidden, optim.lr_scale_out),)
    if "lr_scales" in raw:
        scales = _lr_scales(raw["lr_scales"], file)
    return Grid(
        lr=lr,
        batch_size=batch,
        horizons_tokens=tuple(sorted(horizons)),
        seeds=seeds,
        lr_scales=scales,
    )


def _lr_axis(raw: Any, file: str) -> tuple[float, ...]:
    key = "grid.lr"
    if raw is None:
        raise SpecError(file, key, None, "required: a list or {log2_from, log2_to, log2_step}")
    if isinstance(raw, dict):
        _no_unknown(raw, {"log2_from", "log2_to", "log2_step"}, "grid.lr.", file)
        lo, hi, step = (
            _number(raw.get(k), f"{key}.{k}", file) for k in ("log2_from", "log2_to", "log2_step")
        )
        if not step > 0:
            raise SpecError(file, f"{key}.log2_step", step, "must be > 0")
        if hi < lo:
            raise SpecError(file, f"{key}.log2_to", hi, f"must be >= log2_from = {lo}")
        n = int(math.floor((hi - lo) / step + 1e-9)) + 1
        if n > 10_000:
            raise SpecError(file, key, raw, f"{n} grid points; at most 10000")
        return tuple(2.0 ** (lo + i * step) for i in range(n))
    if not isinstance(raw, list) or not raw:
        raise SpecError(
            file, key, raw, "expected a non-empty list or {log2_from, log2_to, log2_step}"
        )
    values = [_number(v, key, file) for v in raw]
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise SpecError(file, key, v, "every learning rate must be a finite number > 0")
    if len(set(values)) != len(values):
        raise SpecError(file, key, raw, "duplicate learning rates")
    return tuple(sorted(values))


def _lr_scales(raw: Any, file: str) -> tuple[tuple[float, float, float], ...]:
    key = "grid.lr_scales"
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, key, raw, "expected a non-empty list of [in, hidden, out] ratios")
    out = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3:
            raise SpecError(file, key, item, "each entry must be [in, hidden, out]")
        triple = tuple(_number(v, key, file) for v in item)
        if not all(math.isfinite(v) and v > 0 for v in triple):
            raise SpecError(file, key, item, "ratios must be finite numbers > 0")
        out.append(triple)
    if len(set(out)) != len(out):
        raise SpecError(file, key, raw, "duplicate entries")
    return tuple(out)  # type: ignore[return-value]


def _number(v: Any, key: str, file: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(file, key, v, "expected a number")
    return float(v)


def _int_list(raw: Any, key: str, file: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, key, raw, "expected a non-empty list of integers")
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(file, key, v, "expected an integer")
        if v < minimum:
            raise SpecError(file, key, v, f"must be >= {minimum}")
    if len(set(raw)) != len(raw):
        raise SpecError(file, key, raw, "duplicate values")
    return tuple(sorted(raw))


def _train(raw: dict[str, Any], file: str) -> dict[str, Any]:
    for k in sorted(set(raw) & _TRAIN_OWNED):
        raise SpecError(file, f"train.{k}", raw[k], "set by the spec's other tables, not [train]")
    try:
        cfg = _build(TrainConfig, raw, "train")
    except ConfigError as e:
        raise _config_error(file, e) from None
    return {k: getattr(cfg, k) for k in raw}


def _window(raw: dict[str, Any], file: str) -> LawWindow | None:
    if "window" not in raw:
        return None
    table = _table(raw, "window", file)
    _no_unknown(table, {"a", "b", "c", "k"}, "window.", file)
    for k in ("a", "b", "c"):
        if k not in table:
            raise SpecError(
                file, f"window.{k}", None, "required (log2 lr* = a*log2 B + b*log2 D + c)"
            )
    a, b, c = (_number(table[k], f"window.{k}", file) for k in ("a", "b", "c"))
    k = table.get("k", 4)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise SpecError(file, "window.k", k, "expected an integer >= 0")
    return LawWindow(a=a, b=b, c=c, k=k)


def _backend(raw: dict[str, Any], file: str) -> BackendSettings:
    known = {f.name for f in dataclasses.fields(BackendSettings)}
    _no_unknown(raw, known, "backend.", file)
    raw = dict(raw)
    name = raw.get("name", "local")
    from sweeper.backends import BACKENDS

    if name not in BACKENDS:
        raise SpecError(
            file, "backend.name", name, f"unknown backend (known: {', '.join(BACKENDS)})"
        )
    cmd = raw.get("command")
    if cmd is not None:
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) and c for c in cmd):
            raise SpecError(file, "backend.command", cmd, "expected a non-empty list of strings")
        raw["command"] = tuple(cmd)
    _check_types(BackendSettings, raw, "backend", file)
    settings = BackendSettings(**raw)
    if settings.max_parallel < 1:
        raise SpecError(file, "backend.max_parallel", settings.max_parallel, "must be >= 1")
    if not settings.stale_after_s > 0:
        raise SpecError(file, "backend.stale_after_s", settings.stale_after_s, "must be > 0")
    return settings


def _resources(raw: dict[str, Any], file: str) -> Resources:
    known = {f.name for f in dataclasses.fields(Resources)}
    _no_unknown(raw, known, "resources.", file)
    raw = dict(raw)
    _check_types(Resources, raw, "resources", file)
    res = Resources(**raw)
    for k in (
        "nodes",
        "procs_per_node",
        "cpus_per_task",
        "time_min",
        "array_parallelism",
        "runs_per_job",
    ):
        if getattr(res, k) < 1:
            raise SpecError(file, f"resources.{k}", getattr(res, k), "must be >= 1")
    for k in ("gpus_per_node", "max_concurrent", "max_retries"):
        if getattr(res, k) < 0:
            raise SpecError(file, f"resources.{k}", getattr(res, k), "must be >= 0")
    for k in ("mem_gb", "ray_num_cpus", "ray_num_gpus"):
        v = getattr(res, k)
        if not (math.isfinite(v) and v >= 0) or (k == "mem_gb" and v == 0):
            raise SpecError(file, f"resources.{k}", v, "must be a finite number > 0")
    return res


_SCALAR_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _check_types(cls: type, raw: dict[str, Any], where: str, file: str) -> None:
    """Type-check (and coerce ints to floats) the scalar fields of a flat settings dataclass."""
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        v, key = raw[f.name], f"{where}.{f.name}"
        ann = str(f.type)
        if v is None and "None" in ann:
            continue
        if ann.startswith("dict"):
            if not isinstance(v, dict):
                raise SpecError(file, key, v, "expected a table")
            continue
        if ann.startswith("tuple"):
            continue
        base = ann.split("|")[0].strip()
        want = _SCALAR_TYPES.get(base)
        if want is None:
            continue
        if (isinstance(v, bool) and base != "bool") or not isinstance(v, want):
            raise SpecError(file, key, v, f"expected {_TYPE_WORDS[base]}")
        if base == "float":
            raw[f.name] = float(v)


# ------------------------------------------------------------------------------- run validation


def _validate_runs(spec: SweepSpec) -> None:
    """Validate one full TrainConfig per (model, batch size) and each lr once: together that covers
    every run the planner makes, without paying full validation per run."""
    world = spec.resources.world_size
    for model in spec.models:
        for batch in spec.grid.batch_size:
            tps = batch * model.config.seq_len
            for d in spec.grid.horizons_tokens:
                if d % tps:
                    raise SpecError(
                        spec.file,
                        "grid.horizons_tokens",
                        d,
                        f"not a multiple of batch_size*seq_len = {batch}*{model.config.seq_len} "
                        f"= {tps} (model {model.name})",
                    )
            cfg = dataclasses.replace(spec.base_train(model), batch_size=batch)
            try:
                cfg.validate(world_size=world)
            except ConfigError as e:
                raise SpecError(spec.file, f"models.{model.name}", message=str(e)) from None
            if spec.schedule.kind == "wsd":
                _check_branch_points(spec, model, batch)


def _check_branch_points(spec: SweepSpec, model: ModelSpec, batch: int) -> None:
    tps = batch * model.config.seq_len
    for d in spec.grid.horizons_tokens:
        steps = d // tps
        if branch_step(steps, spec.schedule.decay_fraction) < 1:
            raise SpecError(
                spec.file,
                "schedule.decay_fraction",
                spec.schedule.decay_fraction,
                f"horizon {d} at batch {batch} has {steps} steps: no constant phase to branch from",
            )


def branch_step(steps: int, decay_fraction: float) -> int:
    """Step at which a WSD decay branch of ``steps`` total steps leaves the constant trunk.

    ``floor((1 - f) * steps)`` is at or before the trainer's first decaying step for any rounding of
    ``f * steps``, so trunk and branch agree on the LR up to the fork.
    """
    return int(math.floor((1.0 - decay_fraction) * steps + 1e-9))
