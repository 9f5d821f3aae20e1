"""Token data: the pure batch function, rank slices, corpus checks and the prepare CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
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

REPO = Path(__file__).resolve().parent.parent


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
    assert shards.max_token_id < 128
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_token_ids_beyond_the_model_vocabulary_are_rejected(tmp_path: Path) -> None:
    cfg = DataConfig(kind="synthetic", synthetic_tokens=10_000, cache_dir=str(tmp_path))
    path = resolve_shards(cfg, 200)
    with pytest.raises(DataError, match=r"token id 19\d .* model.vocab_size = 100"):
        open_data(DataConfig(kind="shards", path=str(path)), 100)


def _prepare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.data", "prepare", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_prepare_cli_byte_tokenizes_a_text_directory(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text("hello world\n" * 300)
    (texts / "sub" / "b.txt").write_text("héllo ünïcode\n" * 200)
    (texts / "skip.md").write_text("not a .txt file")
    out = tmp_path / "shards"
    done = _prepare(str(texts), "--out", str(out), "--val-fraction", "0.1")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    expected = (texts / "a.txt").read_bytes() + (texts / "sub" / "b.txt").read_bytes()
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 256
    assert meta["train_tokens"] + meta["val_tokens"] == len(expected)
    assert meta["val_tokens"] == int(len(expected) * 0.1)
    shards = Shards.open(out)
    joined = np.concatenate([shards.train, shards.val]).astype(np.uint8).tobytes()
    assert joined == expected
    again = _prepare(str(texts), "--out", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "already holds shards" in again.stderr


def test_prepare_cli_errors_are_one_line(tmp_path: Path) -> None:
    missing = _prepare(str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert missing.stderr.count("\n") == 1
    (tmp_path / "t.txt").write_text("some text " * 100)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    bad = _prepare(str(tmp_path / "t.txt"), "--out", str(tmp_path / "o"), "--tokenizer", str(tok))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "tokenizer" in bad.stderr  # 'pip install tokenizers', or cannot load the file
    assert not (tmp_path / "o").exists()
