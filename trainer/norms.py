"""Operator norms of weight matrices as stored: the quantities the paper logs and transfers.

Every function takes one weight tensor in its storage layout (``nn.Linear``: ``(d_out, d_in)``;
``nn.Embedding``: ``(vocab, d_model)``) and returns a Python ``float``. The functions read the
tensor without changing it and work on any device and dtype (reductions run in float32).

The output layer's ``rms_to_inf`` is the paper's "output norm" (registered as ``rms_to_l1`` in the
torchtitan fork the paper used).
"""

from __future__ import annotations

import math

import torch

__all__ = ["one_to_rms_embedding", "rms_to_inf", "rms_to_rms", "sign_norm"]


def _check_2d(W: torch.Tensor, name: str) -> None:
    if W.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(W.shape)}")


@torch.no_grad()
def rms_to_inf(W: torch.Tensor) -> float:
    """``||W||_{RMS->inf} = sqrt(d_in) * max_i ||row_i||_2`` for a ``(d_out, d_in)`` weight.

    Args:
        W: the weight as stored, e.g. the ``(vocab, d_model)`` output layer.

    Returns:
        The norm as a Python float.
    """
    _check_2d(W, "rms_to_inf")
    row_norms = torch.linalg.vector_norm(W.float(), dim=1)
    return float(row_norms.max()) * math.sqrt(W.shape[1])


@torch.no_grad()
def rms_to_rms(W: torch.Tensor) -> float:
    """``||W||_{RMS->RMS} = sqrt(d_in / d_out) * sigma_max(W)`` for a ``(d_out, d_in)`` weight.

    The largest singular value comes from ``torch.linalg.svdvals`` in float32, as in the reference
    logging code.

    Args:
        W: the weight as stored.

    Returns:
        The norm as a Python float.
    """
    _check_2d(W, "rms_to_rms")
    d_out, d_in = W.shape
    sigma_max = torch.linalg.svdvals(W.float())[0]
    return float(sigma_max) * math.sqrt(d_in / d_out)


@torch.no_grad()
def one_to_rms_embedding(E: torch.Tensor) -> float:
    """``||W_in||_{1->RMS}`` of an embedding stored as ``(vocab, d_model)``: the max row RMS.

    In the maths convention ``W_in`` is ``(d_model, vocab)`` and the norm is the largest column
    RMS; the stored table is its transpose, so the columns are the token rows here.

    Args:
        E: the embedding table as stored by ``nn.Embedding``.

    Returns:
        The norm as a Python float.
    """
    _check_2d(E, "one_to_rms_embedding")
    row_norms = torch.linalg.vector_norm(E.float(), dim=1)
    return float(row_norms.max()) / math.sqrt(E.shape[1])


@torch.no_grad()
def sign_norm(W: torch.Tensor) -> float:
    """``||W||_{1->inf} = max_ij |W_ij|``, the norm whose LMO is the Sign update.

    Args:
        W: the weight as stored.

    Returns:
        The norm as a Python float.
    """
    return float(W.detach().abs().max())
