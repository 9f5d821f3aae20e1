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
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.errors import SpecError
from sweeper.records import Resources
from sweeper.spec_checks import (
    branch_step,
    check_consequences,
    check_host,
    check_launch,
)
from sweeper.spec_protocol import (
    ModelAxes,
    ResourceRule,
    WidthFamily,
    group_scan_axis,
    micro_batch,
    parse_rules,
    parse_schedules,
    pop_model_axes,
    pop_width_family,
    resources_for,
)
from sweeper.spec_settings import BackendSettings, parse_backend, parse_resources
from sweeper.spec_values import (
    MAX_AXIS,
    MAX_DEPTH,
    batch_value,
    check_dotted_keys,
    check_tree,
    deep_key,
    horizon_value,
    int_in,
    log2_horizon_value,
    lr_axis,
    lr_scales_axis,
    lr_scales_value,
    lr_value,
    name_value,
    number_in,
    read_spec_file,
    seed_value,
    value_list,
)
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

__all__ = [
    "BackendSettings",
    "Grid",
    "LawWindow",
    "ModelSpec",
    "Resources",
    "SweepSpec",
    "batch_value",
    "branch_step",
    "check_launch",
    "host_warning",
    "load_spec",
    "lr_scales_value",
    "lr_value",
    "parse_spec",
    "parse_spec_text",
    "read_spec_file",
    "seed_value",
]

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
    "micro_batch_size",
}
_TRAIN_HINTS = {"micro_batch_size": "derived per (model, B) from [[models]] max_micro_batch"}


# ------------------------------------------------------------------------------------ dataclasses


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One ``[[models]]`` entry: a name and its validated architecture."""

    name: str
    preset: str
    config: ModelConfig
    axes: ModelAxes = ModelAxes()  # its own lr / batch axes and micro-batch limit


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
    schedules: tuple[ScheduleConfig, ...] = ()  # [[schedules]]: an axis (empty: [schedule])
    resource_rules: tuple[ResourceRule, ...] = ()  # [[resources.rules]]

    def all_schedules(self) -> tuple[ScheduleConfig, ...]:
        """The schedules every point is run with (``[[schedules]]``, else ``[schedule]``)."""
        return self.schedules or (self.schedule,)

    def lrs(self, model: ModelSpec) -> tuple[float, ...]:
        """The rate axis of ``model`` (its own, else ``[grid] lr``)."""
        return model.axes.lr or self.grid.lr

    def batches(self, model: ModelSpec) -> tuple[int, ...]:
        """The batch axis of ``model`` (its own, else ``[grid] batch_size``)."""
        return model.axes.batch_size or self.grid.batch_size

    def resources_for(self, model: ModelSpec, batch: int) -> tuple[Resources, bool]:
        """A (model, B) run's resources after ``[[resources.rules]]``, and whether its time
        limit comes from the ``[cost]`` estimate."""
        return resources_for(self.resources, self.resource_rules, model.name, batch)

    def micro_batch(self, model: ModelSpec, batch: int) -> int | None:
        """Per-rank micro-batch of a (model, B) run: the largest divisor of the per-rank batch
        within ``max_micro_batch`` (None: the whole per-rank batch in one pass)."""
        world = self.resources_for(model, batch)[0].world_size
        return micro_batch(batch // world, model.axes.max_micro_batch)

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
        res = self.resources_for(model, batch)[0]
        if batch % res.world_size:
            raise SpecError(file, key, batch, f"not divisible by world size {res.world_size} "
                            f"(model {model.name})")  # fmt: skip
        cfg = dataclasses.replace(
            self.base_train(model),
            batch_size=batch,
            micro_batch_size=self.micro_batch(model, batch),
        )
        try:
            cfg.validate(world_size=res.world_size)
        except ConfigError as e:
            raise SpecError(file, f"models.{model.name}", message=str(e)) from None

    def base_train(self, model: ModelSpec, schedule: ScheduleConfig | None = None) -> TrainConfig:
        """The TrainConfig shared by every run of ``model`` (axes at their first value)."""
        return TrainConfig(
            model=model.config,
            optim=self.optim,
            schedule=schedule or self.all_schedules()[0],
            data=self.data,
            batch_size=self.batches(model)[0],
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
    "schedules",
}
# Optional sections owned by other modules: each parser takes (table, file) and returns a frozen
# config or raises SpecError naming the key. Imported only when the section is present.
SECTIONS: dict[str, str] = {
    "tracking": "sweeper.tracking:parse_section",
    "simulator": "sweeper.simulator:parse_section",
    "autopilot": "sweeper.autopilot:parse_section",
    "trainer": "sweeper.external:parse_section",
    "cost": "sweeper.cost:parse_section",
}


MAX_RUNS_CAP = 10_000_000


def load_spec(path: str | Path, *, host_checks: bool = True) -> SweepSpec:
    """Read and validate a spec file to plan or launch it.

    The file must be a regular file of at most 256 KiB (a FIFO or a device is refused before it is
    opened, so nothing blocks or fills memory). Besides everything :func:`parse_spec_text` checks,
    the checks that depend on this machine run here (:func:`sweeper.spec_checks.check_host`: the
    data, and for the local backend CUDA, the node count and the trainer command).

    With ``host_checks=False`` the machine checks are left to the caller (:func:`host_warning`):
    a cluster sweep is planned on a login node that may have neither its GPUs nor its data.

    Raises:
        SpecError: on a missing file, bad TOML or any bad key/value (one line).
    """
    path = Path(path)
    spec = parse_spec_text(read_spec_file(path), str(path))
    if host_checks:
        check_host(spec)
    return spec


def host_warning(spec: SweepSpec) -> str | None:
    """What this machine lacks to run ``spec`` (the message :func:`load_spec` would raise), or
    None. For a local sweep this machine is the one that runs it: the problem is an error."""
    try:
        check_host(spec)
    except SpecError as e:
        if spec.backend.name == "local":
            raise
        return str(e)
    return None


def parse_spec_text(text: str, file: str) -> SweepSpec:
    """Validate spec TOML text (``file`` only names it in errors)."""
    if "\0" in text:
        raise SpecError(file, None, message="bad TOML: contains a NUL character")
    check_dotted_keys(text, file)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(file, None, message=f"bad TOML: {e}") from None
    except RecursionError:
        why = f"nested deeper than {MAX_DEPTH} levels"
        raise SpecError(file, deep_key(text), message=why) from None
    check_tree(raw, file)
    return dataclasses.replace(parse_spec(raw, file), text=text)


def parse_spec(raw: dict[str, Any], file: str) -> SweepSpec:
    """Validate a parsed spec dict into a :class:`SweepSpec`."""
    _no_unknown(raw, _TOP_KEYS | set(SECTIONS), "", file)
    name = name_value(raw.get("name"), "name", file)
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
    schedules: tuple[ScheduleConfig, ...] = ()
    if "schedules" in raw:
        if "schedule" in raw:
            raise SpecError(file, "schedules", message="give [schedule] or [[schedules]], not both")
        schedules = parse_schedules(raw["schedules"], file)
    if schedule.total_steps is not None:
        raise SpecError(
            file,
            "schedule.total_steps",
            schedule.total_steps,
            "derived from each horizon; leave it out",
        )
    models = _models(raw.get("models"), file)
    grid = _grid(_table(raw, "grid", file), file, optim, models)
    if "lr_scales" in _table(raw, "grid", file):
        for k in _LR_SCALE_KEYS:
            if k in optim_raw:
                raise SpecError(file, f"optim.{k}", optim_raw[k], "conflicts with grid.lr_scales")
    elif "group_scan" not in _table(raw, "grid", file):
        grid = dataclasses.replace(
            grid, lr_scales=((optim.lr_scale_in, optim.lr_scale_hidden, optim.lr_scale_out),)
        )
    res_raw = dict(_table(raw, "resources", file))
    rules = res_raw.pop("rules", [])
    spec = SweepSpec(
        name=name,
        file=file,
        description=description,
        models=models,
        grid=grid,
        data=data,
        optim=optim,
        schedule=schedule,
        train=_train(_table(raw, "train", file), file),
        window=_window(raw, file),
        backend=parse_backend(_table(raw, "backend", file), file),
        resources=parse_resources(res_raw, file),
        resource_rules=parse_rules(rules, file, lambda t, k: parse_resources(t, file, k)),
        schedules=schedules,
        max_runs=int_in(raw.get("max_runs", DEFAULT_MAX_RUNS), "max_runs", file, 1, MAX_RUNS_CAP),
        sections=_sections(raw, file),
    )
    check_consequences(spec)
    return spec


def _sections(raw: dict[str, Any], file: str) -> tuple[tuple[str, Any], ...]:
    """Parse the optional sections present, each by its own module."""
    out = []
    for name, target in SECTIONS.items():
        if name not in raw:
            continue
        module, attr = target.split(":")
        try:
            parse = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            raise SpecError(
                file, name, message="section not supported by this installation"
            ) from None
        out.append((name, parse(_table(raw, name, file), file)))
    return tuple(out)


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
    if len(raw) > MAX_AXIS["models"]:
        raise SpecError(file, "models", f"{len(raw)} tables", f"at most {MAX_AXIS['models']}")
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
        name = name_value(entry.pop("name", preset), f"{key}.name", file)
        axes = pop_model_axes(entry, key, file)
        family = pop_width_family(entry, key, file)
        for suffix, overrides, member_axes in _members(preset, entry, axes, family):
            member = name + suffix
            if member in seen:
                raise SpecError(file, f"{key}.name", member, "duplicate model name")
            seen.add(member)
            try:
                cfg = model_from_preset(preset, **overrides)
                cfg.validate()
            except ConfigError as e:
                raise SpecError(file, key, message=str(e).replace("model.", f"{key}.", 1)) from None
            models.append(ModelSpec(name=member, preset=preset, config=cfg, axes=member_axes))
    return tuple(models)


def _members(
    preset: str, entry: dict[str, Any], axes: ModelAxes, family: WidthFamily | None
) -> list[tuple[str, dict[str, Any], ModelAxes]]:
    """One model, or one per width of a family (``-w<width>``; head dim fixed, heads scaled)."""
    if family is None:
        return [("", entry, axes)]
    head_dim = entry.get("head_dim") or model_from_preset(preset, **entry).hdim
    out = []
    for w in family.widths:
        over = {**entry, "d_model": w, "n_heads": max(1, w // head_dim), "head_dim": head_dim}
        member = dataclasses.replace(
            axes,
            width=w,
            base_width=family.base_width,
            width_exponents=family.exponents,
            eps_exponent=family.eps_exponent,
        )
        out.append((f"-w{w}", over, member))
    return out


_GRID_KEYS = {
    "lr",
    "batch_size",
    "horizons_tokens",
    "log2_horizons",
    "seeds",
    "lr_scales",
    "group_scan",
}


def _grid(
    raw: dict[str, Any], file: str, optim: OptimConfig, models: tuple[ModelSpec, ...]
) -> Grid:
    _no_unknown(raw, _GRID_KEYS, "grid.", file)
    # an axis every model sets for itself may be left out of [grid]
    own_lr = all(m.axes.lr for m in models) and "lr" not in raw
    own_batch = all(m.axes.batch_size for m in models) and "batch_size" not in raw
    lr = () if own_lr else lr_axis(raw.get("lr"), file)
    batch = (
        () if own_batch else value_list(raw.get("batch_size"), "grid.batch_size", file, batch_value)
    )
    if "horizons_tokens" in raw and "log2_horizons" in raw:
        raise SpecError(
            file,
            "grid.log2_horizons",
            raw["log2_horizons"],
            "give horizons_tokens or log2_horizons, not both",
        )
    if "log2_horizons" in raw:
        exps = value_list(raw["log2_horizons"], "grid.log2_horizons", file, log2_horizon_value)
        horizons = tuple(2**e for e in exps)
    else:
        key = "grid.horizons_tokens"
        horizons = value_list(raw.get("horizons_tokens"), key, file, horizon_value)
    seeds = value_list(raw.get("seeds", [30]), "grid.seeds", file, seed_value)
    scales: tuple[tuple[float, float, float], ...] = (
        (optim.lr_scale_in, optim.lr_scale_hidden, optim.lr_scale_out),
    )
    if "lr_scales" in raw and "group_scan" in raw:
        raise SpecError(file, "grid.group_scan", raw["group_scan"], "conflicts with grid.lr_scales")
    if "lr_scales" in raw:
        scales = lr_scales_axis(raw["lr_scales"], file)
    if "group_scan" in raw:
        scales = group_scan_axis(raw["group_scan"], scales[0], file)
    return Grid(
        lr=lr,
        batch_size=batch,
        horizons_tokens=tuple(sorted(horizons)),
        seeds=seeds,
        lr_scales=scales,
    )


def _train(raw: dict[str, Any], file: str) -> dict[str, Any]:
    for k in sorted(set(raw) & _TRAIN_OWNED):
        why = _TRAIN_HINTS.get(k, "set by the spec's other tables, not [train]")
        raise SpecError(file, f"train.{k}", raw[k], why)
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
    # |slope| <= 16 and |intercept| <= 1024 (log2 units) hold any law a grid of 2^-40..2^10 fits
    a, b = (number_in(table[k], f"window.{k}", file, -16, 16) for k in ("a", "b"))
    c = number_in(table["c"], "window.c", file, -1024, 1024)
    keep = int_in(table.get("k", 4), "window.k", file, 0, 1000)
    return LawWindow(a=a, b=b, c=c, k=keep)
