"""Llama-3-style decoder with non-parametric RMSNorm "everywhere", as in the norm-transfer paper.

Norms (no weights, ``eps = cfg.norm_eps``) sit before attention and the MLP, on Q and K per head
(before RoPE), on V per head, on the attention output before ``wo``, on the SwiGLU product before
``w2`` and before ``output``. There are no biases and no 1-D parameters, and the embeddings are
untied, so every parameter is a matrix with a Scion norm (see ``trainer.optim``).

The initialisation is part of the method (spec section 1.5) and uses torch's global RNG, so seeding
it before construction makes the weights reproducible. To count parameters of a large preset without
allocating it, build under ``torch.device("meta")``; ``init_weights`` is then a no-op and can be run
after ``to_empty(device=...)``.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig

__all__ = ["Attention", "FeedForward", "Transformer", "TransformerBlock", "rope_tables"]


def _rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables of shape ``(seq_len, head_dim // 2)`` for RoPE (float32).

    Args:
        seq_len: the longest sequence the tables cover.
        head_dim: the (even) per-head dimension; pairs ``(2i, 2i+1)`` rotate together (Llama).
        theta: RoPE base frequency.

    Returns:
        ``(cos, sin)`` of the angle ``position * theta^(-2i / head_dim)``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, T, H, hd)`` by position; ``cos``/``sin`` are ``(T, hd/2)``."""
    # One complex multiply (forward and backward) is ~3x faster on CPU than rotate-half.
    rot = torch.complex(cos, sin)[:, None, :]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(3).type_as(x)


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) attention with QK-norm, V-norm and O-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.hdim
        self.eps = cfg.norm_eps
        d = cfg.d_model
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim)
        q = _apply_rope(_rms_norm(q, self.eps), cos, sin)
        k = _apply_rope(_rms_norm(k, self.eps), cos, sin)
        v = _rms_norm(v, self.eps)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.kv_heads != self.n_heads,
        )
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(_rms_norm(out, self.eps))


class FeedForward(nn.Module):
    """SwiGLU MLP ``w2(norm(silu(w1 x) * w3 x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.w1 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(_rms_norm(F.silu(self.w1(x)) * self.w3(x), self.eps))


class TransformerBlock(nn.Module):
    """Pre-norm block with unscaled residuals."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(_rms_norm(x, self.eps), cos, sin)
        return x + self.feed_forward(_rms_norm(x, self.eps))


class Transformer(nn.Module):
    """The decoder: ``forward(idx[B, T]) -> logits[B, T, vocab]``.

    Args:
        cfg: the model shape; ``cfg.seq_len`` bounds the sequence length ``T``.
    """

    rope_cos: torch.Tensor  # buffers, declared for the type checker
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Not persistent: recomputed from the config, so checkpoints hold only parameters.
        half = cfg.hdim // 2
        self.register_buffer("rope_cos", torch.empty(cfg.seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.seq_len, half), persistent=False)
        self.init_weights()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len = {self.cfg.seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.tok_embeddings(idx)
        for layer in self.blocks():
            h = layer(h, cos, sin)
        return self.output(_rms_norm(h, self.cfg.norm_eps))

    def blocks(self) -> list[TransformerBlock]:
        """The transformer blocks, typed."""
        return [cast(TransformerBlock, m) for m in self.layers]

    def residual_matrices(self) -> list[nn.Linear]:
        """The layers scaled by ``1/sqrt(2 * n_layers)`` at init (``wo``, ``w2``, maybe ``w3``)."""
        out: list[nn.Linear] = []
        for layer in self.blocks():
            out += [layer.attention.wo, layer.feed_forward.w2]
            if self.cfg.init_gate_as_residual:
                out.append(layer.feed_forward.w3)
        return out

    @torch.no_grad()
    def init_weights(self) -> None:
        """Scion initialisation (spec 1.5), drawn from torch's global RNG; no-op on ``meta``.

        Embedding rows have RMS 1 (``||W_in||_{1->RMS} = 1``); hidden matrices are orthogonal with
        gain ``sqrt(d_out/d_in)`` (``||W||_{RMS->RMS} = 1``), residual outputs divided by
        ``sqrt(2 * n_layers)``; output rows have norm ``1/sqrt(d)`` (``||W_out||_{RMS->inf} = 1``).
        """
        if self.output.weight.is_meta:
            return
        cos, sin = rope_tables(self.cfg.seq_len, self.cfg.hdim, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        _normal_rows_(self.tok_embeddings.weight, row_norm=math.sqrt(self.cfg.d_model))
        residual = {id(m) for m in self.residual_matrices()}
        depth_scale = 1.0 / math.sqrt(2 * self.cfg.n_layers)
        for layer in self.blocks():
            for lin in (*_attention_linears(layer), *_mlp_linears(layer)):
                _scaled_orthogonal_(lin.weight, depth_scale if id(lin) in residual else 1.0)
        _normal_rows_(self.output.weight, row_norm=1.0 / math.sqrt(self.cfg.d_model))


def _attention_linears(layer: TransformerBlock) -> tuple[nn.Linear, ...]:
    a = layer.attention
    return a.wq, a.wk, a.wv, a.wo


def _mlp_linears(layer: TransformerBlock) -> tuple[nn.Linear, ...]:
    f = layer.feed_forward
    return f.w1, f.w2, f.w3


def _normal_rows_(W: torch.Tensor, row_norm: float) -> None:
    """Fill with N(0, 1), then rescale every row to 2-norm ``row_norm``."""
    rows = torch.randn(W.shape, dtype=torch.float32, device=W.device)
    rows *= row_norm / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    W.copy_(rows)


def _scaled_orthogonal_(W: torch.Tensor, scale: float) -> None:
    """Orthogonal (QR in float64) with gain ``scale * sqrt(d_out / d_in)``."""
    d_out, d_in = W.shape
    Q = torch.empty(d_out, d_in, dtype=torch.float64, device=W.device)
    nn.init.orthogonal_(Q, gain=scale * math.sqrt(d_out / d_in))
    W.copy_(Q)
