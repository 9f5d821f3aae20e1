"""One-command GPU check of the trainer: throughput, MFU, memory, Newton-Schulz share, Scion/AdamW
step ratio and bf16 against fp32, on the ``proxy`` and ``x4-width`` presets.

Usage::

    python bench/gpu_check.py                       # CUDA (the budget: under 5 min on one H200)
    python bench/gpu_check.py --device cpu --presets test-micro --steps 3 --warmup 1 \\
        --compile-backend eager                     # the same code paths on a CPU, in seconds

Without CUDA (and without ``--device cpu``) it prints one line, "no CUDA device ...", and exits 0.

Time on a GPU, estimated from the FLOPs (not yet measured: no GPU was available when this was
written): per preset four runs of 210 steps of 2 x 4096 tokens. The fp32 run of ``x4-width`` (1.2
GFLOP per token with the output layer, 9.8 TFLOP per step) at ~50 TFLOP/s takes about 40 s, the
bf16 runs a few seconds each, each ``torch.compile`` perhaps 30-60 s: about 3 minutes in all.

Per preset, every run starts from the same initial weights (seed 0) and trains on the same batches
of generated tokens (the trainer's synthetic Markov chain, ``--branching`` successors per token, so
the loss falls from ln(vocab) towards ln(branching)) for ``--warmup`` untimed steps, then
``--steps`` timed ones:

1. ``bf16``: bf16 autocast (as the trainer on CUDA), Scion (Newton-Schulz in bf16), eager;
2. ``bf16+compile``: the same with ``torch.compile`` of the model (as ``compile = true``);
3. ``adamw``: as 1 with AdamW, for the Scion/AdamW step ratio;
4. ``fp32``: no autocast, Scion with Newton-Schulz in fp32, eager: the reference for the loss.

Then a few more Scion steps of runs 1 and 2 with a timer around every Newton-Schulz call (each
call synchronised) give the Newton-Schulz share of the step.

Figures:

* tokens/s: ``batch * seq_len`` over the mean timed step (forward, backward, optimizer step).
* MFU: ``flops_per_token * tokens/s / peak``. ``flops_per_token`` is the trainer's
  (``TrainConfig.flops_per_token``, Kaplan et al. 2020): ``6 N + 6 n_layers seq_len d_attn`` with
  N the non-embedding parameters, which leaves out the output layer. The column ``MFU+out`` adds
  its ``6 vocab d_model`` (the output matmul dominates the proxy: 197 of 241 MFLOP per token).
  ``peak``: ``--peak-tflops``, else 989 TFLOP/s (dense bf16 of an H100/H200 SXM) when the device
  name says H100 or H200; else MFU is not printed.
* peak memory: ``torch.cuda.max_memory_allocated`` of the run.
* loss: the mean training loss of the last ``--loss-window`` timed steps. bf16 and bf16+compile
  must agree with fp32 within ``--tolerance`` (relative); otherwise the script exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import optim  # noqa: E402
from trainer.config import ModelConfig, OptimConfig, TrainConfig, model_from_preset  # noqa: E402
from trainer.data import synthetic_tokens  # noqa: E402
from trainer.model import Transformer  # noqa: E402

# dense bf16 tensor-core peak of the SXM parts (NVIDIA data sheets), TFLOP/s
KNOWN_PEAKS = {"H100": 989.4, "H200": 989.4}
LR = {"scion": 2**-6, "adamw": 2**-10}


@dataclass(frozen=True)
class RunSpec:
    """One measured run of a preset."""

    name: str
    optimizer: str  # "scion" or "adamw"
    bf16: bool  # autocast to bf16 (and Newton-Schulz in bf16); else everything fp32
    compile: bool


RUNS = (
    RunSpec("bf16", "scion", True, False),
    RunSpec("bf16+compile", "scion", True, True),
    RunSpec("adamw", "adamw", True, False),
    RunSpec("fp32", "scion", False, False),
)


@dataclass
class RunResult:
    """What one run measured."""

    spec: RunSpec
    step_s: float  # mean timed step
    losses: list[float]  # every timed step's training loss
    peak_bytes: int | None  # None off CUDA
    ns_share: float | None = None  # Newton-Schulz seconds / step seconds (Scion runs)
    ns_ms: float | None = None  # Newton-Schulz milliseconds per step


# ---------------------------------------------------------------------------------------- helpers


def flops_per_token(cfg: ModelConfig) -> tuple[float, float]:
    """(the trainer's FLOPs per token, the same plus the output layer's ``6 vocab d_model``)."""
    trainer = TrainConfig(model=cfg).flops_per_token()
    return trainer, trainer + 6.0 * cfg.vocab_size * cfg.d_model


def mfu(flops: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak; None when the peak is unknown."""
    if not peak_tflops:
        return None
    return flops * tokens_per_s / (peak_tflops * 1e12)


def peak_tflops_of(device: torch.device, given: float | None) -> float | None:
    """``given``, else the known peak for the CUDA device's name, else None."""
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAKS.items() if k in name), None)


def loss_agreement(loss: float, reference: float, tolerance: float) -> tuple[float, bool]:
    """(relative difference of ``loss`` from ``reference``, whether it is within ``tolerance``)."""
    rel = abs(loss - reference) / abs(reference)
    return rel, bool(math.isfinite(rel) and rel <= tolerance)


def make_batches(
    cfg: ModelConfig, n_steps: int, batch: int, branching: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``(n_steps, batch, seq_len)`` of the synthetic chain (int64, CPU)."""
    n = n_steps * batch * (cfg.seq_len + 1)
    tokens = torch.from_numpy(synthetic_tokens(cfg.vocab_size, branching, n).astype("int64"))
    windows = tokens.view(n_steps, batch, cfg.seq_len + 1)
    return windows[..., :-1].contiguous(), windows[..., 1:].contiguous()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NewtonSchulzTimer:
    """Stands in for ``trainer.optim.newton_schulz`` and adds up the time of its calls."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0
        self.fn: Callable[..., torch.Tensor] = optim.newton_schulz

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        synchronize(self.device)
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    @contextlib.contextmanager
    def installed(self) -> Iterator[NewtonSchulzTimer]:
        """Route the optimizer's Newton-Schulz calls through this timer inside the block."""
        optim.newton_schulz = self
        try:
            yield self
        finally:
            optim.newton_schulz = self.fn


# ------------------------------------------------------------------------------------------- runs


class Stepper:
    """A model, its optimizer and one training step, as the trainer does it."""

    def __init__(
        self, cfg: ModelConfig, spec: RunSpec, device: torch.device, compile_backend: str
    ) -> None:
        torch.manual_seed(0)
        self.device, self.bf16 = device, spec.bf16
        self.model = Transformer(cfg).to(device)
        ocfg = OptimConfig(
            name=spec.optimizer,  # type: ignore[arg-type]
            lr=LR[spec.optimizer],
            ns_dtype="bfloat16" if spec.bf16 else "float32",
        )
        self.opt = optim.build_optimizer(self.model, ocfg, device.type)
        self.fwd: Any = self.model
        if spec.compile:
            self.fwd = torch.compile(self.model, backend=compile_backend)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, backward, optimizer step; the loss (not synchronised)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with amp:
            logits = self.fwd(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def run_one(
    cfg: ModelConfig,
    spec: RunSpec,
    batches: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> RunResult:
    """Warm-up, timed steps, then (Scion) the instrumented steps for the Newton-Schulz share."""
    xs, ys = batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stepper = Stepper(cfg, spec, device, args.compile_backend)
    for i in range(args.warmup):
        stepper.step(xs[i], ys[i])
    synchronize(device)
    t0 = time.perf_counter()
    losses = [stepper.step(xs[args.warmup + i], ys[args.warmup + i]) for i in range(args.steps)]
    synchronize(device)
    step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = RunResult(spec, step_s, [float(v) for v in losses], peak)
    if spec.optimizer == "scion" and spec.bf16 and args.ns_steps:
        ns_s, total_s = _newton_schulz_time(stepper, batches, args, device)
        result.ns_ms, result.ns_share = 1e3 * ns_s, ns_s / total_s
    del stepper
    return result


def _newton_schulz_time(
    stepper: Stepper,
    batches: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[float, float]:
    """(Newton-Schulz seconds per step, step seconds) over ``--ns-steps`` extra steps."""
    xs, ys = batches
    first = args.warmup + args.steps
    with NewtonSchulzTimer(device).installed() as timer:
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(args.ns_steps):
            stepper.step(xs[first + i], ys[first + i])
        synchronize(device)
        total = time.perf_counter() - t0
    return timer.seconds / args.ns_steps, total / args.ns_steps


# ----------------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_preset(
    preset: str,
    cfg: ModelConfig,
    results: dict[str, RunResult],
    args: argparse.Namespace,
    peak_tflops: float | None,
) -> bool:
    """The table of one preset and its ratio and agreement lines; whether the losses agree."""
    tokens = args.batch * cfg.seq_len
    trainer_flops, with_out = flops_per_token(cfg)
    print(
        f"\n{preset}: d={cfg.d_model}, layers={cfg.n_layers}, vocab={cfg.vocab_size}, "
        f"seq={cfg.seq_len}, batch {args.batch} ({tokens} tokens/step); FLOPs/token "
        f"{trainer_flops / 1e6:.1f}M (trainer), {with_out / 1e6:.1f}M (+ output layer)"
    )
    print("| run | step ms | tokens/s | MFU | MFU+out | peak GiB | NS ms | NS share | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        tps = tokens / r.step_s
        loss = statistics.fmean(r.losses[-args.loss_window :])
        cells = [
            name,
            f"{1e3 * r.step_s:.1f}",
            f"{tps:,.0f}",
            _fmt(mfu(trainer_flops, tps, peak_tflops), ".1%"),
            _fmt(mfu(with_out, tps, peak_tflops), ".1%"),
            _fmt(None if r.peak_bytes is None else r.peak_bytes / 2**30, ".2f"),
            _fmt(r.ns_ms, ".1f"),
            _fmt(r.ns_share, ".1%"),
            f"{loss:.4f}",
        ]
        print("| " + " | ".join(cells) + " |")
    return _print_comparisons(results, args)


def _print_comparisons(results: dict[str, RunResult], args: argparse.Namespace) -> bool:
    scion, adamw = results["bf16"].step_s, results["adamw"].step_s
    print(f"Scion/AdamW step ratio (bf16, eager): {scion / adamw:.3f}")
    if "bf16+compile" in results:
        speedup = scion / results["bf16+compile"].step_s
        print(f"torch.compile speed-up of the Scion step: {speedup:.2f}x")
    window = args.loss_window
    reference = statistics.fmean(results["fp32"].losses[-window:])
    ok = True
    for name in ("bf16", "bf16+compile"):
        if name not in results:
            continue
        loss = statistics.fmean(results[name].losses[-window:])
        rel, agree = loss_agreement(loss, reference, args.tolerance)
        ok &= agree
        print(
            f"loss after {args.warmup + args.steps} steps (mean of the last {window}): {name} "
            f"{loss:.4f} vs fp32 {reference:.4f}, relative difference {rel:.2%} "
            f"({'within' if agree else 'OUTSIDE'} the tolerance {args.tolerance:.0%})"
        )
    return ok


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--presets", nargs="+", default=["proxy", "x4-width"])
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--steps", type=int, default=200, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile)")
    p.add_argument("--ns-steps", type=int, default=5, help="steps timing Newton-Schulz")
    p.add_argument("--loss-window", type=int, default=10, help="last steps averaged for loss")
    p.add_argument("--tolerance", type=float, default=0.02, help="bf16 vs fp32 relative loss")
    p.add_argument("--branching", type=int, default=16, help="successors per synthetic token")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: by name)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--no-compile", action="store_true", help="skip the bf16+compile run")
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.loss_window) < 1 or args.warmup < 0 or args.ns_steps < 0:
        p.error("--batch, --steps and --loss-window must be >= 1; --warmup, --ns-steps >= 0")
    args.loss_window = min(args.loss_window, args.steps)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when every bf16 loss agrees with fp32 (or without CUDA), else 1."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: bench/gpu_check.py measured nothing (it needs a GPU)")
        return 0
    device = torch.device(args.device)
    peak = peak_tflops_of(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{where}, torch {torch.__version__}; MFU peak: "
        f"{'unknown (give --peak-tflops)' if peak is None else f'{peak:g} TFLOP/s bf16'}"
    )
    runs = [r for r in RUNS if not (r.compile and args.no_compile)]
    t_start, ok = time.perf_counter(), True
    for preset in args.presets:
        cfg = model_from_preset(preset)
        n_steps = args.warmup + args.steps + args.ns_steps
        batches = make_batches(cfg, n_steps, args.batch, args.branching)
        results = {r.name: run_one(cfg, r, batches, args, device) for r in runs}
        ok &= print_preset(preset, cfg, results, args, peak)
    print(f"\n{'all checks passed' if ok else 'FAILED'}; {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
