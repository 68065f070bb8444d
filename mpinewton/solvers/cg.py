"""Conjugate gradients for the (damped) Newton equation.

Thesis Algorithm 3 (section 5), in the notation of Nocedal & Wright: solve
``A x = b`` where ``A`` is a :class:`~mpinewton.solvers.operators.LinearOperator`
known only by its product ``v -> A v`` -- for Newton, the damped Hessian
``H + alpha I`` (thesis chapter 4 and 7.2, :func:`~mpinewton.solvers.operators.damped`).
Pure numpy:
nothing here knows about MPI or TensorFlow, so every rank that calls
:func:`cg` with the same inputs gets bitwise the same outputs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .operators import LinearOperator, aslinearoperator

__all__ = ["CGReason", "CGResult", "cg"]


class CGReason(enum.StrEnum):
    """Why :func:`cg` stopped (a ``str`` enum: ``CGReason.CONVERGED == "converged"``)."""

    CONVERGED = "converged"  # ||r|| <= tolerance
    MAX_ITER = "max_iter"  # iteration cap reached first
    NEGATIVE_CURVATURE = "negative_curvature"  # p.A p <= 0
    NAN_OR_INF = "nan_or_inf"  # a product or scalar was not finite


@dataclass(frozen=True, eq=False)
class CGResult:
    """Outcome of :func:`cg`.

    ``iterations`` counts CG iterations (one matvec each, including the one
    that detected negative curvature or a non-finite value); ``matvecs`` adds
    the warm-start residual product when ``x0`` was given and nonzero.
    ``residual_norm`` is the norm of the recursively updated residual (no
    extra matvec is spent on the true residual); ``tolerance`` is the absolute
    threshold the residual was compared with.
    """

    x: np.ndarray
    reason: CGReason
    iterations: int
    matvecs: int
    residual_norm: float
    tolerance: float

    @property
    def converged(self) -> bool:
        """True when the residual criterion was met."""
        return self.reason is CGReason.CONVERGED


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """Keep floating dtypes (float32 stays float32), promote the rest to float64."""
    if np.issubdtype(dtype, np.floating):
        return np.dtype(dtype)
    return np.dtype(np.float64)


def _check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"cg: {name} must be a finite number >= 0, got {value!r}")
    return value


def cg(
    a: LinearOperator | Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    *,
    x0: np.ndarray | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    scale_tol_sqrt_n: bool = False,
) -> CGResult:
    """Solve ``A x = b`` by conjugate gradients (thesis Algorithm 3).

    ``a`` is a :class:`LinearOperator` (or a bare ``matvec`` callable, wrapped
    as one); its product is called exactly once per iteration, plus once for
    the warm-start residual ``b - A x0`` when ``x0`` is given and not all zeros.
    Damping is part of the operator: pass ``damped(H, alpha)``.

    Stopping rules, checked in this order:

    * ``||r|| <= max(rtol*||b||, atol)`` (times ``sqrt(n)`` when
      ``scale_tol_sqrt_n``, the thesis' section 9.2 remedy for high
      dimension) -> ``CONVERGED``.  A zero ``b`` gives ``x = 0`` at once,
      without any matvec, whatever ``x0`` is.
    * a product or scalar is NaN/Inf -> ``NAN_OR_INF``; ``x`` is the last
      finite iterate (``x0``, or zeros, if it happens before the first update).
    * ``p.A p <= 0`` -> ``NEGATIVE_CURVATURE``; ``x`` is the
      current iterate, *not* extended along ``p``.  At iteration 0 that is
      ``x0`` (zeros without warm start): deciding what to do with such a
      direction (the descent test and steepest-descent fallback of thesis
      Algorithm 4) is the Newton layer's job.
    * ``max_iter`` iterations (default ``n``) -> ``MAX_ITER``.

    Computation is in the floating dtype of ``b`` (float64 for integer input).
    No randomness and no data-dependent ordering: identical inputs give
    bitwise identical outputs.
    """
    b = np.asarray(b)
    if b.ndim != 1:
        raise ValueError(f"cg: b must be a 1-D vector, got shape {b.shape}")
    dtype = _float_dtype(b.dtype)
    b = b.astype(dtype, copy=False)
    n = b.size
    op = aslinearoperator(a, n, dtype)
    if op.shape != (n, n):
        raise ValueError(f"cg: operator has shape {op.shape}, b has shape {b.shape}")
    rtol = _check_nonnegative("rtol", rtol)
    atol = _check_nonnegative("atol", atol)
    if max_iter is None:
        max_iter = n
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"cg: max_iter must be an integer >= 0, got {max_iter!r}")
    max_iter = int(max_iter)
    if x0 is not None:
        x0 = np.asarray(x0)
        if x0.shape != b.shape:
            raise ValueError(f"cg: x0 has shape {x0.shape}, b has shape {b.shape}")
        x0 = x0.astype(dtype, copy=True)
        if not np.all(np.isfinite(x0)):
            raise ValueError("cg: x0 contains NaN or Inf")

    def apply(v: np.ndarray) -> np.ndarray:
        return op.matvec(v).astype(dtype, copy=False)

    bnorm = float(np.linalg.norm(b))
    tol = max(rtol * bnorm, atol)
    if scale_tol_sqrt_n:
        tol *= math.sqrt(n)

    def start() -> np.ndarray:
        return x0.copy() if x0 is not None else np.zeros(n, dtype=dtype)

    if not math.isfinite(bnorm):
        return CGResult(start(), CGReason.NAN_OR_INF, 0, 0, bnorm, tol)
    if bnorm == 0.0:
        return CGResult(np.zeros(n, dtype=dtype), CGReason.CONVERGED, 0, 0, 0.0, tol)

    matvecs = 0
    if x0 is not None and np.any(x0):
        x = x0
        ax = apply(x)
        matvecs += 1
        r = b - ax
    else:
        x = np.zeros(n, dtype=dtype)
        r = b.copy()
    rr = float(r @ r)
    if not math.isfinite(rr):
        return CGResult(x, CGReason.NAN_OR_INF, 0, matvecs, math.nan, tol)
    rnorm = math.sqrt(rr)
    if rnorm <= tol:
        return CGResult(x, CGReason.CONVERGED, 0, matvecs, rnorm, tol)

    p = r.copy()
    iterations = 0
    while iterations < max_iter:
        Ap = apply(p)
        matvecs += 1
        iterations += 1
        # A non-finite entry of Ap makes pAp non-finite (p != 0 while r != 0).
        pAp = float(p @ Ap)
        if not math.isfinite(pAp):
            return CGResult(x, CGReason.NAN_OR_INF, iterations, matvecs, rnorm, tol)
        if pAp <= 0.0:
            return CGResult(x, CGReason.NEGATIVE_CURVATURE, iterations, matvecs, rnorm, tol)
        alpha = rr / pAp
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below
            x_new = x + alpha * p
            r_new = r - alpha * Ap
            rr_new = float(r_new @ r_new)
        if not (math.isfinite(alpha) and math.isfinite(rr_new) and np.all(np.isfinite(x_new))):
            return CGResult(x, CGReason.NAN_OR_INF, iterations, matvecs, rnorm, tol)
        x, r = x_new, r_new
        rnorm = math.sqrt(rr_new)
        if rnorm <= tol:
            return CGResult(x, CGReason.CONVERGED, iterations, matvecs, rnorm, tol)
        beta = rr_new / rr
        rr = rr_new
        p = r + beta * p
    return CGResult(x, CGReason.MAX_ITER, iterations, matvecs, rnorm, tol)
