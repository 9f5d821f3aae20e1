"""Training-step cost of Scion vs AdamW on the CPU proxy shape, measured side by side.

Both optimizers train their own copy of the same model (preset ``cpu-proxy``: d=256, 4 layers,
4 heads, SwiGLU 704, seq 256, byte vocabulary) on the same random batches. Repetitions are
interleaved (Scion step, AdamW step, Scion step, ...) so machine noise hits both alike; the figures
are medians. Newton-Schulz time is measured inside the Scion step by timing every call.

Usage: ``python bench/bench_trainer.py [--reps 15] [--batch 8] [--threads N]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from trainer import optim
from trainer.config import OptimConfig, model_from_preset
from trainer.model import Transformer


class _TimedNewtonSchulz:
    """Stands in for ``trainer.optim.newton_schulz`` and adds up the time of its calls."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _train_step(
    model: Transformer, opt: torch.optim.Optimizer, idx: torch.Tensor
) -> tuple[float, float]:
    """One full step; returns (total seconds, optimizer-step seconds)."""
    t0 = time.perf_counter()
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="measured steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per optimizer")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = model_from_preset("cpu-proxy")
    timer = _TimedNewtonSchulz(optim.newton_schulz)
    optim.newton_schulz = timer  # the optimizer looks the function up at call time
    runs: dict[str, dict[str, Any]] = {}
    for name, lr in (("scion", 2**-6), ("adamw", 1e-3)):
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = optim.build_optimizer(model, OptimConfig(name=name, lr=lr), "cpu")
        runs[name] = {"model": model, "opt": opt, "step": [], "opt_step": [], "ns": []}

    gen = torch.Generator().manual_seed(0)
    for rep in range(args.warmup + args.reps):
        idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len + 1), generator=gen)
        for run in runs.values():
            ns_before = timer.seconds
            total, opt_s = _train_step(run["model"], run["opt"], idx)
            if rep >= args.warmup:
                run["step"].append(total)
                run["opt_step"].append(opt_s)
                run["ns"].append(timer.seconds - ns_before)

    tokens = args.batch * cfg.seq_len
    med = {
        n: {k: statistics.median(r[k]) for k in ("step", "opt_step", "ns")} for n, r in runs.items()
    }
    print(
        f"cpu-proxy (d={cfg.d_model}, L={cfg.n_layers}, mlp={cfg.mlp_hidden}, seq={cfg.seq_len}), "
        f"batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()}; medians of {args.reps} interleaved steps"
    )
    print(
        f"{'optimizer':<10}{'step ms':>10}{'tokens/s':>11}{'fwd+bwd ms':>12}{'opt ms':>9}"
        f"{'NS ms':>8}{'NS share':>10}"
    )
    for name, m in med.items():
        share = f"{m['ns'] / m['step']:.1%}" if m["ns"] else "-"
        fwd_bwd = statistics.median(
            t - o for t, o in zip(runs[name]["step"], runs[name]["opt_step"], strict=True)
        )
        print(
            f"{name:<10}{1e3 * m['step']:>10.1f}{tokens / m['step']:>11.0f}{1e3 * fwd_bwd:>12.1f}"
            f"{1e3 * m['opt_step']:>9.1f}{1e3 * m['ns']:>8.1f}{share:>10}"
        )
    ratios = [s / a for s, a in zip(runs["scion"]["step"], runs["adamw"]["step"], strict=True)]
    print(
        f"Scion step / AdamW step: {med['scion']['step'] / med['adamw']['step']:.3f} "
        f"(ratio of medians); median of per-rep ratios {statistics.median(ratios):.3f}"
    )
    _compare_ns_forms(cfg.d_model, cfg.mlp_hidden, 3 * cfg.n_layers, args.reps)


def _compare_ns_forms(rows: int, cols: int, count: int, reps: int) -> None:
    """Plain vs Gram-form Newton-Schulz on the model's batch of wide SwiGLU matrices (fp32)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(count, rows, cols, generator=gen)
    X /= torch.linalg.matrix_norm(X, keepdim=True)
    schedule = optim._coefficient_schedule("muon", 5)
    times: dict[str, list[float]] = {"plain": [], "gram": []}
    forms = {"plain": optim._newton_schulz_plain, "gram": optim._newton_schulz_gram}
    for _ in range(reps):
        for name, fn in forms.items():
            t0 = time.perf_counter()
            fn(X, schedule)
            times[name].append(time.perf_counter() - t0)
    plain, gram = (statistics.median(times[k]) for k in ("plain", "gram"))
    print(
        f"NS5 on {count} x {rows}x{cols} fp32: plain {1e3 * plain:.1f} ms, Gram form "
        f"{1e3 * gram:.1f} ms (ratio {gram / plain:.2f})"
    )


if __name__ == "__main__":
    main()
