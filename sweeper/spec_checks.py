"""Checks of a spec's consequences: how many runs it makes, whether every run is a valid
:class:`~trainer.config.TrainConfig`, and whether this machine can run it.

Two kinds, run at different times:

* :func:`check_consequences` depends on the spec alone (run count, per-run validation, WSD branch
  points, vocabulary vs. built-in corpus); it runs whenever a spec is parsed.
* :func:`check_host` and :func:`check_launch` depend on the machine (the data directory, CUDA, the
  trainer command, the local backend's limits). They run when a spec *file* is loaded to plan or
  launch it (``sweeper plan``/``launch``, :func:`sweeper.spec.load_spec`) and before ``resume``
  starts runs, never when an existing sweep is merely opened: ``sweeper status`` works on a login
  node that has neither the GPUs nor the data of the machine that runs the sweep.

The CUDA check is a probe, not ``torch.cuda.is_available()``: the sweeper never imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import TYPE_CHECKING, Any

from sweeper.errors import SpecError
from trainer.config import ConfigError

if TYPE_CHECKING:
    from sweeper.spec import ModelSpec, SweepSpec

CLI = "<cli>"  # the "file" of an error in a command-line option
BYTE_VOCAB = 256  # the stdlib corpus is byte-tokenized


# ------------------------------------------------------------------------------- spec-only checks


def check_consequences(spec: SweepSpec) -> None:
    """Everything that follows from the spec alone (see the module docstring)."""
    check_run_count(spec)
    for model in spec.models:
        if spec.data.kind == "stdlib" and model.config.vocab_size < BYTE_VOCAB:
            raise SpecError(
                spec.file,
                f"models.{model.name}.vocab_size",
                model.config.vocab_size,
                f"data.kind = 'stdlib' is byte-tokenized: needs vocab_size >= {BYTE_VOCAB}",
            )
        key = "grid.batch_size" if model.axes.batch_size is None else f"models.{model.name}"
        for batch in spec.batches(model):
            spec.check_batch(model, batch, spec.file, key)
            for sched in spec.all_schedules():
                if sched.kind == "wsd":
                    _check_branch_points(spec, model, batch, sched.decay_fraction)


def check_run_count(spec: SweepSpec) -> None:
    """Refuse a grid past ``max_runs`` before anything is expanded (a typo in an axis would
    otherwise plan for minutes and submit millions of jobs)."""
    g = spec.grid
    n_d = len(g.horizons_tokens)
    # a window keeps at most 2k+1 rates per horizon (their union over the horizons a run serves)
    width = (2 * spec.window.k + 1) * n_d if spec.window else 10**9
    points = sum(min(len(spec.lrs(m)), width) * len(spec.batches(m)) for m in spec.models)
    per_point = sum(
        {"constant": 1, "cosine": n_d}.get(s.kind, 1 + n_d) for s in spec.all_schedules()
    )
    axes = {
        "(model, lr, batch_size) points": points,
        "seeds": len(g.seeds),
        "lr_scales": len(g.lr_scales),
        "runs per point (schedules)": per_point,
        "trainer axes": len(trainer.axis_points()) if (trainer := spec.section("trainer")) else 1,
    }
    total = math.prod(axes.values())
    if total > spec.max_runs:
        sizes = " x ".join(f"{n} {k}" for k, n in axes.items())
        raise SpecError(
            spec.file,
            "grid",
            f"{total} runs",
            f"{sizes}; more than max_runs = {spec.max_runs} (raise max_runs if you mean it)",
        )


def _check_branch_points(spec: SweepSpec, model: ModelSpec, batch: int, fraction: float) -> None:
    tps = batch * model.config.seq_len
    for d in spec.grid.horizons_tokens:
        steps = d // tps
        if branch_step(steps, fraction) < 1:
            raise SpecError(
                spec.file,
                "schedule.decay_fraction",
                fraction,
                f"horizon {d} at batch {batch} has {steps} steps: no constant phase to branch from",
            )


def branch_step(steps: int, decay_fraction: float) -> int:
    """Step at which a WSD decay branch of ``steps`` total steps leaves the constant trunk.

    ``floor((1 - f) * steps)`` is at or before the trainer's first decaying step for any rounding of
    ``f * steps``, so trunk and branch agree on the LR up to the fork.
    """
    return int(math.floor((1.0 - decay_fraction) * steps + 1e-9))


def check_backend_table(name: str, raw: dict[str, Any], file: str) -> None:
    """Checks of a raw ``[backend.<name>]`` table that hold whatever the backend's own config is:
    ``sbatch_extra`` is a list of ``"key=value"`` or ``"key"`` strings (the SLURM config checks
    each option)."""
    extra = raw.get("sbatch_extra")
    if extra is None:
        return
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise SpecError(
            file,
            f"backend.{name}.sbatch_extra",
            extra,
            'expected a list of sbatch options, "key=value" or "key"',
        )


# ------------------------------------------------------------------------------------ host checks


def check_host(spec: SweepSpec) -> None:
    """Checks that depend on this machine (the data, and for the local backend the device, the
    trainer command and the node count); see the module docstring for when they run."""
    _check_data(spec)
    if spec.backend.name == "local":
        check_local(spec, spec.file)


def _check_data(spec: SweepSpec) -> None:
    """:func:`trainer.manifest.check_data` for every model: the corpus exists, its token ids fit
    the model's vocabulary, and it holds the tokens of the largest horizon at the largest batch
    (``data.allow_repeat`` lifts the last)."""
    from trainer.manifest import check_data, train_tokens_needed

    checked: set[tuple[int, int]] = set()
    for model in spec.models:
        cfg = dataclasses.replace(spec.base_train(model), batch_size=max(spec.batches(model)))
        needed = train_tokens_needed(cfg)
        if (model.config.vocab_size, needed) in checked:
            continue
        checked.add((model.config.vocab_size, needed))
        try:
            check_data(spec.data, model.config.vocab_size, needed)
        except ConfigError as e:
            raise SpecError(spec.file, None, message=f"{e} (model {model.name})") from None
        except (OSError, ValueError) as e:
            raise SpecError(spec.file, "data.path", spec.data.path, f"cannot read: {e}") from None


def check_local(spec: SweepSpec, file: str) -> None:
    """What the local backend needs from this machine: CUDA when ``train.device = "cuda"``, one
    node, and a trainer command that exists."""
    if spec.train.get("device") == "cuda" and not cuda_probably_available():
        raise SpecError(
            file,
            "train.device",
            "cuda",
            "no CUDA device on this machine (local backend); use 'auto' or another backend",
        )
    if spec.resources.nodes > 1:
        raise SpecError(
            file,
            "resources.nodes",
            spec.resources.nodes,
            "the local backend runs on one machine; use slurm or ray for more nodes",
        )
    cmd = spec.backend.command
    if cmd and shutil.which(cmd[0]) is None:
        raise SpecError(file, "backend.command", cmd[0], "not an executable file or on PATH")


def cuda_probably_available() -> bool:
    """Whether torch would find a CUDA device here, guessed without importing torch.

    No when ``CUDA_VISIBLE_DEVICES`` hides every device; yes when the NVIDIA driver lists a GPU in
    ``/proc/driver/nvidia/gpus``, or (no procfs entry, e.g. some containers) ``nvidia-smi`` is on
    PATH; no otherwise.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        if os.listdir("/proc/driver/nvidia/gpus"):
            return True
    except OSError:
        pass
    return shutil.which("nvidia-smi") is not None


def check_launch(spec: SweepSpec, backend: str | None, max_parallel: int | None) -> None:
    """Validate ``--backend`` and ``--max-parallel`` of a launch or resume against the spec, before
    anything is written; the local backend also gets :func:`check_local`.

    Raises:
        SpecError: ``<cli>: --max-parallel = N: why`` (or the spec's key for a local check).
    """
    from sweeper.backends import BACKENDS

    name = backend or spec.backend.name
    if name not in BACKENDS:
        raise SpecError(CLI, "--backend", name, f"unknown backend (known: {', '.join(BACKENDS)})")
    if max_parallel is not None:
        if not 1 <= max_parallel <= 100_000:
            raise SpecError(CLI, "--max-parallel", max_parallel, "must be in 1..100000")
        cfg = spec.backend.config(name)
        if "max_parallel" in {f.name for f in dataclasses.fields(cfg)}:
            try:
                dataclasses.replace(cfg, max_parallel=max_parallel).validate()
            except ConfigError as e:
                why = str(e).split(": ", 1)[-1]
                raise SpecError(CLI, "--max-parallel", max_parallel, why) from None
    if name == "local":
        check_local(spec, spec.file)
