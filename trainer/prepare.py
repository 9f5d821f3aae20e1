"""Tokenize a text corpus into a token directory (``train.bin``, ``val.bin``, ``data.json``).

Inputs are text files (one document per file), JSON Lines files and Parquet files (one document
per row, in the ``text_key`` column), given as files, directories (searched recursively for
``*.txt``, ``*.jsonl`` and ``*.parquet``) or glob patterns. Documents are streamed in batches of
about :data:`BATCH_CHARS` characters through the ``tokenizers`` library's ``encode_batch``
(parallel over the batch, in Rust threads) and appended to the split files, so memory stays bounded
whatever the corpus size. Every document is followed by the end-of-text token.

A document goes to the validation split when the first 8 bytes of the sha256 of its text fall below
``val_fraction * 2**64``: the split depends on the document alone, not on file order or names.

Documents longer than :data:`PIECE_CHARS` characters are encoded in pieces cut at a line break
between two non-space characters. Byte-level BPE pre-tokenizers (GPT-2, Llama 3) split there
anyway, so the tokens are those of encoding the whole document; with other tokenizers the tokens
next to a cut may differ. A document with no such line break in a piece is cut at the limit.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from trainer.manifest import (
    LEGACY_META,
    MANIFEST,
    DataError,
    DataManifest,
    SourceFile,
    write_manifest,
)

SUFFIXES = (".txt", ".jsonl", ".parquet")
PIECE_CHARS = 1 << 18  # longest text handed to the tokenizer at once
BATCH_CHARS = 1 << 21  # characters per encode_batch call (the unit of parallel work)
BYTES_EOS = 256  # end-of-text id of the byte tokenizer (vocabulary 257) unless --eos-id says
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_PARQUET_ROWS = 1024
_HASH_BLOCK = 1 << 20

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ inputs


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The input files, in a fixed order: each input is a file, a directory or a glob pattern.

    Directories are searched recursively for the supported suffixes (hidden entries skipped) and
    listed in path order; glob matches are sorted. A file is listed once even if named twice.

    Raises:
        DataError: An input matches nothing, or a named file has an unsupported suffix.
    """
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.suffix in SUFFIXES
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"prepare: no {'/'.join(SUFFIXES)} files in {str(p)!r}")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(str(raw)):
            found = sorted(
                Path(f) for f in glob.glob(str(raw), recursive=True) if os.path.isfile(f)
            )
            if not found:
                raise DataError(f"prepare: no files match {str(raw)!r}")
        else:
            raise DataError(f"prepare: input {str(raw)!r} does not exist")
        for f in found:
            if f.suffix not in SUFFIXES:
                raise DataError(f"prepare: {str(f)!r}: unsupported file type (use {SUFFIXES})")
        files.extend(found)
    return list(dict.fromkeys(files))


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
                size += len(block)
    except OSError as e:
        raise DataError(f"prepare: cannot read {str(path)!r} ({e.strerror})") from None
    return h.hexdigest(), size


def is_val(digest: bytes, val_fraction: float) -> bool:
    """Whether a document whose text has this sha256 digest belongs to the validation split."""
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


# --------------------------------------------------------------------------------------- documents


def _safe_cut(text: str, start: int, end: int) -> int:
    """End of the piece ``text[start:end]``: just after its last line break with a non-space
    character on either side, else ``end``."""
    i = text.rfind("\n", start + 1, end - 1)
    while i > start:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", start + 1, i)
    return end


def split_pieces(text: str, limit: int | None = None) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` (default :data:`PIECE_CHARS`) characters."""
    limit = limit or PIECE_CHARS
    start = 0
    while len(text) - start > limit:
        cut = _safe_cut(text, start, start + limit)
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def _text_file_pieces(path: Path, errors: str) -> Iterator[str]:
    """A text file's content, decoded as UTF-8 in blocks and cut into pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    buf = ""
    with open(path, "rb") as f:
        while True:
            block = f.read(PIECE_CHARS)
            buf += decoder.decode(block, final=not block)
            while len(buf) > PIECE_CHARS:
                cut = _safe_cut(buf, 0, PIECE_CHARS)
                yield buf[:cut]
                buf = buf[cut:]
            if not block:
                break
    if buf:
        yield buf


def _jsonl_texts(path: Path, text_key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
            if not isinstance(row, dict) or text_key not in row:
                raise DataError(f"{where}: no {text_key!r} key (choose the column with --text-key)")
            text = row[text_key]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{where}: {text_key!r} is {type(text).__name__}, not a string")
            if text:
                yield text


def _parquet_texts(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise DataError(
            f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}; use --text-key)"
        )
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_key!r} is {kind}, not a string column")
    for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


@dataclass(frozen=True)
class Piece:
    """Part of a document, with where its tokens go."""

    text: str
    val: bool
    last: bool  # the document's last piece: the end-of-text token follows it
    source: int  # index of its file


def _with_last(pieces: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Pair each item with whether it is the last one."""
    prev = next(pieces, None)
    for nxt in pieces:
        assert prev is not None
        yield prev, False
        prev = nxt
    if prev is not None:
        yield prev, True


def iter_pieces(
    files: Sequence[Path], digests: Sequence[str], text_key: str, val_fraction: float, errors: str
) -> Iterator[Piece]:
    """Every non-empty document of ``files`` in order, as pieces tagged with their split."""
    for i, path in enumerate(files):
        if path.suffix == ".txt":
            val = is_val(bytes.fromhex(digests[i]), val_fraction)
            for text, last in _with_last(_text_file_pieces(path, errors)):
                yield Piece(text, val, last, i)
            continue
        reader = _jsonl_texts if path.suffix == ".jsonl" else _parquet_texts
        for doc in reader(path, text_key):
            digest = hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest()
            val = is_val(digest, val_fraction)
            for text, last in _with_last(split_pieces(doc)):
                yield Piece(text, val, last, i)


def batches(pieces: Iterable[Piece], max_chars: int | None = None) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped into lists of about ``max_chars`` characters."""
    limit = max_chars or BATCH_CHARS
    batch: list[Piece] = []
    size = 0
    for p in pieces:
        batch.append(p)
        size += len(p.text)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Produce ``items`` in a background thread, at most ``depth`` ahead of the consumer.

    The reader (file I/O, JSON and Parquet decoding) then overlaps the encoder, which releases the
    GIL. An exception in the producer is raised in the consumer; a consumer that stops early stops
    the producer.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(msg: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e))

    thread = threading.Thread(target=produce, name="prepare-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------- encoders


class ByteEncoder:
    """The byte tokenizer: a document's UTF-8 bytes are its token ids (0-255)."""

    name = "bytes"
    sha256: str | None = None
    errors = "surrogateescape"  # text files round-trip byte for byte, even invalid UTF-8

    def __init__(self, eos_id: int | None) -> None:
        self.eos_id = BYTES_EOS if eos_id is None else eos_id
        self.vocab_size = max(256, self.eos_id + 1)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text."""
        return [np.frombuffer(_utf8(t), dtype=np.uint8) for t in texts]


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return text.encode("utf-8", "replace")


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json``; DataError if it cannot be."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            f"--tokenizer {path}: reading a tokenizer.json needs the 'tokenizers' package "
            "(pip install tokenizers)"
        ) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception on any bad file
        raise DataError(f"--tokenizer {path}: cannot load ({str(e).splitlines()[0]})") from None


class TokenizerEncoder:
    """A Hugging Face ``tokenizer.json``, batch-encoded in parallel (Rust threads).

    Texts are encoded without the tokenizer's own special tokens (no BOS/EOS template), and a
    special token's text inside a document (say ``<|endoftext|>``) is encoded as plain text, so the
    only end-of-text ids are the separators between documents.
    """

    errors = "replace"  # the tokenizer takes valid Unicode only

    def __init__(self, path: Path, eos_id: int | None) -> None:
        self.tok = load_tokenizer(path)
        self.tok.encode_special_tokens = True
        self.name = path.name
        self.sha256: str | None = hash_file(path)[0]
        self.eos_id = eos_id if eos_id is not None else self._find_eos(path)
        top = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1)
        self.vocab_size = max(top + 1, self.eos_id + 1)

    def _find_eos(self, path: Path) -> int:
        for name in EOS_NAMES:
            found = self.tok.token_to_id(name)
            if found is not None:
                return int(found)
        raise DataError(
            f"--tokenizer {path}: no end-of-text token (none of {', '.join(EOS_NAMES)}); "
            "name its id with --eos-id"
        )

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text."""
        try:
            encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        except Exception:  # lone surrogates (JSON escapes) are not valid Unicode
            clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
            encodings = self.tok.encode_batch_fast(clean, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.uint32) for e in encodings]


@contextlib.contextmanager
def tokenizer_threads(workers: int) -> Iterator[None]:
    """Limit the tokenizer to ``workers`` threads inside the block (environment restored after).

    ``TOKENIZERS_PARALLELISM`` is read at each call; Rust's thread pool reads ``RAYON_NUM_THREADS``
    once, when the process first encodes in parallel. So 1 worker always means 1 thread, and another
    count applies to the first parallel preparation of a process (the CLI runs one per process).
    """
    keys = ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------ writer


class SplitWriter:
    """Appends the tokens of encoded pieces to ``train.bin`` / ``val.bin`` and counts them."""

    def __init__(self, tmp: Path, dtype: np.dtype, eos_id: int, n_sources: int) -> None:
        self.dtype = dtype
        self.eos = np.array([eos_id], dtype=dtype)
        self.files = {False: open(tmp / "train.bin", "wb"), True: open(tmp / "val.bin", "wb")}
        self.tokens = {False: 0, True: 0}
        self.documents = {False: 0, True: 0}
        self.source_documents = [0] * n_sources
        self.max_token_id = eos_id

    def write(self, pieces: list[Piece], ids: list[np.ndarray]) -> None:
        """Append each piece's ids (and the end-of-text id after a document's last piece)."""
        parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
        for piece, arr in zip(pieces, ids, strict=True):
            parts[piece.val].append(arr)
            if piece.last:
                parts[piece.val].append(self.eos)
                self.documents[piece.val] += 1
                self.source_documents[piece.source] += 1
        for val, arrays in parts.items():
            if not arrays:
                continue
            tokens = np.concatenate(arrays)
            if tokens.size:
                self.max_token_id = max(self.max_token_id, int(tokens.max()))
            tokens.astype(self.dtype, copy=False).tofile(self.files[val])
            self.tokens[val] += tokens.size

    def close(self) -> None:
        """Close both files."""
        for f in self.files.values():
            f.close()


def _check_out(out: Path) -> None:
    if (out / MANIFEST).exists() or (out / LEGACY_META).exists():
        raise DataError(f"--out {out}: already holds shards; remove it first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out}: exists and is not an empty directory")


def _check_args(val_fraction: float, eos_id: int | None, workers: int) -> None:
    if not 0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction {val_fraction}: must be in (0, 0.5)")
    if eos_id is not None and eos_id < 0:
        raise DataError(f"--eos-id {eos_id}: must be >= 0")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be >= 1")


# --------------------------------------------------------------------------------------- pipeline


def _tokenize(
    files: list[Path],
    digests: list[str],
    encoder: ByteEncoder | TokenizerEncoder,
    writer: SplitWriter,
    text_key: str,
    val_fraction: float,
    workers: int,
) -> None:
    pieces = iter_pieces(files, digests, text_key, val_fraction, encoder.errors)
    stream: Iterator[list[Piece]] = batches(pieces)
    if workers > 1:
        stream = prefetch(stream)
    with tokenizer_threads(workers):
        for batch in stream:
            writer.write(batch, encoder.encode([p.text for p in batch]))


def _describe(files: list[Path]) -> str:
    kinds = {s: sum(f.suffix == s for f in files) for s in SUFFIXES}
    listed = ", ".join(f"{n} {s[1:]}" for s, n in kinds.items() if n)
    return f"{len(files)} files ({listed})"


def prepare(
    inputs: Sequence[str | Path],
    out: Path,
    tokenizer: Path | None = None,
    text_key: str = "text",
    eos_id: int | None = None,
    val_fraction: float = 0.02,
    workers: int | None = None,
) -> DataManifest:
    """Tokenize a corpus into the token directory ``out`` (written whole, then renamed into place).

    Args:
        inputs: Files, directories or glob patterns (see :func:`find_inputs`).
        out: The directory to create (absent or empty).
        tokenizer: A local ``tokenizer.json``; None: the byte tokenizer.
        text_key: The text field of JSON Lines rows and the text column of Parquet files.
        eos_id: The end-of-text id; None: the tokenizer's own (``<|endoftext|>``, ``</s>``, ...),
            or 256 for the byte tokenizer (vocabulary 257).
        val_fraction: Expected fraction of documents held out for validation.
        workers: Tokenizer threads; None: every available core.

    Returns:
        The manifest written to ``out/data.json``.

    Raises:
        DataError: One line: bad arguments or inputs, or a split left empty.
    """
    workers = workers or available_cores()
    _check_args(val_fraction, eos_id, workers)
    _check_out(out)
    files = find_inputs(inputs)
    encoder = TokenizerEncoder(tokenizer, eos_id) if tokenizer else ByteEncoder(eos_id)
    hashed = [hash_file(f) for f in files]
    dtype = np.dtype(np.uint16 if encoder.vocab_size <= 1 << 16 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = SplitWriter(tmp, dtype, encoder.eos_id, len(files))
        try:
            digests = [h for h, _ in hashed]
            _tokenize(files, digests, encoder, writer, text_key, val_fraction, workers)
        finally:
            writer.close()
        manifest = _manifest(files, hashed, encoder, writer, dtype, val_fraction)
        write_manifest(tmp, manifest)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _manifest(
    files: list[Path],
    hashed: list[tuple[str, int]],
    encoder: ByteEncoder | TokenizerEncoder,
    writer: SplitWriter,
    dtype: np.dtype,
    val_fraction: float,
) -> DataManifest:
    n_docs = writer.documents[False] + writer.documents[True]
    for val, name in ((True, "validation"), (False, "training")):
        if not writer.documents[val]:
            raise DataError(
                f"prepare: no document fell in the {name} split ({n_docs} documents, "
                f"--val-fraction {val_fraction}); use more, smaller documents or another fraction"
            )
    if writer.max_token_id >= encoder.vocab_size:
        raise DataError(
            f"prepare: token id {writer.max_token_id} is not below the vocabulary "
            f"{encoder.vocab_size} of {encoder.name}"
        )
    sources = tuple(
        SourceFile(path=str(f), sha256=h, bytes=size, documents=docs)
        for f, (h, size), docs in zip(files, hashed, writer.source_documents, strict=True)
    )
    return DataManifest(
        dtype="uint16" if dtype == np.uint16 else "uint32",
        vocab_size=encoder.vocab_size,
        eos_id=encoder.eos_id,
        max_token_id=writer.max_token_id,
        tokenizer=encoder.name,
        tokenizer_sha256=encoder.sha256,
        train_tokens=writer.tokens[False],
        val_tokens=writer.tokens[True],
        n_documents=n_docs,
        val_documents=writer.documents[True],
        val_fraction=val_fraction,
        sources=sources,
        description=_describe(files),
    )
