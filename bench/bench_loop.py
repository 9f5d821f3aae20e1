"""Overheads of the training loop around the step itself, measured side by side.

For one model, the benchmark times in interleaved repetitions (so machine noise hits all alike;
medians reported):

* ``batch``: fetching one global batch from the memory-mapped corpus (``BatchSource.batch``);
* ``step``: forward, backward and the Scion update, i.e. a plain training step;
* ``log extras``: what a logging step adds, which is the norms of the weights (``weight_norms``,
  two SVDs included), the update-norm tracking inside the optimizer, and the gradient norm;
* ``checkpoint``: one atomic checkpoint save (``save_checkpoint``: torch.save, fsync, rename).

It prints each figure and its ratio to the plain step. From these, the cost of ``log_every`` and
``checkpoint_every`` choices follows.

Usage: ``python bench/bench_loop.py [--preset cpu-small] [--batch 16] [--reps 15] [--threads 1]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.checkpoint import save_checkpoint
from trainer.config import DataConfig, OptimConfig, model_from_preset
from trainer.data import BatchSource, open_data
from trainer.metrics import grad_norm, weight_norms
from trainer.model import Transformer
from trainer.optim import build_optimizer


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    """Run the benchmark and print a table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        data = DataConfig(kind="synthetic", synthetic_tokens=2_000_000, cache_dir=tmp)
        source = BatchSource(open_data(data, cfg.vocab_size).train, cfg.seq_len, args.batch, 0)
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = build_optimizer(model, OptimConfig(), "cpu")
        times: dict[str, list[float]] = {
            "batch": [],
            "step": [],
            "log extras": [],
            "checkpoint": [],
        }

        def step(i: int, tracked: bool) -> None:
            x, y = source.batch(i)
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.track_norms = tracked
            opt.step()
            opt.zero_grad(set_to_none=True)

        def log_extras(i: int) -> None:
            x, y = source.batch(i)
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            t = time.perf_counter()
            float(grad_norm(model))
            weight_norms(model)
            opt.track_norms = True
            t_extra = time.perf_counter() - t
            t_step = _timed(opt.step)
            opt.track_norms = False
            x_step = _timed(opt.step)  # same gradients, untracked: the tracking's own cost
            opt.zero_grad(set_to_none=True)
            times["log extras"].append(t_extra + max(0.0, t_step - x_step))

        step(0, False)  # warm-up
        for i in range(1, args.reps + 1):
            times["batch"].append(_timed(lambda i=i: source.batch(i)))
            times["step"].append(_timed(lambda i=i: step(i, False)))
            log_extras(i)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": i}
            times["checkpoint"].append(_timed(lambda s=state: save_checkpoint(Path(tmp), 1, s)))

    base = statistics.median(times["step"])
    print(
        f"preset {args.preset} ({cfg.n_params() / 1e6:.2f}M params), batch {args.batch} x "
        f"seq {cfg.seq_len}, {args.threads} thread(s), {args.reps} reps; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(f"{'what':<12} {'median ms':>10} {'x step':>8}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<12} {med * 1e3:>10.2f} {med / base:>8.3f}")


if __name__ == "__main__":
    main()
