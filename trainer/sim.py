"""A simulated trainer: the real trainer's run files, instantly, from a parametrized loss surface.

``python -m trainer.sim --run TRIAL.json --out RUN_DIR`` reads a run record (``train``: the
:class:`~trainer.config.TrainConfig`; ``params.simulator``: the :class:`Surface`) and writes the
files of :mod:`trainer.schema` (``ckpt/`` holds symbolic markers ``step_XXXXXXXX.json``) at the
trainer's cadence: step 0, every ``log_every`` steps, every horizon (``horizon: true``, with
``val_loss``) and the last step. Exit codes are the trainer's (0, 2 bad config, 3 diverged, 75
checkpointed on SIGTERM/SIGUSR2: run it again to resume). Every value is a pure function of the run
and the step, so a resumed run, an uninterrupted one and the in-process path (:class:`SimRun`, used
by ``sweeper.backends.sim``) write the same files. Surface and parameters: ``docs/simulator.md``.
No torch, no numpy: it starts in milliseconds and costs microseconds per metrics line."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from trainer import schema
from trainer.config import ConfigError, TrainConfig
from trainer.schedule import lr_multiplier
from trainer.schema import Status, Summary, metrics_line

_MARKER = "step_{:08d}.json"
_Stop = Callable[[], str | None] | None
_MASK = (1 << 64) - 1
# log2 of the other logged norms as a * x + b, x = log2 ||W_out||_{RMS->inf}
_OTHER_NORMS = {
    "output_norm": (1.0, 0.0),
    "output_norm_rms": (1.0, -1.0),
    "input_norm": (0.5, 0.0),
    "hidden_norm": (0.25, 0.0),
}


# ------------------------------------------------------------------------------------- surface


@dataclass(frozen=True, kw_only=True)
class Surface:
    """The simulated loss surface (``[simulator]`` in a spec; ``docs/simulator.md``).

    Logs are base 2, B is the global batch in sequences, D (or t) is tokens, eta is the output
    layer's rate ``lr * lr_scale_out``. The optimal rate is ``log2 eta* = lr_b log2 B + lr_d log2 D
    + lr_c``, the optimal batch ``log2 B* = batch_d log2 D + batch_c``; the loss is a parabola in
    x = log2 ||W_out|| with its vertex at the optimal norm ``x0`` and through the loss at
    initialisation at x = 0.
    """

    seed: int = 0
    lr_b: float = 0.5  # d log2 eta* / d log2 B
    lr_d: float = -0.5  # d log2 eta* / d log2 D
    lr_c: float = 3.0
    batch_d: float = 0.45  # d log2 B* / d log2 D
    batch_c: float = -4.0
    batch_curvature: float = 0.02  # loss per (log2 B - log2 B*)^2
    loss_floor: float = 1.5  # the loss as D -> infinity at B*
    loss_decay: float = 0.3  # F(D) = floor + (L0 - floor) (1 + D / loss_tokens)^-decay
    loss_tokens: float = 16384.0
    x0: float = 7.0  # optimal log2 output norm at D = 2^x0_ref_log2_tokens
    x0_drift: float = 0.0  # change of x0 per doubling of D (0: the norm transfers)
    x0_ref_log2_tokens: float = 20.0
    norm_lr_exponent: float = 1.0  # d log2 ||W_out|| / d log2 eta
    curvature: float = 1.0  # multiplies the well's width^-2 (1: through (0, L0))
    curvature_high: float = 1.0  # extra factor on the high-norm side (asymmetry)
    diverge_b: float = 0.0  # log2 eta_div = diverge_b log2 B + diverge_c
    diverge_c: float = 10.0
    diverge_log2_tokens: float = 16.0  # a run at eta_div diverges after 2^this tokens
    noise: float = 0.2  # std of a logged train loss is noise / sqrt(B)
    run_noise: float = 0.0  # std of a per-run (per seed) loss offset, grown in with training
    val_noise: float = 0.005  # std of a validation loss
    norm_noise: float = 0.0  # std of a per-run offset of log2 ||W_out||
    step_time_s: float = 0.01  # simulated seconds per step (wall_time_s, tokens_per_s)
    sleep_s_per_step: float = 0.0  # real seconds slept per step (0: instant)

    def validate(self) -> None:
        """Raise ConfigError (one line, naming the key) unless the surface is usable."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "seed":
                if type(value) is not int or not 0 <= value < 2**63:
                    raise ConfigError(f"simulator.seed = {value!r}: expected an integer >= 0")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"simulator.{f.name} = {value!r}: expected a number")
            elif not math.isfinite(value) or abs(value) > 1e12:
                raise ConfigError(f"simulator.{f.name} = {value!r}: must be a finite number")
            lo, strict = _LOWER.get(f.name, (-math.inf, False))
            if (
                value < lo
                or (strict and value == lo)
                or (f.name == "sleep_s_per_step" and value > 60)
            ):
                bound = f"> {lo:g}" if strict else f">= {lo:g}"
                raise ConfigError(f"simulator.{f.name} = {value}: must be {bound}")
        if self.x0_drift - self.norm_lr_exponent * self.lr_d <= 0:
            raise ConfigError(
                f"simulator.x0_drift = {self.x0_drift}: the norm must grow with D "
                f"(need x0_drift - norm_lr_exponent * lr_d > 0)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Surface:
        """Build and validate; unknown keys are ConfigError naming the key."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        for key in sorted(set(raw) - known):
            raise ConfigError(f"simulator.{key}: unknown key (known: {', '.join(sorted(known))})")
        kinds = {f.name: f.type for f in fields(cls)}
        for key, value in raw.items():
            if kinds[key] == "float" and type(value) is int:
                raw[key] = float(value)
        surface = cls(**raw)
        surface.validate()
        return surface

    # ---- the laws
    def log2_lr_star(self, batch: int, tokens: float) -> float:
        """log2 eta*(B, D)."""
        return self.lr_b * math.log2(batch) + self.lr_d * math.log2(tokens) + self.lr_c

    def log2_batch_star(self, tokens: float) -> float:
        """log2 B*(D)."""
        return self.batch_d * math.log2(tokens) + self.batch_c

    def x0_at(self, tokens: float) -> float:
        """The optimal log2 output norm at D (at least 1)."""
        return max(1.0, self.x0 + self.x0_drift * (math.log2(tokens) - self.x0_ref_log2_tokens))

    def log2_lr_diverge(self, batch: int) -> float:
        """log2 of the lowest rate that diverges at batch B."""
        return self.diverge_b * math.log2(batch) + self.diverge_c


# Lower bounds of the surface's parameters: (bound, strict).
_LOWER: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(("noise", "run_noise", "val_noise", "norm_noise"), (0.0, False)),
    **dict.fromkeys(("batch_curvature", "step_time_s", "sleep_s_per_step"), (0.0, False)),
    **dict.fromkeys(("loss_decay", "loss_tokens", "x0", "norm_lr_exponent"), (0.0, True)),
    **dict.fromkeys(("curvature", "curvature_high"), (0.0, True)),
}


# --------------------------------------------------------------------------------------- noise


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit integer from any 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def gaussian(key: int, step: int, stream: int) -> float:
    """A standard normal draw that is a pure function of (key, step, stream) (Box-Muller)."""
    h1 = _mix(key ^ _mix(step * 4 + stream))
    h2 = _mix(h1 ^ 0xD1B54A32D192ED03)
    u1 = ((h1 >> 11) + 0.5) / 2**53
    u2 = (h2 >> 11) / 2**53
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def run_key(surface: Surface, cfg: TrainConfig) -> int:
    """The noise key of a run: surface seed, run seed, rates and batch (not the schedule nor the
    horizons, so a decay branch sees its trunk's noise up to the fork)."""
    o, m = cfg.optim, cfg.model
    text = f"{surface.seed}/{cfg.seed}/{cfg.batch_size}/{m.seq_len}/{m.vocab_size}/" + "/".join(
        float(r).hex() for r in (o.lr, o.lr_scale_out, o.lr_scale_hidden)
    )
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------ the model


class Point(NamedTuple):
    """The simulated state at one step: deterministic loss, log2 output norm, progress R."""

    loss: float
    x: float
    progress: float  # L0 - L*(B, t): how far the run's best possible loss has come down


class Model:
    """The surface evaluated for one run (its batch, rates, schedule and noise key)."""

    def __init__(self, surface: Surface, cfg: TrainConfig) -> None:
        self.s, self.cfg = surface, cfg
        self.l0 = math.log(cfg.model.vocab_size)
        self.tps = cfg.tokens_per_step
        self.log2_b = math.log2(cfg.batch_size)
        self.lr_out = cfg.optim.lr_out
        self.key = run_key(surface, cfg)
        self.norm_offset = surface.norm_noise * gaussian(self.key, 0, 3)
        self.run_offset = surface.run_noise * gaussian(self.key, 0, 4)
        self.sigma = surface.noise / math.sqrt(cfg.batch_size)
        wd = cfg.optim.weight_decay
        self.log2_cap = -math.log2(wd * self.lr_out) if wd > 0 else None
        self.div_step = self._divergence_step()
        self._mult_sum: tuple[int, float] = (0, 0.0)

    def _divergence_step(self) -> int | None:
        excess = math.log2(self.lr_out) - self.s.log2_lr_diverge(self.cfg.batch_size)
        if excess < 0:
            return None
        tokens = 2.0 ** (self.s.diverge_log2_tokens - 2.0 * excess)
        return max(1, math.ceil(tokens / self.tps))

    def multiplier(self, step: int) -> float:
        """LR multiplier of the update from ``step`` (the trainer's schedule)."""
        return lr_multiplier(self.cfg.schedule, step, self.cfg.total_steps)

    def mean_multiplier(self, step: int) -> float:
        """Mean LR multiplier over the updates before ``step`` (1 for a constant schedule)."""
        if self.cfg.schedule.kind == "constant" and self.cfg.schedule.warmup_steps == 0:
            return 1.0
        done, total = self._mult_sum if self._mult_sum[0] <= step else (0, 0.0)
        self._mult_sum = (step, total + sum(self.multiplier(s) for s in range(done, step)))
        return self._mult_sum[1] / step if step else 1.0

    def point(self, step: int) -> Point:
        """The deterministic state after ``step`` updates."""
        s = self.s
        if step == 0:
            return Point(self.l0, 0.0, 0.0)
        t = float(step * self.tps)
        eta = self.lr_out * self.mean_multiplier(step)
        x0 = s.x0_at(t)
        z = x0 + s.norm_lr_exponent * (math.log2(eta) - s.log2_lr_star(self.cfg.batch_size, t))
        x = _softplus4(z + self.norm_offset)
        if self.log2_cap is not None:
            x = -_softplus4(-x + self.log2_cap) + self.log2_cap  # smooth min(x, log2(1/(wd lr)))
        floor = s.loss_floor + (self.l0 - s.loss_floor) * (1.0 + t / s.loss_tokens) ** -s.loss_decay
        gap_b = self.log2_b - s.log2_batch_star(t)
        l_star = min(self.l0, floor + s.batch_curvature * gap_b * gap_b)
        progress = self.l0 - l_star
        width = s.curvature * (s.curvature_high if x > x0 else 1.0)
        loss = l_star + width * progress * ((x - x0) / x0) ** 2
        if self.cfg.schedule.kind != "constant":
            loss -= _ANNEAL_GAIN * (1.0 - self.multiplier(max(0, step - 1))) * progress
        return Point(loss, x, progress)

    def train_loss(self, step: int, p: Point) -> float:
        """The logged train loss: the surface plus per-step and per-run noise."""
        if self.div_step is not None and step >= self.div_step:
            return math.nan
        grown = p.progress / max(1e-9, self.l0 - self.s.loss_floor)
        return p.loss + self.sigma * gaussian(self.key, step, 0) + self.run_offset * grown

    def val_loss(self, step: int, p: Point) -> float:
        """The logged validation loss at a horizon."""
        grown = p.progress / max(1e-9, self.l0 - self.s.loss_floor)
        return p.loss + self.s.val_noise * gaussian(self.key, step, 1) + self.run_offset * grown


_ANNEAL_GAIN = 0.1  # a decay's share of the remaining progress recovered at the end of the decay


def _softplus4(z: float) -> float:
    """log2 of (1 + 2^(4z))^(1/4): z for z >> 0, 0 for z << 0 (the norm starts at 1)."""
    if 4.0 * z > 60.0:
        return z
    return 0.25 * math.log2(1.0 + 2.0 ** (4.0 * z))


# -------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Trial:
    """A parsed ``TRIAL.json``: the train config and the surface."""

    cfg: TrainConfig
    surface: Surface

    @classmethod
    def from_dict(cls, raw: Any) -> Trial:
        """A record (``train``, ``params.simulator``) or a bare TrainConfig; ConfigError if bad."""
        if not isinstance(raw, dict):
            raise ConfigError("expected a JSON object (a run record or a TrainConfig)")
        train: dict[str, Any] = raw["train"] if isinstance(raw.get("train"), dict) else raw
        params: dict[str, Any] = raw["params"] if isinstance(raw.get("params"), dict) else {}
        cfg = TrainConfig.from_dict({k: v for k, v in train.items() if k != "params"})
        cfg.validate(world_size=1)
        return cls(cfg, Surface.from_dict(params.get("simulator")))


class SimRun:
    """One simulated run in a run directory: :meth:`open`, then :meth:`advance` until it returns
    a summary. The files are the real trainer's; see the module docstring."""

    def __init__(self, trial: Trial, out_dir: Path) -> None:
        self.cfg, self.surface = trial.cfg, trial.surface
        self.out_dir = Path(out_dir)
        self.model = Model(trial.surface, trial.cfg)
        self.total = trial.cfg.total_steps
        self.horizons = set(trial.cfg.horizon_steps)
        self.permanent = set(trial.cfg.checkpoint_steps)
        if trial.cfg.checkpoint_at_horizons:
            self.permanent |= self.horizons
        self.step, self.checked = 0, False
        self.initial_loss: float | None = None
        self.last_norm: float | None = None
        self.last_loss: float | None = None

    # ---- setup
    def open(self) -> dict[str, Any] | None:
        """Check the directory, find the start step and write config/provenance; return the
        final summary if the run already ended (nothing to do), else None.

        Raises:
            ConfigError: a directory made by another config, or a branch without its trunk's
                checkpoint.
        """
        done = _check_dir(self.cfg, self.out_dir)
        if done is not None:
            return done
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resume = max(_markers(self.out_dir / schema.CKPT_DIR), default=None)
        b = self.cfg.branch
        if resume is None and b is not None:
            if not (Path(b.run_dir) / schema.CKPT_DIR / _MARKER.format(b.step)).exists():
                raise ConfigError(
                    f"branch.run_dir = {b.run_dir!r}: no checkpoint for step {b.step}"
                )
        self.step = resume if resume is not None else b.step if b is not None else 0
        config = {**self.cfg.to_dict(), "schema_version": schema.SCHEMA_VERSION}
        _write_json(self.out_dir / schema.CONFIG_FILE, config)
        _write_json(self.out_dir / schema.PROVENANCE_FILE, _provenance(self.surface))
        (self.out_dir / schema.SUMMARY_FILE).unlink(missing_ok=True)
        _truncate_metrics(
            self.out_dir / schema.METRICS_FILE, self.step if resume is not None else None
        )
        self.initial_loss = self.model.train_loss(0, self.model.point(0))
        return None

    def log_steps(self, start: int, end: int) -> list[int]:
        """Logged steps in ``[start, end]``: every ``log_every``, the horizons and the last."""
        every = self.cfg.log_every
        steps = set(range(start + (-start) % every, end + 1, every))
        steps |= {h for h in self.horizons if start <= h <= end}
        if start <= self.total <= end:
            steps.add(self.total)
        if self.model.div_step is not None and start <= self.model.div_step <= end:
            steps.add(self.model.div_step)
        return sorted(steps)

    # ---- running
    def advance(self, until_step: int | None = None, stop: _Stop = None) -> dict[str, Any] | None:
        """Write the lines up to ``until_step`` (None: the end; a pause leaves no marker, so a
        process that dies paused resumes from its last checkpoint). ``stop`` is asked between
        lines; a reason ends the run ``interrupted`` at a marker. Returns the summary once the run
        ended (completed, diverged or interrupted), else None."""
        end = self.total if until_step is None else min(self.total, until_step)
        sleep_s = self.surface.sleep_s_per_step
        prev = self.step - 1  # the last step done (markers are due in (prev, step])
        with open(self.out_dir / schema.METRICS_FILE, "a", encoding="utf-8") as f:
            for step in self.log_steps(self.step, end):
                reason = stop() if stop is not None else None
                if reason is None and sleep_s > 0:
                    reason = _sleep((step - prev) * sleep_s, stop)
                if reason is not None and self.step < self.total:
                    return self._interrupt(reason)
                self._checkpoints(prev, step)
                diverged = self._line(f, step)
                prev, self.step = step, step + 1
                if diverged is not None:
                    return self._summary(Status.DIVERGED, step, diverged)
                if step == self.total:
                    return self._summary(Status.COMPLETED, step)
        return None

    def _line(self, f: Any, step: int) -> str | None:
        """Append the line of ``step``; return why the run diverged there, if it did."""
        m, cfg = self.model, self.cfg
        p = m.point(step)
        loss = m.train_loss(step, p)
        mult = m.multiplier(max(0, step - 1))
        o = cfg.optim
        step_time = self.surface.step_time_s
        rates = {"in": o.lr_in * mult, "hidden": o.lr_hidden * mult, "out": o.lr_out * mult}
        row: dict[str, Any] = {"step": step, "tokens": step * m.tps, "train_loss": loss}
        row |= {f"lr_{g}": r for g, r in rates.items()}
        # stand-ins for the norms the trainer also logs: fixed powers of the output norm
        row |= {name: 2.0 ** (p.x * a + b) for name, (a, b) in _OTHER_NORMS.items()}
        # the output layer's update has norm eta exactly; the hidden one ~1.13 eta (NS5)
        ups = {"in": 1.0, "hidden": 1.13, "out": 1.0}
        row |= {f"update_norm_{g}": (ups[g] * r if step else None) for g, r in rates.items()}
        row["grad_norm"] = p.loss / m.l0
        row["tokens_per_s"] = m.tps / step_time if step_time > 0 else None
        row |= {"step_time_s": step_time, "horizon": step in self.horizons}
        if step in self.horizons:
            row["val_loss"] = m.val_loss(step, p)
        if not self.checked:  # the schema's check of the keys, once per run
            self.checked = bool(metrics_line(**row))
        f.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")
        self.last_norm, self.last_loss = 2.0**p.x, loss
        assert self.initial_loss is not None  # set by open()
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if loss > self.initial_loss + cfg.diverge_margin:
            return (
                f"loss {loss:.4f} > initial loss {self.initial_loss:.4f} + diverge_margin "
                f"{cfg.diverge_margin}"
            )
        return None

    def _checkpoints(self, after: int, upto: int) -> None:
        """Markers due in ``(after, upto]``, pruned like the trainer's checkpoints."""
        every = self.cfg.checkpoint_every
        due = {s for s in self.permanent if after < s <= upto} if self.permanent else set()
        if every > 0 and upto // every > after // every:
            last = upto - upto % every
            keep = self.cfg.keep_checkpoints
            due |= {s for s in range(last, after, -every)[:keep] if s > 0}
        for s in sorted(due):
            self._marker(s)

    def _marker(self, step: int) -> None:
        ckpt = self.out_dir / schema.CKPT_DIR
        ckpt.mkdir(exist_ok=True)
        _write_json(ckpt / _MARKER.format(step), {"step": step, "simulator": True})
        _prune(ckpt, self.cfg.keep_checkpoints, self.permanent)

    def _interrupt(self, reason: str) -> dict[str, Any]:
        step = max(self.step, 1)
        self._marker(step)
        return self._summary(Status.INTERRUPTED, step, reason)

    def _summary(self, status: Status, step: int, reason: str | None = None) -> dict[str, Any]:
        start = self.cfg.branch.step if self.cfg.branch is not None else 0
        summary = Summary(
            status=status,
            step=step,
            tokens=step * self.model.tps,
            final_loss=self.last_loss,
            final_output_norm=self.last_norm,
            wall_time_s=(step - start) * self.surface.step_time_s,
            diverged_step=step if status == Status.DIVERGED else None,
            reason=reason,
        ).to_dict()
        _write_json(self.out_dir / schema.SUMMARY_FILE, summary)
        return summary


def _finite(v: Any) -> Any:
    return v if type(v) is not float or math.isfinite(v) else None


def _sleep(seconds: float, stop: _Stop) -> str | None:
    """Sleep in short slices, returning early with the stop reason if one comes."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.02, left))
        reason = stop() if stop is not None else None
        if reason is not None:
            return reason
    return None


# ------------------------------------------------------------------------------------ the files


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as the trainer's JSON files are written (temp file, ``os.replace``); no
    fsync: a simulated run is cheap to redo, and fsync would cost more than the simulation."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _provenance(surface: Surface) -> dict[str, Any]:
    """``provenance.json`` of a simulated run (deterministic: no clock, no git call)."""
    prov: dict[str, Any] = dict.fromkeys(("git_sha", "git_dirty", "torch", "cuda", "data"))
    return prov | {
        "python": platform.python_version(),
        "device": "sim",
        "device_name": "simulator (trainer.sim)",
        "world_size": 1,
        "hostname": socket.gethostname(),
        "threads": 1,
        "simulator": surface.to_dict(),
    }


def _check_dir(cfg: TrainConfig, out_dir: Path) -> dict[str, Any] | None:
    """Refuse a directory of another config; return its final summary if it has one."""
    config_file = out_dir / schema.CONFIG_FILE
    if config_file.exists():
        try:
            old = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
        old.pop("schema_version", None)
        mine = cfg.to_dict()
        for key in sorted(set(old) | set(mine)):
            if key not in ("threads", "device", "compile") and old.get(key) != mine.get(key):
                raise ConfigError(f"{key}: differs from {config_file} (a run directory belongs "
                                  "to one config)")  # fmt: skip
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((out_dir / schema.SUMMARY_FILE).read_text())
        if summary.get("status") in (Status.COMPLETED.value, Status.DIVERGED.value):
            return dict(summary)
    return None


def _markers(ckpt: Path) -> list[int]:
    names = [p.name for p in ckpt.iterdir()] if ckpt.is_dir() else []
    ok = [n for n in names if n[:5] == "step_" and n[13:] == ".json" and n[5:13].isdigit()]
    return sorted(int(n[5:13]) for n in ok)


def _prune(ckpt: Path, keep: int, permanent: set[int]) -> None:
    periodic = [s for s in _markers(ckpt) if s not in permanent]
    for s in periodic[: max(0, len(periodic) - keep)]:
        (ckpt / _MARKER.format(s)).unlink(missing_ok=True)


def _truncate_metrics(path: Path, resume_step: int | None) -> None:
    """Keep the lines before ``resume_step`` (a resumed run logs the rest again); None empties
    the file (a fresh start). A torn last line is dropped."""
    kept: list[str] = []
    if resume_step is not None and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row.get("step"), int) and row["step"] < resume_step:
                    kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ entry points


def simulate(
    trial: Mapping[str, Any] | Trial, out_dir: Path, *, stop: _Stop = None
) -> dict[str, Any]:
    """Run one simulated trial in-process to its end; return the summary (``summary.json``).

    Raises:
        ConfigError: a bad trial or run directory (nothing written).
    """
    parsed = trial if isinstance(trial, Trial) else Trial.from_dict(dict(trial))
    run = SimRun(parsed, out_dir)
    done = run.open()
    if done is not None:
        return done
    summary = run.advance(stop=stop)
    assert summary is not None  # advance() without until_step runs to an end
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.sim --run TRIAL.json --out RUN_DIR``; returns the trainer's exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.sim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--run", required=True, type=Path, help="TRIAL.json")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    reason: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        reason.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, on_signal)
    try:
        raw = json.loads(args.run.read_text())
        summary = simulate(
            Trial.from_dict(raw), args.out, stop=lambda: reason[0] if reason else None
        )
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {args.run}: {e}", file=sys.stderr)
        return schema.EXIT_CONFIG
    return schema.EXIT_BY_STATUS[Status(summary["status"])]


if __name__ == "__main__":
    sys.exit(main())
