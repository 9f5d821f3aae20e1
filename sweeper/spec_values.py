"""Validators of single spec values and axes, shared by the spec's ``[grid]`` and by
``extra_points.json``; plus the checks every spec file gets (a small regular UTF-8 file, read
without blocking) and every value in it (nesting depth, control characters).

Every function raises :class:`~sweeper.errors.SpecError` naming the file, the key and the value.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from sweeper.errors import SpecError

# A name that becomes (part of) a directory name: the sweep's and each model's.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "letters, digits, _ and - only, starting with a letter or digit (max 64)"

LOG2_LR_RANGE = (-40.0, 10.0)  # 2^-40 .. 2^10: beyond it a rate is a typo (or underflows)
MAX_BATCH = 1 << 24
MAX_HORIZON_LOG2 = 62
MAX_SEED = 2**31 - 1
MAX_SCALE = 2.0**20
# Values per axis. lr and seeds may be long (fine scans, many seeds); a batch or horizon axis of
# thousands is a typo, and every (batch, horizon) pair is validated one by one.
MAX_AXIS = {
    "grid.lr": 10_000,
    "grid.seeds": 10_000,
    "grid.batch_size": 1024,
    "grid.horizons_tokens": 256,
    "grid.log2_horizons": 256,
    "grid.lr_scales": 1024,
    "models": 256,
}
# A real spec is a few kB (10,000 seeds: 60 kB); tomllib needs seconds per MiB of hostile input.
MAX_SPEC_BYTES = 256 << 10
MAX_DEPTH = 8  # tables within tables; a real spec uses 3
# Strings may not hold control characters (a newline in a SLURM field would add a line to the
# batch script; a NUL cannot be passed to exec). Free text may hold newlines and tabs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_FREE_TEXT = {"description"}


# -------------------------------------------------------------------------------------- scalars


def number(v: Any, key: str, file: str) -> float:
    """A finite number (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(file, key, v, "expected a number")
    if not math.isfinite(v) or abs(v) > 1e300:
        raise SpecError(file, key, v, "must be a finite number")
    return float(v)


def number_in(v: Any, key: str, file: str, lo: float, hi: float) -> float:
    """A finite number in ``lo..hi``."""
    x = number(v, key, file)
    if not lo <= x <= hi:
        raise SpecError(file, key, v, f"must be in {lo:g}..{hi:g}")
    return x


def int_in(v: Any, key: str, file: str, lo: int, hi: int) -> int:
    """An integer (not a bool, not a float) in ``lo..hi``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(file, key, v, "expected an integer")
    if not lo <= v <= hi:
        raise SpecError(file, key, v, f"must be in {lo}..{hi}")
    return v


def name_value(v: Any, key: str, file: str) -> str:
    """A name that becomes a directory name (the sweep's, a model's)."""
    if v is None:
        raise SpecError(file, key, v, f"required: {NAME_RULE}")
    if not isinstance(v, str) or not NAME.fullmatch(v):
        raise SpecError(file, key, v, NAME_RULE)
    return v


def lr_value(v: Any, key: str, file: str) -> float:
    """A learning rate: finite, > 0, within 2^-40..2^10."""
    lr = number(v, key, file)
    lo, hi = LOG2_LR_RANGE
    if not (lr > 0 and lo <= math.log2(lr) <= hi):
        raise SpecError(file, key, v, f"must be a learning rate in 2^{lo:g}..2^{hi:g}")
    return lr


def batch_value(v: Any, key: str, file: str) -> int:
    """A global batch size in sequences: an integer in 1..2^24."""
    return int_in(v, key, file, 1, MAX_BATCH)


def seed_value(v: Any, key: str, file: str) -> int:
    """A seed: an integer in 0..2^31-1."""
    return int_in(v, key, file, 0, MAX_SEED)


def horizon_value(v: Any, key: str, file: str) -> int:
    """A token budget: an integer in 1..2^62."""
    return int_in(v, key, file, 1, 2**MAX_HORIZON_LOG2)


def log2_horizon_value(v: Any, key: str, file: str) -> int:
    """A token budget's base-2 exponent: an integer in 1..62."""
    return int_in(v, key, file, 1, MAX_HORIZON_LOG2)


def lr_scales_value(v: Any, key: str, file: str) -> tuple[float, float, float]:
    """Per-group rate ratios ``[in, hidden, out]``: finite numbers in (0, 2^20]."""
    if not isinstance(v, list) or len(v) != 3:
        raise SpecError(file, key, v, "must be [in, hidden, out]")
    triple = tuple(number(x, key, file) for x in v)
    if not all(0 < x <= MAX_SCALE for x in triple):
        raise SpecError(file, key, v, "ratios must be numbers in (0, 2^20]")
    return triple  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- axes


def value_list(raw: Any, key: str, file: str, value: Any) -> tuple[Any, ...]:
    """A non-empty list of unique values, each checked by ``value(v, key, file)``, sorted."""
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, key, raw, "expected a non-empty list")
    cap = MAX_AXIS.get(key, 10_000)
    if len(raw) > cap:
        raise SpecError(file, key, f"{len(raw)} values", f"at most {cap} values on this axis")
    values = [value(v, key, file) for v in raw]
    if len(set(values)) != len(values):
        raise SpecError(file, key, raw, "duplicate values")
    return tuple(sorted(values))


def lr_axis(raw: Any, file: str, key: str = "grid.lr") -> tuple[float, ...]:
    """``grid.lr`` (or a model's ``lr``): a list of rates or ``{log2_from, log2_to, log2_step}``."""
    if raw is None:
        raise SpecError(file, key, None, "required: a list or {log2_from, log2_to, log2_step}")
    if not isinstance(raw, dict):
        return value_list(raw, key, file, lr_value)
    known = ("log2_from", "log2_to", "log2_step")
    for k in sorted(set(raw) - set(known)):
        raise SpecError(file, f"{key}.{k}", raw[k], f"unknown key (known: {', '.join(known)})")
    lo_, hi_ = LOG2_LR_RANGE
    lo, hi = (number_in(raw.get(k), f"{key}.{k}", file, lo_, hi_) for k in ("log2_from", "log2_to"))
    step = number(raw.get("log2_step"), f"{key}.log2_step", file)
    if not step > 0:
        raise SpecError(file, f"{key}.log2_step", raw["log2_step"], "must be > 0")
    if hi < lo:
        raise SpecError(file, f"{key}.log2_to", raw["log2_to"], f"must be >= log2_from = {lo:g}")
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if n > MAX_AXIS.get(key, 10_000):
        raise SpecError(file, key, raw, f"{n} grid points; at most {MAX_AXIS.get(key, 10_000)}")
    return tuple(2.0 ** (lo + i * step) for i in range(n))


def lr_scales_axis(raw: Any, file: str) -> tuple[tuple[float, float, float], ...]:
    """``grid.lr_scales``: a non-empty list of distinct ``[in, hidden, out]`` ratios."""
    key = "grid.lr_scales"
    if not isinstance(raw, list) or not raw:
        raise SpecError(file, key, raw, "expected a non-empty list of [in, hidden, out] ratios")
    if len(raw) > MAX_AXIS[key]:
        raise SpecError(file, key, f"{len(raw)} values", f"at most {MAX_AXIS[key]} entries")
    out = [lr_scales_value(item, key, file) for item in raw]
    if len(set(out)) != len(out):
        raise SpecError(file, key, raw, "duplicate entries")
    return tuple(out)


# ------------------------------------------------------------------------------------ whole file


def check_tree(node: Any, file: str, where: str = "", depth: int = 0) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` and control characters in keys and strings.

    Iterative in the depth it accepts, so a hostile file cannot exhaust the stack here.
    """
    if depth > MAX_DEPTH:
        raise SpecError(file, where, message=f"nested deeper than {MAX_DEPTH} levels")
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        key = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else k
        if isinstance(k, str) and _CONTROL.search(k):
            raise SpecError(file, where or None, k, "control characters are not allowed in keys")
        if isinstance(v, dict | list):
            check_tree(v, file, key, depth + 1)
        elif isinstance(v, str):
            top = key.split(".")[0].split("[")[0]
            pattern = _CONTROL_IN_TEXT if top in _FREE_TEXT else _CONTROL
            if pattern.search(v):
                raise SpecError(file, key, v, "control characters are not allowed")


_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_LONG_DOTTED_KEY = re.compile(
    rf"(?<![A-Za-z0-9_-]){_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART}){{{4 * MAX_DEPTH}}}"
)


def check_dotted_keys(text: str, file: str) -> None:
    """Refuse a dotted key of more than ``4 * MAX_DEPTH`` parts before the TOML parser sees it:
    tomllib takes time quadratic in the parts of one key (20,000 parts: seconds; a file of them:
    hours), and no spec nests that deep anyway."""
    if text.count(".") < 4 * MAX_DEPTH:
        return
    m = _LONG_DOTTED_KEY.search(text)
    if m:
        key = m.group(0)
        shown = key if len(key) <= 40 else key[:37] + "..."
        raise SpecError(file, shown, message=f"nested deeper than {MAX_DEPTH} levels")


_DEEP_LINE = re.compile(r"^\s*([^=#\[\]{}\s][^=#\n]*?)\s*=\s*[\[{]", re.MULTILINE)


def deep_key(text: str) -> str | None:
    """The key of the most deeply bracketed value of ``text`` (to name it when the TOML parser
    itself gives up on nesting), or None."""
    best, best_depth = None, 0
    for m in _DEEP_LINE.finditer(text):
        rest = text[m.end() - 1 : m.end() - 1 + 4 * MAX_DEPTH + 64]
        depth = len(rest) - len(rest.lstrip("[{ \t"))
        if depth > best_depth:
            best, best_depth = m.group(1).strip(), depth
    return best


def read_spec_file(path: Path) -> str:
    """The text of a spec file, checked to be a small regular UTF-8 file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpecError(str(path), None, message="no such spec file") from None
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise SpecError(str(path), None, message=f"cannot read: {why}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(str(path), None, message="not a regular file")
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError(str(path), None, message=f"larger than {MAX_SPEC_BYTES} bytes")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, open() cannot block
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SpecError(str(path), None, message="not a regular file")
            data = f.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(str(path), None, message=f"larger than {MAX_SPEC_BYTES} bytes")
        return data.decode("utf-8")
    except OSError as e:
        raise SpecError(str(path), None, message=f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(str(path), None, message="not UTF-8 text") from None
