"""Training-step cost of Scion vs AdamW (CPU proxy shape), and Newton-Schulz accuracy per shape.

Step cost: three optimizers train their own copy of the same model (preset ``cpu-proxy``: d=256,
4 layers, 4 heads, SwiGLU 704, seq 256, byte vocabulary) on the same random batches: Scion with
today's Newton-Schulz (``trainer.newton_schulz``), Scion with the Newton-Schulz as it was before
the Gram-form restarts (``legacy_newton_schulz`` below: unrestarted Gram form, one float32 norm
reduction), and AdamW. Repetitions are interleaved (Scion, Scion-before, AdamW, Scion, ...) so
machine noise hits all alike; the figures are medians. Newton-Schulz time is measured inside the
Scion steps by timing every call.

Accuracy: for every 2-D weight shape of the presets (``trainer.config.PRESETS``), in its wide
orientation, the relative error ``||X_32 - X_64||_F / ||X_64||_F`` (max over the matrices) of the
float32 result against the float64 plain iteration on the same input, for today's NS, the legacy
one and the plain float32 iteration. Inputs: Gaussian matrices and matrices whose singular values
are log-uniform over 3 decades (like gradients: the proxy's SwiGLU gradients span ~2 decades at
initialisation). Embedding/output shapes with more than ``--max-numel`` entries are scaled down
by a power of 2 in both dimensions (same aspect ratio); hidden shapes run at full size unless
``--max-numel-hidden`` says otherwise.

Usage: ``python bench/bench_trainer.py [--reps 15] [--batch 8] [--threads N] [--no-accuracy]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from trainer import newton_schulz as ns
from trainer import optim
from trainer.config import PRESETS, ModelConfig, OptimConfig, model_from_preset
from trainer.model import Transformer


def legacy_newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str = "muon",
    eps: float = 1e-7,
    dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """``newton_schulz`` as it was before the restarts (same operations, bit for bit).

    Frobenius norm in one float32 reduction; the Gram form (n >= 2m, float32/64) never restarts.
    """
    schedule = ns._coefficient_schedule(coefficients, steps)
    X = G.to(ns._as_dtype(dtype) or G.dtype)
    X = X if X.ndim == 3 else X.unsqueeze(0)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    if ns.uses_gram_form(X.shape[-2], X.shape[-1], X.dtype):
        X = ns._gram_segment(X, schedule)
    else:
        X = ns._newton_schulz_plain(X, schedule)
    if tall:
        X = X.mT
    X = X if G.ndim == 3 else X.squeeze(0)
    return X.to(G.dtype)


class _TimedNewtonSchulz:
    """Stands in for ``trainer.optim.newton_schulz``: runs ``fn`` and adds up the time of calls."""

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


# ------------------------------------------------------------------------------------- step cost

# name -> (optimizer, lr, Newton-Schulz function or None)
_RUNS: dict[str, tuple[str, float, Callable[..., torch.Tensor] | None]] = {
    "scion": ("scion", 2**-6, ns.newton_schulz),
    "scion-before": ("scion", 2**-6, legacy_newton_schulz),
    "adamw": ("adamw", 1e-3, None),
}


def _measure_steps(cfg: ModelConfig, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Interleaved steps of every run in ``_RUNS``; per run the lists step, opt_step, ns (s)."""
    timer = _TimedNewtonSchulz(ns.newton_schulz)
    optim.newton_schulz = timer  # the optimizer looks the function up at call time
    runs: dict[str, dict[str, Any]] = {}
    for name, (opt_name, lr, _) in _RUNS.items():
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = optim.build_optimizer(model, OptimConfig(name=opt_name, lr=lr), "cpu")
        runs[name] = {"model": model, "opt": opt, "step": [], "opt_step": [], "ns": []}
    gen = torch.Generator().manual_seed(0)
    for rep in range(args.warmup + args.reps):
        idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len + 1), generator=gen)
        for name, run in runs.items():
            timer.fn = _RUNS[name][2] or ns.newton_schulz
            ns_before = timer.seconds
            total, opt_s = _train_step(run["model"], run["opt"], idx)
            if rep >= args.warmup:
                run["step"].append(total)
                run["opt_step"].append(opt_s)
                run["ns"].append(timer.seconds - ns_before)
    optim.newton_schulz = ns.newton_schulz
    return {name: {k: run[k] for k in ("step", "opt_step", "ns")} for name, run in runs.items()}


def _ratio(num: list[float], den: list[float]) -> str:
    """``ratio of medians (median of per-rep ratios)``."""
    per_rep = statistics.median(a / b for a, b in zip(num, den, strict=True))
    return f"{statistics.median(num) / statistics.median(den):.3f} ({per_rep:.3f})"


def _print_steps(
    cfg: ModelConfig, args: argparse.Namespace, runs: dict[str, dict[str, list[float]]]
) -> None:
    print(
        f"cpu-proxy (d={cfg.d_model}, L={cfg.n_layers}, mlp={cfg.mlp_hidden}, seq={cfg.seq_len}), "
        f"batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()}; medians of {args.reps} interleaved steps"
    )
    print(
        f"{'optimizer':<13}{'step ms':>9}{'tokens/s':>10}{'fwd+bwd ms':>12}{'opt ms':>9}"
        f"{'NS ms':>8}{'NS share':>10}"
    )
    tokens = args.batch * cfg.seq_len
    for name, r in runs.items():
        step, opt_s, ns_s = (statistics.median(r[k]) for k in ("step", "opt_step", "ns"))
        fwd_bwd = statistics.median(t - o for t, o in zip(r["step"], r["opt_step"], strict=True))
        share = f"{ns_s / step:.1%}" if ns_s else "-"
        print(
            f"{name:<13}{1e3 * step:>9.1f}{tokens / step:>10.0f}{1e3 * fwd_bwd:>12.1f}"
            f"{1e3 * opt_s:>9.1f}{1e3 * ns_s:>8.1f}{share:>10}"
        )
    new, old, adam = runs["scion"], runs["scion-before"], runs["adamw"]
    print("ratios: of medians (median of per-rep ratios)")
    print(f"  Scion step / AdamW step:         now {_ratio(new['step'], adam['step'])}")
    print(f"                                   before {_ratio(old['step'], adam['step'])}")
    print(f"  Scion opt step, now / before:    {_ratio(new['opt_step'], old['opt_step'])}")
    print(f"  Newton-Schulz time, now / before: {_ratio(new['ns'], old['ns'])}")


def _compare_ns_forms(rows: int, cols: int, count: int, reps: int) -> None:
    """Plain, unrestarted Gram and restarted Gram NS5 on the model's wide SwiGLU batch (fp32)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(count, rows, cols, generator=gen)
    X /= ns._frobenius_norm(X)
    schedule = ns._coefficient_schedule("muon", 5)
    forms: dict[str, Callable[[], torch.Tensor]] = {
        "plain": lambda: ns._newton_schulz_plain(X, schedule),
        "Gram, before": lambda: ns._gram_segment(X, schedule),
        "Gram, now": lambda: ns._newton_schulz_gram(X, schedule),
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(reps):
        for name, fn in forms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    plain = statistics.median(times["plain"])
    cells = [
        f"{name} {1e3 * statistics.median(t):.1f} ms ({statistics.median(t) / plain:.2f})"
        for name, t in times.items()
    ]
    print(f"NS5 on {count} x {rows}x{cols} fp32 (x plain): " + ", ".join(cells))


# -------------------------------------------------------------------------------------- accuracy


def preset_matrix_shapes() -> dict[tuple[str, tuple[int, int]], list[str]]:
    """``(kind, (m, n))`` -> presets: every 2-D weight shape, wide orientation (``m <= n``).

    ``kind`` is ``"hidden"`` (attention and SwiGLU matrices) or ``"vocab"`` (embedding, output).
    """
    shapes: dict[tuple[str, tuple[int, int]], list[str]] = {}
    for preset in PRESETS:
        c = model_from_preset(preset)
        d, q, kv = c.d_model, c.n_heads * c.hdim, c.kv_heads * c.hdim
        found = [("hidden", s) for s in ((q, d), (kv, d), (c.mlp_hidden, d))]
        found.append(("vocab", (c.vocab_size, d)))
        for kind, (a, b) in found:
            key = (kind, (min(a, b), max(a, b)))
            if preset not in shapes.setdefault(key, []):
                shapes[key].append(preset)
    return shapes


def scaled_down(shape: tuple[int, int], max_numel: int) -> tuple[int, int]:
    """``shape`` divided by the smallest power of 2 that brings it to ``max_numel`` entries."""
    m, n = shape
    f = 1
    while (m // f) * (n // f) > max_numel and m // f > 1:
        f *= 2
    return m // f, n // f


def sample_matrices(count: int, m: int, n: int, decades: int, seed: int = 0) -> torch.Tensor:
    """``count`` float32 ``m x n`` matrices: Gaussian (``decades = 0``), or with singular values
    log-uniform from 1 down to ``10**-decades`` and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    if decades == 0:
        return torch.randn(count, m, n, generator=gen)
    U = torch.linalg.qr(torch.randn(count, m, m, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(count, n, m, generator=gen, dtype=torch.float64))[0]
    s = torch.logspace(0, -decades, m, dtype=torch.float64)
    return ((U * s) @ V.mT).float()


def relative_error(X: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``||X - ref||_F / ||ref||_F`` over a batch."""
    diff = torch.linalg.vector_norm((X.double() - ref).flatten(1), dim=1)
    return float((diff / torch.linalg.vector_norm(ref.flatten(1), dim=1)).max())


def _ns_errors(G: torch.Tensor) -> dict[str, float]:
    """float32 errors of NS5 (Muon) now, before, and plain, against the float64 plain iteration."""
    schedule = ns._coefficient_schedule("muon", 5)
    X64 = G.double()
    ref = ns._newton_schulz_plain(X64 / ns._frobenius_norm(X64), schedule)
    plain = ns._newton_schulz_plain(G / ns._frobenius_norm(G), schedule)
    return {
        "now": relative_error(ns.newton_schulz(G), ref),
        "before": relative_error(legacy_newton_schulz(G), ref),
        "plain": relative_error(plain, ref),
    }


def _accuracy_rows(max_numel: int, max_numel_hidden: int) -> Iterator[list[str]]:
    """One table row per preset shape: shape, tested shape, form, then errors per input kind."""
    for (kind, shape), presets in preset_matrix_shapes().items():
        tested = scaled_down(shape, max_numel if kind == "vocab" else max_numel_hidden)
        m, n = tested
        count = 1 if m * n > 2**22 else 2
        form = "Gram" if ns.uses_gram_form(m, n, torch.float32) else "plain"
        row = [f"{shape[0]}x{shape[1]}", f"{m}x{n}", kind, form]
        for decades in (0, 3):
            errs = _ns_errors(sample_matrices(count, m, n, decades))
            row += [f"{errs[k]:.1e}" for k in ("before", "now", "plain")]
        yield row + [", ".join(presets)]


def _print_accuracy(max_numel: int, max_numel_hidden: int) -> None:
    head = ["shape", "tested", "kind", "form"]
    head += [f"{w} {k}" for w in ("gauss", "3dec") for k in ("before", "now", "plain")]
    head.append("presets")
    print("NS5 (Muon) float32 relative error against the float64 iteration, max over matrices")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in _accuracy_rows(max_numel, max_numel_hidden):
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="measured steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per optimizer")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-steps", action="store_true", help="skip the step timing")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    parser.add_argument(
        "--max-numel", type=int, default=2**20, help="scale embedding/output shapes down to this"
    )
    parser.add_argument(
        "--max-numel-hidden", type=int, default=2**25, help="scale hidden shapes down to this"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_steps:
        cfg = model_from_preset("cpu-proxy")
        _print_steps(cfg, args, _measure_steps(cfg, args))
        _compare_ns_forms(cfg.d_model, cfg.mlp_hidden, 3 * cfg.n_layers, args.reps)
    if not args.no_accuracy:
        _print_accuracy(args.max_numel, args.max_numel_hidden)


if __name__ == "__main__":
    main()
