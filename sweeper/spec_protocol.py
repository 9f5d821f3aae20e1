"""The parts of a spec that a paper-scale study needs beyond one grid: per-model grids and
micro-batches, schedules as an axis, and resources by model and batch size.

    [[models]]
    preset = "proxy"
    batch_size = [8, 16, 32]          # this model's own batch axis (default: [grid] batch_size)
    lr = {log2_from = -11, log2_to = 2, log2_step = 0.5}   # its own rate axis
    max_micro_batch = 16              # sequences per rank per forward: gradient accumulation
                                      # makes up the rest of each batch size

    [[schedules]]                     # instead of [schedule]: every run once per schedule
    kind = "constant"
    [[schedules]]
    kind = "wsd"
    decay_fraction = 0.2

    [resources]                       # the default shape of a run
    gpus_per_node = 1
    [[resources.rules]]               # later rules win; any matching rule applies
    model = "x12-width"               # match: model, batch_size_min, batch_size_max
    gpus_per_node = 4
    [[resources.rules]]
    batch_size_min = 1024
    nodes = 2
    time_from_cost = true             # time limit = [cost] estimate x margin
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sweeper.errors import SpecError
from sweeper.records import Resources
from sweeper.spec_values import batch_value, int_in, lr_axis, number_in, value_list
from trainer.config import ConfigError, ScheduleConfig, _build

MODEL_AXIS_KEYS = ("lr", "batch_size", "max_micro_batch")
_MATCH_KEYS = ("model", "batch_size_min", "batch_size_max")
MAX_SCHEDULES = 16
MAX_RULES = 256


@dataclass(frozen=True, kw_only=True)
class ModelAxes:
    """A model's own rate and batch axes and its micro-batch limit (None: the spec's), and for a
    member of a width family its width and how rates scale with it."""

    lr: tuple[float, ...] | None = None
    batch_size: tuple[int, ...] | None = None
    max_micro_batch: int | None = None
    width: int | None = None
    base_width: int | None = None
    width_exponents: tuple[float, float, float] = (0.0, 0.0, 0.0)  # c_in, c_hidden, c_out
    eps_exponent: float | None = None  # Adam's epsilon x (width / base)^-c (Everett et al.)

    def width_factors(self) -> tuple[float, float, float]:
        """``(width / base_width)^(-c_group)`` per group (all 1 outside a width family)."""
        if self.width is None or self.base_width is None:
            return (1.0, 1.0, 1.0)
        r = self.width / self.base_width
        c_in, c_hidden, c_out = self.width_exponents
        return (r**-c_in, r**-c_hidden, r**-c_out)

    def eps_factor(self) -> float:
        if self.width is None or self.base_width is None or self.eps_exponent is None:
            return 1.0
        return float((self.width / self.base_width) ** -self.eps_exponent)


@dataclass(frozen=True, kw_only=True)
class WidthFamily:
    """``widths = [...]`` in a ``[[models]]`` entry: one model per width, head dim fixed."""

    widths: tuple[int, ...]
    base_width: int
    exponents: tuple[float, float, float]
    eps_exponent: float | None


_WIDTH_KEYS = ("widths", "base_width", "width_exponents", "adam_eps_width_exponent")


def pop_width_family(entry: dict[str, Any], key: str, file: str) -> WidthFamily | None:
    """Take a width family's keys out of a ``[[models]]`` entry (None: a single model)."""
    if "widths" not in entry:
        for k in _WIDTH_KEYS:
            if k in entry:
                raise SpecError(file, f"{key}.{k}", entry[k], "only with widths = [...]")
        return None
    widths = value_list(entry.pop("widths"), f"{key}.widths", file, _width)
    base = _width(entry.pop("base_width", widths[0]), f"{key}.base_width", file)
    raw_c = entry.pop("width_exponents", [0.0, 0.0, 0.0])
    if not isinstance(raw_c, list) or len(raw_c) != 3:
        raise SpecError(file, f"{key}.width_exponents", raw_c, "must be [c_in, c_hidden, c_out]")
    c = tuple(number_in(v, f"{key}.width_exponents", file, -4.0, 4.0) for v in raw_c)
    eps = entry.pop("adam_eps_width_exponent", None)
    if eps is not None:
        eps = number_in(eps, f"{key}.adam_eps_width_exponent", file, -4.0, 4.0)
    return WidthFamily(widths=widths, base_width=base, exponents=c, eps_exponent=eps)  # type: ignore[arg-type]


def _width(v: Any, key: str, file: str) -> int:
    return int_in(v, key, file, 2, 1 << 16)


def group_scan_axis(
    raw: Any, base: tuple[float, float, float], file: str
) -> tuple[tuple[float, float, float], ...]:
    """``[grid] group_scan = {log2_from, log2_to, log2_step}``: the lr-scale triples that vary one
    layer group's rate at a time around ``base`` (the others held), which identifies each group's
    optimum (Everett et al. 2024)."""
    key = "grid.group_scan"
    if not isinstance(raw, dict):
        raise SpecError(file, key, raw, "expected {log2_from, log2_to, log2_step}")
    factors = lr_axis(raw, file, key)  # 2^from .. 2^to, validated like a rate axis
    out: list[tuple[float, float, float]] = [base]
    for g in range(3):
        for f in factors:
            t = list(base)
            t[g] = base[g] * f
            out.append((t[0], t[1], t[2]))
    return tuple(dict.fromkeys(out))


def pop_model_axes(entry: dict[str, Any], key: str, file: str) -> ModelAxes:
    """Take the per-model axis keys out of a ``[[models]]`` entry (the rest is the model)."""
    lr = entry.pop("lr", None)
    batch = entry.pop("batch_size", None)
    micro = entry.pop("max_micro_batch", None)
    return ModelAxes(
        lr=None if lr is None else lr_axis(lr, file, f"{key}.lr"),
        batch_size=None
        if batch is None
        else value_list(batch, f"{key}.batch_size", file, batch_value),
        max_micro_batch=None
        if micro is None
        else int_in(micro, f"{key}.max_micro_batch", file, 1, 1 << 20),
    )


def micro_batch(per_rank: int, limit: int | None) -> int | None:
    """The largest micro-batch that divides the per-rank batch and fits ``limit`` (None: no
    accumulation needed or asked for)."""
    if limit is None or per_rank <= limit:
        return None
    return max(d for d in range(1, limit + 1) if per_rank % d == 0)


def parse_schedules(raw: Any, file: str) -> tuple[ScheduleConfig, ...]:
    """``[[schedules]]``: each a validated ScheduleConfig without ``total_steps``."""
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, "schedules", raw, "expected one or more [[schedules]] tables")
    if len(raw) > MAX_SCHEDULES:
        raise SpecError(file, "schedules", f"{len(raw)} tables", f"at most {MAX_SCHEDULES}")
    out = []
    for i, table in enumerate(raw):
        key = f"schedules[{i}]"
        try:
            sched = _build(ScheduleConfig, table, key)
            sched.validate()
        except ConfigError as e:
            raise SpecError(file, None, message=str(e)) from None
        if sched.total_steps is not None:
            raise SpecError(file, f"{key}.total_steps", sched.total_steps, "derived; leave it out")
        out.append(sched)
    if len(set(out)) != len(out):
        raise SpecError(file, "schedules", raw, "duplicate schedules")
    return tuple(out)


def schedule_tag(s: ScheduleConfig) -> str:
    """A short label of a schedule for slugs and tables (``constant``, ``wsd0.2``, ``cosine``)."""
    return f"wsd{s.decay_fraction:g}" if s.kind == "wsd" else s.kind


@dataclass(frozen=True, kw_only=True)
class ResourceRule:
    """``[[resources.rules]]``: resources for the runs it matches."""

    model: str | None = None
    batch_size_min: int | None = None
    batch_size_max: int | None = None
    time_from_cost: bool = False
    changes: tuple[tuple[str, Any], ...] = ()  # Resources fields it sets

    def matches(self, model: str, batch: int) -> bool:
        return (
            (self.model is None or self.model == model)
            and (self.batch_size_min is None or batch >= self.batch_size_min)
            and (self.batch_size_max is None or batch <= self.batch_size_max)
        )


def parse_rules(raw: Any, file: str, check: Any) -> tuple[ResourceRule, ...]:
    """``[[resources.rules]]``; ``check(table, key)`` type-checks and validates the resource
    fields a rule sets (the same checks as ``[resources]``)."""
    if not isinstance(raw, list):
        raise SpecError(file, "resources.rules", raw, "expected [[resources.rules]] tables")
    if len(raw) > MAX_RULES:
        raise SpecError(file, "resources.rules", f"{len(raw)} tables", f"at most {MAX_RULES}")
    fields = {f.name for f in dataclasses.fields(Resources)}
    rules = []
    for i, table in enumerate(raw):
        key = f"resources.rules[{i}]"
        if not isinstance(table, dict):
            raise SpecError(file, key, table, "expected a table")
        for k in sorted(set(table) - fields - set(_MATCH_KEYS) - {"time_from_cost"}):
            known = ", ".join(sorted(fields | set(_MATCH_KEYS) | {"time_from_cost"}))
            raise SpecError(file, f"{key}.{k}", table[k], f"unknown key (known: {known})")
        rule = _rule(table, key, file)
        check(dict(rule.changes), key)
        rules.append(rule)
    return tuple(rules)


def _rule(table: dict[str, Any], key: str, file: str) -> ResourceRule:
    model = table.get("model")
    if model is not None and not isinstance(model, str):
        raise SpecError(file, f"{key}.model", model, "expected a model name")
    bounds = {
        k: batch_value(table[k], f"{key}.{k}", file)
        for k in ("batch_size_min", "batch_size_max")
        if k in table
    }
    flag = table.get("time_from_cost", False)
    if not isinstance(flag, bool):
        raise SpecError(file, f"{key}.time_from_cost", flag, "expected true or false")
    changes = tuple(
        (k, v) for k, v in table.items() if k not in _MATCH_KEYS and k != "time_from_cost"
    )
    return ResourceRule(model=model, time_from_cost=flag, changes=changes, **bounds)


def resources_for(
    base: Resources, rules: tuple[ResourceRule, ...], model: str, batch: int
) -> tuple[Resources, bool]:
    """The resources of a (model, B) run, and whether its time limit comes from the cost."""
    res, from_cost = base, False
    for rule in rules:
        if rule.matches(model, batch):
            res = dataclasses.replace(res, **dict(rule.changes))
            from_cost = from_cost or rule.time_from_cost
    return res, from_cost
