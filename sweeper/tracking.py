"""Tracking mirrors: each run's metrics copied to TensorBoard and/or W&B as they arrive.

::

    [tracking]
    tensorboard = true                              # <run_dir>/tb/
    wandb = {project = "scaling", mode = "offline"}  # <run_dir>/wandb/; `wandb sync` later
    poll_s = 2.0                                    # how often metrics.jsonl is read

The worker mirrors, not the trainer: a thread beside the heartbeat (:func:`start_mirror`,
:func:`stop_mirror`) tails the run's ``metrics.jsonl`` (read through ``trainer.schema``), so every
trainer, an external one included, is mirrored the same way, and a slow or failing tracker never
touches the training loop. One tracker run per sweep run, with the run id as the tracker's id, so a
requeued or resumed run continues it. A tracker that fails writes one line to the run's
``stderr.log`` and the run goes on. Why and how: docs/tracking.md.

``tensorboard`` and ``wandb`` are the optional extra ``sweeper[tracking]``; :func:`parse_section`
refuses a section naming a missing one at plan time, and they are imported only by the thread.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from sweeper.errors import SpecError
from sweeper.fsutil import write_json_atomic
from sweeper.records import RunRecord
from sweeper.store import open_in_run_dir
from trainer.schema import FLOAT_METRICS, METRICS_FILE, parse_metrics_line

SECTION = "tracking"
TB_DIR = "tb"  # <run_dir>/tb/: `tensorboard --logdir results/<sweep>/runs`
WANDB_DIR = "wandb"  # made by wandb under <run_dir>
STATE_FILE = "tracking.json"  # the last step each mirror holds
STDERR = "stderr.log"
STOP_TIMEOUT_S = 60.0
MAX_READ = 16 << 20  # bytes of metrics.jsonl read per poll
INSTALL = "pip install 'sweeper[tracking]'"
WANDB_MODES = ("offline", "online")
WANDB_ID_MAX = 64


# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """``[tracking] wandb = {...}``."""

    project: str
    mode: str = "offline"
    entity: str | None = None
    group: str | None = None  # default: the sweep name
    tags: tuple[str, ...] = ()  # added to model:/B:/lr:/D:

    def to_dict(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "mode": self.mode,
            "entity": self.entity,
            "group": self.group,
            "tags": list(self.tags),
        }


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """``[tracking]``: which mirrors the worker writes."""

    tensorboard: bool = False
    wandb: WandbConfig | None = None
    poll_s: float = 2.0
    # Observing a run does not change what it trains: a planner that honours this leaves the
    # section out of run ids, so turning tracking on keeps a sweep's runs.
    in_run_id: ClassVar[bool] = False

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.wandb is not None

    def run_params(self) -> dict[str, Any]:
        """``params["tracking"]`` of every record: how the worker finds the settings."""
        return {
            "tensorboard": self.tensorboard,
            "wandb": self.wandb.to_dict() if self.wandb else None,
            "poll_s": self.poll_s,
        }

    @classmethod
    def from_params(cls, raw: Any) -> TrackingConfig | None:
        """The config from a record's ``params["tracking"]`` (None if absent).

        Raises:
            SpecError: the params do not hold a valid section.
        """
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise SpecError("run.json", f"params.{SECTION}", raw, "expected an object")
        table = {k: v for k, v in raw.items() if v is not None}
        return parse_section(table, "run.json", check_installed=False)


def parse_section(
    table: dict[str, Any], file: str, *, check_installed: bool = True
) -> TrackingConfig:
    """Validate ``[tracking]``; a mirror whose package is missing is refused here, at plan time.

    Raises:
        SpecError: an unknown key, a bad value, or a missing package (one line naming the key).
    """
    known = ("poll_s", "tensorboard", "wandb")
    for key in sorted(set(table) - set(known)):
        raise SpecError(
            file, f"{SECTION}.{key}", table[key], f"unknown key (known: {', '.join(known)})"
        )
    tb = table.get("tensorboard", False)
    if not isinstance(tb, bool):
        raise SpecError(file, f"{SECTION}.tensorboard", tb, "expected true or false")
    poll = table.get("poll_s", 2.0)
    if isinstance(poll, bool) or not isinstance(poll, int | float) or not 0.05 <= poll <= 3600:
        raise SpecError(
            file, f"{SECTION}.poll_s", poll, "must be a number of seconds in 0.05..3600"
        )
    wandb = _wandb(table.get("wandb", False), file)
    if check_installed:
        for key, package, on in (("tensorboard", "tensorboard", tb), ("wandb", "wandb", wandb)):
            if on and not _installed(package):
                raise SpecError(
                    file,
                    f"{SECTION}.{key}",
                    message=f"the {package} package is not installed ({INSTALL})",
                )
    return TrackingConfig(tensorboard=tb, wandb=wandb, poll_s=float(poll))


def _wandb(raw: Any, file: str) -> WandbConfig | None:
    key = f"{SECTION}.wandb"
    if raw is False:
        return None
    if not isinstance(raw, dict):
        raise SpecError(file, key, raw, 'expected {project = ..., mode = "offline" | "online"}')
    known = ("entity", "group", "mode", "project", "tags")
    for k in sorted(set(raw) - set(known)):
        raise SpecError(file, f"{key}.{k}", raw[k], f"unknown key (known: {', '.join(known)})")
    for k in ("project", "entity", "group"):
        v = raw.get(k)
        if (v is not None or k == "project") and not _name(v):
            raise SpecError(
                file, f"{key}.{k}", v, "expected a name (1..128 characters, no / \\ # ? % :)"
            )
    mode = raw.get("mode", "offline")
    if mode not in WANDB_MODES:
        raise SpecError(file, f"{key}.mode", mode, f"expected one of {', '.join(WANDB_MODES)}")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or len(tags) > 20 or not all(_name(t, 64) for t in tags):
        raise SpecError(file, f"{key}.tags", tags, "expected at most 20 names of <= 64 characters")
    return WandbConfig(
        project=raw["project"],
        mode=mode,
        entity=raw.get("entity"),
        group=raw.get("group"),
        tags=tuple(tags),
    )


def _name(value: Any, limit: int = 128) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and not set("/\\#?%:\n") & set(value)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------ what a tracker run holds


def run_hparams(record: RunRecord) -> dict[str, Any]:
    """The run's hyperparameters as flat scalars (TensorBoard's HParams, W&B's config)."""
    t = record.train
    o, m = t.optim, t.model
    hp: dict[str, Any] = {
        "run_id": record.id,
        "slug": record.slug,
        "sweep": record.sweep,
        "model": record.model,
        "kind": record.kind.value,
        "source": record.source,
        "lr": o.lr,
        "lr_in": o.lr_in,
        "lr_hidden": o.lr_hidden,
        "lr_out": o.lr_out,
        "batch_size": t.batch_size,
        "seed": t.seed,
        "tokens": t.max_tokens,
        "steps": t.total_steps,
        "tokens_per_step": t.tokens_per_step,
        "horizons_tokens": ",".join(str(d) for d in t.horizons_tokens),
        "seq_len": m.seq_len,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "schedule": t.schedule.kind,
        "warmup_steps": t.schedule.warmup_steps,
        "optimizer": o.name,
        "momentum": o.momentum,
        "weight_decay": o.weight_decay,
        "flops": record.flops,
    }
    trainer = (record.params or {}).get("trainer")
    axes = trainer.get("axes") if isinstance(trainer, dict) else None
    if isinstance(axes, dict):
        hp.update({f"axis.{k}": v for k, v in axes.items() if isinstance(v, str | int | float)})
    return hp


def run_tags(record: RunRecord) -> list[str]:
    """``model:<name>``, ``B:<batch>``, ``lr:<2^-6>``, ``D:<2^20>`` (the largest budget)."""
    return [
        f"model:{record.model}",
        f"B:{record.batch_size}",
        f"lr:{_pow2(record.lr)}",
        f"D:{_pow2(record.train.max_tokens)}",
    ]


def _pow2(x: float) -> str:
    e = math.log2(x)
    if abs(2 * e - round(2 * e)) < 1e-9:
        return f"2^{round(2 * e) / 2:g}"
    return f"{x:.4g}"


def tracker_id(run_id: str) -> str:
    """The tracker's run id: the run id itself, or, past 64 characters, its first 55 and a hash."""
    if len(run_id) <= WANDB_ID_MAX:
        return run_id
    return f"{run_id[:55]}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    out = {k: row[k] for k in FLOAT_METRICS if row.get(k) is not None}
    out["tokens"] = float(row["tokens"])
    return out


# ----------------------------------------------------------------------------------------- sinks


class _Sink(Protocol):
    name: str
    last: int  # the last step this tracker holds; -1 for none

    def write(self, rows: list[dict[str, Any]]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _TensorBoard:
    """``<run_dir>/tb/`` through ``torch.utils.tensorboard``'s ``SummaryWriter``."""

    name = "tensorboard"

    def __init__(self, record: RunRecord, run_dir: Path, last: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = run_dir / TB_DIR
        if log_dir.is_symlink():
            raise OSError(f"{log_dir} is a symlink; refused")
        existing = log_dir.is_dir() and any(
            p.name.startswith("events.out.tfevents.") for p in log_dir.iterdir()
        )
        # Continuing: every event past the last step we know of is purged (an attempt killed
        # before its state was saved), and those steps are mirrored again from metrics.jsonl.
        purge = last + 1 if existing else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)
        self.last = last
        if purge is None or purge == 0:
            hp = {k: v for k, v in run_hparams(record).items() if isinstance(v, int | float | str)}
            metrics = {"train_loss": 0.0, "val_loss": 0.0, "output_norm": 0.0}
            file_writer = self.writer.file_writer
            assert file_writer is not None  # made by SummaryWriter.__init__
            for summary in hparams(hp, metrics):
                file_writer.add_summary(summary)
            self.writer.add_text("tags", ", ".join(run_tags(record)), 0)

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["step"] > self.last:
                for key, value in _scalars(row).items():
                    self.writer.add_scalar(key, value, row["step"])
                self.last = row["step"]

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """One W&B run per sweep run (``id`` = the run id, ``resume="allow"``)."""

    name = "wandb"

    def __init__(self, cfg: WandbConfig, record: RunRecord, run_dir: Path, last: int) -> None:
        import wandb

        if (run_dir / WANDB_DIR).is_symlink():
            raise OSError(f"{run_dir / WANDB_DIR} is a symlink; refused")
        wid = tracker_id(record.id)
        _next_offline_second(run_dir / WANDB_DIR, wid)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or record.sweep,
            name=record.slug,
            id=wid,
            resume="allow",
            dir=str(run_dir),
            mode=cfg.mode,  # type: ignore[arg-type]
            config={**run_hparams(record), "train": record.train.to_dict()},
            tags=[*run_tags(record), *cfg.tags],
            reinit="create_new",  # several runs in one worker process (local backend)
            settings=wandb.Settings(
                silent=True,
                console="off",  # never wrap the worker's stdout
                disable_git=True,
                save_code=False,
                x_disable_stats=True,
                x_disable_meta=True,
            ),
        )
        self.last = last

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["step"] > self.last:
                self.run.log(_scalars(row), step=row["step"])
                self.last = row["step"]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def _next_offline_second(wandb_dir: Path, wid: str) -> None:
    """Offline run directories are named by the second they start in: wait out a second that
    already has one for this id (an attempt that ended within the same second)."""
    for _ in range(30):
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        if not (wandb_dir / f"offline-run-{stamp}-{wid}").exists():
            return
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------- tail


class _Tail:
    """Complete lines appended to a file that its writer may replace or truncate (a resumed
    trainer rewrites ``metrics.jsonl`` without the lines it is about to log again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inode: int | None = None
        self.offset = 0
        self.partial = b""

    def read(self) -> list[bytes]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_ino != self.inode or st.st_size < self.offset:
                self.inode, self.offset, self.partial = st.st_ino, 0, b""
            f.seek(self.offset)
            data = f.read(MAX_READ)
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return lines


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        return parse_metrics_line(json.loads(line))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------- mirror


class Mirror:
    """The thread that mirrors one attempt of a run (see :func:`start_mirror`)."""

    def __init__(self, record: RunRecord, run_dir: Path, config: TrackingConfig) -> None:
        self.record, self.run_dir, self.config = record, run_dir, config
        self.tail = _Tail(run_dir / METRICS_FILE)
        self.state = self._load_state()
        self._saved = dict(self.state)
        if not (run_dir / METRICS_FILE).exists() and self.state.get(_TensorBoard.name, -1) >= 0:
            # restarted from step 0 (`resume --restart` deleted the metrics): TensorBoard purges
            # everything; W&B cannot rewind a run and keeps the steps it has.
            self.state[_TensorBoard.name] = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"mirror-{record.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Mirror what is left of ``metrics.jsonl``, close the trackers and end the thread (or
        leave it behind after ``timeout`` seconds, with a line in ``stderr.log``)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.log(f"still closing after {timeout:g} s; left behind")

    def log(self, message: str) -> None:
        """One line in the run's ``stderr.log`` (never raises)."""
        log_line(self.run_dir, message)

    def _main(self) -> None:
        try:
            sinks = self._open()
            while sinks:
                stopping = self._stop.wait(self.config.poll_s)
                sinks = self._pump(sinks)
                if stopping:
                    break
            for sink in sinks:
                self._guard(sink, sink.close)
        except Exception as e:  # noqa: BLE001 - a mirror must never take the worker down
            self.log(f"{type(e).__name__}: {e}")

    def _open(self) -> list[_Sink]:
        sinks: list[_Sink] = []
        cfg, rec, rd = self.config, self.record, self.run_dir
        openers: list[tuple[str, Any]] = []
        if cfg.tensorboard:
            openers.append((_TensorBoard.name, lambda last: _TensorBoard(rec, rd, last)))
        if cfg.wandb is not None:
            wb = cfg.wandb
            openers.append((_Wandb.name, lambda last: _Wandb(wb, rec, rd, last)))
        for name, opener in openers:
            try:
                sinks.append(opener(self.state.get(name, -1)))
            except Exception as e:  # noqa: BLE001 - missing package, bad credentials, ...
                self.log(f"{name}: cannot start ({type(e).__name__}: {e}); not mirrored")
        return sinks

    def _pump(self, sinks: list[_Sink]) -> list[_Sink]:
        """Mirror the new lines; return the sinks still working."""
        rows = [row for row in map(_parse, self.tail.read()) if row is not None]
        if not rows:
            return sinks
        alive = []
        for sink in sinks:
            if self._guard(sink, sink.write, rows) and self._guard(sink, sink.flush):
                alive.append(sink)
                self.state[sink.name] = sink.last
            else:
                with contextlib.suppress(Exception):
                    sink.close()  # what it holds so far, best effort
        if self.state != self._saved:
            with contextlib.suppress(OSError):
                write_json_atomic(self.run_dir / STATE_FILE, self.state)
                self._saved = dict(self.state)
        return alive

    def _guard(self, sink: _Sink, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - one line in stderr.log, the run goes on
            self.log(f"{sink.name}: {type(e).__name__}: {e}; mirroring stopped")
            return False

    def _load_state(self) -> dict[str, int]:
        try:
            raw = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict):
            return {}
        return {k: v for k, v in raw.items() if isinstance(k, str) and type(v) is int}


def start_mirror(record: RunRecord, run_dir: str | Path) -> Mirror | None:
    """Start mirroring a run's metrics if its record asks for it (``params["tracking"]``).

    Never raises: a bad setting becomes a line in ``stderr.log`` and no mirror.
    """
    raw = (record.params or {}).get(SECTION)
    if raw is None:
        return None
    try:
        config = TrackingConfig.from_params(raw)
        if config is None or not config.enabled:
            return None
        mirror = Mirror(record, Path(run_dir), config)
        mirror.start()
        return mirror
    except Exception as e:  # noqa: BLE001 - tracking never fails a run
        log_line(Path(run_dir), f"{type(e).__name__}: {e}; not mirrored")
        return None


def stop_mirror(mirror: Mirror | None, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop a mirror from :func:`start_mirror` (None: nothing to do). Never raises."""
    if mirror is not None:
        with contextlib.suppress(Exception):
            mirror.stop(timeout)


def log_line(run_dir: Path, message: str) -> None:
    """Append ``sweeper: tracking: <message>`` as one line to the run's ``stderr.log``; never
    raises."""
    line = f"sweeper: tracking: {' '.join(str(message).split())[:400]}\n"
    with contextlib.suppress(OSError):
        fd = open_in_run_dir(run_dir, STDERR, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)
