"""Diagonal preconditioners for (damped) Newton-CG.

Two estimates of a curvature diagonal and one way to turn either into ``M^{-1}``
for preconditioned CG (Nocedal & Wright 2nd ed., Algorithm 5.3):

- :func:`fisher_diagonal`: the empirical Fisher diagonal, the mean over samples
  of the squared per-sample gradients (``problem.grad_squares``), as in
  Martens 2010, "Deep learning via Hessian-free optimization", section 4.7;
- :func:`hutchinson_diagonal`: ``diag(B) ~ mean_k z_k * (B z_k)`` with
  Rademacher ``z_k`` (Bekas, Kokiopoulou & Saad 2007, "An estimator for the
  diagonal of a matrix"; ``z * z = 1`` so no division is needed), all ``k``
  products in one ``matmat`` call (one batched, reduced product for the
  distributed objective);
- :func:`diagonal_preconditioner`: ``M = (max(|d|, floor) + damping)^power``
  (Martens 2010, section 4.7, uses ``power = 0.75``), returned as the
  :class:`~.operators.DiagonalOperator` of ``M^{-1}``.

Pure numpy.  Random vectors come from numpy's ``Generator`` seeded by a tuple
of integers, so every rank that passes the same seed draws the same vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .operators import DiagonalOperator, LinearOperator

if TYPE_CHECKING:
    from .base import Problem

__all__ = [
    "PRECONDITIONERS",
    "diagonal_preconditioner",
    "fisher_diagonal",
    "hutchinson_diagonal",
    "rademacher",
]

#: Diagonal preconditioners Newton-CG can use (``NewtonConfig.preconditioner``).
PRECONDITIONERS = ("none", "fisher", "hutchinson")


def rademacher(n: int, k: int, seed: int | Sequence[int], dtype: np.dtype | type = np.float64,
               ) -> np.ndarray:
    """An ``(n, k)`` block of independent +-1 entries from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)
    bits = rng.integers(0, 2, size=(n, k), dtype=np.int8)
    return (2 * bits - 1).astype(dtype)


def hutchinson_diagonal(op: LinearOperator, samples: int,
                        seed: int | Sequence[int]) -> np.ndarray:
    """Stochastic estimate of ``diag(op)`` (Bekas, Kokiopoulou & Saad 2007).

    ``d = mean_k z_k * (A z_k)`` over ``samples`` Rademacher vectors ``z_k``;
    exact for a diagonal ``A``, unbiased in general, with variance
    ``sum_{j != i} A_ij^2 / samples`` in entry ``i``.  The ``samples``
    products are one ``op.matmat`` call.  For an indefinite ``A`` entries may
    be negative.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"hutchinson_diagonal: samples must be an integer >= 1, got {samples!r}")
    n = op.shape[0]
    z = rademacher(n, int(samples), seed, op.dtype)
    az = np.asarray(op.matmat(z))
    return np.mean(z * az, axis=1)


def fisher_diagonal(problem: Problem, w: np.ndarray) -> np.ndarray:
    """``problem.grad_squares(w)``: mean squared per-sample gradient (Martens 2010, 4.7)."""
    fn = getattr(problem, "grad_squares", None)
    if not callable(fn):
        raise TypeError(f"fisher preconditioner: the problem ({type(problem).__name__}) has no "
                        "grad_squares(w) product")
    d = np.asarray(fn(w))
    if d.shape != np.shape(w):
        raise ValueError(f"fisher preconditioner: grad_squares has shape {d.shape}, "
                         f"weights have shape {np.shape(w)}")
    return d


def diagonal_preconditioner(diagonal: np.ndarray, damping: float, power: float,
                            floor: float) -> DiagonalOperator:
    """``M^{-1}`` for ``M = (max(|d|, floor * max|d|) + damping)^power`` (Martens 2010, 4.7).

    ``|d|`` makes an estimate of an indefinite Hessian's diagonal usable; the
    relative ``floor`` keeps ``M`` away from zero where ``d`` vanishes.  A
    diagonal without any nonzero finite entry (and zero damping) gives the
    identity.  Non-finite entries are treated as zero.
    """
    d = np.abs(np.asarray(diagonal, dtype=np.float64))
    d[~np.isfinite(d)] = 0.0
    top = float(d.max()) if d.size else 0.0
    d = np.maximum(d, floor * top) + float(damping)
    if top == 0.0 and float(damping) == 0.0:
        d = np.ones_like(d)
    m = d ** float(power)
    if not (np.all(np.isfinite(m)) and np.all(m > 0.0)):
        raise FloatingPointError("diagonal_preconditioner: M is not finite and positive")
    dtype = np.asarray(diagonal).dtype
    inv = 1.0 / m
    return DiagonalOperator(inv.astype(dtype) if np.issubdtype(dtype, np.floating) else inv)

