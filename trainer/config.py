"""Typed, frozen run configuration of the trainer. Imports no torch.

The sweeper imports this module (and only this one from ``trainer``) to validate and resolve
runs on a machine without torch, e.g. a cluster login node. A run is described by one JSON
file (``run.json``) that maps one-to-one onto :class:`TrainConfig`::

    cfg = TrainConfig.from_dict(json.load(open("run.json")))   # ConfigError on any bad key or value
    json.dump(cfg.to_dict(), ...)                               # round-trips exactly

Conventions: ``batch_size`` is the *global* batch in sequences; token counts end in ``_tokens``;
``momentum`` is the conventional beta (Scion's alpha is ``1 - momentum``; beta = 0 means no
momentum, the paper's main setting).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

# The file contract (schema version, exit codes) lives in trainer.schema; re-exported here.
from trainer.schema import (  # noqa: E402, F401
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    SCHEMA_VERSION,
)


class ConfigError(ValueError):
    """A bad key or value in a run configuration. The message is one line naming the key."""


# ------------------------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Llama-3-style decoder, non-parametric RMSNorm everywhere (the paper's "norm-everywhere")."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: MHA (= n_heads); fewer: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    # SwiGLU hidden = round(mlp_ratio * d_model); 2.75 matches the paper's counts
    mlp_ratio: float = 2.75
    vocab_size: int = 256
    seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-20
    # also divide w3 by sqrt(2L) at init (torchtitan fork default)
    init_gate_as_residual: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hdim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    def n_params(self) -> int:
        """Exact parameter count (no biases, no norm weights, untied embeddings)."""
        d, h = self.d_model, self.hdim
        attn = d * self.n_heads * h * 2 + d * self.kv_heads * h * 2  # wq, wo, wk, wv
        mlp = 3 * d * self.mlp_hidden
        return 2 * self.vocab_size * d + self.n_layers * (attn + mlp)

    def n_params_non_embedding(self) -> int:
        return self.n_params() - 2 * self.vocab_size * self.d_model

    def validate(self) -> None:
        _positive(self, "d_model", "n_layers", "n_heads", "vocab_size", "seq_len")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"model.n_kv_heads = {self.n_kv_heads}: must divide n_heads = {self.n_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads = {self.n_heads}: must divide d_model = {self.d_model} "
                "(or set head_dim)"
            )
        if self.hdim % 2:
            raise ConfigError(f"model.head_dim = {self.hdim}: RoPE needs an even head dimension")
        if self.head_dim is not None and not 2 <= self.head_dim <= 4096:
            raise ConfigError(f"model.head_dim = {self.head_dim}: must be in 2..4096")
        if not 0 < self.mlp_ratio <= 64 or self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_ratio = {self.mlp_ratio}: must be in (0, 64]")
        for key, top in (("d_model", 1 << 16), ("n_layers", 4096), ("n_heads", 1024),
                         ("vocab_size", 1 << 24), ("seq_len", 1 << 22)):  # fmt: skip
            if getattr(self, key) > top:
                raise ConfigError(f"model.{key} = {getattr(self, key)}: must be <= {top}")
        if not self.norm_eps >= 0:
            raise ConfigError(f"model.norm_eps = {self.norm_eps}: must be >= 0")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta = {self.rope_theta}: must be > 0")


_PAPER_VOCAB = 128_256  # Llama-3 tokenizer
# Presets: the paper's model family (spec section 4.1) and small CPU models (byte vocabulary).
PRESETS: dict[str, dict[str, Any]] = {
    "proxy": dict(d_model=256, n_layers=4, n_heads=4, vocab_size=_PAPER_VOCAB, seq_len=4096),
    "x4-width": dict(d_model=1024, n_layers=4, n_heads=16, vocab_size=_PAPER_VOCAB, seq_len=4096),
    "x12-width": dict(d_model=3072, n_layers=4, n_heads=48, vocab_size=_PAPER_VOCAB, seq_len=4096),
    "x8-depth": dict(d_model=256, n_layers=32, n_heads=4, vocab_size=_PAPER_VOCAB, seq_len=4096),
    "x32-depth": dict(d_model=256, n_layers=128, n_heads=4, vocab_size=_PAPER_VOCAB, seq_len=4096),
    # the proxy's shape on a CPU: byte vocabulary, seq 256
    "cpu-proxy": dict(d_model=256, n_layers=4, n_heads=4, vocab_size=256, seq_len=256),
    "cpu-small": dict(d_model=128, n_layers=2, n_heads=2, vocab_size=256, seq_len=128),
    "cpu-tiny": dict(d_model=64, n_layers=2, n_heads=2, vocab_size=256, seq_len=64),
    "test-micro": dict(d_model=32, n_layers=1, n_heads=2, vocab_size=256, seq_len=16),
}


def model_from_preset(preset: str, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a named preset plus overrides; ConfigError if unknown."""
    if preset not in PRESETS:
        raise ConfigError(
            f"model.preset = {preset!r}: unknown preset (known: {', '.join(PRESETS)})"
        )
    return _build(ModelConfig, {**PRESETS[preset], **overrides}, "model")


# --------------------------------------------------------------------------------------- optimizer

OptimizerName = Literal["scion", "adamw", "adam_atan2"]
OutputNorm = Literal["rownorm", "sign"]
NSCoefficients = Literal["muon", "tuned"]
NSDtype = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer and its per-group learning rates.

    Groups: ``in`` (token embedding), ``hidden`` (every 2-D matrix in the blocks), ``out``
    (unembedding). ``lr_in = lr * lr_scale_in`` etc.; the paper's best layout 1 : 1/8 : 1 is
    ``lr_scale_hidden = 0.125``.
    """

    name: OptimizerName = "scion"
    lr: float = 2**-6
    lr_scale_in: float = 1.0
    lr_scale_hidden: float = 1.0
    lr_scale_out: float = 1.0
    momentum: float = 0.0  # conventional beta; Scion alpha = 1 - beta; 0 = no momentum (paper)
    nesterov: bool = False
    # decoupled, Disco-style: W <- (1 - wd*lr) W - lr*u; > 0 is constrained
    weight_decay: float = 0.0
    eps: float = 1e-20
    output_norm: OutputNorm = "rownorm"  # RMS->inf (paper) or Sign (Scion's 1-hot recommendation)
    ns_steps: int = 5
    ns_coefficients: NSCoefficients = "muon"  # "tuned": per-step coefficients (Disco's triton path)
    # auto: bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow there)
    ns_dtype: NSDtype = "auto"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    atan2_a: float = 1.27
    atan2_b: float = 1.0
    grad_clip: float = 0.0  # 0 = off; irrelevant for Scion with momentum 0 (scale invariance)

    @property
    def lr_in(self) -> float:
        return self.lr * self.lr_scale_in

    @property
    def lr_hidden(self) -> float:
        return self.lr * self.lr_scale_hidden

    @property
    def lr_out(self) -> float:
        return self.lr * self.lr_scale_out

    @property
    def scion_alpha(self) -> float:
        """Scion's ``momentum`` argument (alpha = 1 - beta)."""
        return 1.0 - self.momentum

    def validate(self) -> None:
        for key in ("lr", "lr_scale_in", "lr_scale_hidden", "lr_scale_out"):
            v = getattr(self, key)
            if not (math.isfinite(v) and 0 < v <= 2.0**20):
                raise ConfigError(f"optim.{key} = {v}: must be a number in (0, 2^20]")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum = {self.momentum}: must be in [0, 1) (beta)")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay = {self.weight_decay}: must be >= 0")
        if self.ns_steps < 1:
            raise ConfigError(f"optim.ns_steps = {self.ns_steps}: must be >= 1")
        if self.ns_coefficients == "tuned" and self.ns_steps != 5:
            raise ConfigError("optim.ns_coefficients = 'tuned': needs ns_steps = 5")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key} = {getattr(self, key)}: must be in [0, 1)")
        if self.ns_steps > 100:
            raise ConfigError(f"optim.ns_steps = {self.ns_steps}: must be in 1..100")
        for key in ("atan2_a", "atan2_b", "eps", "adam_eps", "grad_clip"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"optim.{key} = {getattr(self, key)}: must be >= 0")


# ---------------------------------------------------------------------------------------- schedule

ScheduleKind = Literal["constant", "wsd", "cosine"]


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """LR multiplier as a pure function of the step (see ``trainer.schedule``).

    constant: linear warmup over ``warmup_steps`` then 1 (no warmup: the paper's main scans).
    wsd: warmup, stable, then linear decay to ``min_lr_ratio`` over the last ``decay_fraction`` of
    ``total_steps``. cosine: warmup then cosine to ``min_lr_ratio`` at ``total_steps``.
    ``total_steps`` = None means the run's own last step.
    """

    kind: ScheduleKind = "constant"
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.0
    total_steps: int | None = None

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps = {self.warmup_steps}: must be >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction = {self.decay_fraction}: must be in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio = {self.min_lr_ratio}: must be in [0, 1]")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ConfigError(f"schedule.total_steps = {self.total_steps}: must be > 0")


# -------------------------------------------------------------------------------------------- data

DataKind = Literal["stdlib", "synthetic", "shards"]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from.

    stdlib: the Python standard library's own source files, byte-tokenized (on every machine).
    synthetic: a random Markov chain with a known entropy rate (tests).
    shards: a directory made by ``python -m trainer.data prepare`` (train.bin, val.bin, data.json;
    see ``trainer.manifest``).
    """

    kind: DataKind = "stdlib"
    path: str | None = None  # shards directory (kind = "shards")
    # where built-in corpora are prepared; None: $TRAINER_CACHE or ~/.cache
    cache_dir: str | None = None
    synthetic_tokens: int = 4_000_000  # size of the synthetic train split
    # successors per state of the synthetic chain (entropy ~ log branching)
    synthetic_branching: int = 4
    val_fraction: float = 0.02
    # train past the end of the corpus (each further epoch in a new seeded order); false: a corpus
    # smaller than the largest horizon is refused at plan time and before step 0
    allow_repeat: bool = False

    def validate(self) -> None:
        if self.kind == "shards" and not self.path:
            raise ConfigError("data.path: required when data.kind = 'shards'")
        if self.synthetic_tokens <= 0 or self.synthetic_branching <= 0:
            raise ConfigError("data.synthetic_tokens and data.synthetic_branching must be > 0")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction = {self.val_fraction}: must be in (0, 0.5)")


# ------------------------------------------------------------------------------------------ branch


@dataclass(frozen=True, kw_only=True)
class BranchConfig:
    """Start from another run's checkpoint at ``step`` (e.g. a decay branch forked from a trunk)."""

    run_dir: str
    step: int

    def validate(self) -> None:
        if self.step <= 0:
            raise ConfigError(f"branch.step = {self.step}: must be > 0")


# ------------------------------------------------------------------------------------------- train

Device = Literal["auto", "cpu", "cuda"]
MAX_VAL_TOKENS = 1 << 32  # evaluated at every horizon: more is a typo, not a measurement
Precision = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. ``horizons_tokens`` are the token budgets D at which the run is read off;
    the run trains to the largest. Every horizon must be a multiple of ``batch_size * seq_len``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    branch: BranchConfig | None = None
    batch_size: int = 16  # global, in sequences
    # per rank; None: batch_size // world_size (no accumulation)
    micro_batch_size: int | None = None
    seed: int = 30
    horizons_tokens: tuple[int, ...] = (2**20,)
    log_every: int = 10  # steps; every horizon step is logged as well
    # tokens between metrics lines; when set it overrides log_every, so that runs at different
    # batch sizes log at the same token counts (the paper: every 2^26 tokens)
    log_every_tokens: int | None = None
    val_every_tokens: int | None = None  # tokens between validation losses (besides horizons)
    val_tokens: int = 65_536  # validation tokens evaluated at each horizon
    checkpoint_every: int = 100  # steps; 0 = only on signals / horizons / checkpoint_steps
    checkpoint_at_horizons: bool = False
    checkpoint_steps: tuple[int, ...] = ()  # extra steps whose checkpoints are kept (branch points)
    keep_checkpoints: int = 2  # periodic checkpoints kept (horizon/branch ones are always kept)
    # loss > initial loss + margin (or NaN/inf) ends the run as diverged
    diverge_margin: float = 1.0
    device: Device = "auto"
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile (CUDA only)
    threads: int | None = None  # torch intra-op threads on CPU; None: torch's default

    # ---- derived quantities
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.seq_len

    @property
    def max_tokens(self) -> int:
        return max(self.horizons_tokens)

    @property
    def total_steps(self) -> int:
        return self.max_tokens // self.tokens_per_step

    @property
    def horizon_steps(self) -> tuple[int, ...]:
        return tuple(d // self.tokens_per_step for d in self.horizons_tokens)

    @property
    def log_interval(self) -> int:
        """Steps between metrics lines: ``log_every_tokens`` as steps if set, else ``log_every``."""
        if self.log_every_tokens is not None:
            return max(1, self.log_every_tokens // self.tokens_per_step)
        return self.log_every

    @property
    def val_interval(self) -> int | None:
        """Steps between validation losses besides the horizons (None: horizons only)."""
        if self.val_every_tokens is None:
            return None
        return max(1, self.val_every_tokens // self.tokens_per_step)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), Kaplan et al. (2020), eq. 2.2:
        ``6·N + 6·n_layers·seq_len·d_attn`` with N the non-embedding parameters and
        ``d_attn = n_heads·head_dim`` (the embedding lookups cost no matmul; the attention
        scores and weighted sum are the second term). Chinchilla (Hoffmann et al., 2022,
        appendix F) counts the same terms within a few percent at these shapes."""
        return _flops_per_token(self.model)

    def flops(self) -> float:
        """Training compute to the largest horizon (``flops_per_token() * max_tokens``)."""
        return self.flops_per_token() * self.max_tokens

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError (one line, naming the key) unless the run can start."""
        self.model.validate()
        self.optim.validate()
        self.schedule.validate()
        self.data.validate()
        if self.branch is not None:
            self.branch.validate()
        _positive(self, "batch_size", "log_every", "val_tokens", "keep_checkpoints")
        if self.val_tokens > MAX_VAL_TOKENS:
            raise ConfigError(f"val_tokens = {self.val_tokens}: must be <= {MAX_VAL_TOKENS}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed = {self.seed}: must be >= 0")
        if not self.horizons_tokens:
            raise ConfigError("horizons_tokens: must name at least one token budget")
        tps = self.tokens_per_step
        for d in self.horizons_tokens:
            if d <= 0 or d % tps:
                raise ConfigError(
                    f"horizons_tokens: {d} is not a positive multiple of batch_size*seq_len = "
                    f"{self.batch_size}*{self.model.seq_len} = {tps}"
                )
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every = {self.checkpoint_every}: must be >= 0")
        for s in self.checkpoint_steps:
            if not 0 < s <= self.total_steps:
                raise ConfigError(f"checkpoint_steps: {s} is outside 1..{self.total_steps}")
        if self.branch is not None and self.branch.step >= self.total_steps:
            raise ConfigError(
                f"branch.step = {self.branch.step}: must be below total steps {self.total_steps}"
            )
        for key in ("log_every_tokens", "val_every_tokens"):
            every = getattr(self, key)
            if every is not None and (every <= 0 or every % tps):
                raise ConfigError(
                    f"{key} = {every}: must be a positive multiple of batch_size*seq_len = "
                    f"{self.batch_size}*{self.model.seq_len} = {tps} (the cadence in tokens must "
                    "be whole steps at every batch size)"
                )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size = {self.micro_batch_size}: must be >= 1")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ConfigError(f"threads = {self.threads}: must be in 1..1024")
        if self.checkpoint_every < 0 or self.keep_checkpoints > 1000:
            raise ConfigError("checkpoint_every must be >= 0 and keep_checkpoints <= 1000")
        if not self.diverge_margin > 0:
            raise ConfigError(f"diverge_margin = {self.diverge_margin}: must be > 0")
        if world_size is not None:
            if self.batch_size % world_size:
                raise ConfigError(
                    f"batch_size = {self.batch_size}: not divisible by world size {world_size}"
                )
            per_rank = self.batch_size // world_size
            if self.micro_batch_size is not None and per_rank % self.micro_batch_size:
                raise ConfigError(
                    f"micro_batch_size = {self.micro_batch_size}: must divide the per-rank batch "
                    f"{per_rank}"
                )

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build and validate; unknown keys and wrong types are ConfigError naming the key.

        ``model`` may carry ``preset`` plus overrides instead of every field.
        """
        raw = dict(raw)
        raw.pop("schema_version", None)
        model = raw.get("model")
        if isinstance(model, dict) and "preset" in model:
            model = dict(model)
            raw["model"] = model_from_preset(model.pop("preset"), **model)
        cfg = _build(cls, raw, "")
        cfg.validate()
        return cfg


# ----------------------------------------------------------------------------------------- helpers


@functools.cache
def _flops_per_token(m: ModelConfig) -> float:
    # cached: planning asks once per run, and a sweep has few distinct models
    return 6.0 * m.n_params_non_embedding() + 6.0 * m.n_layers * m.seq_len * m.n_heads * m.hdim


def _positive(obj: Any, *keys: str) -> None:
    prefix = {ModelConfig: "model."}.get(type(obj), "")
    for k in keys:
        v = getattr(obj, k)
        if not v > 0:
            raise ConfigError(f"{prefix}{k} = {v!r}: must be > 0")


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_jsonable(v) for v in obj]
    return obj


@functools.cache
def _fields(cls: type) -> tuple[dict[str, tuple[Any, tuple[str, Any]]], frozenset[str]]:
    # get_type_hints re-evaluates every annotation string: ~1 ms per call, too slow per run; and
    # hashing a ``typing`` annotation (to look up its _shape) runs Python code: shapes are kept.
    hints, names = typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))
    return {n: (hints[n], _shape(hints[n])) for n in names}, names


def _build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict, checking keys and value types recursively."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {raw!r}")
    hints, names = _fields(cls)
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(*hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required field
        raise ConfigError(f"{where or 'config'}: {e}") from None


_SHARED: dict[tuple[type, bytes], Any] = {}  # sub-configs built, by class and JSON text


def _build_shared(cls: type, raw: Any, where: str) -> Any:
    """:func:`_build`, memoized (frozen: one instance serves every run) for dicts by their JSON
    text, which tells ``1`` from ``1.0``, ``true`` and ``-0.0`` from ``0.0``; orjson writes NaN
    and infinity as ``null``, so a dict with more ``null`` than None values must hold neither."""
    try:
        text = orjson.dumps(raw) if type(raw) is dict else None
    except TypeError:  # not JSON (e.g. a huge integer)
        text = None
    nulls = text.count(b"null") if text else 0
    if text is None or nulls and nulls != list(raw.values()).count(None) and _non_finite(raw):
        return _build(cls, raw, where)  # built, not memoized
    built = _SHARED.get((cls, text))
    if built is None:
        if len(_SHARED) >= 4096:
            _SHARED.clear()
        built = _SHARED[cls, text] = _build(cls, raw, where)
    return built


def _non_finite(value: Any) -> bool:
    """True if ``value`` is or holds a float that is NaN or infinite."""
    if isinstance(value, dict | list | tuple):
        return any(map(_non_finite, value.values() if isinstance(value, dict) else value))
    return type(value) is float and not math.isfinite(value)


@functools.cache
def _shape(tp: Any) -> tuple[str, Any]:
    """What kind of annotation ``tp`` is, worked out once per type (typing's introspection would
    otherwise dominate reading a record)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return ("optional" if type(None) in args else "union", inner[0])
    if origin is Literal:
        return ("literal", args)
    if origin is tuple:
        return ("tuple", args[0])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return ("dataclass", tp)
    return ("scalar", tp)


def _coerce(tp: Any, shape: tuple[str, Any], value: Any, key: str) -> Any:
    kind, arg = shape
    if kind in ("optional", "union"):
        if value is None and kind == "optional":
            return None
        return _coerce(arg, _shape(arg), value, key)
    if kind == "literal":
        if value not in arg:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(map(repr, arg))}")
        return value
    if kind == "tuple":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        return tuple([_coerce(arg, _shape(arg), v, key) for v in value])
    if kind == "dataclass":
        return _build_shared(arg, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**62:
                return int(value)
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        if abs(value) >= 2**62:
            raise ConfigError(f"{key} = {value!r}: out of range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if not math.isfinite(value) or abs(value) > 1e300:
            # no setting of a run is infinite or NaN; refusing them here covers every field
            raise ConfigError(f"{key} = {value!r}: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    return value
