"""The training loop: ``train(cfg, out_dir) -> summary``, data-parallel under torchrun.

One iteration at step ``s`` (optimizer steps done) runs forward and backward on batch ``s`` with the
weights ``W_s``, logs line ``s`` (loss of ``W_s`` on a batch it has not seen, norms of ``W_s``, the
update that produced ``W_s``), checks divergence, and, unless ``s`` is the last step, updates to
``W_{s+1}`` and checkpoints there when due. The step-0 line is therefore the loss before any update,
and every quantity on a line refers to the same weights.

A checkpoint at step ``s`` is written before line ``s``, so a resumed run drops metrics lines from
``s`` on and logs them again: on CPU the result is bit-identical to a run never interrupted, since
the batch and the schedule are pure functions of the step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    save_checkpoint,
)
from trainer.config import SCHEMA_VERSION, ConfigError, TrainConfig
from trainer.data import BatchSource, DataError, check_enough, open_data, validation_windows
from trainer.metrics import MetricsWriter, grad_norm, weight_norms, write_json
from trainer.model import Transformer
from trainer.optim import build_optimizer
from trainer.runtime import (
    DistEnv,
    StopFlag,
    configure_threads,
    dist_env_from_environ,
    init_process_group,
    provenance,
)
from trainer.schedule import lr_multiplier
from trainer.schema import CONFIG_FILE, METRICS_FILE, PROVENANCE_FILE, SUMMARY_FILE, Status, Summary

log = logging.getLogger("trainer")

# Keys that may differ between the attempts of one run: they change speed, not results.
_VOLATILE_KEYS = {"threads", "device", "compile"}
_FINAL_STATES = {"completed", "diverged"}


# ---------------------------------------------------------------------------------------- run dir


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if not where and key in _VOLATILE_KEYS:
                continue
            diff = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    return None if a == b else where or "config"


def check_run_dir(cfg: TrainConfig, out_dir: Path) -> dict[str, Any] | None:
    """Refuse a run directory made by a different config; return its final summary if it has one."""
    config_file = out_dir / CONFIG_FILE
    if config_file.exists():
        try:
            old = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
        old.pop("schema_version", None)
        key = _first_difference(old, cfg.to_dict())
        if key:
            raise ConfigError(
                f"{key}: differs from {config_file} (a run directory belongs to one config; "
                "use a new directory or a branch)"
            )
    summary_file = out_dir / SUMMARY_FILE
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("status") in _FINAL_STATES:
            return summary
    return None


# --------------------------------------------------------------------------------------- training


@dataclass
class _Start:
    step: int
    state: dict[str, Any] | None  # checkpoint to load, None for a fresh start
    resumed: bool  # from this run's own checkpoint (metrics are kept up to ``step``)


class Trainer:
    """One run in one process (one rank). Use :func:`train`."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, env: DistEnv) -> None:
        self.cfg, self.out_dir, self.env = cfg, out_dir, env
        self.ckpt_dir = out_dir / "ckpt"
        self.total_steps = cfg.total_steps
        self.horizons = set(cfg.horizon_steps)
        self.permanent = set(cfg.checkpoint_steps)
        if cfg.checkpoint_at_horizons:
            self.permanent |= self.horizons
        shards = open_data(cfg.data, cfg.model.vocab_size)
        self.source = BatchSource(shards.train, cfg.model.seq_len, cfg.batch_size, cfg.seed)
        # the last step's line needs one more batch (the loss of the final weights)
        check_enough(self.source, self.total_steps + 1, shards.path, cfg.data.allow_repeat)
        self.data_provenance = shards.provenance()  # manifest path, hash, tokenizer, counts
        self.val = validation_windows(shards.val, cfg.model.seq_len, cfg.val_tokens)
        self.start = self._find_start()
        self.per_rank = cfg.batch_size // env.world_size
        self.micro = cfg.micro_batch_size or self.per_rank
        amp = cfg.precision == "bfloat16" or (cfg.precision == "auto" and env.device.type == "cuda")
        self.autocast = (
            (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16))
            if amp
            else contextlib.nullcontext
        )

    # ---- setup
    def _find_start(self) -> _Start:
        latest = load_latest(self.ckpt_dir)
        if latest is not None:
            return _Start(latest[0], latest[1], resumed=True)
        branch = self.cfg.branch
        if branch is None:
            return _Start(0, None, resumed=False)
        path = checkpoint_path(Path(branch.run_dir) / "ckpt", branch.step)
        if not path.exists():
            raise ConfigError(
                f"branch.run_dir = {branch.run_dir!r}: no checkpoint for step "
                f"{branch.step} ({path} is missing)"
            )
        try:
            state = load_checkpoint(path)
        except Exception as e:  # an unreadable trunk checkpoint is bad input, not a crash
            raise ConfigError(f"branch: cannot load {path} ({type(e).__name__})") from None
        trunk = state.get("config", {})
        mine = self.cfg.to_dict()
        for section in ("model", "optim"):
            key = _first_difference(trunk.get(section, {}), mine[section], section)
            if key and (section == "model" or key == "optim.name"):
                raise ConfigError(f"branch: {key} differs from the trunk's ({path})")
        return _Start(branch.step, state, resumed=False)

    def _build(self) -> None:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.model = Transformer(cfg.model).to(env.device)
        # Scion and the Adam variants of trainer.optim: they also track update norms
        self.optimizer: Any = build_optimizer(self.model, cfg.optim, env.device.type)
        self.initial_loss: float | None = None
        self.pending_update_norms: dict[str, float] | None = None
        self.wall_before = 0.0
        if self.start.state is not None:
            self._load(self.start.state)
            self.start.state = None  # the weights now live in the model; free the copy
        fwd: Any = self.model  # the module, its DDP wrapper, or their compiled form
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            fwd = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.ddp: Any = fwd if env.distributed else None
        if cfg.compile and env.device.type == "cuda":
            fwd = torch.compile(fwd)
        elif cfg.compile:
            log.info("compile = true is ignored on %s", env.device)
        self.fwd = fwd

    def _load(self, state: dict[str, Any]) -> None:
        data = state.get("data", {})
        if self.start.resumed and data.get("n_windows") != self.source.windows.n_windows:
            raise DataError(
                f"data: the corpus changed since the checkpoint ({data.get('n_windows')} "
                f"windows then, {self.source.windows.n_windows} now)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.env.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.env.device)
        self.initial_loss = state.get("initial_loss")
        self.pending_update_norms = state.get("pending_update_norms")
        self.wall_before = float(state.get("wall_time_s", 0.0)) if self.start.resumed else 0.0

    def _state(self, step: int, wall_s: float) -> dict[str, Any]:
        cuda_rng = (
            torch.cuda.get_rng_state(self.env.device) if self.env.device.type == "cuda" else None
        )
        return {
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "cuda": cuda_rng},
            "initial_loss": self.initial_loss,
            "pending_update_norms": self.pending_update_norms,
            "data": {
                "seed": self.cfg.seed,
                "n_windows": self.source.windows.n_windows,
                "batch_size": self.cfg.batch_size,
                "seq_len": self.cfg.model.seq_len,
            },
            "wall_time_s": wall_s,
            "config": self.cfg.to_dict(),
        }

    def _write_run_files(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            self.out_dir / CONFIG_FILE, {**self.cfg.to_dict(), "schema_version": SCHEMA_VERSION}
        )
        write_json(
            self.out_dir / PROVENANCE_FILE, {**provenance(self.env), "data": self.data_provenance}
        )
        (self.out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # an old "interrupted" one

    # ---- one step
    def _forward_backward(self, step: int) -> torch.Tensor:
        """Accumulate gradients of the global batch at ``step``; return this rank's mean loss."""
        n_micro = self.per_rank // self.micro
        total = torch.zeros((), device=self.env.device)
        for m in range(n_micro):
            x, y = self.source.batch(step, self.env.rank, self.env.world_size, m, self.micro)
            x, y = (
                x.to(self.env.device, non_blocking=True),
                y.to(self.env.device, non_blocking=True),
            )
            sync = self.ddp is None or m == n_micro - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    logits = self.fwd(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / n_micro).backward()
            total += loss.detach()
        return total / n_micro

    def _reduce(self, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """Global mean loss and whether any rank was asked to stop (one all-reduce)."""
        packed = torch.stack([loss.float(), torch.tensor(float(stop), device=loss.device)])
        if self.env.distributed:
            dist.all_reduce(packed)
            packed[0] /= self.env.world_size
        loss_value, stop_value = packed.tolist()
        return loss_value, stop_value > 0

    @torch.no_grad()
    def _val_loss(self) -> float:
        """Mean loss over the validation windows, split across ranks."""
        n = self.val.n_windows
        positions = torch.arange(self.env.rank, n, self.env.world_size).numpy()
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for i in range(0, len(positions), self.micro):
            x, y = self.val.rows(positions[i : i + self.micro])
            x, y = x.to(self.env.device), y.to(self.env.device)
            with self.autocast():
                logits = self.model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            sums += torch.stack(
                [
                    loss.double(),
                    torch.tensor(y.numel(), dtype=torch.float64, device=self.env.device),
                ]
            )
        if self.env.distributed:
            dist.all_reduce(sums)
        return float(sums[0] / sums[1])

    def _set_lr(self, step: int) -> float:
        mult = lr_multiplier(self.cfg.schedule, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        return mult

    def _group_lrs(self, step: int) -> dict[str, float | None]:
        """LRs of the update that produced ``W_step`` (of the first update at step 0)."""
        mult = lr_multiplier(self.cfg.schedule, max(0, step - 1), self.total_steps)
        lrs = {g.get("role"): g["base_lr"] * mult for g in self.optimizer.param_groups}
        return {f"lr_{r}": lrs.get(r) for r in ("in", "hidden", "out")}

    def _is_log_step(self, step: int) -> bool:
        return (
            step % self.cfg.log_interval == 0
            or step == self.total_steps
            or self._is_val_step(step)  # horizons included
        )

    def _is_val_step(self, step: int) -> bool:
        every = self.cfg.val_interval
        return step in self.horizons or (every is not None and step % every == 0)

    def _checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return step in self.permanent or (every > 0 and step % every == 0)

    # ---- the loop
    def run(self, stop: StopFlag) -> dict[str, Any]:
        """Train from the start point to the last horizon (or a stop); return the summary."""
        self._build()
        env, cfg = self.env, self.cfg
        writer = None
        if env.is_main:
            self._write_run_files()
            writer = MetricsWriter(
                self.out_dir / METRICS_FILE, self.start.step if self.start.resumed else None
            )
        t0 = time.time()
        step = self.start.step
        log.info(
            "%s at step %d of %d (%d tokens/step, world size %d, %s)",
            "resuming" if self.start.resumed else "starting",
            step,
            self.total_steps,
            cfg.tokens_per_step,
            env.world_size,
            env.device,
        )
        mark, steps_since, last_norms = time.time(), 0, {}
        try:
            while True:
                loss_t = self._forward_backward(step)
                loss, stop_now = self._reduce(loss_t, stop.reason is not None)
                if self.initial_loss is None:
                    self.initial_loss = loss
                diverged = self._divergence(loss)
                gnorm = self._grad_norm(step, diverged)
                if self._is_log_step(step) or diverged:
                    now = time.time()
                    step_time = (now - mark) / max(1, steps_since)
                    last_norms = self._log_line(writer, step, loss, gnorm, step_time)
                    mark, steps_since = now, 0
                if diverged:
                    return self._finish("diverged", step, loss, last_norms, t0, reason=diverged)
                if step == self.total_steps:
                    return self._finish("completed", step, loss, last_norms, t0)
                self._set_lr(step)
                self.optimizer.track_norms = self._is_log_step(step + 1)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_since += 1
                self.pending_update_norms = (
                    dict(self.optimizer.last_update_norms) if self.optimizer.track_norms else None
                )
                if self._checkpoint_due(step) or stop_now:
                    self._save(step, t0)
                if stop_now:
                    reason = stop.reason or "signal on another rank"
                    log.info("%s: checkpointed at step %d, exiting", reason, step)
                    return self._finish("interrupted", step, loss, last_norms, t0, reason=reason)
        finally:
            if writer is not None:
                writer.close()

    def _divergence(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        assert self.initial_loss is not None
        if loss > self.initial_loss + self.cfg.diverge_margin:
            return (
                f"loss {loss:.4f} > initial loss {self.initial_loss:.4f} + diverge_margin "
                f"{self.cfg.diverge_margin}"
            )
        return None

    def _grad_norm(self, step: int, diverged: str | None) -> float | None:
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        elif self._is_log_step(step) or diverged:
            norm = grad_norm(self.model)
        else:
            return None
        return float(norm)

    def _log_line(
        self,
        writer: MetricsWriter | None,
        step: int,
        loss: float,
        gnorm: float | None,
        step_time: float,
    ) -> dict[str, float]:
        horizon = step in self.horizons
        val = self._val_loss() if self._is_val_step(step) else None  # every rank takes part
        if writer is None:
            return {}
        norms = weight_norms(self.model)
        upd = self.pending_update_norms or {}
        row: dict[str, Any] = {
            "step": step,
            "tokens": step * self.cfg.tokens_per_step,
            "train_loss": loss,
            **self._group_lrs(step),
            **norms,
            "update_norm_in": upd.get("in"),
            "update_norm_hidden": upd.get("hidden"),
            "update_norm_out": upd.get("out"),
            "grad_norm": gnorm,
            "tokens_per_s": self.cfg.tokens_per_step / step_time if step_time > 0 else None,
            "step_time_s": step_time,
            "horizon": horizon,
        }
        if val is not None:
            row["val_loss"] = val
        writer.write(row)
        log.info(
            "step %d  loss %.4f  output_norm %.3g%s",
            step,
            loss,
            norms["output_norm"],
            f"  val_loss {val:.4f}" if val is not None else "",
        )
        return norms

    def _save(self, step: int, t0: float) -> None:
        if not self.env.is_main:
            return
        save_checkpoint(self.ckpt_dir, step, self._state(step, self.wall_before + time.time() - t0))
        prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints, self.permanent.__contains__)

    def _finish(
        self,
        status: str,
        step: int,
        loss: float,
        norms: dict[str, float],
        t0: float,
        reason: str | None = None,
    ) -> dict[str, Any]:
        summary = Summary(
            status=Status(status),
            step=step,
            tokens=step * self.cfg.tokens_per_step,
            final_loss=loss,
            final_output_norm=norms.get("output_norm"),
            wall_time_s=self.wall_before + time.time() - t0,
            diverged_step=step if status == "diverged" else None,
            reason=reason,
        ).to_dict()
        if self.env.is_main:
            write_json(self.out_dir / SUMMARY_FILE, summary)
            log.info(
                "%s at step %d (loss %.4f)%s", status, step, loss, f": {reason}" if reason else ""
            )
        if self.env.distributed:
            dist.barrier()  # rank 0's files are complete before any rank exits
        return summary


def train(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Train one run into ``out_dir``, resuming from its newest valid checkpoint.

    Works in-process and under torchrun (every rank calls it). Everything that can be checked
    before step 0 is (config against the world size and the run directory, corpus size and
    vocabulary, the branch checkpoint); such errors raise :class:`~trainer.config.ConfigError`
    before anything is written. SIGTERM and SIGUSR2 checkpoint and return status ``interrupted``.

    Args:
        cfg: The validated run configuration.
        out_dir: The run directory.

    Returns:
        The summary also written to ``summary.json``: ``status`` (``completed``, ``diverged`` or
        ``interrupted``), ``step``, ``tokens``, ``final_loss``, ``final_output_norm``,
        ``wall_time_s``, ``diverged_step``, ``reason``.
    """
    env = dist_env_from_environ(cfg)
    cfg.validate(world_size=env.world_size)
    out_dir = Path(out_dir)
    done = check_run_dir(cfg, out_dir)
    if done is not None:
        log.info("%s already %s at step %s; nothing to do", out_dir, done["status"], done["step"])
        return done
    configure_threads(cfg, env)
    owns_group = init_process_group(env)
    try:
        with StopFlag() as stop:
            return Trainer(cfg, out_dir, env).run(stop)
    finally:
        if owns_group:
            dist.destroy_process_group()
