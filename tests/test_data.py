"""Token data: the pure batch function, rank slices, epochs, corpus checks, token directories."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import (
    BatchSource,
    DataError,
    Shards,
    check_enough,
    open_data,
    resolve_shards,
    synthetic_entropy,
    synthetic_tokens,
    validation_windows,
)


def _tokens(n: int = 10_000) -> np.ndarray:
    return (np.arange(n) % 251).astype(np.uint16)


def test_batch_is_a_pure_function_of_seed_and_step() -> None:
    a = BatchSource(_tokens(), seq_len=8, batch_size=4, seed=7)
    b = BatchSource(_tokens(), seq_len=8, batch_size=4, seed=7)
    for step in (0, 3, 17):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = BatchSource(_tokens(), seq_len=8, batch_size=4, seed=8)
    assert not torch.equal(a.batch(0)[0], other.batch(0)[0])


def test_targets_are_inputs_shifted_by_one_and_windows_never_repeat() -> None:
    tokens = np.arange(9 * 100, dtype=np.uint32)  # token value = position, so windows are visible
    src = BatchSource(tokens, seq_len=8, batch_size=5, seed=3)
    seen = set()
    for step in range(src.steps_available()):
        x, y = src.batch(step)
        assert x.shape == (5, 8) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.all(x[:, 0] % 9 == 0)  # each row starts a seq_len+1 window
        seen.update(x[:, 0].tolist())
    assert len(seen) == 100  # every window once, none twice


def test_rank_and_micro_slices_tile_the_global_batch() -> None:
    src = BatchSource(_tokens(), seq_len=8, batch_size=8, seed=1)
    whole = src.batch(5)[0]
    parts = [
        src.batch(5, rank=r, world_size=2, micro_step=m, micro_batch_size=2)[0]
        for r in range(2)
        for m in range(2)
    ]
    assert torch.equal(torch.cat(parts), whole)


def test_too_small_corpus_is_a_one_line_error() -> None:
    src = BatchSource(_tokens(900), seq_len=8, batch_size=4, seed=0)  # 100 windows = 25 steps
    check_enough(src, 25, Path("corpus"))
    with pytest.raises(DataError, match=r"too small: 100 windows .* 25 steps .* needs 26") as e:
        check_enough(src, 26, Path("corpus"))
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="val_tokens = 1000"):
        validation_windows(_tokens(900), seq_len=8, val_tokens=1000)


def test_synthetic_chain_has_the_stated_entropy(tmp_path: Path) -> None:
    tokens = synthetic_tokens(vocab_size=64, branching=4, n=200_000)
    successors = defaultdict(set)
    for a, b in zip(tokens[:-1].tolist(), tokens[1:].tolist(), strict=True):
        successors[a].add(b)
    assert len(successors) == 64 and {len(s) for s in successors.values()} == {4}
    pairs = np.unique(tokens[:-1] * 64 + tokens[1:], return_counts=True)[1]
    p_pair = pairs / pairs.sum()
    p_first = np.bincount(tokens[:-1], minlength=64) / (len(tokens) - 1)
    cond_entropy = -(p_pair * np.log(p_pair)).sum() + (p_first * np.log(p_first)).sum()
    assert cond_entropy == pytest.approx(math.log(4), abs=0.01)
    assert synthetic_entropy(DataConfig(kind="synthetic", synthetic_branching=4)) == math.log(4)


def _resolve(cache: str) -> str:
    cfg = DataConfig(kind="synthetic", synthetic_tokens=300_000, cache_dir=cache)
    return str(resolve_shards(cfg, 128))


def test_builtin_corpus_is_prepared_once_under_concurrency(tmp_path: Path) -> None:
    with ProcessPoolExecutor(3) as pool:
        paths = set(pool.map(_resolve, [str(tmp_path)] * 3))
    assert len(paths) == 1
    shards = Shards.open(Path(paths.pop()))
    assert len(shards.train) == 300_000 and len(shards.val) == 6_000
    assert (shards.path / "data.json").is_file() and shards.manifest.tokenizer == "synthetic"
    assert shards.max_token_id < 128
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_token_ids_beyond_the_model_vocabulary_are_rejected(tmp_path: Path) -> None:
    cfg = DataConfig(kind="synthetic", synthetic_tokens=10_000, cache_dir=str(tmp_path))
    path = resolve_shards(cfg, 200)
    with pytest.raises(DataError, match=r"token id 19\d .* model.vocab_size = 100"):
        open_data(DataConfig(kind="shards", path=str(path)), 100)


def test_later_epochs_revisit_every_window_in_a_new_order() -> None:
    tokens = np.arange(9 * 10, dtype=np.uint32)  # 10 windows of seq_len+1 = 9
    src = BatchSource(tokens, seq_len=8, batch_size=5, seed=3)
    firsts = [src.batch(step)[0][:, 0].tolist() for step in range(6)]  # 3 epochs of 2 steps
    epochs = [firsts[0] + firsts[1], firsts[2] + firsts[3], firsts[4] + firsts[5]]
    assert all(sorted(e) == list(range(0, 90, 9)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = BatchSource(tokens, seq_len=8, batch_size=5, seed=3)
    assert again.batch(4)[0][:, 0].tolist() == firsts[4]  # still a pure function of the step
    with pytest.raises(DataError, match="data.allow_repeat"):
        check_enough(src, 3, Path("corpus"))
    check_enough(src, 3, Path("corpus"), allow_repeat=True)
    with pytest.raises(DataError, match="smaller batch_size"):
        check_enough(BatchSource(tokens, 8, 11, 0), 3, Path("corpus"), allow_repeat=True)


def test_first_format_directories_with_meta_json_still_open(tmp_path: Path) -> None:
    tokens = (np.arange(1000) % 200).astype(np.uint16)
    tokens[:900].tofile(tmp_path / "train.bin")
    tokens[900:].tofile(tmp_path / "val.bin")
    meta = {
        "format": 1,
        "dtype": "uint16",
        "vocab_size": 256,
        "max_token_id": 199,
        "train_tokens": 900,
        "val_tokens": 100,
        "tokenizer": "bytes",
        "source": "old",
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    shards = Shards.open(tmp_path)
    assert len(shards.train) == 900 and shards.max_token_id == 199
    assert shards.manifest.split == "tail" and shards.manifest.eos_id is None
    assert shards.provenance()["format"] == 1
    shards.check_vocab(200)
    with pytest.raises(DataError, match="token id 199"):
        shards.check_vocab(199)
    meta["train_tokens"] = 901
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="train.bin holds 900 tokens, its manifest says 901"):
        Shards.open(tmp_path)
