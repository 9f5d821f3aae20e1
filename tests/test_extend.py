"""The paper's protocol on the local backend with the real trainer: token cadence across batch
sizes 16x apart, and extending the horizons continues runs instead of retraining them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeper import RunKind, RunState, Sweep
from trainer.config import TrainConfig
from trainer.train import train

SPEC = """
name = "ext"
[[models]]
preset = "test-micro"
[data]
kind = "synthetic"
synthetic_tokens = 200000
[grid]
lr = [0.03125]
batch_size = [2, 32]
horizons_tokens = {horizons}
[train]
log_every_tokens = 512
val_tokens = 64
checkpoint_every = 0
threads = 1
"""


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_token_cadence_and_extension_continue_runs(tmp_path: Path) -> None:
    spec = tmp_path / "ext.toml"
    spec.write_text(SPEC.format(horizons="[1024, 2048]"))
    sweep = Sweep.create(spec, tmp_path / "results")
    sweep.launch()
    first = {st.run_id: st.state for st in sweep.status()}
    assert set(first.values()) == {RunState.COMPLETED}
    tokens = {}
    for rid in first:
        rec = sweep.store.load_record(rid)
        tokens[rec.batch_size] = [
            x["tokens"] for x in _lines(sweep.store.run_dir(rid) / "metrics.jsonl")
        ]
    assert tokens[2] == tokens[32] == [0, 512, 1024, 1536, 2048]  # same tokens at B 16x apart
    before = {rid: (sweep.store.run_dir(rid) / "metrics.jsonl").read_bytes() for rid in first}

    spec.write_text(SPEC.format(horizons="[1024, 2048, 4096]"))
    sweep = Sweep.create(spec, tmp_path / "results")
    new = [sweep.store.load_record(r) for r in sweep.new_ids]
    assert len(new) == 2 and all(r.parent in first and r.kind == RunKind.SINGLE for r in new)
    assert sweep.launch().run_ids == tuple(sweep.new_ids)
    for r in new:
        assert r.train.branch is not None and r.start_step == 2048 // r.tokens_per_step
        lines = _lines(sweep.store.run_dir(r.id) / "metrics.jsonl")
        assert min(x["step"] for x in lines) == r.start_step  # no step before the fork re-trained
        assert lines[-1]["tokens"] == 4096
    for rid, data in before.items():  # the old runs are untouched
        assert (sweep.store.run_dir(rid) / "metrics.jsonl").read_bytes() == data
    # the continuation equals a straight run to 4096 tokens
    cont = next(r for r in new if r.batch_size == 32)
    straight = TrainConfig.from_dict({**cont.train.to_dict(), "branch": None,
                                      "horizons_tokens": [1024, 2048, 4096]})  # fmt: skip
    summary = train(straight, tmp_path / "straight")
    got = _lines(sweep.store.run_dir(cont.id) / "metrics.jsonl")[-1]["train_loss"]
    assert got == pytest.approx(summary["final_loss"], abs=1e-6)
    # a third launch of the same spec plans nothing new
    assert Sweep.create(spec, tmp_path / "results").new_ids == ()
