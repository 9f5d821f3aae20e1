"""The trainer contract (``trainer/schema.py``) for a trainer of your own, in three lines.

A sweep can run any training script (a ``[trainer]`` command in the spec, see
docs/external-trainers.md) as long as it leaves its run directory in the shape ``sweeper collect``
reads: ``metrics.jsonl`` lines, a ``summary.json`` written last, the exit codes, and a checkpoint
followed by exit 75 on SIGTERM/SIGUSR2. :class:`RunWriter` writes all of it::

    from sweeper.contract import RunWriter

    w = RunWriter(args.out, start_step=step, on_stop=save_checkpoint)  # resumed: keeps lines < step
    ...  # after each optimizer step:
    w.log(step=step, tokens=step * tokens_per_step, train_loss=loss, output_norm=norm)
    sys.exit(w.finish("completed"))  # or "diverged"; returns the exit code to use

Everything goes through ``trainer.schema``, which imports no torch; this module imports nothing of
the sweeper beyond its atomic file write, so a script depends only on this package being installed.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from sweeper.fsutil import write_json_atomic
from trainer.schema import (
    EXIT_BY_STATUS,
    METRICS_FILE,
    PROVENANCE_FILE,
    SUMMARY_FILE,
    SchemaError,
    Status,
    Summary,
    clean_float,
    metrics_line,
)

__all__ = ["STOP_SIGNALS", "RunWriter", "SchemaError"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class RunWriter:
    """Writes one attempt of a run into ``out_dir`` following ``trainer/schema.py``.

    Args:
        out_dir: The run directory (the ``{out_dir}`` placeholder); created if missing.
        start_step: The step this attempt starts from: 0 for a fresh run, the checkpoint's step
            when resuming. Metrics lines at or after it are dropped first (this attempt logs them
            again), so the file ends up equal to an uninterrupted run's.
        on_stop: Called with the last logged step when SIGTERM or SIGUSR2 arrived, at the next
            :meth:`log` or :meth:`check_stop` (a step boundary, never mid-update); it should save a
            checkpoint. The writer then records ``interrupted`` and exits with code 75. Without
            it no handler is installed (the signal kills the process; the sweep still resumes
            from the last checkpoint).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        start_step: int = 0,
        on_stop: Callable[[int], object] | None = None,
    ) -> None:
        if type(start_step) is not int or start_step < 0:
            raise SchemaError(f"start_step = {start_step!r}: expected an integer >= 0")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.start_step = start_step
        self._t0 = time.monotonic()
        self._wall_before = self._previous_wall_time() if start_step > 0 else 0.0
        (self.out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # an old "interrupted" one
        self.last: dict[str, Any] | None = None  # the last line written (or kept)
        self._keep_lines_before(start_step)
        self._file = open(self.out_dir / METRICS_FILE, "a")  # noqa: SIM115 - open for the run
        self._write_provenance()
        self._on_stop = on_stop
        self._stop_signal: str | None = None
        if on_stop is not None:
            self._install_handlers()

    # ---- metrics
    def log(self, **values: Any) -> None:
        """Append one metrics line (keys of ``trainer.schema.METRICS``; ``step`` and ``tokens``
        required, ``step`` increasing) and flush it; then honour a pending stop signal.

        Raises:
            SchemaError: an unknown key, a missing ``step``/``tokens``, or a step not after the
                previous line's.
        """
        line = metrics_line(**values)
        step, tokens = line["step"], line["tokens"]
        if type(step) is not int or type(tokens) is not int or step < 0 or tokens < 0:
            raise SchemaError(f"metrics: step = {step!r}, tokens = {tokens!r}: integers >= 0")
        if self.last is not None and step <= self.last["step"]:
            raise SchemaError(f"metrics: step {step} is not after the last step logged")
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.last = line
        self.check_stop(step)

    @property
    def stop_requested(self) -> bool:
        """True once SIGTERM or SIGUSR2 arrived (only with ``on_stop``)."""
        return self._stop_signal is not None

    def check_stop(self, step: int | None = None) -> None:
        """At a step boundary: if a stop signal arrived, call ``on_stop(step)`` (default: the
        last logged step), write an ``interrupted`` summary and exit with code 75."""
        if self._stop_signal is None or self._on_stop is None:
            return
        if step is None:
            step = self.last["step"] if self.last else self.start_step
        self._on_stop(step)
        tokens = self.last["tokens"] if self.last and self.last["step"] == step else None
        code = self.finish(Status.INTERRUPTED, step=step, tokens=tokens, reason=self._stop_signal)
        raise SystemExit(code)

    # ---- the outcome
    def finish(
        self,
        status: str | Status = Status.COMPLETED,
        *,
        step: int | None = None,
        tokens: int | None = None,
        final_loss: float | None = None,
        reason: str | None = None,
    ) -> int:
        """Write ``summary.json`` and return the exit code the script must exit with.

        ``status`` is ``completed`` (the planned last step must have been logged), ``diverged``
        or ``interrupted``. ``step``, ``tokens`` and ``final_loss`` default to the last logged
        line's; a ``completed`` run's step must equal the planned steps (``{steps}``).
        """
        st = Status(status)
        last = self.last or {}
        summary = Summary(
            status=st,
            step=last.get("step", self.start_step) if step is None else step,
            tokens=last.get("tokens", 0) if tokens is None else tokens,
            final_loss=clean_float(last.get("train_loss") if final_loss is None else final_loss),
            final_output_norm=clean_float(last.get("output_norm")),
            wall_time_s=self._wall_before + time.monotonic() - self._t0,
            diverged_step=(last.get("step") if step is None else step)
            if st == Status.DIVERGED
            else None,
            reason=reason,
        )
        self.close()
        write_json_atomic(self.out_dir / SUMMARY_FILE, summary.to_dict())
        return EXIT_BY_STATUS[st]

    def close(self) -> None:
        """Flush and close ``metrics.jsonl`` (idempotent; :meth:`finish` calls it)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    # ---- internals
    def _keep_lines_before(self, start_step: int) -> None:
        """Rewrite ``metrics.jsonl`` atomically with only its valid lines before ``start_step``."""
        path = self.out_dir / METRICS_FILE
        kept: list[str] = []
        if start_step > 0 and path.exists():
            for text in path.read_text(errors="replace").splitlines():
                try:
                    obj = json.loads(text)
                except ValueError:
                    continue  # a torn line from a kill
                step = obj.get("step") if isinstance(obj, dict) else None
                if type(step) is int and step < start_step:
                    kept.append(json.dumps(obj) + "\n")
                    self.last = obj
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def _previous_wall_time(self) -> float:
        """Wall time of earlier attempts, from the ``interrupted`` summary they left."""
        try:
            raw = json.loads((self.out_dir / SUMMARY_FILE).read_text())
            return float(Summary.from_dict(raw).wall_time_s or 0.0)
        except (OSError, ValueError, TypeError, SchemaError):
            return 0.0

    def _write_provenance(self) -> None:
        write_json_atomic(
            self.out_dir / PROVENANCE_FILE,
            {
                "trainer": "external",
                "argv": sys.argv,
                "python": platform.python_version(),
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "start_time": time.time(),
                "start_step": self.start_step,
                "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
            },
        )

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def handle(signum: int, _frame: FrameType | None) -> None:
            self._stop_signal = signal.Signals(signum).name

        for sig in STOP_SIGNALS:
            signal.signal(sig, handle)
