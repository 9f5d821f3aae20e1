"""Token cadence and gradient accumulation in the trainer (the paper's protocol at any B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, DataConfig, TrainConfig, model_from_preset
from trainer.train import train


def _cfg(batch: int, **kw: object) -> TrainConfig:
    base: dict[str, object] = {"horizons_tokens": (2048,), "val_tokens": 64, "threads": 1,
                               "checkpoint_every": 0}  # fmt: skip
    return TrainConfig(
        model=model_from_preset("test-micro"),
        data=DataConfig(kind="synthetic", synthetic_tokens=100_000),
        batch_size=batch,
        **{**base, **kw},  # type: ignore[arg-type]
    )


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_token_cadence_logs_the_same_tokens_at_batch_sizes_16x_apart(tmp_path: Path) -> None:
    seen = {}
    for batch in (2, 32):
        cfg = _cfg(batch, log_every_tokens=512, val_every_tokens=1024)
        train(cfg, tmp_path / f"b{batch}")
        lines = _lines(tmp_path / f"b{batch}")
        seen[batch] = [x["tokens"] for x in lines]
        assert [x["tokens"] for x in lines if "val_loss" in x] == [0, 1024, 2048]
    assert seen[2] == seen[32] == [0, 512, 1024, 1536, 2048]


def test_token_cadence_must_be_whole_steps() -> None:
    with pytest.raises(ConfigError, match="log_every_tokens = 100"):
        _cfg(2, log_every_tokens=100).validate()


def test_accumulation_gives_the_update_of_one_big_batch(tmp_path: Path) -> None:
    # one step of B = 8 in a single micro-batch vs 4 micro-batches of 2: same weights after it
    weights = {}
    for micro in (8, 2):
        cfg = _cfg(8, micro_batch_size=micro, horizons_tokens=(128,), checkpoint_steps=(1,))
        out = tmp_path / f"m{micro}"
        train(cfg, out)
        ckpt = sorted((out / "ckpt").glob("*.pt"))[-1]
        weights[micro] = torch.load(ckpt, weights_only=True)["model"]
    for name, w in weights[8].items():
        torch.testing.assert_close(weights[2][name], w, rtol=1e-5, atol=1e-6, msg=name)
