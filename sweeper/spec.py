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
import importlib
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.errors import SpecError
from sweeper.records import Resources
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

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # becomes a directory name
DEFAULT_MAX_RUNS = 100_000
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
class BackendSettings:
    """``[backend]``: which backend runs the sweep, plus every ``[backend.<name>]`` config given.

    ``configs`` maps a backend name to its frozen config (see ``sweeper.backends``); a backend
    without a table gets its defaults from :meth:`config`.
    """

    name: str = "local"
    command: tuple[str, ...] | None = None  # trainer command prefix, replaces `python -m trainer`
    stale_after_s: float = 120.0
    configs: tuple[tuple[str, Any], ...] = ()

    def config(self, name: str | None = None) -> Any:
        """The config of backend ``name`` (default: the sweep's)."""
        from sweeper.backends import default_config

        name = name or self.name
        return dict(self.configs).get(name) or default_config(name)


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
    max_runs: int = DEFAULT_MAX_RUNS
    text: str = ""  # the TOML it was read from (stored as the sweep's spec.toml)
    sections: tuple[tuple[str, Any], ...] = ()  # parsed optional sections (see SECTIONS)

    def section(self, name: str) -> Any:
        """The parsed optional section ``name`` (``tracking``, ``simulator``, ...), or None."""
        return dict(self.sections).get(name)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise SpecError(self.file, "model", name, f"unknown model (known: {self.model_names()})")

    def model_names(self) -> str:
        return ", ".join(m.name for m in self.models)

    def check_batch(self, model: ModelSpec, batch: int, file: str, key: str) -> None:
        """SpecError unless every horizon is whole steps at ``batch`` and a run of ``model`` at
        this batch size is a valid TrainConfig for the world size."""
        tps = batch * model.config.seq_len
        for d in self.grid.horizons_tokens:
            if d % tps:
                raise SpecError(
                    file,
                    key,
                    batch,
                    f"horizon {d} is not a multiple of batch_size*seq_len = "
                    f"{batch}*{model.config.seq_len} = {tps} (model {model.name})",
                )
        cfg = dataclasses.replace(self.base_train(model), batch_size=batch)
        try:
            cfg.validate(world_size=self.resources.world_size)
        except ConfigError as e:
            raise SpecError(file, f"models.{model.name}", message=str(e)) from None

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
    "max_runs",
}
# Optional sections owned by other modules: each parser takes (table, file) and returns a frozen
# config or raises SpecError naming the key. Imported only when the section is present.
SECTIONS: dict[str, str] = {
    "tracking": "sweeper.tracking:parse_section",
    "simulator": "sweeper.simulator:parse_section",
    "autopilot": "sweeper.autopilot:parse_section",
    "trainer": "sweeper.external:parse_section",
}


MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 8  # tables within tables; a real spec uses 3


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file.

    The file must be a regular file of at most 1 MiB (a FIFO or a device is refused before it is
    opened, so nothing blocks or fills memory).

    Raises:
        SpecError: on a missing file, bad TOML or any bad key/value (one line).
    """
    path = Path(path)
    return parse_spec_text(read_spec_file(path), str(path))


def read_spec_file(path: Path) -> str:
    """The text of a spec file, checked to be a small regular UTF-8 file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpecError(str(path), None, message="no such spec file") from None
    except OSError as e:
        raise SpecError(str(path), None, message=f"cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(str(path), None, message="not a regular file")
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(str(path), None, message=f"larger than {MAX_SPEC_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(str(path), None, message=f"larger than {MAX_SPEC_BYTES} bytes")
        return data.decode("utf-8")
    except OSError as e:
        raise SpecError(str(path), None, message=f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(str(path), None, message="not UTF-8 text") from None


def parse_spec_text(text: str, file: str) -> SweepSpec:
    """Validate spec TOML text (``file`` only names it in errors)."""
    if "\0" in text:
        raise SpecError(file, None, message="bad TOML: contains a NUL character")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(file, None, message=f"bad TOML: {e}") from None
    except RecursionError:
        raise SpecError(file, None, message=f"nested deeper than {MAX_DEPTH} levels") from None
    _check_depth(raw, file, "", 0)
    return dataclasses.replace(parse_spec(raw, file), text=text)


def _check_depth(node: Any, file: str, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise SpecError(file, where, message=f"nested deeper than {MAX_DEPTH} levels")
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        if isinstance(v, dict | list):
            _check_depth(v, file, f"{where}.{k}" if where else str(k), depth + 1)


def parse_spec(raw: dict[str, Any], file: str) -> SweepSpec:
    """Validate a parsed spec dict into a :class:`SweepSpec`."""
    _no_unknown(raw, _TOP_KEYS | set(SECTIONS), "", file)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(file, "name", name, "required; letters, digits, _ and - only (max 64)")
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
        max_runs=_int_in(raw.get("max_runs", DEFAULT_MAX_RUNS), "max_runs", file, 1, 10_000_000),
        sections=_sections(raw, file),
    )
    _check_run_count(spec)
    _validate_runs(spec)
    return spec


def _sections(raw: dict[str, Any], file: str) -> tuple[tuple[str, Any], ...]:
    """Parse the optional sections present, each by its own module."""
    out = []
    for name, target in SECTIONS.items():
        if name not in raw:
            continue
        module, attr = target.split(":")
        parse = getattr(importlib.import_module(module), attr)
        out.append((name, parse(_table(raw, name, file), file)))
    return tuple(out)


def _check_run_count(spec: SweepSpec) -> None:
    """Refuse a grid past ``max_runs`` before anything is expanded (a typo in an axis would
    otherwise plan for minutes and submit millions of jobs)."""
    g = spec.grid
    lrs = len(g.lr) if spec.window is None else min(len(g.lr), 2 * spec.window.k + 1)
    per_point = {"constant": 1, "cosine": len(g.horizons_tokens)}.get(
        spec.schedule.kind, 1 + len(g.horizons_tokens)
    )
    axes = {
        "models": len(spec.models),
        "lr": lrs,
        "batch_size": len(g.batch_size),
        "seeds": len(g.seeds),
        "lr_scales": len(g.lr_scales),
        f"runs per point ({spec.schedule.kind})": per_point,
    }
    total = math.prod(axes.values())
    if total > spec.max_runs:
        sizes = " x ".join(f"{n} {k}" for k, n in axes.items())
        raise SpecError(
            spec.file, "grid", f"{total} runs", f"{sizes}; more than max_runs = {spec.max_runs}"
        )


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
            raise SpecError(file, f"{key}.name", name, "letters, digits, _ and - only (max 64)")
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
    batch = _list(raw.get("batch_size"), "grid.batch_size", file, batch_value)
    if "horizons_tokens" in raw and "log2_horizons" in raw:
        raise SpecError(
            file,
            "grid.log2_horizons",
            raw["log2_horizons"],
            "give horizons_tokens or log2_horizons, not both",
        )
    if "log2_horizons" in raw:
        exps = _list(raw["log2_horizons"], "grid.log2_horizons", file, _log2_horizon)
        horizons = tuple(2**e for e in exps)
    else:
        horizons = _list(raw.get("horizons_tokens"), "grid.horizons_tokens", file, _horizon)
    seeds = _list(raw.get("seeds", [30]), "grid.seeds", file, seed_value)
    scales: tuple[tuple[float, float, float], ...] = (
        (optim.lr_scale_in, optim.lr_scale_hidden, optim.lr_scale_out),
    )
    if "lr_scales" in raw:
        scales = _lr_scales(raw["lr_scales"], file)
    return Grid(
        lr=lr,
        batch_size=batch,
        horizons_tokens=tuple(sorted(horizons)),
        seeds=seeds,
        lr_scales=scales,
    )


# ---- axis values: the spec's grid and extra_points.json share these validators

LOG2_LR_RANGE = (-40.0, 10.0)  # 2^-40 .. 2^10: beyond it a rate is a typo (or underflows)
MAX_BATCH = 1 << 24
MAX_HORIZON_LOG2 = 62


def number(v: Any, key: str, file: str) -> float:
    """A finite number (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(file, key, v, "expected a number")
    if not math.isfinite(v) or abs(v) > 1e300:
        raise SpecError(file, key, v, "must be a finite number")
    return float(v)


def lr_value(v: Any, key: str, file: str) -> float:
    """A learning rate: finite, > 0, within 2^-40..2^10."""
    lr = number(v, key, file)
    lo, hi = LOG2_LR_RANGE
    if not (lr > 0 and lo <= math.log2(lr) <= hi):
        raise SpecError(file, key, v, f"must be a learning rate in 2^{lo:g}..2^{hi:g}")
    return lr


def batch_value(v: Any, key: str, file: str) -> int:
    """A global batch size in sequences: an integer in 1..2^24."""
    return _int_in(v, key, file, 1, MAX_BATCH)


def seed_value(v: Any, key: str, file: str) -> int:
    """A seed: an integer in 0..2^31-1."""
    return _int_in(v, key, file, 0, 2**31 - 1)


def lr_scales_value(v: Any, key: str, file: str) -> tuple[float, float, float]:
    """Per-group rate ratios ``[in, hidden, out]``: finite numbers in (0, 2^20]."""
    if not isinstance(v, list) or len(v) != 3:
        raise SpecError(file, key, v, "must be [in, hidden, out]")
    triple = tuple(number(x, key, file) for x in v)
    if not all(0 < x <= 2**20 for x in triple):
        raise SpecError(file, key, v, "ratios must be numbers in (0, 2^20]")
    return triple  # type: ignore[return-value]


def _horizon(v: Any, key: str, file: str) -> int:
    return _int_in(v, key, file, 1, 2**MAX_HORIZON_LOG2)


def _log2_horizon(v: Any, key: str, file: str) -> int:
    return _int_in(v, key, file, 1, MAX_HORIZON_LOG2)


def _int_in(v: Any, key: str, file: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(file, key, v, "expected an integer")
    if not lo <= v <= hi:
        raise SpecError(file, key, v, f"must be in {lo}..{hi}")
    return v


def _list(raw: Any, key: str, file: str, value: Any) -> tuple[Any, ...]:
    """A non-empty list of unique values, each checked by ``value(v, key, file)``, sorted."""
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, key, raw, "expected a non-empty list")
    if len(raw) > MAX_AXIS:
        raise SpecError(file, key, f"{len(raw)} values", f"at most {MAX_AXIS} values per axis")
    values = [value(v, key, file) for v in raw]
    if len(set(values)) != len(values):
        raise SpecError(file, key, raw, "duplicate values")
    return tuple(sorted(values))


MAX_AXIS = 10_000


def _lr_axis(raw: Any, file: str) -> tuple[float, ...]:
    key = "grid.lr"
    if raw is None:
        raise SpecError(file, key, None, "required: a list or {log2_from, log2_to, log2_step}")
    if not isinstance(raw, dict):
        return _list(raw, key, file, lr_value)
    _no_unknown(raw, {"log2_from", "log2_to", "log2_step"}, "grid.lr.", file)
    lo_, hi_ = LOG2_LR_RANGE
    lo, hi, step = (
        number(raw.get(k), f"{key}.{k}", file) for k in ("log2_from", "log2_to", "log2_step")
    )
    for k, v in (("log2_from", lo), ("log2_to", hi)):
        if not lo_ <= v <= hi_:
            raise SpecError(file, f"{key}.{k}", v, f"must be in {lo_:g}..{hi_:g}")
    if not step > 0:
        raise SpecError(file, f"{key}.log2_step", step, "must be > 0")
    if hi < lo:
        raise SpecError(file, f"{key}.log2_to", hi, f"must be >= log2_from = {lo}")
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if n > MAX_AXIS:
        raise SpecError(file, key, raw, f"{n} grid points; at most {MAX_AXIS}")
    return tuple(2.0 ** (lo + i * step) for i in range(n))


def _lr_scales(raw: Any, file: str) -> tuple[tuple[float, float, float], ...]:
    key = "grid.lr_scales"
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, key, raw, "expected a non-empty list of [in, hidden, out] ratios")
    out = [lr_scales_value(item, key, file) for item in raw]
    if len(set(out)) != len(out):
        raise SpecError(file, key, raw, "duplicate entries")
    return tuple(out)


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
    a, b, c = (number(table[k], f"window.{k}", file) for k in ("a", "b", "c"))
    k = _int_in(table.get("k", 4), "window.k", file, 0, 1000)
    return LawWindow(a=a, b=b, c=c, k=k)


def _backend(raw: dict[str, Any], file: str) -> BackendSettings:
    from sweeper.backends import BACKENDS, parse_config

    known = {"name", "command", "stale_after_s", *BACKENDS}
    _no_unknown(raw, known, "backend.", file)
    name = raw.get("name", "local")
    if name not in BACKENDS:
        raise SpecError(
            file, "backend.name", name, f"unknown backend (known: {', '.join(BACKENDS)})"
        )
    cmd = raw.get("command")
    if cmd is not None and (
        not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) and c for c in cmd)
    ):
        raise SpecError(file, "backend.command", cmd, "expected a non-empty list of strings")
    stale = raw.get("stale_after_s", 120.0)
    if isinstance(stale, bool) or not isinstance(stale, int | float) or not 0 < stale < 1e9:
        raise SpecError(file, "backend.stale_after_s", stale, "must be a number of seconds > 0")
    for b in BACKENDS:
        if b in raw and not isinstance(raw[b], dict):
            raise SpecError(file, f"backend.{b}", raw[b], "expected a table")
    configs = tuple((b, parse_config(b, raw[b], file)) for b in BACKENDS if b in raw)
    return BackendSettings(
        name=name,
        command=tuple(cmd) if cmd else None,
        stale_after_s=float(stale),
        configs=configs,
    )


def _resources(raw: dict[str, Any], file: str) -> Resources:
    known = {f.name for f in dataclasses.fields(Resources)}
    _no_unknown(raw, known, "resources.", file)
    raw = dict(raw)
    _check_types(Resources, raw, "resources", file)
    res = Resources(**raw)
    for k in ("nodes", "procs_per_node", "cpus_per_task", "time_min"):
        v = getattr(res, k)
        if not 1 <= v <= _RESOURCE_MAX[k]:
            raise SpecError(file, f"resources.{k}", v, f"must be in 1..{_RESOURCE_MAX[k]}")
    if not 0 <= res.gpus_per_node <= 64:
        raise SpecError(file, "resources.gpus_per_node", res.gpus_per_node, "must be in 0..64")
    if not (math.isfinite(res.mem_gb) and 0.25 <= res.mem_gb <= 1 << 20):
        raise SpecError(file, "resources.mem_gb", res.mem_gb, "must be a number of GB >= 0.25")
    return res


_RESOURCE_MAX = {"nodes": 4096, "procs_per_node": 64, "cpus_per_task": 1024, "time_min": 525_600}


_SCALAR_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bool": bool,
}
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
    for model in spec.models:
        for batch in spec.grid.batch_size:
            spec.check_batch(model, batch, spec.file, "grid.batch_size")
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
