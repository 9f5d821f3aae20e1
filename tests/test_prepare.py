"""The data pipeline: mixed inputs, reference tokens, document split, manifest, CLI, plan checks."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweeper.store import SweepStore
from trainer.config import ConfigError, DataConfig, TrainConfig
from trainer.data import Shards
from trainer.manifest import check_data, read_manifest, train_tokens_needed
from trainer.prepare import PIECE_CHARS, is_val, prepare, split_pieces

tokenizers = pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parent.parent
WORDS = "the of and a to in is was he for it with as his on be at by i this had not are but".split()
EOT = "<|endoftext|>"


def _doc(rng: random.Random, n_words: int) -> str:
    lines = []
    for _ in range(max(1, n_words // 12)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines)


def _docs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [_doc(rng, rng.randint(5, 80)) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE ``tokenizer.json`` (GPT-2 style, vocab 400) trained on generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_docs(0, 300), trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _mixed_corpus(root: Path, docs: list[str]) -> list[str]:
    """txt files, a jsonl file and a parquet file (in a subdirectory) holding ``docs``.

    Returns the documents in the order prepare reads them (sorted paths).
    """
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0])
    (root / "b.txt").write_text(docs[1])
    rows = [{"text": d, "id": i} for i, d in enumerate(docs[2:30])]
    rows.insert(3, {"text": "", "id": -1})  # empty documents are skipped
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    table = pa.table({"id": list(range(30, len(docs))), "text": docs[30:]})
    pq.write_table(table, root / "sub" / "d.parquet", row_group_size=7)
    (root / "notes.md").write_text("not a corpus file")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    return docs


def _reference(
    tok: Any, docs: list[str], eos: int | None, val_fraction: float
) -> dict[bool, list[int]]:
    """Each document encoded on its own, followed by ``eos``, in the split its hash chooses."""
    assert eos is not None
    out: dict[bool, list[int]] = {False: [], True: []}
    for d in docs:
        key = int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big")
        out[key < val_fraction * 2**64] += tok.encode(d, add_special_tokens=False).ids + [eos]
    return out


def test_mixed_directory_gives_the_reference_tokens(tmp_path: Path, bpe: Path) -> None:
    from tokenizers import Tokenizer

    docs = _docs(1, 60)
    docs[5] += f" a literal {EOT} inside a document is text"
    _mixed_corpus(tmp_path / "corpus", docs)
    m = prepare([tmp_path / "corpus"], tmp_path / "out", tokenizer=bpe, val_fraction=0.2)
    tok = Tokenizer.from_file(str(bpe))
    tok.encode_special_tokens = True
    eos = tok.token_to_id(EOT)
    ref = _reference(tok, docs, eos, 0.2)
    shards = Shards.open(tmp_path / "out")
    assert shards.train.tolist() == ref[False] and shards.val.tolist() == ref[True]
    assert len(ref[True]) > 0 and (shards.train == eos).sum() + (shards.val == eos).sum() == 60
    assert m == read_manifest(tmp_path / "out")
    assert (m.dtype, m.vocab_size, m.eos_id, m.n_documents) == (
        "uint16",
        tok.get_vocab_size(),
        eos,
        60,
    )
    assert m.tokenizer == "tokenizer.json"
    assert m.tokenizer_sha256 == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert (m.train_tokens, m.val_tokens) == (len(ref[False]), len(ref[True]))
    names = [Path(s.path).name for s in m.sources]
    assert names == ["a.txt", "b.txt", "c.jsonl", "d.parquet"]
    assert [s.documents for s in m.sources] == [1, 1, 28, 30]
    for s in m.sources:
        assert s.sha256 == hashlib.sha256(Path(s.path).read_bytes()).hexdigest()


def _documents(out: Path, split: str = "val", eos: int = 256) -> list[bytes]:
    """The documents of a byte-level split, cut at the end-of-text tokens, sorted."""
    val = getattr(Shards.open(out), split)
    assert val[-1] == eos
    cuts = np.flatnonzero(val == eos)
    return sorted(
        val[a + 1 : b].astype(np.uint8).tobytes()
        for a, b in zip([-1, *cuts[:-1]], cuts, strict=True)
    )


def test_validation_split_is_stable_under_file_reordering(tmp_path: Path) -> None:
    docs = _docs(2, 200)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    for i, d in enumerate(docs[:40]):
        (one / f"{i:03d}.txt").write_text(d)
        (two / f"{999 - i:03d}.txt").write_text(d)  # the reverse order
    rows = [json.dumps({"text": d}) + "\n" for d in docs[40:]]
    (one / "rows.jsonl").write_text("".join(rows))
    random.Random(0).shuffle(rows)  # other rows, other files, other order
    (two / "x.jsonl").write_text("".join(rows[:70]))
    (two / "y.jsonl").write_text("".join(rows[70:]))
    a = prepare([one], tmp_path / "a", val_fraction=0.1, workers=1)
    b = prepare([two / "y.jsonl", two], tmp_path / "b", val_fraction=0.1, workers=1)
    assert a.val_documents and a.val_documents == b.val_documents
    assert a.n_documents == b.n_documents == 200
    assert (a.train_tokens, a.val_tokens) == (b.train_tokens, b.val_tokens)
    assert _documents(tmp_path / "a") == _documents(tmp_path / "b")
    expected = sorted(d.encode() for d in docs if is_val(hashlib.sha256(d.encode()).digest(), 0.1))
    assert _documents(tmp_path / "a") == expected


def test_byte_level_tokens_and_end_of_text_choice(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    texts = [
        b"\xff invalid utf-8 is kept byte for byte\n" + "h\u00e9llo \u00fcn\u00efcode\n".encode()
    ]
    texts += [d.encode() for d in _docs(8, 30)]
    for i, t in enumerate(texts):
        (tmp_path / "in" / f"{i:02d}.txt").write_bytes(t)
    m = prepare([tmp_path / "in" / "*.txt"], tmp_path / "out", val_fraction=0.3)
    assert (m.vocab_size, m.eos_id, m.dtype, m.n_documents) == (257, 256, "uint16", 31)
    assert m.val_documents is not None and 0 < m.val_documents < 31
    assert sorted(
        _documents(tmp_path / "out", "train") + _documents(tmp_path / "out", "val")
    ) == sorted(texts)
    declared = prepare([tmp_path / "in"], tmp_path / "zero", eos_id=0, val_fraction=0.3)
    assert (declared.vocab_size, declared.eos_id) == (256, 0)
    assert declared.val_documents == m.val_documents


def test_long_documents_are_encoded_in_pieces_with_the_same_tokens(
    tmp_path: Path, bpe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenizers import Tokenizer

    import trainer.prepare as prep

    monkeypatch.setattr(prep, "PIECE_CHARS", 300)
    monkeypatch.setattr(prep, "BATCH_CHARS", 1000)
    long_doc = "\n".join(_docs(3, 40)) + "\n\n  indented\tline\n" + "x" * 700
    pieces = list(split_pieces(long_doc, 300))
    assert "".join(pieces) == long_doc and max(map(len, pieces)) <= 300 and len(pieces) > 10
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "long.txt").write_text(long_doc)
    (tmp_path / "in" / "rows.jsonl").write_text(json.dumps({"body": long_doc}) + "\n")
    short = _docs(4, 60)
    (tmp_path / "in" / "short.jsonl").write_text(
        "".join(json.dumps({"body": d}) + "\n" for d in short)
    )
    prepare([tmp_path / "in"], tmp_path / "out", tokenizer=bpe, text_key="body", val_fraction=0.3)
    tok = Tokenizer.from_file(str(bpe))
    tok.encode_special_tokens = True
    ref = _reference(tok, [long_doc, long_doc, *short], tok.token_to_id(EOT), 0.3)
    s = Shards.open(tmp_path / "out")
    assert s.train.tolist() == ref[False] and s.val.tolist() == ref[True]
    assert PIECE_CHARS == 1 << 18  # the module default is untouched outside this test


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.data", "prepare", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_workers_give_identical_files(tmp_path: Path, bpe: Path) -> None:
    (tmp_path / "in").mkdir()
    rows = "".join(json.dumps({"text": d}) + "\n" for d in _docs(5, 400))
    (tmp_path / "in" / "rows.jsonl").write_text(rows)
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        done = _cli(str(tmp_path / "in"), "--out", str(out), "--tokenizer", str(bpe),
                    "--workers", workers)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "tokens/s" in done.stdout
        outs.append(out)
    for name in ("train.bin", "val.bin", "data.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, bpe: Path) -> None:
    (tmp_path / "t.txt").write_text("some text " * 100)
    (tmp_path / "rows.jsonl").write_text('{"content": "x"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"text": \n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "empty").mkdir()
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("{}")
    from tokenizers import Tokenizer, models

    no_eos = tmp_path / "noeos.json"
    Tokenizer(models.BPE()).save(str(no_eos))
    t = str(tmp_path / "t.txt")
    cases = {
        "does not exist": [str(tmp_path / "nope")],
        "no files match": [str(tmp_path / "*.none")],
        "unsupported file type": [str(tmp_path / "notes.md")],
        "no .txt/.jsonl/.parquet files": [str(tmp_path / "empty")],
        "rows.jsonl:1: no 'text' key": [str(tmp_path / "rows.jsonl")],
        "bad.jsonl:2: not valid JSON": [str(tmp_path / "bad.jsonl")],
        "no column 'text'": [str(tmp_path / "p.parquet")],
        "cannot load": [t, "--tokenizer", str(bad_tok)],
        "no end-of-text token": [t, "--tokenizer", str(no_eos)],
        "--val-fraction 0.7": [t, "--val-fraction", "0.7"],
        "no document fell in the": [t],  # one document cannot make two splits
        "invalid int value": [t, "--eos-id", "x"],
    }
    for expected, args in cases.items():
        done = _cli(*args, "--out", str(tmp_path / "o"))
        assert done.returncode == 2, (expected, done.stderr)
        assert expected in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "o").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    (tmp_path / "many.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in _docs(7, 50))
    )
    ok = _cli(str(tmp_path / "many.jsonl"), "--out", str(tmp_path / "o"), "--val-fraction", "0.2")
    again = _cli(t, "--out", str(tmp_path / "o"))
    assert again.returncode == 2 and "already holds shards" in again.stderr, ok.stderr


# ------------------------------------------------------------------------------- manifest checks


def _corpus(tmp_path: Path, n_docs: int = 300) -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    rows = "".join(json.dumps({"text": d}) + "\n" for d in _docs(6, n_docs))
    (tmp_path / "in" / "rows.jsonl").write_text(rows)
    out = tmp_path / "shards"
    prepare([tmp_path / "in"], out, val_fraction=0.05, workers=1)
    return out


def test_check_data_refuses_with_one_line(tmp_path: Path) -> None:
    out = _corpus(tmp_path)
    m = read_manifest(out)
    ok = DataConfig(kind="shards", path=str(out))
    assert check_data(ok, 257, m.train_tokens) == m
    cases = [
        (DataConfig(kind="shards", path=str(tmp_path / "nope")), 257, 1, "no such directory"),
        (DataConfig(kind="shards", path=str(tmp_path / "in")), 257, 1, "data.json: missing"),
        (ok, 256, 1, "vocabulary 257 > model.vocab_size 256"),
        (ok, 257, m.train_tokens + 1, f"{m.train_tokens} training tokens, the largest horizon"),
        (DataConfig(kind="synthetic", synthetic_tokens=1000), 64, 1001, "synthetic_tokens = 1000"),
        (DataConfig(kind="synthetic", synthetic_branching=64), 64, 1, "synthetic_branching = 64"),
    ]
    for data, vocab, needed, message in cases:
        with pytest.raises(ConfigError) as e:
            check_data(data, vocab, needed)
        assert message in str(e.value) and "\n" not in str(e.value)
        assert str(e.value).startswith("data.")
    repeat = DataConfig(kind="shards", path=str(out), allow_repeat=True)
    assert check_data(repeat, 257, 10 * m.train_tokens) == m
    assert check_data(DataConfig(kind="stdlib"), 256, 10**12) is None
    (out / "data.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"data.path = .*data.json: not valid JSON"):
        check_data(ok, 257, 1)
    (out / "data.json").write_text('{"dtype": "uint16"}')
    with pytest.raises(ConfigError, match=r"data.json: missing or unknown key"):
        read_manifest(out)


def test_manifest_module_imports_no_torch_or_numpy() -> None:
    code = (
        "import sys, trainer.manifest; "
        "assert not {'torch', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_tokens_needed_matches_what_the_trainer_reads() -> None:
    cfg = TrainConfig.from_dict(
        {"model": {"preset": "test-micro"}, "batch_size": 4, "horizons_tokens": [640, 1280]}
    )
    assert train_tokens_needed(cfg) == 21 * 4 * 17  # 20 steps + 1, windows of seq_len + 1


@pytest.mark.slow
def test_trainer_trains_on_prepared_data(tmp_path: Path, trainer_cli: Any) -> None:
    out = _corpus(tmp_path, 600)
    cfg = {
        "model": {"preset": "test-micro", "vocab_size": 257},
        "data": {"kind": "shards", "path": str(out)},
        "batch_size": 4,
        "horizons_tokens": [640],
        "log_every": 5,
        "val_tokens": 256,
        "checkpoint_every": 0,
        "threads": 1,
    }
    check_data(
        TrainConfig.from_dict(cfg).data, 257, train_tokens_needed(TrainConfig.from_dict(cfg))
    )
    done = trainer_cli.run(cfg, tmp_path / "run")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 10
    data = json.loads((tmp_path / "run" / "provenance.json").read_text())["data"]
    digest = hashlib.sha256((out / "data.json").read_bytes()).hexdigest()
    assert data["manifest_sha256"] == digest and data["eos_id"] == 256
    assert data["train_tokens"] == read_manifest(out).train_tokens
    small = {**cfg, "model": {"preset": "test-micro"}}  # vocab 256 < 257: refused before step 0
    refused = trainer_cli.run(small, tmp_path / "run2")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1


# ------------------------------------------------------------------------ through the sweeper CLI

SWEEPER = str(Path(sys.executable).with_name("sweeper"))


def _spec(path: Path, shards: Path, vocab: int = 257) -> Path:
    """A one-run sweep (test-micro, 10 steps of 4 x 16 tokens) on the token directory ``shards``."""
    path.write_text(
        f"""name = "{path.stem}"

[[models]]
preset = "test-micro"
vocab_size = {vocab}

[data]
kind = "shards"
path = "{shards}"
[grid]
lr = [0.03125]
batch_size = [4]
horizons_tokens = [640]
seeds = [30]

[train]
log_every = 5
val_tokens = 256
checkpoint_every = 0
threads = 1

[backend.local]
max_parallel = 1
"""
    )
    return path


def _sweeper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SWEEPER, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_a_sweep_trains_on_prepared_data(tmp_path: Path) -> None:
    out = _corpus(tmp_path, 600)
    spec = _spec(tmp_path / "onshards.toml", out)
    results = tmp_path / "results"
    done = _sweeper("--results", str(results), "launch", str(spec), "--no-progress")
    assert done.returncode == 0, done.stderr
    store = SweepStore(results / "onshards")
    (run_id,) = store.run_ids()
    run = store.run_dir(run_id)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 10
    data = json.loads((run / "provenance.json").read_text())["data"]
    digest = hashlib.sha256((out / "data.json").read_bytes()).hexdigest()
    assert data["manifest_sha256"] == digest
    assert (data["vocab_size"], data["eos_id"], data["tokenizer"]) == (257, 256, "bytes")
    assert data["train_tokens"] == read_manifest(out).train_tokens


def test_plan_refuses_a_vocabulary_or_size_mismatch_in_one_line(tmp_path: Path) -> None:
    out = _corpus(tmp_path, 40)  # 40 documents, about 16k training tokens
    m = read_manifest(out)
    _spec(tmp_path / "vocab.toml", out, vocab=256)
    big = _spec(tmp_path / "size.toml", out).read_text().replace("[640]", "[1048576]")
    (tmp_path / "size.toml").write_text(big)  # 16,384 steps of 4 x 17 tokens
    cases = {
        "vocab.toml": "vocabulary 257 > model.vocab_size 256",
        "size.toml": f"{m.train_tokens} training tokens, the largest horizon needs",
    }
    for name, message in cases.items():
        done = _sweeper("plan", str(tmp_path / name))
        assert done.returncode == 2, (name, done.stdout, done.stderr)
        assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr and str(out) in done.stderr
    (tmp_path / "repeat.toml").write_text(big.replace("[data]", "[data]\nallow_repeat = true"))
    ok = _sweeper("plan", str(tmp_path / "repeat.toml"))  # the same corpus, vocabulary 257
    assert ok.returncode == 0, ok.stderr
