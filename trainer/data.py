"""Token data: token directories, built-in corpora and the deterministic batch function.

A token directory holds ``train.bin`` and ``val.bin`` (flat arrays of token ids, ``uint16`` or
``uint32``, memory-mapped) and its manifest ``data.json`` (``trainer.manifest``: tokenizer and its
hash, vocabulary, end-of-text id, token and document counts, source files and their hashes).
Directories of the first format, with ``meta.json``, are still read.

The training split is cut into non-overlapping windows of ``seq_len + 1`` tokens, and the windows
are visited in a permutation seeded by the run's seed. Sample ``j`` of step ``s`` is window
``perm[s * batch_size + j]``, so the batch at (seed, step, rank) is a pure function, no window is
seen twice (non-repeating data, as in the paper), and resuming needs only the step. With
``data.allow_repeat``, position ``p`` past the end is window ``perm_e[p mod n]`` of epoch
``e = p // n``, each epoch in its own seeded order.

Command line (``trainer.prepare`` does the work)::

    python -m trainer.data prepare INPUT... --out DIR [--tokenizer tokenizer.json] [--text-key text]
        [--eos-id N] [--val-fraction 0.02] [--workers N]
    python -m trainer.data builtin {stdlib,synthetic} [--vocab-size 256] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.manifest import (
    DataError,
    DataManifest,
    manifest_file,
    read_manifest_with_digest,
    write_manifest,
)

if TYPE_CHECKING:
    import torch


_CHUNK_TOKENS = 1 << 24  # copy granularity when splitting a token stream
_SYNTHETIC_SEED = 20_250_203  # fixed: the synthetic corpus is the same on every machine


# ------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class Shards:
    """An opened token directory: memory-mapped splits plus their manifest."""

    path: Path
    train: np.ndarray
    val: np.ndarray
    manifest: DataManifest
    manifest_sha256: str

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def max_token_id(self) -> int:
        return self.manifest.max_token_id

    @classmethod
    def open(cls, path: Path) -> Shards:
        """Memory-map ``train.bin`` and ``val.bin`` of a directory made by ``prepare``."""
        try:
            manifest, digest = read_manifest_with_digest(path)
        except DataError as e:
            raise DataError(f"data.path = {str(path)!r}: {e}") from None
        splits = {}
        for split in ("train", "val"):
            file = path / f"{split}.bin"
            if not file.is_file() or file.stat().st_size == 0:
                raise DataError(f"data.path = {str(path)!r}: {file.name} is missing or empty")
            splits[split] = np.memmap(file, dtype=manifest.dtype, mode="r")
            expected = getattr(manifest, f"{split}_tokens")
            if len(splits[split]) != expected:
                raise DataError(
                    f"data.path = {str(path)!r}: {file.name} holds {len(splits[split])} tokens, "
                    f"its manifest says {expected}"
                )
        return cls(path, splits["train"], splits["val"], manifest, digest)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise DataError unless every token id is below the model's ``vocab_size``."""
        if self.max_token_id >= vocab_size:
            raise DataError(
                f"data: {self.path} holds token id {self.max_token_id} (tokenizer vocabulary "
                f"{self.vocab_size}), not below model.vocab_size = {vocab_size}"
            )

    def provenance(self) -> dict[str, Any]:
        """What a run records about its data in ``provenance.json``."""
        return self.manifest.provenance(self.path, self.manifest_sha256)


# ------------------------------------------------------------------------------------------ batches


class TokenWindows:
    """Non-overlapping ``seq_len + 1`` windows of a token array, in a seeded (or natural) order.

    Positions past the last window wrap around into further epochs, each in its own order seeded by
    (seed, epoch); epoch 0 keeps the order of the seed alone.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int | None) -> None:
        self.tokens = tokens
        self.width = seq_len + 1
        self.n_windows = len(tokens) // self.width
        self.seed = seed
        if seed is None:
            self.order = np.arange(self.n_windows, dtype=np.int64)
        else:
            self.order = np.random.Generator(np.random.PCG64(seed)).permutation(self.n_windows)
        self._later: dict[int, np.ndarray] = {}  # orders of epochs >= 1, the latest two

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch == 0 or self.seed is None:
            return self.order
        order = self._later.get(epoch)
        if order is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            order = rng.permutation(self.n_windows)
            self._later = {e: o for e, o in self._later.items() if e >= epoch - 1}
            self._later[epoch] = order
        return order

    def starts(self, positions: np.ndarray) -> np.ndarray:
        """Token offsets of the windows at ``positions`` (wrapping into later epochs)."""
        if len(positions) and int(positions.max()) < self.n_windows:
            return self.order[positions] * self.width
        epochs, index = np.divmod(positions, self.n_windows)
        starts = np.empty_like(index)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            starts[mask] = self._epoch_order(epoch)[index[mask]]
        return starts * self.width

    def rows(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each ``(len(positions), seq_len)`` int64, for the given positions."""
        import torch  # lazily: the prepare CLI and the sweeper's login node need no torch

        starts = self.starts(positions)
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


def check_enough(
    source: BatchSource, steps_needed: int, where: Path, allow_repeat: bool = False
) -> None:
    """Raise DataError unless the corpus holds ``steps_needed`` non-repeating global batches.

    With ``allow_repeat`` one global batch is enough: later steps revisit the windows.
    """
    have = source.steps_available()
    if have < (1 if allow_repeat else steps_needed):
        w = source.windows
        fix = (
            "use a larger corpus or a smaller batch_size"
            if allow_repeat
            else "lower horizons_tokens, use a larger corpus, or set data.allow_repeat = true"
        )
        raise DataError(
            f"data: corpus {where} is too small: {w.n_windows} windows of seq_len+1 = {w.width} "
            f"tokens give {have} steps of batch_size = {source.batch_size}, the run needs "
            f"{steps_needed} ({fix})"
        )


# ------------------------------------------------------------------------- built-in corpora: writer


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
) -> DataManifest:
    """Write a built-in corpus's token directory atomically (a temp directory renamed into place).

    Built-in corpora are one stream with no end-of-text token, split at its tail (user corpora go
    through ``trainer.prepare``, which splits by document).

    Args:
        chunks: Token arrays, in corpus order; the last ``val_fraction`` of the tokens is held out.
        out: The directory to create; must not exist.
        vocab_size: The tokenizer's vocabulary size (chooses ``uint16`` or ``uint32``).
        val_fraction: Fraction of tokens held out for validation.
        source: Free-text description of the corpus, kept in ``data.json``.
        tokenizer: ``"bytes"`` or ``"synthetic"``.
        val_tokens: Exact number of held-out tokens; overrides ``val_fraction``.

    Returns:
        The manifest written to ``data.json``.
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
        manifest = DataManifest(
            dtype="uint16" if dtype == np.uint16 else "uint32",
            vocab_size=vocab_size,
            eos_id=None,
            max_token_id=top,
            tokenizer=tokenizer,
            tokenizer_sha256=None,
            train_tokens=n - n_val,
            val_tokens=n_val,
            n_documents=None,
            val_documents=None,
            val_fraction=n_val / n,
            split="tail",
            description=source,
        )
        write_manifest(tmp, manifest)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _byte_chunks(files: Iterable[Path]) -> Iterator[np.ndarray]:
    for f in files:
        yield np.frombuffer(f.read_bytes(), dtype=np.uint8)


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
    if manifest_file(out) is not None:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{out.name}.lock"):
        if manifest_file(out) is None:
            _build_builtin(cfg, vocab_size, out)
    return out


def open_data(cfg: DataConfig, vocab_size: int) -> Shards:
    """Resolve (and if needed prepare) and open the corpus of ``cfg``; check its vocabulary."""
    shards = Shards.open(resolve_shards(cfg, vocab_size))
    shards.check_vocab(vocab_size)
    return shards


# ---------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit 2, as argparse's do)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trainer.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare", help="tokenize text, JSON Lines and Parquet files into a token directory"
    )
    prep.add_argument(
        "inputs", nargs="+", help="files (.txt, .jsonl, .parquet), directories or glob patterns"
    )
    prep.add_argument("--out", required=True, type=Path, help="token directory to create")
    prep.add_argument("--tokenizer", type=Path, help="local tokenizer.json (default: bytes)")
    prep.add_argument("--text-key", default="text", help="JSON Lines field / Parquet column")
    prep.add_argument(
        "--eos-id", type=int, help="end-of-text id (default: the tokenizer's; bytes: 256)"
    )
    prep.add_argument(
        "--val-fraction", type=float, default=0.02, help="share of documents held out"
    )
    prep.add_argument("--workers", type=int, help="tokenizer threads (default: all cores)")
    built = sub.add_parser(
        "builtin", help="prepare a built-in corpus into the cache; print its path"
    )
    built.add_argument("kind", choices=["stdlib", "synthetic"])
    built.add_argument("--vocab-size", type=int, default=256)
    built.add_argument("--cache-dir", type=Path)
    return p


def _prepare(args: argparse.Namespace) -> None:
    from trainer.prepare import prepare

    start = time.perf_counter()
    m = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        text_key=args.text_key,
        eos_id=args.eos_id,
        val_fraction=args.val_fraction,
        workers=args.workers,
    )
    seconds = time.perf_counter() - start
    total = m.train_tokens + m.val_tokens
    print(
        f"{args.out}: {m.train_tokens} train + {m.val_tokens} val tokens ({m.dtype}, vocab "
        f"{m.vocab_size}, eos {m.eos_id}) from {m.n_documents} documents ({m.val_documents} val) "
        f"in {len(m.sources)} files, {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} tokens/s)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m trainer.data``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            _prepare(args)
        else:
            cache = str(args.cache_dir) if args.cache_dir else None
            print(resolve_shards(DataConfig(kind=args.kind, cache_dir=cache), args.vocab_size))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk or permission problem while writing
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (nothing written)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
