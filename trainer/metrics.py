"""What a run logs: model norms, the metrics.jsonl writer and atomic JSON files.

The line format is the contract in ``trainer/schema.py`` (``METRICS``); ``sweeper.collect``
reads it through the same module. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.model import Transformer
from trainer.norms import one_to_rms_embedding, rms_to_inf, rms_to_rms
from trainer.schema import METRICS_FILE, metrics_line

__all__ = [
    "METRICS_FILE",
    "MetricsWriter",
    "grad_norm",
    "read_metrics",
    "weight_norms",
    "write_json",
]


def weight_norms(model: Transformer) -> dict[str, float]:
    """The paper's tracked norms of the current weights.

    Returns:
        ``output_norm`` (RMS->inf of the unembedding, the paper's "output norm"),
        ``output_norm_rms`` (its RMS->RMS norm), ``input_norm`` (1->RMS of the token embedding)
        and ``hidden_norm`` (RMS->RMS of the last block's ``w2``).
    """
    out = model.output.weight
    return {
        "output_norm": rms_to_inf(out),
        "output_norm_rms": rms_to_rms(out),
        "input_norm": one_to_rms_embedding(model.tok_embeddings.weight),
        "hidden_norm": rms_to_rms(model.blocks()[-1].feed_forward.w2.weight),
    }


def grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of all gradients, as a 0-d float32 tensor (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    )


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: a non-finite float becomes null (the loss carries divergence anyway)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({k: _clean(v) for k, v in obj.items()}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics file; a torn last line (from a kill) is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    Args:
        path: The metrics file.
        resume_step: Lines with ``step >= resume_step`` are dropped first (the resumed run logs
            them again), so the file ends up equal to an uninterrupted run's. None starts afresh.
    """

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept = (
            []
            if resume_step is None
            else [
                r
                for r in read_metrics(path)
                if isinstance(r.get("step"), int) and r["step"] < resume_step
            ]
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self._file = open(path, "a")  # noqa: SIM115 - held open for the whole run

    def write(self, row: dict[str, Any]) -> None:
        """Append one line and flush it (readers such as ``sweeper status`` follow the file)."""
        self._file.write(json.dumps(metrics_line(**row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()
