"""LR schedules: values at the key steps of each kind."""

from __future__ import annotations

import math

import pytest

from trainer.config import ScheduleConfig
from trainer.schedule import decay_start, lr_multiplier


def test_constant_is_one_everywhere() -> None:
    cfg = ScheduleConfig(kind="constant")
    assert [lr_multiplier(cfg, s, 100) for s in (0, 1, 50, 99, 500)] == [1.0] * 5


def test_linear_warmup_then_constant() -> None:
    cfg = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_multiplier(cfg, s, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_wsd_stable_then_linear_decay_over_the_last_fraction() -> None:
    cfg = ScheduleConfig(kind="wsd", decay_fraction=0.25, min_lr_ratio=0.0)
    assert decay_start(cfg, 40) == 30
    values = [lr_multiplier(cfg, s, 40) for s in range(40)]
    assert values[:31] == [1.0] * 31  # the first decay step still uses the full LR
    assert values[35] == pytest.approx(0.5)
    assert values[39] == pytest.approx(0.1)  # never exactly 0 on a real update
    assert all(a > b for a, b in zip(values[30:], values[31:], strict=False))
    assert lr_multiplier(cfg, 40, 40) == 0.0


def test_wsd_respects_floor_warmup_and_explicit_total() -> None:
    cfg = ScheduleConfig(
        kind="wsd", warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.2, total_steps=20
    )
    assert lr_multiplier(cfg, 0, 999) == 0.5
    assert lr_multiplier(cfg, 9, 999) == 1.0
    assert lr_multiplier(cfg, 10, 999) == 1.0
    assert lr_multiplier(cfg, 15, 999) == pytest.approx(1 - 0.8 * 0.5)
    assert lr_multiplier(cfg, 20, 999) == pytest.approx(0.2)
    assert lr_multiplier(cfg, 30, 999) == pytest.approx(0.2)


def test_cosine() -> None:
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 4, 110) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 10, 110) == 1.0
    assert lr_multiplier(cfg, 60, 110) == pytest.approx(0.55)
    assert lr_multiplier(cfg, 35, 110) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_multiplier(cfg, 110, 110) == pytest.approx(0.1)


def test_negative_step_is_an_error() -> None:
    with pytest.raises(ValueError, match="step = -1"):
        lr_multiplier(ScheduleConfig(), -1, 10)
