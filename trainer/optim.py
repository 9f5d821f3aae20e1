"""Scion (Disco-style, data-parallel), Adam-atan2, and the optimizer builder for the trainer.

Scion updates every layer with the linear minimisation oracle (LMO) of the norm assigned to it
(spec section 1): the token embedding with ColNorm (``1 -> RMS``), hidden matrices with the spectral
LMO (``RMS -> RMS``, via Newton-Schulz), the output layer with RowNorm (``RMS -> inf``) or Sign::

    W <- (1 - weight_decay * lr) * W - lr * lmo(d)        d = gradient or its momentum EMA

The LMOs are scale-invariant, so gradient scaling, clipping and ``1/accum`` normalisation do not
change an update made without momentum. Optimizer state holds only tensors, numbers, strings and
lists, so ``state_dict()`` loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import OptimConfig
from trainer.newton_schulz import (
    MUON_COEFFICIENTS,
    TUNED_COEFFICIENTS,
    _as_dtype,
    _coefficient_schedule,
    newton_schulz,
)
from trainer.norms import one_to_rms_embedding, rms_to_inf, rms_to_rms

__all__ = [
    "MUON_COEFFICIENTS",
    "TUNED_COEFFICIENTS",
    "AdamAtan2",
    "AdamW",
    "Scion",
    "build_optimizer",
    "check_partition",
    "colnorm_lmo",
    "newton_schulz",
    "param_groups",
    "rownorm_lmo",
    "sign_lmo",
    "spectral_lmo",
]

ROLES = ("in", "hidden", "out")
NORMS = ("colnorm", "spectral", "rownorm", "sign")

# --------------------------------------------------------------------------------------------- LMOs


def colnorm_lmo(G: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """ColNorm (``1 -> RMS``) LMO on an embedding stored ``(vocab, d)``: each row gets RMS 1.

    Returns ``sqrt(d) * row / (||row|| + eps)`` for every token row.
    """
    scale = math.sqrt(G.shape[-1]) / (torch.linalg.vector_norm(G, dim=-1, keepdim=True) + eps)
    return G * scale


def rownorm_lmo(G: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """RowNorm (``RMS -> inf``) LMO on ``(d_out, d_in)``: ``row / (sqrt(d_in) (||row|| + eps))``."""
    norms = torch.linalg.vector_norm(G, dim=-1, keepdim=True) + eps
    return G / (norms * math.sqrt(G.shape[-1]))


def sign_lmo(G: torch.Tensor) -> torch.Tensor:
    """Sign (``1 -> inf``) LMO on a ``(d_out, d_in)`` weight: ``sign(G) / d_in``."""
    return torch.sign(G) / G.shape[-1]


def spectral_lmo(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str = "muon",
    eps: float = 1e-20,
    dtype: torch.dtype | str | None = None,
) -> torch.Tensor:
    """Spectral (``RMS -> RMS``) LMO: ``sqrt(d_out / d_in) * NS(G)`` (2-D, or a 3-D batch)."""
    d_out, d_in = G.shape[-2:]
    return newton_schulz(G, steps, coefficients, eps, dtype) * math.sqrt(d_out / d_in)


# -------------------------------------------------------------------------------- update tracking


def _last_w2_index(names: Sequence[str]) -> int | None:
    """Index of the deepest block's ``feed_forward.w2`` weight among parameter names."""
    best, best_layer = None, -1
    for i, name in enumerate(names):
        m = re.search(r"layers\.(\d+)\.feed_forward\.w2\.weight$", name)
        if m and int(m.group(1)) > best_layer:
            best, best_layer = i, int(m.group(1))
    return best


class _TracksUpdateNorms:
    """Mixin: ``track_norms`` / ``last_update_norms`` over groups carrying a ``role`` key.

    ``last_update_norms`` maps ``"in"`` to the 1->RMS norm of the embedding update, ``"hidden"`` to
    the RMS->RMS norm of the deepest block's ``w2`` update and ``"out"`` to the RMS->inf norm of the
    output update (each the norm of ``lr * u``, or of the parameter change for Adam).
    """

    param_groups: list[dict[str, Any]]
    track_norms: bool
    last_update_norms: dict[str, float]

    def _init_tracking(self) -> None:
        self.track_norms = False
        self.last_update_norms = {}

    def _tracked_params(self) -> dict[str, torch.Tensor]:
        tracked: dict[str, torch.Tensor] = {}
        for group in self.param_groups:
            role, params = group.get("role"), group["params"]
            if not params or role not in ROLES:
                continue
            if role == "hidden":
                idx = _last_w2_index(group.get("param_names", []))
                tracked[role] = params[idx if idx is not None else -1]
            else:
                tracked[role] = params[0]
        return tracked

    @staticmethod
    def _norm_of(role: str, delta: torch.Tensor) -> float:
        if role == "in":
            return one_to_rms_embedding(delta)
        if role == "out":
            return rms_to_inf(delta)
        return rms_to_rms(delta) if delta.ndim == 2 else float("nan")

    def _step_tracking_change(self, step: Callable[[], Any]) -> Any:
        """Run ``step`` and, when tracking, record the norms of the parameter change."""
        if not self.track_norms:
            return step()
        tracked = self._tracked_params()
        before = {role: p.detach().clone() for role, p in tracked.items()}
        result = step()
        self.last_update_norms = {
            role: self._norm_of(role, tracked[role].detach() - before[role]) for role in tracked
        }
        return result


# -------------------------------------------------------------------------------------------- Scion


class Scion(_TracksUpdateNorms, torch.optim.Optimizer):
    """Scion / Disco: per-layer LMO updates, hidden LMO work split across data-parallel ranks.

    Each param group carries ``role`` (``"in"``, ``"hidden"``, ``"out"``), ``norm``
    (``"colnorm"``, ``"spectral"``, ``"rownorm"``, ``"sign"``), ``lr``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``eps`` and the Newton-Schulz settings ``ns_steps``, ``ns_coefficients``
    (``"muon"``/``"tuned"``) and ``ns_dtype`` (``"float32"``, ``"bfloat16"`` or None for the
    gradient's dtype).

    Momentum convention: ``momentum`` is the conventional beta. The buffer is the EMA
    ``d <- beta * d + (1 - beta) * g``, which is Scion's ``momentum`` argument alpha = ``1 - beta``
    (``d <- (1 - alpha) d + alpha g``). ``momentum = 0`` (the paper's setting, Scion alpha = 1) uses
    the raw gradient and keeps no buffer. With ``nesterov`` the LMO sees
    ``beta * d + (1 - beta) * g``.

    Update (Disco): ``W <- (1 - weight_decay * lr) W - lr * lmo(d)``; ``weight_decay = 0`` is
    unconstrained Scion, ``weight_decay = 1/rho`` equals constrained Scion with radius rho.

    Distributed: when ``torch.distributed`` is initialised with more than one rank, gradients must
    already be averaged. The spectral LMOs are assigned to ranks by sorting the matrices by size
    and dealing them out in snake order (as Disco's ``step_ddp``); each rank orthogonalises its
    share and one ``all_gather`` shares the updates, so every rank applies identical updates.

    Set ``track_norms = True`` to have ``step()`` fill ``last_update_norms`` (norms of ``lr * u``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2**-6,
        role: str = "hidden",
        norm: str = "spectral",
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        eps: float = 1e-20,
        ns_steps: int = 5,
        ns_coefficients: str = "muon",
        ns_dtype: str | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            role=role,
            norm=norm,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            eps=eps,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        self._init_tracking()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_scion_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Scion step over all groups; returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = [
            (group, p, self._direction(group, p))
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        spectral = [it for it in items if it[0]["norm"] == "spectral"]
        updates = _spectral_updates(spectral)
        for group, p, d in items:
            if group["norm"] != "spectral":
                updates[p] = _simple_lmo(group, d)
        for group in self.param_groups:
            ps = [p for p in group["params"] if p in updates]
            if not ps:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(ps, 1.0 - wd * lr)
            torch._foreach_add_(ps, [updates[p].to(p.dtype) for p in ps], alpha=-lr)
        if self.track_norms:
            self._record_update_norms(updates)
        return loss

    def _direction(self, group: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        """The tensor the LMO sees: the gradient, its EMA, or the Nesterov mix."""
        g = p.grad
        assert g is not None  # step() asks only for parameters with a gradient
        beta = group["momentum"]
        if beta <= 0:
            return g
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        buf.lerp_(g, 1.0 - beta)
        return g.lerp(buf, beta) if group["nesterov"] else buf

    def _record_update_norms(self, updates: dict[torch.Tensor, torch.Tensor]) -> None:
        lrs = {p: g["lr"] for g in self.param_groups for p in g["params"]}
        self.last_update_norms = {
            role: lrs[p] * self._norm_of(role, updates[p])
            for role, p in self._tracked_params().items()
            if p in updates
        }


def _validate_scion_group(group: dict[str, Any]) -> None:
    if group["role"] not in ROLES:
        raise ValueError(f"Scion group role = {group['role']!r}: must be one of {ROLES}")
    if group["norm"] not in NORMS:
        raise ValueError(f"Scion group norm = {group['norm']!r}: must be one of {NORMS}")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"Scion momentum = {group['momentum']}: must be in [0, 1) (beta)")
    _coefficient_schedule(group["ns_coefficients"], group["ns_steps"])
    _as_dtype(group["ns_dtype"])
    names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
    for name, p in zip(names, group["params"], strict=True):
        if p.ndim != 2:
            raise ValueError(
                f"Scion ({group['norm']}): parameter {name} has shape {tuple(p.shape)}; "
                "only 2-D weights are supported"
            )


def _simple_lmo(group: dict[str, Any], d: torch.Tensor) -> torch.Tensor:
    norm = group["norm"]
    if norm == "colnorm":
        return colnorm_lmo(d, group["eps"])
    if norm == "rownorm":
        return rownorm_lmo(d, group["eps"])
    return sign_lmo(d)


_Item = tuple[dict[str, Any], torch.Tensor, torch.Tensor]


def _spectral_updates(items: list[_Item]) -> dict[torch.Tensor, torch.Tensor]:
    """Spectral LMO of every item, batched by shape, split across ranks when distributed."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1 or len(items) <= 1:
        return _batched_spectral(items)
    owners = _snake_owners([it[2].numel() for it in items], world)
    rank = dist.get_rank()
    mine = [it for it, r in zip(items, owners, strict=True) if r == rank]
    local = _batched_spectral(mine)
    return _all_gather_updates(items, owners, local, world)


def _snake_owners(numels: Sequence[int], world: int) -> list[int]:
    """Rank owning each item: by size, largest first, dealt in snake order to balance the work."""
    order = sorted(range(len(numels)), key=lambda i: (-numels[i], i))
    owners = [0] * len(numels)
    for pos, i in enumerate(order):
        block, offset = divmod(pos, world)
        owners[i] = offset if block % 2 == 0 else world - 1 - offset
    return owners


def _all_gather_updates(
    items: list[_Item],
    owners: list[int],
    local: dict[torch.Tensor, torch.Tensor],
    world: int,
) -> dict[torch.Tensor, torch.Tensor]:
    """Share every rank's updates through one ``all_gather`` of padded flat buffers."""
    dtypes = {it[2].dtype for it in items}
    comm_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    device = items[0][2].device
    per_rank: list[list[_Item]] = [[] for _ in range(world)]
    for it, r in zip(items, owners, strict=True):
        per_rank[r].append(it)
    sizes = [sum(it[2].numel() for it in share) for share in per_rank]
    flat = torch.zeros(max(sizes), dtype=comm_dtype, device=device)
    rank = dist.get_rank()
    if per_rank[rank]:
        mine = torch.cat([local[p].reshape(-1).to(comm_dtype) for _, p, _ in per_rank[rank]])
        flat[: mine.numel()] = mine
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    updates: dict[torch.Tensor, torch.Tensor] = {}
    for r, share in enumerate(per_rank):
        offset = 0
        for _, p, d in share:
            n = d.numel()
            updates[p] = gathered[r][offset : offset + n].view(d.shape).to(d.dtype)
            offset += n
    return updates


def _batched_spectral(items: list[_Item]) -> dict[torch.Tensor, torch.Tensor]:
    """Orthogonalise same-shaped matrices (in their wide orientation) in one batched call each."""
    buckets: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor, bool]]] = {}
    for group, p, d in items:
        tall = d.shape[0] > d.shape[1]
        wide_shape = (d.shape[1], d.shape[0]) if tall else tuple(d.shape)
        key = (
            wide_shape,
            d.dtype,
            d.device,
            group["ns_steps"],
            group["ns_coefficients"],
            group["ns_dtype"],
            group["eps"],
        )
        buckets.setdefault(key, []).append((p, d, tall))
    updates: dict[torch.Tensor, torch.Tensor] = {}
    for (_, _, _, steps, coefficients, ns_dtype, eps), bucket in buckets.items():
        stacked = torch.stack([d.mT if tall else d for _, d, tall in bucket])
        ortho = newton_schulz(stacked, steps, coefficients, eps, ns_dtype)
        # sqrt(d_out / d_in) of each parameter as stored, applied in place to the whole batch
        scales = [math.sqrt(d.shape[0] / d.shape[1]) for _, d, _ in bucket]
        ortho.mul_(torch.tensor(scales, dtype=ortho.dtype, device=ortho.device).view(-1, 1, 1))
        for (p, _, tall), u in zip(bucket, ortho.unbind(0), strict=True):
            updates[p] = u.mT if tall else u
    return updates


# --------------------------------------------------------------------------------------------- Adam


class AdamW(_TracksUpdateNorms, torch.optim.AdamW):
    """``torch.optim.AdamW`` plus ``track_norms`` / ``last_update_norms`` (from the change)."""

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._init_tracking()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step; see ``torch.optim.AdamW.step``."""
        return self._step_tracking_change(lambda: super(AdamW, self).step(closure))


class AdamAtan2(_TracksUpdateNorms, torch.optim.Optimizer):
    """Adam-atan2 (Everett et al. 2024): Adam without epsilon, scale-invariant in the gradient.

    ``m <- b1 m + (1-b1) g``; ``v <- b2 v + (1-b2) g^2``; bias-corrected ``m_hat``, ``v_hat``;
    ``W <- (1 - lr * weight_decay) W - lr * a * atan2(m_hat, b * sqrt(v_hat))``. Each coordinate
    moves at most ``lr * a * pi / 2``. Supports ``track_norms`` like :class:`Scion`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        a: float = 1.27,
        b: float = 1.0,
    ) -> None:
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamAtan2 betas = {betas}: must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b)
        super().__init__(params, defaults)
        self._init_tracking()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adam-atan2 step; returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_tracking_change(self._update)
        return loss

    def _update(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            states = [self._state(p) for p in params]
            ms = [s["exp_avg"] for s in states]
            vs = [s["exp_avg_sq"] for s in states]
            torch._foreach_lerp_(ms, grads, 1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
            for p, s in zip(params, states, strict=True):
                s["step"] += 1
                t = s["step"]
                m_hat = s["exp_avg"] / (1.0 - beta1**t)
                denom = s["exp_avg_sq"].sqrt().mul_(group["b"] / math.sqrt(1.0 - beta2**t))
                p.add_(torch.atan2(m_hat, denom), alpha=-group["lr"] * group["a"])

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state


# ------------------------------------------------------------------------------------------ builder

_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.")


def _canonical(name: str) -> str:
    """Parameter name without the prefixes of ``torch.compile`` / DDP wrappers."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _role_of(name: str) -> str:
    canonical = _canonical(name)
    if canonical == "tok_embeddings.weight":
        return "in"
    if canonical == "output.weight":
        return "out"
    return "hidden"


def check_partition(model: nn.Module, groups: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError unless every trainable parameter of ``model`` is in exactly one group.

    Args:
        model: the module whose parameters are optimised.
        groups: param-group dicts; ``params`` holds tensors or ``(name, tensor)`` pairs.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for group in groups:
        for entry in group["params"]:
            p = entry[1] if isinstance(entry, tuple) else entry
            if id(p) not in names:
                raise ValueError(f"param group {group.get('role')!r}: holds a non-model tensor")
            if id(p) in seen:
                raise ValueError(
                    f"parameter {names[id(p)]} is in groups {seen[id(p)]!r} and "
                    f"{group.get('role')!r}: it must be in exactly one"
                )
            seen[id(p)] = group.get("role", "?")
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            raise ValueError(f"parameter {n} is in no optimizer group")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The groups ``in`` (token embedding), ``hidden`` (block matrices), ``out`` (unembedding).

    Each dict has ``role``, ``params`` (``(name, tensor)`` pairs), ``base_lr`` and ``lr``
    (= base_lr; the training loop rescales ``lr`` by the schedule every step). The partition is
    checked.

    Args:
        model: a :class:`trainer.model.Transformer` (optionally compiled or DDP-wrapped).
        cfg: the optimizer config (its ``lr_in``, ``lr_hidden``, ``lr_out``).

    Returns:
        Group dicts in the order in, hidden, out.
    """
    base = {"in": cfg.lr_in, "hidden": cfg.lr_hidden, "out": cfg.lr_out}
    members: dict[str, list[tuple[str, torch.Tensor]]] = {role: [] for role in ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            members[_role_of(name)].append((name, p))
    for role in ("in", "out"):
        if len(members[role]) != 1:
            raise ValueError(
                f"optimizer group {role!r}: expected exactly one parameter "
                f"({'tok_embeddings' if role == 'in' else 'output'}.weight), "
                f"found {len(members[role])}"
            )
    groups = [
        {"role": role, "params": members[role], "base_lr": base[role], "lr": base[role]}
        for role in ROLES
    ]
    check_partition(model, groups)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over :func:`param_groups`.

    Args:
        model: the model to optimise.
        cfg: optimizer settings.
        device_type: ``"cuda"`` or ``"cpu"``; picks the Newton-Schulz dtype for ``"auto"``.

    Returns:
        A :class:`Scion`, :class:`AdamW` or :class:`AdamAtan2` with groups ``in``, ``hidden``,
        ``out``, each carrying ``role``, ``base_lr`` and ``lr``.
    """
    groups = param_groups(model, cfg)
    if cfg.name == "scion":
        norms = {"in": "colnorm", "hidden": "spectral", "out": cfg.output_norm}
        for group in groups:
            group["norm"] = norms[group["role"]]
        ns_dtype = cfg.ns_dtype
        if ns_dtype == "auto":
            ns_dtype = "bfloat16" if device_type == "cuda" else "float32"
        return Scion(
            groups,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            eps=cfg.eps,
            ns_steps=cfg.ns_steps,
            ns_coefficients=cfg.ns_coefficients,
            ns_dtype=ns_dtype,
        )
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.name == "adamw":
        # torch picks the slow per-tensor loop on CPU unless asked; fused kernels exist on CUDA.
        impl = {"fused": True} if device_type == "cuda" else {"foreach": True}
        return AdamW(groups, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, **impl)
    if cfg.name == "adam_atan2":
        return AdamAtan2(
            groups, betas=betas, weight_decay=cfg.weight_decay, a=cfg.atan2_a, b=cfg.atan2_b
        )
    raise ValueError(f"optim.name = {cfg.name!r}: unknown optimizer")
