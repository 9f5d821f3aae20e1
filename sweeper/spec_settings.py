"""The settings part of a spec: ``[backend]`` (with each backend's own ``[backend.<name>]``
table, built by the backend registry) and ``[resources]`` (generic compute per run)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sweeper.errors import SpecError
from sweeper.records import Resources
from sweeper.spec_checks import check_backend_table


def _no_unknown(raw: dict[str, Any], known: set[str], where: str, file: str) -> None:
    for k in sorted(set(raw) - known):
        raise SpecError(
            file, f"{where}{k}", raw[k], f"unknown key (known: {', '.join(sorted(known))})"
        )


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


def parse_backend(raw: dict[str, Any], file: str) -> BackendSettings:
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
        if b in raw:
            check_backend_table(b, raw[b], file)
    configs = tuple((b, parse_config(b, raw[b], file)) for b in BACKENDS if b in raw)
    return BackendSettings(
        name=name,
        command=tuple(cmd) if cmd else None,
        stale_after_s=float(stale),
        configs=configs,
    )


def parse_resources(raw: dict[str, Any], file: str, where: str = "resources") -> Resources:
    known = {f.name for f in dataclasses.fields(Resources)}
    _no_unknown(raw, known, f"{where}.", file)
    raw = dict(raw)
    _check_types(Resources, raw, where, file)
    res = Resources(**raw)
    for k in ("nodes", "procs_per_node", "cpus_per_task", "time_min"):
        v = getattr(res, k)
        if not 1 <= v <= _RESOURCE_MAX[k]:
            raise SpecError(file, f"{where}.{k}", v, f"must be in 1..{_RESOURCE_MAX[k]}")
    if not 0 <= res.gpus_per_node <= 64:
        raise SpecError(file, f"{where}.gpus_per_node", res.gpus_per_node, "must be in 0..64")
    if not (math.isfinite(res.mem_gb) and 0.25 <= res.mem_gb <= 1 << 20):
        raise SpecError(file, f"{where}.mem_gb", res.mem_gb, "must be a number of GB >= 0.25")
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
        if base == "float" and isinstance(v, int | float):
            raw[f.name] = float(v)
