"""The manifest of a prepared token directory (``data.json``) and the plan-time data checks.

Torch- and numpy-free: the sweeper imports this module on a login node to refuse, before anything
is submitted, a run whose corpus is missing, tokenized for a larger vocabulary than the model's, or
too small for the largest horizon::

    manifest = check_data(cfg.data, cfg.model.vocab_size, train_tokens_needed(cfg))

A directory made by ``python -m trainer.data prepare`` holds ``train.bin``, ``val.bin`` and
``data.json`` (format 2). Directories of the first format hold ``meta.json`` instead; they are still
read, with the fields they lack (documents, sources, end-of-text id) left unknown.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainer.config import ConfigError, DataConfig

if TYPE_CHECKING:
    from trainer.config import TrainConfig

MANIFEST = "data.json"
LEGACY_META = "meta.json"  # format 1: no documents, no end-of-text token, tail split
FORMAT = 2

Dtype = Literal["uint16", "uint32"]
Split = Literal["document-hash", "tail"]


class DataError(ConfigError):
    """Data that cannot feed the planned run (missing, too small, wrong vocabulary). One line."""


@dataclass(frozen=True, kw_only=True)
class SourceFile:
    """One input file of a prepared corpus."""

    path: str  # as given on the command line (relative paths stay relative)
    sha256: str
    bytes: int
    documents: int  # non-empty documents read from it


@dataclass(frozen=True, kw_only=True)
class DataManifest:
    """What ``data.json`` says about a prepared token directory.

    Token streams are ``train.bin`` and ``val.bin``: flat arrays of ``dtype``. With an ``eos_id``,
    every document is followed by that token. ``split = "document-hash"``: a document is held out
    for validation when the first 8 bytes of the sha256 of its text, read as a big-endian integer,
    fall below ``val_fraction * 2**64``, so the split does not depend on file order.
    """

    format: int = FORMAT
    dtype: Dtype
    vocab_size: int  # ids of the tokenizer (and the end-of-text token) are below this
    eos_id: int | None  # None: documents are concatenated with no separator (format 1, built-ins)
    max_token_id: int  # largest id actually present
    tokenizer: str  # "bytes", "synthetic", or the tokenizer file's name
    tokenizer_sha256: str | None  # of the tokenizer.json file; None for built-in tokenizers
    train_tokens: int
    val_tokens: int
    n_documents: int | None  # None: unknown (format 1)
    val_documents: int | None
    val_fraction: float | None
    split: Split = "document-hash"
    sources: tuple[SourceFile, ...] = ()
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``data.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataManifest:
        """Build from a ``data.json`` object; KeyError/TypeError/ValueError on a bad one."""
        d = dict(raw)
        d["sources"] = tuple(SourceFile(**s) for s in d.get("sources", ()))
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        wrong = sorted(required - set(d)) + sorted(set(d) - {f.name for f in fields})
        if wrong:
            raise KeyError(wrong[0])
        m = cls(**d)
        m._check_types()
        return m

    def _check_types(self) -> None:
        if self.dtype not in ("uint16", "uint32"):
            raise ValueError(f"dtype = {self.dtype!r}, expected 'uint16' or 'uint32'")
        for key in ("vocab_size", "max_token_id", "train_tokens", "val_tokens"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} = {v!r}, expected an integer >= 0")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id = {self.eos_id}, not below vocab_size = {self.vocab_size}")

    def provenance(self, path: Path, manifest_sha256: str) -> dict[str, Any]:
        """The summary a run records in ``provenance.json`` (sources are counted, not listed)."""
        return {
            "path": str(path),
            "manifest_sha256": manifest_sha256,
            "format": self.format,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "dtype": self.dtype,
            "train_tokens": self.train_tokens,
            "val_tokens": self.val_tokens,
            "n_documents": self.n_documents,
            "n_sources": len(self.sources),
        }


def manifest_file(path: Path) -> Path | None:
    """``data.json`` of a token directory, else its legacy ``meta.json``, else None."""
    for name in (MANIFEST, LEGACY_META):
        if (path / name).is_file():
            return path / name
    return None


def _from_legacy(raw: dict[str, Any]) -> DataManifest:
    """A format-1 ``meta.json`` as a manifest (unknown fields are None).

    Either of ``vocab_size`` and ``max_token_id`` may be missing (shards written by another tool);
    each is then derived from the other.
    """
    raw_vocab, raw_top = raw.get("vocab_size"), raw.get("max_token_id")
    if raw_vocab is not None:
        vocab = int(raw_vocab)
    elif raw_top is not None:
        vocab = int(raw_top) + 1
    else:
        raise KeyError("vocab_size")
    top = int(raw_top) if raw_top is not None else vocab - 1
    m = DataManifest(
        format=1,
        dtype=raw["dtype"],
        vocab_size=vocab,
        eos_id=None,
        max_token_id=top,
        tokenizer=str(raw.get("tokenizer", "unknown")),
        tokenizer_sha256=None,
        train_tokens=int(raw["train_tokens"]),
        val_tokens=int(raw["val_tokens"]),
        n_documents=None,
        val_documents=None,
        val_fraction=None,
        split="tail",
        description=str(raw.get("source", "")),
    )
    m._check_types()
    return m


def read_manifest_with_digest(path: str | Path) -> tuple[DataManifest, str]:
    """:func:`read_manifest` plus the sha256 of the manifest file's bytes (for provenance)."""
    path = Path(path)
    file = manifest_file(path)
    if file is None:
        raise DataError(
            f"{path / MANIFEST}: missing (make the directory with 'python -m trainer.data prepare')"
        )
    try:
        data = file.read_bytes()
        raw = json.loads(data)
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{file}: expected a JSON object")
    try:
        manifest = _from_legacy(raw) if file.name == LEGACY_META else DataManifest.from_dict(raw)
    except KeyError as e:
        raise DataError(f"{file}: missing or unknown key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise DataError(f"{file}: bad manifest ({str(e).splitlines()[0]})") from None
    return manifest, hashlib.sha256(data).hexdigest()


def read_manifest(path: str | Path) -> DataManifest:
    """The manifest of the token directory ``path`` (``data.json``, or a legacy ``meta.json``).

    Raises:
        DataError: (a ConfigError) one line naming the file: missing, unreadable, not JSON, or not
            a manifest.
    """
    return read_manifest_with_digest(path)[0]


def write_manifest(path: Path, manifest: DataManifest) -> None:
    """Write ``path/data.json`` (the caller renames the whole directory into place)."""
    (path / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")


def train_tokens_needed(cfg: TrainConfig) -> int:
    """Training tokens a run reads: ``total_steps + 1`` global batches of ``seq_len + 1`` windows.

    The last logged step needs one batch more (the loss of the final weights), and windows do not
    overlap, so each sequence consumes ``seq_len + 1`` tokens.
    """
    return (cfg.total_steps + 1) * cfg.batch_size * (cfg.model.seq_len + 1)


def check_data(data: DataConfig, vocab_size: int, tokens_needed: int) -> DataManifest | None:
    """Refuse, before any run starts, data that cannot feed a model of ``vocab_size``.

    Args:
        data: The run's data section.
        vocab_size: ``model.vocab_size``.
        tokens_needed: Training tokens the run reads (see :func:`train_tokens_needed`).

    Returns:
        The manifest for ``kind = "shards"``; None for the built-in corpora (prepared on first use;
        only the synthetic corpus's size and branching are checked).

    Raises:
        ConfigError: One line naming the key and value: missing directory or manifest, vocabulary
            larger than the model's, or fewer training tokens than needed without
            ``data.allow_repeat = true``.
    """
    if data.kind == "stdlib":
        return None
    if data.kind == "synthetic":
        if not 0 < data.synthetic_branching < vocab_size:
            raise ConfigError(
                f"data.synthetic_branching = {data.synthetic_branching}: must be below "
                f"model.vocab_size = {vocab_size}"
            )
        if data.synthetic_tokens < tokens_needed and not data.allow_repeat:
            raise ConfigError(
                f"data.synthetic_tokens = {data.synthetic_tokens}: fewer than the {tokens_needed} "
                "training tokens the largest horizon needs (raise it, or set data.allow_repeat)"
            )
        return None
    key = f"data.path = {data.path!r}"
    if not data.path or not os.path.isdir(data.path):
        raise ConfigError(f"{key}: no such directory")
    try:
        manifest = read_manifest(data.path)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if manifest.vocab_size > vocab_size:
        raise ConfigError(
            f"{key}: vocabulary {manifest.vocab_size} > model.vocab_size {vocab_size}"
        )
    if manifest.train_tokens < tokens_needed and not data.allow_repeat:
        epochs = tokens_needed / max(manifest.train_tokens, 1)
        raise ConfigError(
            f"{key}: {manifest.train_tokens} training tokens, the largest horizon needs "
            f"{tokens_needed} ({math.ceil(epochs)} epochs; set data.allow_repeat = true to repeat)"
        )
    return manifest
