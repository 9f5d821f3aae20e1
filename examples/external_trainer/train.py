"""A trainer of your own, run by a sweep: a tiny numpy language model that follows the contract.

It has its own model (a factorised bigram model: token embedding, then an output layer), its own
Adam, and its own data (a random Markov chain, the same corpus for every run, batch ``s`` fixed by
``(seed, s)`` so a resumed run sees the batches an uninterrupted one would). Of the sweeper it uses
only ``sweeper.contract.RunWriter``, which writes ``metrics.jsonl`` and ``summary.json``, and on
SIGTERM/SIGUSR2 calls our checkpoint function and exits 75::

    python examples/external_trainer/train.py --out runs/demo --lr 0.01 --batch-size 8 \\
        --seq-len 16 --steps 64 --horizon-steps 32,64

A sweep runs it through ``[trainer] command`` (``examples/external_trainer/sweep.toml``,
docs/external-trainers.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.contract import RunWriter

DATA_SEED = 1234  # one corpus for every run of a sweep
BRANCHING = 4  # successors per token in the Markov chain
VAL_SEQUENCES = 64
KEEP_CHECKPOINTS = 2

Params = dict[str, np.ndarray]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory ({out_dir})")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to train")
    p.add_argument("--horizon-steps", default="", help="steps to evaluate at, e.g. 32,64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--schedule", choices=("constant", "wsd", "cosine"), default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--decay-fraction", type=float, default=0.2, help="wsd: the decaying part")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="lr at the end of a decay")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=16)
    p.add_argument("--keep-steps", default="", help="steps whose checkpoints are never deleted")
    p.add_argument("--resume-from", default="", help="a checkpoint to resume from ('' = fresh)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="pause per step (demos, tests)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- data


def transition_table(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's successors and their cumulative probabilities (fixed by DATA_SEED)."""
    rng = np.random.default_rng(DATA_SEED)
    succ = np.stack([rng.choice(vocab, BRANCHING, replace=False) for _ in range(vocab)])
    probs = rng.dirichlet(np.ones(BRANCHING), size=vocab)
    return succ, np.cumsum(probs, axis=1)


def sample(
    table: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, n: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences of ``length + 1`` tokens, as inputs and next-token targets."""
    succ, cum = table
    seq = np.empty((n, length + 1), dtype=np.int64)
    seq[:, 0] = rng.integers(0, len(succ), n)
    for t in range(length):
        u = rng.random(n)[:, None]
        pick = np.minimum((u > cum[seq[:, t]]).sum(axis=1), BRANCHING - 1)
        seq[:, t + 1] = succ[seq[:, t], pick]
    return seq[:, :-1].reshape(-1), seq[:, 1:].reshape(-1)


# ------------------------------------------------------------------------------ model and optimizer


def init_params(vocab: int, width: int, seed: int) -> Params:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((vocab, width)),  # rows of RMS 1
        "out": rng.standard_normal((vocab, width)) / width,
    }


def loss_and_grads(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    """Mean next-token cross-entropy and its gradients (written out by hand)."""
    h = params["embed"][x]  # (N, width)
    logits = h @ params["out"].T  # (N, vocab)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-300).mean())
    p[np.arange(n), y] -= 1.0
    p /= n
    g_embed = np.zeros_like(params["embed"])
    np.add.at(g_embed, x, p @ params["out"])
    return loss, {"embed": g_embed, "out": p.T @ h}


class Adam:
    """Adam (beta1 0.9, beta2 0.95) over a dict of arrays."""

    def __init__(self, params: Params) -> None:
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: Params, grads: Params, lr: float) -> None:
        self.t += 1
        for k, g in grads.items():
            self.m[k] = 0.9 * self.m[k] + 0.1 * g
            self.v[k] = 0.95 * self.v[k] + 0.05 * g * g
            m_hat = self.m[k] / (1 - 0.9**self.t)
            v_hat = self.v[k] / (1 - 0.95**self.t)
            params[k] -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def lr_factor(args: argparse.Namespace, step: int) -> float:
    """The schedule at update ``step`` (0-based): warmup, then constant, a WSD decay over the
    last ``decay_fraction`` of the steps, or a cosine, down to ``min_lr_ratio``."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    lo = args.min_lr_ratio
    if args.schedule == "wsd":
        decay = round(args.decay_fraction * args.steps)
        left = args.steps - step  # updates left, this one included
        return 1.0 if left > decay else lo + (1 - lo) * (left - 1) / max(decay, 1)
    if args.schedule == "cosine":
        t = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def output_norm(w: np.ndarray) -> float:
    """RMS->inf operator norm of the output layer: sqrt(width) * the largest row norm."""
    return float(np.linalg.norm(w, axis=1).max() * math.sqrt(w.shape[1]))


# ------------------------------------------------------------------------------------ checkpoints


def save(out: Path, step: int, params: Params, opt: Adam, keep: set[int]) -> None:
    """``ckpt/step_XXXXXXXX.npz``, written to a temp file and renamed (never half a file); the
    newest two are kept, and those of ``keep`` (other runs fork from them)."""
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    final = ckpt / f"step_{step:08d}.npz"
    tmp = ckpt / f".{final.name}.tmp"
    arrays: dict[str, Any] = {f"p_{k}": v for k, v in params.items()}
    arrays |= {f"m_{k}": v for k, v in opt.m.items()} | {f"v_{k}": v for k, v in opt.v.items()}
    arrays |= {"step": np.array(step), "t": np.array(opt.t)}
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in sorted(ckpt.glob("step_*.npz"))[:-KEEP_CHECKPOINTS]:
        if int(old.stem[5:]) not in keep:
            old.unlink()


def load(path: str, params: Params, opt: Adam) -> int:
    """Restore parameters and optimizer state; return the step the checkpoint was taken at."""
    with np.load(path) as z:
        for k in params:
            params[k], opt.m[k], opt.v[k] = z[f"p_{k}"], z[f"m_{k}"], z[f"v_{k}"]
        opt.t = int(z["t"])
        return int(z["step"])


# ------------------------------------------------------------------------------------------ train


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    params = init_params(args.vocab, args.width, args.seed)
    opt = Adam(params)
    start = load(args.resume_from, params, opt) if args.resume_from else 0
    print(f"{'resuming from step ' + str(start) if start else 'starting'}", flush=True)
    horizons = {int(s) for s in args.horizon_steps.split(",") if s}
    keep = {int(s) for s in args.keep_steps.split(",") if s}
    table = transition_table(args.vocab)
    val = sample(table, np.random.default_rng([DATA_SEED, 1]), VAL_SEQUENCES, args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    writer = RunWriter(out, start_step=start, on_stop=lambda s: save(out, s, params, opt, keep))
    for step in range(start, args.steps + 1):
        # line `step`: the weights after `step` updates, measured on the batch of step `step`
        x, y = sample(
            table, np.random.default_rng([args.seed, step]), args.batch_size, args.seq_len
        )
        loss, grads = loss_and_grads(params, x, y)
        line = {"step": step, "tokens": step * tokens_per_step, "train_loss": loss}
        line["output_norm"] = output_norm(params["out"])
        if step in horizons:
            line |= {"val_loss": loss_and_grads(params, *val)[0], "horizon": True}
        if not math.isfinite(loss):
            writer.log(**line)
            return writer.finish("diverged", reason=f"train loss {loss} at step {step}")
        if step % args.log_every == 0 or step in horizons or step == args.steps:
            writer.log(**line)  # also where a pending SIGTERM checkpoints and exits 75
        writer.check_stop(step)
        if step == args.steps:
            break
        opt.step(params, grads, args.lr * lr_factor(args, step))
        if (step + 1) % args.checkpoint_every == 0 or step + 1 in keep:
            save(out, step + 1, params, opt, keep)
        time.sleep(args.step_sleep)
    return writer.finish("completed")


if __name__ == "__main__":
    sys.exit(main())
