"""Token data: shard directories, built-in corpora and the deterministic batch function.

A shard directory holds ``train.bin`` and ``val.bin`` (flat arrays of token ids, ``uint16`` or
``uint32``, memory-mapped) and ``meta.json`` (dtype, vocabulary size, token counts, largest token
id, tokenizer).

The training split is cut into non-overlapping windows of ``seq_len + 1`` tokens, and the windows
are visited in a permutation seeded by the run's seed. Sample ``j`` of step ``s`` is window
``perm[s * batch_size + j]``, so the batch at (seed, step, rank) is a pure function, no window is
seen twice (non-repeating data, as in the paper), and resuming needs only the step.

Command line::

    python -m trainer.data prepare DIR_OR_FILE... --out SHARDS [--tokenizer tokenizer.json]
    python -m trainer.data builtin {stdlib,synthetic} [--vocab-size 256] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer.config import ConfigError, DataConfig

META = "meta.json"
if TYPE_CHECKING:
    import torch

_CHUNK_TOKENS = 1 << 24  # copy granularity when splitting a token stream
_SYNTHETIC_SEED = 20_250_203  # fixed: the synthetic corpus is the same on every machine


class DataError(ConfigError):
    """Data that cannot feed the planned run (missing, too small, wrong vocabulary). One line."""


# ------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Shards:
    """An opened shard directory: memory-mapped splits plus their metadata."""

    path: Path
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    max_token_id: int

    @classmethod
    def open(cls, path: Path) -> Shards:
        """Memory-map ``train.bin`` and ``val.bin`` of a directory made by :func:`prepare_text`."""
        meta_path = path / META
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise DataError(
                f"data.path = {str(path)!r}: no {META} (make shards with "
                "'python -m trainer.data prepare')"
            ) from None
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path}: not valid JSON ({e})") from None
        dtype = meta.get("dtype")
        if dtype not in ("uint16", "uint32"):
            raise DataError(f"{meta_path}: dtype = {dtype!r}, expected 'uint16' or 'uint32'")
        splits = {}
        for split in ("train", "val"):
            file = path / f"{split}.bin"
            if not file.is_file() or file.stat().st_size == 0:
                raise DataError(f"data.path = {str(path)!r}: {file.name} is missing or empty")
            splits[split] = np.memmap(file, dtype=dtype, mode="r")
        top = meta.get("max_token_id")
        if top is None:  # shards written by another tool: scan once
            top = max(int(splits["train"].max()), int(splits["val"].max()))
        return cls(
            path=path,
            train=splits["train"],
            val=splits["val"],
            vocab_size=int(meta.get("vocab_size", top + 1)),
            max_token_id=int(top),
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError unless every token id is below the model's ``vocab_size``."""
        if self.max_token_id >= vocab_size:
            raise DataError(
                f"data: {self.path} holds token id {self.max_token_id} (tokenizer vocabulary "
                f"{self.vocab_size}), not below model.vocab_size = {vocab_size}"
            )


# ------------------------------------------------------------------------------------------ batches


class TokenWindows:
    """Non-overlapping ``seq_len + 1`` windows of a token array, in a seeded (or natural) order."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int | None) -> None:
        self.tokens = tokens
        self.width = seq_len + 1
        self.n_windows = len(tokens) // self.width
        if seed is None:
            self.order = np.arange(self.n_windows, dtype=np.int64)
        else:
            self.order = np.random.Generator(np.random.PCG64(seed)).permutation(self.n_windows)

    def rows(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each ``(len(positions), seq_len)`` int64, for the given positions."""
        import torch  # lazily: the prepare CLI and the sweeper's login node need no torch

        starts = self.order[positions] * self.width
        rows = np.asarray(self.tokens[starts[:, None] + np.arange(self.width)], dtype=np.int64)
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()


class BatchSource:
    """The training batches of one run: a pure function of (step, rank, micro-step).

    Args:
        tokens: The training split.
        seq_len: Tokens per sequence.
        batch_size: Global batch in sequences.
        seed: Seed of the window permutation (the run's seed).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        self.windows = TokenWindows(tokens, seq_len, seed)
        self.batch_size = batch_size

    def steps_available(self) -> int:
        """How many full global batches the corpus holds."""
        return self.windows.n_windows // self.batch_size

    def batch(
        self,
        step: int,
        rank: int = 0,
        world_size: int = 1,
        micro_step: int = 0,
        micro_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``micro_step``-th micro-batch of ``rank``'s slice of the global batch at ``step``.

        Rank ``r`` gets sequences ``[r * B / W, (r + 1) * B / W)`` of the global batch, so the ranks
        together see exactly the batch one process would see.
        """
        per_rank = self.batch_size // world_size
        micro = micro_batch_size or per_rank
        start = step * self.batch_size + rank * per_rank + micro_step * micro
        return self.windows.rows(np.arange(start, start + micro))


def validation_windows(tokens: np.ndarray, seq_len: int, val_tokens: int) -> TokenWindows:
    """The first ``ceil(val_tokens / seq_len)`` windows of the validation split, in order.

    Raises:
        DataError: The split is too small.
    """
    windows = TokenWindows(tokens, seq_len, seed=None)
    needed = math.ceil(val_tokens / seq_len)
    if windows.n_windows < needed:
        raise DataError(
            f"val_tokens = {val_tokens}: the validation split has {len(tokens)} tokens, only "
            f"{windows.n_windows} windows of seq_len+1 = {seq_len + 1} (needs {needed})"
        )
    windows.n_windows = needed
    windows.order = windows.order[:needed]
    return windows


def check_enough(source: BatchSource, steps_needed: int, where: Path) -> None:
    """Raise DataError unless the corpus holds ``steps_needed`` non-repeating global batches."""
    have = source.steps_available()
    if have < steps_needed:
        w = source.windows
        raise DataError(
            f"data: corpus {where} is too small: {w.n_windows} windows of seq_len+1 = {w.width} "
            f"tokens give {have} steps of batch_size = {source.batch_size}, the run needs "
            f"{steps_needed} (lower horizons_tokens or use a larger corpus)"
        )


# -------------------------------------------------------------------------------------- preparation


def _write_tokens(chunks: Iterable[np.ndarray], out: Path, dtype: np.dtype) -> tuple[int, int]:
    """Stream token chunks to ``out``; return (count, largest id)."""
    count, top = 0, -1
    with open(out, "wb") as f:
        for chunk in chunks:
            if chunk.size:
                top = max(top, int(chunk.max()))
                f.write(chunk.astype(dtype).tobytes())
                count += chunk.size
    return count, top


def _split_tail(all_path: Path, tmp: Path, dtype: np.dtype, n: int, n_val: int) -> None:
    """Move the last ``n_val`` tokens of ``all_path`` to ``val.bin``; the rest is ``train.bin``."""
    tokens = np.memmap(all_path, dtype=dtype, mode="r")
    with open(tmp / "val.bin", "wb") as f:
        for i in range(n - n_val, n, _CHUNK_TOKENS):
            f.write(np.asarray(tokens[i : min(n, i + _CHUNK_TOKENS)]).tobytes())
    del tokens
    with open(all_path, "r+b") as f:
        f.truncate((n - n_val) * dtype.itemsize)
    os.replace(all_path, tmp / "train.bin")


def write_shards(
    chunks: Iterable[np.ndarray],
    out: Path,
    vocab_size: int,
    val_fraction: float,
    source: str,
    tokenizer: str,
    val_tokens: int | None = None,
) -> dict:
    """Write a shard directory atomically (a temp directory renamed into place).

    Args:
        chunks: Token arrays, in corpus order; the last ``val_fraction`` of the tokens is held out.
        out: The directory to create; must not exist.
        vocab_size: The tokenizer's vocabulary size (chooses ``uint16`` or ``uint32``).
        val_fraction: Fraction of tokens held out for validation.
        source: Free-text description of the corpus, kept in ``meta.json``.
        tokenizer: ``"bytes"`` or the tokenizer file's name.
        val_tokens: Exact number of held-out tokens; overrides ``val_fraction``.

    Returns:
        The metadata written to ``meta.json``.
    """
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n, top = _write_tokens(chunks, tmp / "all.bin", dtype)
        n_val = val_tokens or max(1, int(n * val_fraction))
        if n - n_val < 2:
            raise DataError(f"data: {source} holds only {n} tokens, too few to split")
        _split_tail(tmp / "all.bin", tmp, dtype, n, n_val)
        meta = {
            "format": 1,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "max_token_id": top,
            "train_tokens": n - n_val,
            "val_tokens": n_val,
            "tokenizer": tokenizer,
            "source": source,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _text_files(inputs: Iterable[Path], pattern: str) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob(pattern) if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"prepare: input {str(p)!r} does not exist")
    if not files:
        raise DataError(f"prepare: no files matching {pattern!r} in the inputs")
    return files


def _byte_chunks(files: Iterable[Path]) -> Iterator[np.ndarray]:
    for f in files:
        yield np.frombuffer(f.read_bytes(), dtype=np.uint8)


def _load_tokenizer(path: Path):  # noqa: ANN202 - tokenizers is optional, no type to name
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            f"--tokenizer {path}: reading a Hugging Face tokenizer.json needs the 'tokenizers' "
            "package (pip install tokenizers)"
        ) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception on any bad file
        raise DataError(f"--tokenizer {path}: cannot load ({str(e).splitlines()[0]})") from None


def prepare_text(
    inputs: list[Path],
    out: Path,
    tokenizer: Path | None = None,
    val_fraction: float = 0.02,
    pattern: str = "*.txt",
) -> dict:
    """Tokenize text files into a shard directory.

    Args:
        inputs: Files, or directories searched recursively for ``pattern``.
        out: The shard directory to create (must not hold shards yet).
        tokenizer: A Hugging Face ``tokenizer.json``; None: the built-in byte tokenizer (vocab 256).
        val_fraction: Fraction of tokens (the corpus tail) held out for validation.
        pattern: File-name pattern used inside directories.

    Returns:
        The metadata written to ``meta.json``.
    """
    if (out / META).exists():
        raise DataError(f"--out {out}: already holds shards; remove it first")
    if not 0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction {val_fraction}: must be in (0, 0.5)")
    files = _text_files(inputs, pattern)
    source = f"{len(files)} text files"
    if tokenizer is None:
        return write_shards(_byte_chunks(files), out, 256, val_fraction, source, "bytes")
    tok = _load_tokenizer(tokenizer)
    chunks = (
        np.asarray(tok.encode(f.read_text(errors="replace")).ids, dtype=np.int64) for f in files
    )
    return write_shards(chunks, out, tok.get_vocab_size(), val_fraction, source, tokenizer.name)


# ------------------------------------------------------------------------------- built-in corpora


def stdlib_files() -> list[Path]:
    """The Python standard library's own ``.py`` files (no site-packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))


def synthetic_entropy(cfg: DataConfig) -> float:
    """Entropy rate (nats per token) of the synthetic corpus: the best achievable loss."""
    return math.log(cfg.synthetic_branching)


def synthetic_tokens(vocab_size: int, branching: int, n: int) -> np.ndarray:
    """A Markov chain where every token has ``branching`` equally likely successors.

    The hidden state walks ``x_{t+1} = x_t + c[r_t] mod V`` with ``branching`` distinct offsets
    ``c`` and uniform ``r_t``; tokens are a fixed permutation of the state. The entropy rate is
    exactly ``log(branching)``, and the walk is a cumulative sum, so generation is vectorised.
    """
    if not 0 < branching < vocab_size:
        raise DataError(
            f"data.synthetic_branching = {branching}: must be below model.vocab_size = {vocab_size}"
        )
    rng = np.random.Generator(np.random.PCG64(_SYNTHETIC_SEED))
    offsets = rng.choice(np.arange(1, vocab_size), size=branching, replace=False)
    perm = rng.permutation(vocab_size)
    steps = offsets[rng.integers(0, branching, size=n)]
    state = np.cumsum(steps, dtype=np.int64) % vocab_size
    return perm[state]


def default_cache_dir() -> Path:
    """``$TRAINER_CACHE`` or ``~/.cache/sweeper-trainer``."""
    env = os.environ.get("TRAINER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sweeper-trainer"


def _builtin_name(cfg: DataConfig, vocab_size: int) -> str:
    if cfg.kind == "stdlib":
        files = stdlib_files()
        digest = hashlib.sha1(
            "\n".join(f"{f.name}:{f.stat().st_size}" for f in files).encode()
        ).hexdigest()[:10]
        return f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-{digest}-v{cfg.val_fraction}"
    return (
        f"synthetic-V{vocab_size}-k{cfg.synthetic_branching}-n{cfg.synthetic_tokens}"
        f"-v{cfg.val_fraction}"
    )


def _build_builtin(cfg: DataConfig, vocab_size: int, out: Path) -> None:
    if cfg.kind == "stdlib":
        files = stdlib_files()
        write_shards(
            _byte_chunks(files),
            out,
            256,
            cfg.val_fraction,
            f"python stdlib ({len(files)} files)",
            "bytes",
        )
        return
    n_val = max(1, int(cfg.synthetic_tokens * cfg.val_fraction))
    tokens = synthetic_tokens(vocab_size, cfg.synthetic_branching, cfg.synthetic_tokens + n_val)
    write_shards(
        [tokens],
        out,
        vocab_size,
        cfg.val_fraction,
        f"synthetic markov chain, branching {cfg.synthetic_branching}",
        "synthetic",
        val_tokens=n_val,
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_shards(cfg: DataConfig, vocab_size: int) -> Path:
    """The shard directory of ``cfg``, preparing a built-in corpus into the cache on first use.

    Many runs may start at once: preparation happens under an exclusive file lock, and the result is
    renamed into place, so a reader never sees a half-written corpus.
    """
    if cfg.kind == "shards":
        assert cfg.path is not None  # DataConfig.validate
        return Path(cfg.path)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    out = cache / _builtin_name(cfg, vocab_size)
    if (out / META).exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{out.name}.lock"):
        if not (out / META).exists():
            _build_builtin(cfg, vocab_size, out)
    return out


def open_data(cfg: DataConfig, vocab_size: int) -> Shards:
    """Resolve (and if needed prepare) and open the corpus of ``cfg``; check its vocabulary."""
    shards = Shards.open(resolve_shards(cfg, vocab_size))
    shards.check_vocab(vocab_size)
    return shards


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text files into a shard directory")
    prep.add_argument("inputs", nargs="+", type=Path, help="text files or directories")
    prep.add_argument("--out", required=True, type=Path, help="shard directory to create")
    prep.add_argument("--tokenizer", type=Path, help="Hugging Face tokenizer.json (default: bytes)")
    prep.add_argument("--val-fraction", type=float, default=0.02)
    prep.add_argument("--pattern", default="*.txt", help="file pattern inside directories")
    built = sub.add_parser(
        "builtin", help="prepare a built-in corpus into the cache; print its path"
    )
    built.add_argument("kind", choices=["stdlib", "synthetic"])
    built.add_argument("--vocab-size", type=int, default=256)
    built.add_argument("--cache-dir", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m trainer.data``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            meta = prepare_text(
                args.inputs, args.out, args.tokenizer, args.val_fraction, args.pattern
            )
            print(
                f"{args.out}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens "
                f"({meta['dtype']}, vocab {meta['vocab_size']})"
            )
        else:
            cache = str(args.cache_dir) if args.cache_dir else None
            print(resolve_shards(DataConfig(kind=args.kind, cache_dir=cache), args.vocab_size))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
