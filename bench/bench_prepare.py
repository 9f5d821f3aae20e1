"""Throughput and peak memory of ``python -m trainer.data prepare``: one worker against all cores.

The benchmark generates a corpus of ``--mb`` megabytes of English-like text (Zipf-distributed
synthetic words in sentences and paragraphs): 70 % JSON Lines rows, 20 % text files (one document
each), 10 % Parquet rows. It trains a byte-level BPE tokenizer (``--vocab`` tokens, GPT-2
pre-tokenization) on a 2 MB sample, then prepares the corpus in a fresh process per configuration:

* ``bpe``, 1 worker and all cores (``--workers``, default every available core);
* ``bytes`` (the byte tokenizer, no Rust threads), 1 worker.

For each it prints the median wall time and CPU time (user + system, all threads) over ``--reps``
interleaved repetitions, tokens/s and input MB/s of the wall time, and the peak resident memory
of the process (``ru_maxrss`` from ``os.wait4``). Several
``--mb`` values show how peak memory depends on corpus size (it should not).

Usage: ``python bench/bench_prepare.py [--mb 200 ...] [--vocab 8192] [--workers N] [--reps 3]
[--configs bpe-1 bpe-all bytes]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("bpe-1", "bpe-all", "bytes")
_LETTERS = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
_LETTER_P = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4,
                      2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])  # fmt: skip


def _lexicon(rng: np.random.Generator, n: int = 30_000) -> np.ndarray:
    lengths = np.clip(rng.poisson(5, n), 1, 14)
    letters = rng.choice(_LETTERS, size=int(lengths.sum()), p=_LETTER_P / _LETTER_P.sum())
    cuts = np.cumsum(lengths)[:-1]
    return np.array(["".join(w) for w in np.split(letters, cuts)])


def _documents(rng: np.random.Generator, lexicon: np.ndarray, n_bytes: int) -> list[str]:
    """Documents of Zipf-distributed words, about ``n_bytes`` in all."""
    p = 1.0 / np.arange(1, len(lexicon) + 1)
    p /= p.sum()
    docs: list[str] = []
    size = 0
    while size < n_bytes:
        words = lexicon[rng.choice(len(lexicon), size=200_000, p=p)].tolist()
        i = 0
        while i < len(words) - 3000 and size < n_bytes:
            n = int(rng.lognormal(6.5, 1.0)) + 5  # median ~ 660 words
            sentences = [
                " ".join(words[j : j + 12]).capitalize() + "."
                for j in range(i, i + min(n, 3000), 12)
            ]
            doc = "\n\n".join(" ".join(sentences[k : k + 5]) for k in range(0, len(sentences), 5))
            docs.append(doc)
            size += len(doc) + 1
            i += min(n, 3000)
    return docs


def make_corpus(root: Path, mb: float, seed: int = 0) -> tuple[int, list[str]]:
    """Write the corpus under ``root``; return (bytes written, a 2 MB sample of documents)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    docs = _documents(rng, _lexicon(rng), int(mb * 1e6))
    root.mkdir(parents=True)
    (root / "txt").mkdir()
    n = len(docs)
    cut_txt, cut_pq = int(n * 0.7), int(n * 0.9)
    per_file = 20_000
    for k in range(0, cut_txt, per_file):
        rows = (json.dumps({"text": d}) + "\n" for d in docs[k : min(k + per_file, cut_txt)])
        (root / f"rows-{k // per_file:03d}.jsonl").write_text("".join(rows))
    for k in range(cut_txt, cut_pq):
        (root / "txt" / f"{k:07d}.txt").write_text(docs[k])
    pq.write_table(pa.table({"text": docs[cut_pq:]}), root / "rows.parquet", row_group_size=2048)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    sample, size = [], 0
    for d in docs[:: max(1, n // 2000)]:
        sample.append(d)
        size += len(d)
        if size > 2e6:
            break
    return total, sample


def train_tokenizer(sample: list[str], vocab: int, out: Path) -> Path:
    """A GPT-2-style byte-level BPE with ``<|endoftext|>``, trained on ``sample``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer)
    tok.save(str(out))
    return out


def run_prepare(corpus: Path, out: Path, workers: int, tokenizer: Path | None) -> dict:
    """One ``prepare`` in a fresh process: seconds, tokens and peak RSS (MB) of that process."""
    cmd = [sys.executable, "-m", "trainer.data", "prepare", str(corpus), "--out", str(out),
           "--workers", str(workers)]  # fmt: skip
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed: {stderr.decode().strip()}")
    manifest = json.loads((out / "data.json").read_text())
    shutil.rmtree(out)
    return {
        "seconds": seconds,
        "tokens": manifest["train_tokens"] + manifest["val_tokens"],
        "documents": manifest["n_documents"],
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def _row(n_bytes: int, name: str, workers: int, runs: list[dict]) -> str:
    seconds = statistics.median(r["seconds"] for r in runs)
    tokens = runs[0]["tokens"]
    return (
        f"| {n_bytes / 1e6:.0f} | {name} | {workers} | {runs[0]['documents']} | {tokens} | "
        f"{seconds:.1f} | {statistics.median(r['cpu_s'] for r in runs):.1f} | "
        f"{tokens / seconds:,.0f} | {n_bytes / 1e6 / seconds:.1f} | "
        f"{max(r['peak_rss_mb'] for r in runs):.0f} |"
    )


def _generate(work: Path, mb: float, vocab: int) -> tuple[Path, int, Path]:
    """Make the corpus and tokenizer in a child process, so that this one stays small.

    A child's peak RSS (``ru_maxrss``) includes the RSS of the process it was forked from, so the
    process that launches the measured runs must not hold the corpus.
    """
    corpus, tok = work / f"corpus-{mb:g}", work / "tokenizer.json"
    cmd = [sys.executable, __file__, "--generate", str(corpus), "--mb", str(mb),
           "--vocab", str(vocab)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO)
    return corpus, sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file()), tok


def main() -> None:
    """Generate, tokenize and print one table row per (size, configuration)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, nargs="+", default=[200.0], help="corpus sizes (MB)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median time)")
    p.add_argument(
        "--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="what to run"
    )
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # the child of _generate
    args = p.parse_args()
    if args.generate:
        _, sample = make_corpus(args.generate, args.mb[0])
        train_tokenizer(sample, args.vocab, args.generate.parent / "tokenizer.json")
        return
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.dir))
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| corpus MB | tokenizer | workers | documents | tokens | wall s | CPU s | tokens/s "
          "| MB/s | peak RSS MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for mb in args.mb:
            corpus, n_bytes, tok = _generate(work, mb, args.vocab)
            every = {"bpe-1": ("bpe", 1, tok), "bpe-all": ("bpe", args.workers, tok),
                     "bytes": ("bytes", 1, None)}  # fmt: skip
            configs = [every[c] for c in args.configs]
            runs: list[list[dict]] = [[] for _ in configs]
            for _ in range(args.reps):  # interleaved, so load on the machine hits all alike
                for i, (_, workers, tokenizer) in enumerate(configs):
                    runs[i].append(run_prepare(corpus, work / "out", workers, tokenizer))
            for (name, workers, _), r in zip(configs, runs, strict=True):
                print(_row(n_bytes, name, workers, r), flush=True)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
