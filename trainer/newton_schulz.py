"""Newton-Schulz orthogonalisation: the spectral LMO's ``U V^T`` (spec section 1.4).

:func:`newton_schulz` runs the quintic iteration ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, on
the Frobenius-normalised wide orientation of each matrix. In float32/float64, matrices at least
twice as wide as tall (the SwiGLU ones) run the same iteration in its Gram form, on ``m x m``
matrices, restarted from the ``m x n`` iterate every :data:`GRAM_RESTART_EVERY` steps; everything
else runs the plain iteration. Both are deterministic on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "GRAM_RESTART_EVERY",
    "MUON_COEFFICIENTS",
    "TUNED_COEFFICIENTS",
    "newton_schulz",
    "uses_gram_form",
]

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Per-step coefficients of Dion's / Disco's 5-step Triton path: sigma_max ~1.02 instead of ~1.13.
TUNED_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# Gram-form steps between restarts from the m x n iterate (see _newton_schulz_gram).
GRAM_RESTART_EVERY = 3

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_Schedule = Sequence[tuple[float, float, float]]


def _coefficient_schedule(coefficients: str, steps: int) -> _Schedule:
    """The ``(a, b, c)`` triple of every step; ValueError for unknown names or bad step counts."""
    if steps < 1:
        raise ValueError(f"ns steps = {steps}: must be >= 1")
    if coefficients == "muon":
        return [MUON_COEFFICIENTS] * steps
    if coefficients == "tuned":
        if steps != len(TUNED_COEFFICIENTS):
            raise ValueError(f"ns coefficients 'tuned' need steps = 5, got {steps}")
        return TUNED_COEFFICIENTS
    raise ValueError(f"ns coefficients = {coefficients!r}: must be 'muon' or 'tuned'")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype, its name or None; ValueError for other names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"ns dtype = {dtype!r}: must be one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str = "muon",
    eps: float = 1e-7,
    dtype: torch.dtype | str | None = None,
    restart_every: int = GRAM_RESTART_EVERY,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U V^T`` of ``G = U S V^T`` by Newton-Schulz.

    Works on the wide orientation (transposing tall matrices), normalises each matrix by its
    Frobenius norm, then iterates ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``. The singular
    values come out in a band around 1 (up to ~1.13 with the Muon coefficients, ~1.02 tuned), not
    exactly 1.

    In float32/float64, matrices at least twice as wide as tall (e.g. the SwiGLU 256 x 704 ones)
    run the same iteration in its Gram form (:func:`_newton_schulz_gram`), restarted every
    ``restart_every`` steps: ~25% fewer flops than the plain iteration at 256 x 704. In float32
    it stays within 1e-5 of the float64 iteration, as the plain iteration does: relative errors
    measured at the preset shapes (``bench/bench_trainer.py``) are 1e-6 to 5e-6 on Gaussian and
    on gradient-like (3-decade spectrum) matrices, up to 2.6x the plain float32 iteration's own
    1e-6 to 4e-6 (tests pin < 1e-5 and < 3x plain per aspect ratio, on 32-row matrices). Lower
    precisions always use the plain iteration.

    Args:
        G: a matrix ``(m, n)`` or a batch ``(k, m, n)``; each matrix is orthogonalised on its own.
        steps: iterations.
        coefficients: ``"muon"`` (3.4445, -4.7750, 2.0315) every step, or ``"tuned"`` (5 per-step
            triples).
        eps: added to the Frobenius norm.
        dtype: compute dtype (``torch.dtype`` or name); None keeps ``G``'s dtype.
        restart_every: Gram-form steps between restarts; ``>= steps`` never restarts (the
            unrestarted form: 0.7e-4 to 2e-4 off in float32 on 3-decade spectra at the preset
            shapes, 30-65x the plain iteration; kept for benchmarks).

    Returns:
        A tensor of ``G``'s shape and dtype.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: expected a 2-D or 3-D tensor, got shape {tuple(G.shape)}")
    if restart_every < 1:
        raise ValueError(f"newton_schulz: restart_every = {restart_every}: must be >= 1")
    schedule = _coefficient_schedule(coefficients, steps)
    X = G.to(_as_dtype(dtype) or G.dtype)
    X = X if X.ndim == 3 else X.unsqueeze(0)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (_frobenius_norm(X) + eps)
    if uses_gram_form(X.shape[-2], X.shape[-1], X.dtype):
        X = _newton_schulz_gram(X, schedule, restart_every)
    else:
        X = _newton_schulz_plain(X, schedule)
    if tall:
        X = X.mT
    X = X if G.ndim == 3 else X.squeeze(0)
    return X.to(G.dtype)


def uses_gram_form(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether :func:`newton_schulz` runs the Gram form on a ``rows x cols`` matrix in ``dtype``."""
    m, n = min(rows, cols), max(rows, cols)
    return dtype in (torch.float32, torch.float64) and n >= 2 * m


def _frobenius_norm(X: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of every matrix of a batch ``(k, m, n)``, shaped ``(k, 1, 1)``.

    The norm of the row norms: torch's single float32 reduction over all ``m n`` entries
    accumulates rounding (relative error 1e-6 at 256 x 704, 6e-5 at 1024 x 2816, 1.5e-3 at
    3072 x 8448), and the iteration passes a scale error of the input on to its output.
    """
    rows = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    return torch.linalg.vector_norm(rows, dim=-2, keepdim=True)


def _newton_schulz_plain(X: torch.Tensor, schedule: _Schedule) -> torch.Tensor:
    """The textbook iteration on a normalised wide batch ``(k, m, n)``, ``m <= n``."""
    for a, b, c in schedule:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


def _newton_schulz_gram(
    X: torch.Tensor, schedule: _Schedule, restart_every: int = GRAM_RESTART_EVERY
) -> torch.Tensor:
    """The same iteration on ``m x m`` Gram matrices of a wide batch ``(k, m, n)``, with restarts.

    Within a segment of steps every iterate is ``X_j = Q_j X_0`` with ``Q_j`` a polynomial in
    ``M_0 = X_0 X_0^T``, so all the ``m x m`` matrices commute: ``P_j = a I + b M_j + c M_j^2``,
    ``Q_{j+1} = P_j Q_j`` and ``M_{j+1} = X_{j+1} X_{j+1}^T = P_j^2 M_j``. Only the first and last
    products of a segment touch the ``n``-wide matrix.

    Why restart: on a tiny singular value every step multiplies by ~``a`` (3.44), so ``Q`` grows to
    ~``a^j`` (480 after 5 steps) and float32 rounding in ``Q`` and ``M`` is amplified by as much in
    ``Q X_0``: 0.7e-4 to 2e-4 relative error after 5 unrestarted steps on gradient-like matrices
    at the preset shapes, against 2e-6 to 4e-6 for the plain iteration. Forming ``X_3 = Q_3 X_0``
    and starting again from ``M = X_3 X_3^T`` keeps ``Q`` below ~``a^3`` and the error within
    2.6x the plain iteration's, for two more ``m^2 n`` products (256 x 704: 4 m^2 n + 14 m^3
    products against the plain iteration's 10 m^2 n + 5 m^3).
    """
    for start in range(0, len(schedule), restart_every):
        X = _gram_segment(X, schedule[start : start + restart_every])
    return X


def _gram_segment(X: torch.Tensor, schedule: _Schedule) -> torch.Tensor:
    """``len(schedule)`` steps of the Gram form from the iterate ``X`` (no restart)."""
    M = torch.bmm(X, X.mT)
    Q = None
    for j, (a, b, c) in enumerate(schedule):
        P = torch.baddbmm(M, M, M, beta=b, alpha=c)
        P.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = P if Q is None else torch.bmm(P, Q)
        if j < len(schedule) - 1:
            M = torch.bmm(P, torch.bmm(P, M))
    assert Q is not None
    return torch.bmm(Q, X)
