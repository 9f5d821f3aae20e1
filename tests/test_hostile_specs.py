"""Hostile specs and bad command lines: each is refused with one line naming the file, the key and
the value, exit status 2, no traceback, and nothing written.

Every spec goes through the real CLI in-process (``sweeper.cli.main``) twice: as ``sweeper plan
SPEC`` and as ``sweeper launch SPEC --results DIR``; the whole test directory (spec, results, cwd)
must be exactly as it was afterwards (no ``.lock``, no ``spec.toml``, no sweep directory).
"""

from __future__ import annotations

import copy
import os
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sweeper import Sweep
from sweeper.cli import main
from trainer.manifest import DataManifest, write_manifest

# ----------------------------------------------------------------------------------- the base spec

BASE: dict[str, Any] = {
    "": {"name": '"h"'},
    "models": [{"preset": '"test-micro"'}],
    "data": {"kind": '"synthetic"', "synthetic_tokens": "200000"},
    "grid": {
        "lr": "[0.0078125, 0.03125]",
        "batch_size": "[4, 8]",
        "horizons_tokens": "[1024, 2048]",
    },
    "train": {"log_every": "4", "val_tokens": "256", "threads": "1"},
    "backend.local": {"max_parallel": "2"},
}


def render(edits: dict[str, Any] | None = None, append: str = "") -> str:
    """The base spec with ``edits`` applied: ``{section: {key: toml_value or None}}`` (None deletes
    the key; a section set to None is dropped; ``models`` is a list of key dicts)."""
    spec = copy.deepcopy(BASE)
    for section, body in (edits or {}).items():
        if body is None:
            spec.pop(section, None)
        elif section == "models":
            spec["models"] = body
        else:
            table = spec.setdefault(section, {})
            for k, v in body.items():
                if v is None:
                    table.pop(k, None)
                else:
                    table[k] = v
    lines = [f"{k} = {v}" for k, v in spec.pop("").items()]
    for model in spec.pop("models"):
        lines += ["[[models]]", *(f"{k} = {v}" for k, v in model.items())]
    for section, body in spec.items():
        lines += [f"[{section}]", *(f"{k} = {v}" for k, v in body.items())]
    return "\n".join(lines) + "\n" + append


@dataclass(frozen=True)
class Case:
    """One hostile spec: ``edits`` of the base spec (or a whole ``text``), the key and the value the
    one-line error must name (None: the file as a whole), and extra environment."""

    id: str
    edits: dict[str, Any] | None = None
    key: str | None = None
    value: str | None = None
    text: str | None = None
    append: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def spec_text(self, shards: Path) -> str:
        text = self.text if self.text is not None else render(self.edits, self.append)
        return text.replace("{SHARDS}", str(shards))


def lr(v: str) -> dict[str, Any]:
    return {"grid": {"lr": v}}


def log2(lo: str = "-8", hi: str = "-4", step: str = "1", extra: str = "") -> dict[str, Any]:
    return lr(f"{{log2_from = {lo}, log2_to = {hi}, log2_step = {step}{extra}}}")


def model(**kv: str) -> dict[str, Any]:
    return {"models": [{"preset": '"test-micro"', **kv}]}


def grid(**kv: str) -> dict[str, Any]:
    return {"grid": kv}


def sect(section: str, /, **kv: str | None) -> dict[str, Any]:
    return {section: kv}


SEEDS_10K = "[" + ", ".join(map(str, range(10_000))) + "]"
BATCH_10 = "[" + ", ".join(str(2**i) for i in range(10)) + "]"
DEEP = 20_000

CASES = [
    # ---- learning rates: non-finite, underflowing, overflowing, wrong types
    Case("lr-log2-from-nan", log2(lo="nan"), "grid.lr.log2_from", "nan"),
    Case("lr-log2-to-inf", log2(hi="inf"), "grid.lr.log2_to", "inf"),
    Case("lr-log2-from-neg-inf", log2(lo="-inf"), "grid.lr.log2_from", "-inf"),
    Case("lr-log2-underflow", log2(lo="-2000"), "grid.lr.log2_from", "-2000"),
    Case("lr-log2-overflow", log2(hi="1024"), "grid.lr.log2_to", "1024"),
    Case("lr-log2-step-nan", log2(step="nan"), "grid.lr.log2_step", "nan"),
    Case("lr-log2-step-zero", log2(step="0"), "grid.lr.log2_step", "0"),
    Case("lr-log2-step-negative", log2(step="-1"), "grid.lr.log2_step", "-1"),
    Case("lr-log2-step-tiny", log2(step="1e-300"), "grid.lr", "1e-300"),
    Case("lr-log2-reversed", log2(lo="-4", hi="-8"), "grid.lr.log2_to", "-8"),
    Case("lr-log2-string", log2(lo='"-8"'), "grid.lr.log2_from", "'-8'"),
    Case("lr-log2-unknown-key", log2(extra=", base = 2"), "grid.lr.base", "2"),
    Case("lr-log2-missing-step", lr("{log2_from = -8, log2_to = -4}"), "grid.lr.log2_step"),
    Case("lr-nan", lr("[nan]"), "grid.lr", "nan"),
    Case("lr-inf", lr("[0.01, inf]"), "grid.lr", "inf"),
    Case("lr-zero", lr("[0.0]"), "grid.lr", "0.0"),
    Case("lr-negative", lr("[-0.01]"), "grid.lr", "-0.01"),
    Case("lr-denormal", lr("[1e-320]"), "grid.lr", "1e-320"),
    Case("lr-huge", lr("[1e300]"), "grid.lr", "1e+300"),
    Case("lr-string", lr('["0.01"]'), "grid.lr", "'0.01'"),
    Case("lr-bool", lr("[true]"), "grid.lr", "True"),
    Case("lr-duplicate", lr("[0.01, 0.01]"), "grid.lr", "0.01"),
    Case("lr-empty", lr("[]"), "grid.lr", "[]"),
    Case("lr-missing", lr(None), "grid.lr", "None"),  # type: ignore[arg-type]
    # ---- model shape
    Case("mlp-ratio-inf", model(mlp_ratio="inf"), "mlp_ratio", "inf"),
    Case("mlp-ratio-tiny", model(mlp_ratio="1e-9"), "mlp_ratio", "1e-09"),
    Case("mlp-ratio-nan", model(mlp_ratio="nan"), "mlp_ratio", "nan"),
    Case("mlp-ratio-huge", model(mlp_ratio="1000.0"), "mlp_ratio", "1000.0"),
    Case("head-dim-negative", model(head_dim="-8"), "head_dim", "-8"),
    Case("head-dim-odd", model(head_dim="7"), "head_dim", "7"),
    Case("d-model-zero", model(d_model="0"), "d_model", "0"),
    Case("n-layers-negative", model(n_layers="-1"), "n_layers", "-1"),
    Case("n-heads-not-dividing", model(n_heads="3"), "n_heads", "3"),
    Case("n-kv-heads-zero", model(n_kv_heads="0"), "n_kv_heads", "0"),
    Case("vocab-zero", model(vocab_size="0"), "vocab_size", "0"),
    Case("seq-len-huge", model(seq_len=str(2**40)), "seq_len", str(2**40)),
    Case("norm-eps-nan", model(norm_eps="nan"), "norm_eps", "nan"),
    Case("rope-theta-zero", model(rope_theta="0.0"), "rope_theta", "0.0"),
    Case("model-unknown-key", model(width="3"), "width"),
    Case("model-bool-for-int", model(d_model="true"), "d_model", "True"),
    Case("preset-unknown", {"models": [{"preset": '"gpt5"'}]}, "models[0].preset", "gpt5"),
    Case("preset-missing", {"models": [{"d_model": "32"}]}, "models[0].preset", "None"),
    Case("models-empty", {"models": []}, "models"),
    # ---- names that become paths
    Case("model-name-dotdot", model(name='"a..b"'), "models[0].name", "a..b"),
    Case("model-name-slash", model(name='"a/b"'), "models[0].name", "a/b"),
    Case("model-name-traversal", model(name='"../x"'), "models[0].name", "../x"),
    Case("model-name-hidden", model(name='".x"'), "models[0].name", ".x"),
    Case("model-name-empty", model(name='""'), "models[0].name", "''"),
    Case("model-name-long", model(name=f'"{"x" * 65}"'), "models[0].name", "xxxx"),
    Case("model-name-unicode", model(name='"modèle"'), "models[0].name", "mod"),
    Case("model-name-newline", model(name='"a\\nb"'), "models[0].name", "a\\nb"),
    Case(
        "model-name-duplicate",
        {"models": [{"preset": '"test-micro"'}, {"preset": '"test-micro"'}]},
        "models[1].name",
        "test-micro",
    ),
    Case("sweep-name-dotdot", sect("", name='"a..b"'), "name", "a..b"),
    Case("sweep-name-traversal", sect("", name='"../../etc"'), "name", "../../etc"),
    Case("sweep-name-space", sect("", name='"my sweep"'), "name", "my sweep"),
    Case("sweep-name-int", sect("", name="5"), "name", "5"),
    Case("sweep-name-missing", sect("", name=None), "name", "None"),
    # ---- optimizer
    Case("weight-decay-nan", sect("optim", weight_decay="nan"), "optim.weight_decay", "nan"),
    Case("weight-decay-negative", sect("optim", weight_decay="-0.1"), "optim.weight_decay"),
    Case("eps-nan", sect("optim", eps="nan"), "optim.eps", "nan"),
    Case("eps-inf", sect("optim", eps="inf"), "optim.eps", "inf"),
    Case("grad-clip-nan", sect("optim", grad_clip="nan"), "optim.grad_clip", "nan"),
    Case("grad-clip-negative", sect("optim", grad_clip="-1.0"), "optim.grad_clip", "-1.0"),
    Case("momentum-one", sect("optim", momentum="1.0"), "optim.momentum", "1.0"),
    Case("ns-steps-zero", sect("optim", ns_steps="0"), "optim.ns_steps", "0"),
    Case("adam-beta-nan", sect("optim", adam_beta2="nan"), "optim.adam_beta2", "nan"),
    Case("lr-scale-zero", sect("optim", lr_scale_hidden="0.0"), "optim.lr_scale_hidden", "0.0"),
    Case("lr-scale-huge", sect("optim", lr_scale_out="1e30"), "optim.lr_scale_out", "1e+30"),
    Case("optim-lr-given", sect("optim", lr="0.1"), "optim.lr", "0.1"),
    Case("optim-name-unknown", sect("optim", name='"sgd"'), "optim.name", "sgd"),
    # ---- schedule
    Case("warmup-negative", sect("schedule", warmup_steps="-1"), "schedule.warmup_steps", "-1"),
    Case("decay-nan", sect("schedule", decay_fraction="nan"), "schedule.decay_fraction", "nan"),
    Case("decay-zero", sect("schedule", decay_fraction="0.0"), "schedule.decay_fraction", "0.0"),
    Case("min-lr-inf", sect("schedule", min_lr_ratio="inf"), "schedule.min_lr_ratio", "inf"),
    Case("total-steps-given", sect("schedule", total_steps="10"), "schedule.total_steps", "10"),
    Case(
        "wsd-no-constant-phase",
        sect("schedule", kind='"wsd"', decay_fraction="1.0"),
        "schedule.decay_fraction",
        "1.0",
    ),
    Case("schedule-kind-unknown", sect("schedule", kind='"linear"'), "schedule.kind", "linear"),
    # ---- [train]
    Case("micro-batch-zero", sect("train", micro_batch_size="0"), "micro_batch_size", "0"),
    Case("micro-batch-negative", sect("train", micro_batch_size="-4"), "micro_batch_size", "-4"),
    Case("micro-batch-in-train", sect("train", micro_batch_size="2"), "micro_batch_size", "2"),
    Case("max-micro-batch-zero", model(max_micro_batch="0"), "max_micro_batch", "0"),
    Case("max-micro-batch-negative", model(max_micro_batch="-4"), "max_micro_batch", "-4"),
    Case("max-micro-batch-float", model(max_micro_batch="1.5"), "max_micro_batch", "1.5"),
    Case("threads-zero", sect("train", threads="0"), "threads", "0"),
    Case("threads-negative", sect("train", threads="-2"), "threads", "-2"),
    Case("threads-huge", sect("train", threads="100000"), "threads", "100000"),
    Case("log-every-zero", sect("train", log_every="0"), "log_every", "0"),
    Case("val-tokens-zero", sect("train", val_tokens="0"), "val_tokens", "0"),
    Case("val-tokens-huge", sect("train", val_tokens=str(2**61)), "val_tokens", str(2**61)),
    Case("checkpoint-every-negative", sect("train", checkpoint_every="-1"), "checkpoint_every"),
    Case("keep-checkpoints-zero", sect("train", keep_checkpoints="0"), "keep_checkpoints", "0"),
    Case("diverge-margin-nan", sect("train", diverge_margin="nan"), "diverge_margin", "nan"),
    Case("diverge-margin-zero", sect("train", diverge_margin="0.0"), "diverge_margin", "0.0"),
    Case(
        "device-cuda-without-cuda",
        sect("train", device='"cuda"'),
        "train.device",
        "cuda",
        env={"CUDA_VISIBLE_DEVICES": ""},
    ),
    Case("device-unknown", sect("train", device='"tpu"'), "train.device", "tpu"),
    Case("precision-unknown", sect("train", precision='"fp8"'), "train.precision", "fp8"),
    Case("train-owns-batch", sect("train", batch_size="4"), "train.batch_size", "4"),
    Case("train-unknown-key", sect("train", epochs="3"), "train.epochs"),
    # ---- [window]
    Case("window-a-nan", sect("window", a="nan", b="0", c="0"), "window.a", "nan"),
    Case("window-b-inf", sect("window", a="0", b="inf", c="0"), "window.b", "inf"),
    Case("window-c-neg-inf", sect("window", a="0", b="0", c="-inf"), "window.c", "-inf"),
    Case("window-a-huge", sect("window", a="1e10", b="0", c="0"), "window.a", "10000000000.0"),
    Case("window-k-negative", sect("window", a="0", b="0", c="-6", k="-1"), "window.k", "-1"),
    Case("window-k-float", sect("window", a="0", b="0", c="-6", k="2.5"), "window.k", "2.5"),
    Case("window-missing-c", sect("window", a="0", b="0"), "window.c"),
    Case("window-string", sect("window", a='"x"', b="0", c="0"), "window.a", "'x'"),
    # ---- data
    Case(
        "shards-missing-path",
        sect("data", kind='"shards"', path='"{SHARDS}/nope"', synthetic_tokens=None),
        "data.path",
        "nope",
    ),
    Case("shards-no-path", sect("data", kind='"shards"', synthetic_tokens=None), "data.path"),
    Case(
        "shards-no-manifest",
        sect("data", kind='"shards"', path='"{SHARDS}/empty"', synthetic_tokens=None),
        "data.path",
        "empty",
    ),
    Case(
        "shards-vocab-above-model",
        sect("data", kind='"shards"', path='"{SHARDS}/bigvocab"', synthetic_tokens=None),
        "data.path",
        "bigvocab",
    ),
    Case(
        "shards-corpus-too-small",
        sect("data", kind='"shards"', path='"{SHARDS}/small"', synthetic_tokens=None),
        "data.path",
        "small",
    ),
    Case("synthetic-too-small", sect("data", synthetic_tokens="1000"), "synthetic_tokens", "1000"),
    Case(
        "synthetic-branching-vocab",
        sect("data", synthetic_branching="256"),
        "synthetic_branching",
        "256",
    ),
    Case(
        "stdlib-vocab-below-bytes",
        {**model(vocab_size="100"), "data": None},
        "vocab_size",
        "100",
    ),
    Case("val-fraction-nan", sect("data", val_fraction="nan"), "data.val_fraction", "nan"),
    Case("data-kind-unknown", sect("data", kind='"web"'), "data.kind", "web"),
    Case("data-path-nul", sect("data", cache_dir='"a\\u0000b"'), "data.cache_dir", "a\\x00b"),
    # ---- resources: minimums, ranges, types
    Case("mem-tiny", sect("resources", mem_gb="1e-9"), "resources.mem_gb", "1e-09"),
    Case("mem-nan", sect("resources", mem_gb="nan"), "resources.mem_gb", "nan"),
    Case("mem-inf", sect("resources", mem_gb="inf"), "resources.mem_gb", "inf"),
    Case("mem-negative", sect("resources", mem_gb="-4"), "resources.mem_gb", "-4"),
    Case("time-zero", sect("resources", time_min="0"), "resources.time_min", "0"),
    Case("time-negative", sect("resources", time_min="-5"), "resources.time_min", "-5"),
    Case("time-huge", sect("resources", time_min="1000000000"), "resources.time_min"),
    Case("time-float", sect("resources", time_min="1.5"), "resources.time_min", "1.5"),
    Case("nodes-zero", sect("resources", nodes="0"), "resources.nodes", "0"),
    Case("nodes-local-multi", sect("resources", nodes="2"), "resources.nodes", "2"),
    Case("gpus-negative", sect("resources", gpus_per_node="-1"), "resources.gpus_per_node", "-1"),
    Case("cpus-zero", sect("resources", cpus_per_task="0"), "resources.cpus_per_task", "0"),
    Case("world-size-odd", sect("resources", procs_per_node="3"), "batch_size", "world size 3"),
    Case("resources-slurm-key", sect("resources", partition='"gpu"'), "resources.partition"),
    Case("resources-string", sect("resources", nodes='"two"'), "resources.nodes", "'two'"),
    # ---- backends
    Case(
        "max-parallel-1e9",
        sect("backend.local", max_parallel="1000000000"),
        "backend.local.max_parallel",
        "1000000000",
    ),
    Case(
        "max-parallel-float",
        sect("backend.local", max_parallel="1e9"),
        "backend.local.max_parallel",
        "1000000000",
    ),
    Case("max-parallel-zero", sect("backend.local", max_parallel="0"), "max_parallel", "0"),
    Case("backend-unknown", sect("backend", name='"k8s"'), "backend.name", "k8s"),
    Case("backend-unknown-table", sect("backend.k8s", replicas="2"), "backend.k8s"),
    Case("command-string", sect("backend", command='"python"'), "backend.command", "python"),
    Case("command-empty", sect("backend", command="[]"), "backend.command", "[]"),
    Case("command-nul", sect("backend", command='["py\\u0000thon"]'), "backend.command[0]"),
    Case(
        "command-missing-executable",
        sect("backend", command='["/nonexistent/trainer"]'),
        "backend.command",
        "/nonexistent/trainer",
    ),
    Case("stale-nan", sect("backend", stale_after_s="nan"), "backend.stale_after_s", "nan"),
    Case("stale-negative", sect("backend", stale_after_s="-1"), "backend.stale_after_s", "-1"),
    Case(
        "slurm-partition-newline",
        sect("backend.slurm", partition='"gpu\\n#SBATCH --uid=0"'),
        "backend.slurm.partition",
        "gpu\\n#SBATCH",
    ),
    Case(
        "slurm-account-escape",
        sect("backend.slurm", account='"\\u001b[31m"'),
        "backend.slurm.account",
        "\\x1b[31m",
    ),
    Case(
        "sbatch-extra-bad-key",
        sect("backend.slurm", sbatch_extra='["gres;x=gpu:1"]'),
        "backend.slurm.sbatch_extra",
        "gres;x=gpu:1",
    ),
    Case(
        "sbatch-extra-key-space",
        sect("backend.slurm", sbatch_extra='["mail user=me"]'),
        "backend.slurm.sbatch_extra",
        "mail user=me",
    ),
    Case(
        "sbatch-extra-newline-value",
        sect("backend.slurm", sbatch_extra='["gres=gpu:1\\n#SBATCH --x"]'),
        "backend.slurm.sbatch_extra",
        "gpu:1\\n",
    ),
    Case(
        "sbatch-extra-nested",
        sect("backend.slurm", sbatch_extra='[{gres = "gpu:1"}]'),
        "backend.slurm.sbatch_extra",
        "{'gres': 'gpu:1'}",
    ),
    Case(
        "sbatch-extra-not-list",
        sect("backend.slurm", sbatch_extra='"--gres=gpu:1"'),
        "backend.slurm.sbatch_extra",
        "--gres",
    ),
    Case("ray-address-cr", sect("backend.ray", address='"a\\rb"'), "backend.ray.address", "a\\rb"),
    # ---- caps on the total and on each axis
    Case(
        "grid-1e9-runs",
        grid(
            lr="{log2_from = -40, log2_to = 9.995, log2_step = 0.005}",
            seeds=SEEDS_10K,
            batch_size=BATCH_10,
            horizons_tokens="[1048576]",
        ),  # fmt: skip
        "grid",
        "1000000000 runs",
    ),
    Case("max-runs-exceeded", sect("", max_runs="3"), "grid", "4 runs"),
    Case("max-runs-zero", sect("", max_runs="0"), "max_runs", "0"),
    Case("max-runs-float", sect("", max_runs="1e12"), "max_runs", "1000000000000.0"),
    Case("max-runs-huge", sect("", max_runs=str(10**12)), "max_runs", str(10**12)),
    Case("lr-axis-too-long", log2(lo="-40", hi="10", step="0.001"), "grid.lr", "0.001"),
    Case(
        "batch-axis-too-long",
        grid(batch_size="[" + ", ".join(map(str, range(1, 2001))) + "]"),
        "grid.batch_size",
        "2000 values",
    ),
    Case(
        "horizon-axis-too-long",
        grid(horizons_tokens="[" + ", ".join(str(1024 * i) for i in range(1, 301)) + "]"),
        "grid.horizons_tokens",
        "300 values",
    ),
    Case(
        "seeds-axis-too-long",
        grid(seeds="[" + ", ".join(map(str, range(10_001))) + "]"),
        "grid.seeds",
        "10001 values",
    ),
    Case("models-too-many", {"models": [{"preset": '"test-micro"'}] * 300}, "models", "300"),
    # ---- other grid values
    Case("batch-zero", grid(batch_size="[0]"), "grid.batch_size", "0"),
    Case("batch-negative", grid(batch_size="[-4]"), "grid.batch_size", "-4"),
    Case("batch-huge", grid(batch_size=f"[{2**30}]"), "grid.batch_size", str(2**30)),
    Case("batch-float", grid(batch_size="[4.5]"), "grid.batch_size", "4.5"),
    Case("horizon-zero", grid(horizons_tokens="[0]"), "grid.horizons_tokens", "0"),
    Case("horizon-negative", grid(horizons_tokens="[-1024]"), "grid.horizons_tokens", "-1024"),
    Case(
        "horizon-int64-max",
        grid(horizons_tokens="[9223372036854775807]"),
        "grid.horizons_tokens",
        "9223372036854775807",
    ),
    Case("horizon-not-divisible", grid(horizons_tokens="[1000]"), "grid.batch_size", "4"),
    Case("log2-horizon-63", grid(horizons_tokens=None, log2_horizons="[63]"), "log2_horizons"),
    Case("both-horizon-keys", grid(log2_horizons="[10]"), "grid.log2_horizons", "[10]"),
    Case("seed-negative", grid(seeds="[-1]"), "grid.seeds", "-1"),
    Case("seed-huge", grid(seeds=f"[{2**40}]"), "grid.seeds", str(2**40)),
    Case("seed-float", grid(seeds="[1.5]"), "grid.seeds", "1.5"),
    Case("lr-scales-nan", grid(lr_scales="[[1, nan, 1]]"), "grid.lr_scales", "nan"),
    Case("lr-scales-zero", grid(lr_scales="[[1, 0, 1]]"), "grid.lr_scales", "[1, 0, 1]"),
    Case("lr-scales-short", grid(lr_scales="[[1, 1]]"), "grid.lr_scales", "[1, 1]"),
    Case("grid-unknown-key", grid(lrs="[0.1]"), "grid.lrs", "[0.1]"),
    # ---- structure
    Case("toml-syntax", text='name = "h"\nname =\n'),
    Case("toml-duplicate-key", text='name = "a"\nname = "b"\n'),
    Case("unknown-top-table", append="[colour]\nred = 1\n", key="colour"),
    Case(
        "grid-not-a-table",
        text='name = "h"\ngrid = 5\n[[models]]\npreset = "test-micro"\n',
        key="grid",
        value="5",
    ),  # fmt: skip
    Case(
        "models-not-an-array",
        text=render()
        .replace('[[models]]\npreset = "test-micro"\n', "")
        .replace('name = "h"', 'name = "h"\nmodels = "x"'),
        key="models",
        value="'x'",
    ),
    Case("nesting-arrays-20000", text='name = "h"\nx = ' + "[" * DEEP + "]" * DEEP, key="x"),
    Case(
        "nesting-inline-tables-20000",
        text='name = "h"\ny = ' + "{a = " * DEEP + "1" + "}" * DEEP,
        key="y",
    ),
    Case("nesting-dotted-header-20000", text="[" + ".".join(["a"] * DEEP) + "]\n", key="a.a.a"),
    Case("nesting-arrays-12", text='name = "h"\nz = ' + "[" * 12 + "]" * 12, key="z"),
    Case("control-char-in-key", append='"a\\u0001b" = 1\n', key="'a\\x01b'"),
    Case(
        "description-escape-sequence",
        sect("", description='"\\u001b]0;pwned\\u0007"'),
        "description",
        "\\x1b]0;pwned",
    ),
    # ---- injection into the job script: every SLURM string (a newline would end #SBATCH lines)
    *(
        Case(
            f"slurm-{key}-control",
            sect("backend.slurm", **{key: toml}),
            f"backend.slurm.{key}",
            shown,
        )
        for key, toml, shown in (
            ("sbatch_extra", '["gr\\nes=gpu:1"]', "gr\\nes"),
            ("env", '["A=1\\nrm -rf x"]', "A=1\\nrm"),
            ("python", '"python3\\nrm -rf x"', "python3\\nrm"),
            ("setup", '["module load x\\nrm -rf y"]', "module load x\\nrm"),
            ("qos", '"normal\\r"', "normal\\r"),
            ("constraint", '"a\\tb"', "a\\tb"),
        )
    ),
    Case(
        "slurm-env-bad-name", sect("backend.slurm", env='["A B=1"]'), "backend.slurm.env", "A B=1"
    ),
    Case(
        "sbatch-extra-owned",
        sect("backend.slurm", sbatch_extra='["array=0-99"]'),
        "backend.slurm.sbatch_extra",
        "array=0-99",
    ),
]


# ------------------------------------------------------------------------------------- harness


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``sweeper ARGS`` in-process; any exception but SystemExit fails the test (a traceback)."""
    try:
        main(list(args))
        code: Any = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (not following links) with its type, size and mtime."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            snap[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return snap


def assert_refused(code: int, err: str, path: Path, key: str | None, value: str | None) -> None:
    """Exit 2 and exactly one line ``error: ...`` naming the file, the key and the value."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    assert str(path) in line, line
    if key is not None:
        assert key in line, line
    if value is not None:
        assert value in line, line


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token directories: a vocabulary larger than the model's, a corpus of 100 tokens, one
    without a manifest."""
    root = tmp_path_factory.mktemp("shards")

    def make(name: str, vocab: int, train_tokens: int) -> None:
        (root / name).mkdir()
        manifest = DataManifest(
            dtype="uint16" if vocab <= 1 << 16 else "uint32",
            vocab_size=vocab,
            eos_id=None,
            max_token_id=vocab - 1,
            tokenizer="bytes",
            tokenizer_sha256=None,
            train_tokens=train_tokens,
            val_tokens=10_000,
            n_documents=None,
            val_documents=None,
            val_fraction=None,
        )
        write_manifest(root / name, manifest)

    make("bigvocab", 50_000, 10**7)
    make("small", 256, 100)
    (root / "empty").mkdir()
    return root


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A spec directory, an existing (empty) results directory and an empty working directory."""
    dirs = {name: tmp_path / name for name in ("spec", "results", "cwd")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.chdir(dirs["cwd"])
    return dirs


def refuse_both_ways(
    capsys: pytest.CaptureFixture[str],
    place: dict[str, Path],
    path: Path,
    key: str | None,
    value: str | None,
) -> None:
    """``plan`` and ``launch`` each refuse ``path`` and leave the test directory untouched."""
    root = place["spec"].parent
    before = snapshot(root)
    code, out, err = run_cli(capsys, "plan", str(path))
    assert_refused(code, err, path, key, value)
    assert snapshot(root) == before
    code, out, err = run_cli(capsys, "launch", str(path), "--results", str(place["results"]))
    assert_refused(code, err, path, key, value)
    assert snapshot(root) == before, "launch wrote something before validation passed"


# ---------------------------------------------------------------------------------------- specs


def test_the_base_spec_is_valid(
    capsys: pytest.CaptureFixture[str], place: dict[str, Path], shards: Path
) -> None:
    path = place["spec"] / "h.toml"
    path.write_text(render())
    assert run_cli(capsys, "plan", str(path))[0] == 0
    code, _, err = run_cli(capsys, "launch", str(path), "--results", str(place["results"]),
                           "--dry-run")  # fmt: skip
    assert code == 0, err
    assert not any(place["results"].iterdir())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_spec_is_refused(
    case: Case,
    capsys: pytest.CaptureFixture[str],
    place: dict[str, Path],
    shards: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    path = place["spec"] / "h.toml"
    path.write_text(case.spec_text(shards), encoding="utf-8")
    refuse_both_ways(capsys, place, path, case.key, case.value)


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _dev_zero(p: Path) -> None:
    p.symlink_to("/dev/zero")


def _directory(p: Path) -> None:
    p.mkdir()


def _huge(p: Path) -> None:
    p.write_text(render() + ("# padding\n" * 250_000))


def _binary(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 64)


def _latin1(p: Path) -> None:
    p.write_bytes(render().replace('"h"', '"h\xe9"').encode("latin-1"))


def _nul(p: Path) -> None:
    p.write_bytes(render().encode() + b"\x00\n")


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _missing(p: Path) -> None:
    pass


def _loop(p: Path) -> None:
    p.symlink_to(p.name)


def _dangling(p: Path) -> None:
    p.symlink_to(p.parent / "gone.toml")


def _socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()


FILE_KINDS = {
    "fifo": (_fifo, "not a regular file"),
    "dev-zero-symlink": (_dev_zero, "not a regular file"),
    "directory": (_directory, "directory"),
    "huge-file": (_huge, "larger than"),
    "binary": (_binary, "UTF-8"),
    "latin-1": (_latin1, "UTF-8"),
    "nul-byte": (_nul, "NUL"),
    "empty": (_empty, "name"),
    "missing": (_missing, "no such spec file"),
    "symlink-loop": (_loop, "cannot read"),
    "dangling-symlink": (_dangling, "no such spec file"),
    "unix-socket": (_socket, "not a regular file"),
}


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_hostile_spec_file_is_refused(
    kind: str, capsys: pytest.CaptureFixture[str], place: dict[str, Path]
) -> None:
    make, why = FILE_KINDS[kind]
    path = place["spec"] / "h.toml"
    make(path)
    refuse_both_ways(capsys, place, path, None, why)


def test_spec_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    """The console script itself: a FIFO does not block, nothing is printed but one line."""
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    sweeper = str(Path(sys.executable).with_name("sweeper"))
    proc = subprocess.run([sweeper, "launch", str(fifo), "--results", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {fifo}: ") and not (tmp_path / "r").exists()


def test_at_least_eighty_hostile_specs() -> None:
    assert len(CASES) + len(FILE_KINDS) >= 80


def test_device_cuda_is_accepted_where_cuda_is_probed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], place: dict[str, Path]
) -> None:
    import sweeper.spec_checks as checks

    monkeypatch.setattr(checks, "cuda_probably_available", lambda: True)
    path = place["spec"] / "h.toml"
    path.write_text(render(sect("train", device='"cuda"')))
    assert run_cli(capsys, "plan", str(path))[0] == 0
    # another backend runs elsewhere: this machine's CUDA is not asked
    monkeypatch.setattr(checks, "cuda_probably_available", lambda: False)
    path.write_text(render({**sect("train", device='"cuda"'), **sect("backend", name='"slurm"')}))
    assert run_cli(capsys, "plan", str(path))[0] == 0


def test_cuda_probe_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeper.spec_checks import cuda_probably_available

    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not cuda_probably_available()


def test_small_corpus_is_accepted_with_allow_repeat(
    capsys: pytest.CaptureFixture[str], place: dict[str, Path], shards: Path
) -> None:
    path = place["spec"] / "h.toml"
    data = sect("data", kind='"shards"', path=f'"{shards}/small"', synthetic_tokens=None)
    data["data"]["allow_repeat"] = "true"
    path.write_text(render(data))
    code, _, err = run_cli(capsys, "plan", str(path))
    assert code == 0, err


# ---------------------------------------------------------------------------- bad command lines


@pytest.fixture
def sweep_dir(place: dict[str, Path]) -> Path:
    """An existing sweep (records written, nothing run) under the results directory."""
    spec = place["spec"] / "h.toml"
    spec.write_text(render())
    return Sweep.create(spec, place["results"]).root


BAD_INVOCATIONS: list[tuple[str, list[str], str]] = [
    # (id, argv with {spec} {results} {sweep} {file} {tmp} placeholders, text the line must hold)
    ("status-unknown-sweep", ["status", "nope", "--results", "{results}"], "nope"),
    ("resume-unknown-sweep", ["resume", "nope", "--results", "{results}"], "nope"),
    ("resume-not-a-sweep", ["resume", "{tmp}/cwd"], "cwd"),
    ("collect-unknown-sweep", ["collect", "nope", "--results", "{results}"], "nope"),
    ("cancel-unknown-sweep", ["cancel", "nope", "--results", "{results}"], "nope"),
    (
        "export-unknown-sweep",
        ["export", "nope", "--table", "runs", "--results", "{results}"],
        "nope",
    ),  # fmt: skip
    (
        "launch-max-parallel-zero",
        ["launch", "{spec}", "--results", "{results}", "--max-parallel", "0"],
        "--max-parallel",
    ),  # fmt: skip
    (
        "launch-max-parallel-text",
        ["launch", "{spec}", "--results", "{results}", "--max-parallel", "abc"],
        "--max-parallel",
    ),  # fmt: skip
    (
        "launch-max-parallel-1e9",
        ["launch", "{spec}", "--results", "{results}", "--max-parallel", "1000000000"],
        "1000000000",
    ),  # fmt: skip
    (
        "launch-unknown-backend",
        ["launch", "{spec}", "--results", "{results}", "--backend", "k8s"],
        "k8s",
    ),  # fmt: skip
    ("launch-results-is-a-file", ["launch", "{spec}", "--results", "{file}"], "{file}"),
    ("launch-results-under-a-file", ["launch", "{spec}", "--results", "{file}/sub"], "{file}"),
    ("global-results-is-a-file", ["--results", "{file}", "status", "h"], "{file}"),
    ("launch-missing-spec", ["launch", "{tmp}/nope.toml", "--results", "{results}"], "nope.toml"),
    ("plan-spec-is-a-directory", ["plan", "{tmp}/spec"], "spec"),
    ("plan-no-argument", ["plan"], "SPEC"),
    ("plan-bad-format", ["plan", "{spec}", "--format", "xml"], "xml"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("status-bad-state", ["status", "{sweep}", "--state", "bogus"], "bogus"),
    ("status-bad-format", ["status", "{sweep}", "--format", "yaml"], "yaml"),
    ("export-unknown-table", ["export", "{sweep}", "--table", "foo"], "foo"),
    ("export-bad-format", ["export", "{sweep}", "--table", "runs", "--format", "xml"], "xml"),
    (
        "export-into-missing-dir",
        ["export", "{sweep}", "--table", "runs", "-o", "{tmp}/no/x.csv"],
        "{tmp}/no",
    ),  # fmt: skip
    (
        "export-onto-a-directory",
        ["export", "{sweep}", "--table", "runs", "-o", "{tmp}/cwd"],
        "cwd",
    ),  # fmt: skip
    (
        "resume-max-parallel-1e9",
        ["resume", "{sweep}", "--max-parallel", "1000000000"],
        "1000000000",
    ),  # fmt: skip
    ("resume-unknown-backend", ["resume", "{sweep}", "--backend", "k8s"], "k8s"),
    ("launch-unknown-option", ["launch", "{spec}", "--paralel", "2"], "--paralel"),
]


@pytest.mark.parametrize(("case", "argv", "named"), BAD_INVOCATIONS,
                         ids=[b[0] for b in BAD_INVOCATIONS])  # fmt: skip
def test_bad_invocation_is_one_line(
    case: str,
    argv: list[str],
    named: str,
    capsys: pytest.CaptureFixture[str],
    place: dict[str, Path],
    sweep_dir: Path,
) -> None:
    tmp = place["spec"].parent
    file = tmp / "a-file"
    file.write_text("x")
    subs = {"{spec}": str(place["spec"] / "h.toml"), "{results}": str(place["results"]),
            "{sweep}": str(sweep_dir), "{file}": str(file), "{tmp}": str(tmp)}  # fmt: skip

    def fill(s: str) -> str:
        for k, v in subs.items():
            s = s.replace(k, v)
        return s

    before = snapshot(tmp)
    code, out, err = run_cli(capsys, *map(fill, argv))
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fill(named) in err, err
    assert snapshot(tmp) == before, "a refused command wrote something"


def test_at_least_fifteen_bad_invocations() -> None:
    assert len(BAD_INVOCATIONS) >= 15
