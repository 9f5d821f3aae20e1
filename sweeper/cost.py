"""What a sweep costs before it runs: FLOPs, GPU-hours and wall time per run, per (model, B) and in
total, from a throughput table (declared in ``[cost]`` or measured by ``sweeper calibrate``).

``[cost]`` in a spec::

    [cost]
    throughput = {proxy = 2.4e6, x4-width = 6.1e5}   # tokens/s of one run on its resources
    # or: throughput_file = "throughput.json"        # written by `sweeper calibrate SPEC`
    # fallback for models without a measured throughput: FLOPs at this fraction of peak
    device_flops = 989e12                             # per GPU (H100/H200 dense bf16)
    mfu = 0.35
    margin = 1.5                                      # time limit = estimate x margin
    confirm_runs = 1000                               # launch asks above these
    confirm_gpu_hours = 500

FLOPs per token follow Kaplan et al. (2020): 6·N_non-embedding + 6·n_layers·seq_len·d_attn
(``TrainConfig.flops_per_token``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.errors import SpecError
from sweeper.records import RunRecord


@dataclass(frozen=True, kw_only=True)
class CostConfig:
    """``[cost]``: how fast each model trains, and when launch asks before submitting."""

    throughput: tuple[tuple[str, float], ...] = ()  # (model, tokens/s of one run)
    device_flops: float | None = None  # peak FLOP/s of one GPU (or of the CPU, for CPU runs)
    mfu: float = 0.35
    margin: float = 1.5
    confirm_runs: int = 1000
    confirm_gpu_hours: float = 500.0

    def tokens_per_s(self, record: RunRecord) -> float | None:
        """Throughput of ``record``'s run: measured for its model, else from FLOPs x MFU."""
        table = dict(self.throughput)
        if record.model in table:
            return table[record.model]
        if self.device_flops is None:
            return None
        devices = max(1, record.resources.gpus_per_node) * record.resources.nodes
        return self.device_flops * self.mfu * devices / record.train.flops_per_token()


_KEYS = {"throughput", "throughput_file", "device_flops", "mfu", "margin", "confirm_runs",
         "confirm_gpu_hours"}  # fmt: skip


def parse_section(raw: dict[str, Any], file: str) -> CostConfig:
    """Validate ``[cost]``; SpecError naming the key."""
    for key in sorted(set(raw) - _KEYS):
        raise SpecError(
            file, f"cost.{key}", raw[key], f"unknown key (known: {', '.join(sorted(_KEYS))})"
        )
    table = dict(_throughput(raw.get("throughput", {}), file, "cost.throughput"))
    if "throughput_file" in raw:
        table = {**_read_throughput(raw["throughput_file"], file), **table}
    kw: dict[str, Any] = {"throughput": tuple(sorted(table.items()))}
    for key, lo, hi in (("device_flops", 1e6, 1e20), ("mfu", 1e-4, 1.0), ("margin", 1.0, 100.0),
                        ("confirm_gpu_hours", 0.0, 1e12)):  # fmt: skip
        if key in raw:
            kw[key] = _number(raw[key], f"cost.{key}", file, lo, hi)
    if "confirm_runs" in raw:
        v = raw["confirm_runs"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SpecError(file, "cost.confirm_runs", v, "expected an integer >= 0")
        kw["confirm_runs"] = v
    return CostConfig(**kw)


def _number(v: Any, key: str, file: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise SpecError(file, key, v, "expected a finite number")
    if not lo <= v <= hi:
        raise SpecError(file, key, v, f"must be in {lo:g}..{hi:g}")
    return float(v)


def _throughput(raw: Any, file: str, key: str) -> Iterable[tuple[str, float]]:
    if not isinstance(raw, dict):
        raise SpecError(file, key, raw, "expected a table of model = tokens per second")
    for model, v in raw.items():
        yield str(model), _number(v, f"{key}.{model}", file, 1e-6, 1e15)


def _read_throughput(name: Any, file: str) -> dict[str, float]:
    if not isinstance(name, str) or not name:
        raise SpecError(file, "cost.throughput_file", name, "expected a file name")
    path = Path(name) if Path(name).is_absolute() else Path(file).parent / name
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(file, "cost.throughput_file", name, f"cannot read: {e}") from None
    runs = raw.get("tokens_per_s") if isinstance(raw, dict) else None
    return dict(_throughput(runs, str(path), "tokens_per_s"))


@dataclass(frozen=True)
class RunCost:
    """The cost of one run."""

    flops: float
    tokens: int
    wall_hours: float | None
    gpu_hours: float | None


def run_cost(record: RunRecord, cfg: CostConfig | None) -> RunCost:
    """FLOPs, tokens, and (with a throughput) wall and GPU hours of ``record``'s own steps."""
    tps = cfg.tokens_per_s(record) if cfg else None
    wall = record.trained_tokens / tps / 3600 if tps else None
    gpus = record.resources.nodes * max(1, record.resources.gpus_per_node)
    return RunCost(record.flops, record.trained_tokens, wall, None if wall is None else wall * gpus)


def time_limit_min(record: RunRecord, cfg: CostConfig | None) -> int | None:
    """A job time limit from the estimate x margin (None without a throughput)."""
    cost = run_cost(record, cfg)
    if cost.wall_hours is None or cfg is None:
        return None
    return max(5, math.ceil(cost.wall_hours * 60 * cfg.margin))


def cost_rows(records: list[RunRecord], cfg: CostConfig | None) -> list[dict[str, Any]]:
    """One row per (model, B): runs, steps, tokens, FLOPs, wall and GPU hours; then a total."""
    groups: dict[tuple[str, int], list[RunRecord]] = {}
    order: dict[str, int] = {}
    for r in records:
        order.setdefault(r.model, len(order))
        groups.setdefault((r.model, r.batch_size), []).append(r)
    keys = sorted(groups, key=lambda k: (order[k[0]], k[1]))  # models in spec order, B ascending
    rows = [_row(model, str(b), groups[(model, b)], cfg) for model, b in keys]
    if len(rows) > 1:
        rows.append(_row("total", "", records, cfg))
    return rows


def _row(model: str, b: str, rs: list[RunRecord], cfg: CostConfig | None) -> dict[str, Any]:
    costs = [run_cost(r, cfg) for r in rs]
    known = [c for c in costs if c.gpu_hours is not None]
    gpu = sum(c.gpu_hours or 0.0 for c in known) if len(known) == len(costs) else None
    wall = max((c.wall_hours or 0.0 for c in known), default=None) if known else None
    return {
        "model": model,
        "batch_size": b,
        "runs": len(rs),
        "tokens": sum(c.tokens for c in costs),
        "flops": sum(c.flops for c in costs),
        "gpu_hours": gpu,
        "longest_run_h": wall,
    }


def totals(records: list[RunRecord], cfg: CostConfig | None) -> dict[str, Any]:
    """The whole plan's cost (the last row of :func:`cost_rows`)."""
    return _row("total", "", records, cfg)


def needs_confirmation(records: list[RunRecord], cfg: CostConfig | None) -> str | None:
    """Why launching ``records`` should be confirmed first, or None."""
    cfg = cfg or CostConfig()
    t = totals(records, cfg)
    if t["runs"] > cfg.confirm_runs:
        return f"{t['runs']} runs (more than cost.confirm_runs = {cfg.confirm_runs})"
    if t["gpu_hours"] is not None and t["gpu_hours"] > cfg.confirm_gpu_hours:
        return (f"{t['gpu_hours']:.0f} GPU-hours (more than cost.confirm_gpu_hours = "
                f"{cfg.confirm_gpu_hours:g})")  # fmt: skip
    return None


def with_throughput(cfg: CostConfig | None, measured: dict[str, float]) -> CostConfig:
    """``cfg`` with measured throughputs added (they win over declared ones)."""
    base = cfg or CostConfig()
    return dataclasses.replace(
        base, throughput=tuple(sorted({**dict(base.throughput), **measured}.items()))
    )
