"""Conjugate gradients for the (damped) Newton equation.

Thesis Algorithm 3 (section 5), in the notation of Nocedal & Wright: solve
``A x = b`` where ``A`` is a :class:`~mpinewton.solvers.operators.LinearOperator`
known only by its product ``v -> A v`` -- for Newton, the damped Hessian
``H + alpha I`` (thesis chapter 4 and 7.2, :func:`~mpinewton.solvers.operators.damped`).
With a preconditioner it is preconditioned CG (Nocedal & Wright 2nd ed.,
Algorithm 5.3).  Besides ``x`` it reports, without extra products, the value
of the quadratic model at ``x``, the iterates Martens (2010, section 4.6)
backtracks over, and the direction of negative curvature it met.
Pure numpy:
nothing here knows about MPI or TensorFlow, so every rank that calls
:func:`cg` with the same inputs gets bitwise the same outputs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .operators import LinearOperator, aslinearoperator

__all__ = ["CGReason", "CGResult", "cg", "keep_schedule"]


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

    Model values, from the recursive residual ``r = b - A x`` (no extra
    product): ``x_dot_ax = x.A x = b.x - r.x`` and ``model_value = q(x) =
    0.5 x.A x - b.x = -0.5 (b.x + r.x)`` (NaN when ``r`` is not finite).
    For a damped operator ``A = B + alpha I`` the undamped curvature is
    ``x.B x = x_dot_ax - alpha |x|^2``.

    ``iterates`` (only with ``keep_iterates``): ``(i, x_i)`` pairs, ``x_i``
    the iterate after ``i`` CG updates, for ``i = ceil(1.3^j)`` (Martens 2010,
    section 4.6) and, last, the returned ``x`` (its ``i`` is ``iterations``,
    or ``iterations - 1`` when the last iteration broke down);
    ``iterate_x_dot_ax`` holds ``x_i.A x_i`` for each.

    ``negative_curvature_direction`` is the search direction ``p`` with
    ``p.A p <= 0`` (reason ``NEGATIVE_CURVATURE``, None otherwise) and
    ``negative_curvature_value`` its ``p.A p`` (NaN otherwise).
    """

    x: np.ndarray
    reason: CGReason
    iterations: int
    matvecs: int
    residual_norm: float
    tolerance: float
    model_value: float = math.nan
    x_dot_ax: float = math.nan
    iterates: tuple[tuple[int, np.ndarray], ...] = ()
    iterate_x_dot_ax: tuple[float, ...] = ()
    negative_curvature_direction: np.ndarray | None = None
    negative_curvature_value: float = math.nan

    @property
    def converged(self) -> bool:
        """True when the residual criterion was met."""
        return self.reason is CGReason.CONVERGED


def keep_schedule() -> Iterator[int]:
    """The CG iterations Martens (2010, section 4.6) keeps: distinct ``ceil(1.3^j)``, j >= 0.

    ``1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 24, 31, 40, 52, ...``
    """
    last, j = 0, 0
    while True:
        i = math.ceil(1.3**j)
        j += 1
        if i > last:
            last = i
            yield i


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
    preconditioner: LinearOperator | Callable[[np.ndarray], np.ndarray] | None = None,
    keep_iterates: bool = False,
    reorthogonalize: bool = False,
    callback: Callable[[int, int, float], None] | None = None,
) -> CGResult:
    """Solve ``A x = b`` by conjugate gradients (thesis Algorithm 3).

    ``a`` is a :class:`LinearOperator` (or a bare ``matvec`` callable, wrapped
    as one); its product is called exactly once per iteration, plus once for
    the warm-start residual ``b - A x0`` when ``x0`` is given and not all zeros.
    Damping is part of the operator: pass ``damped(H, alpha)``.

    ``preconditioner`` applies ``M^{-1}`` (an operator or a callable; symmetric
    positive definite): preconditioned CG, Nocedal & Wright Algorithm 5.3, one
    application per iteration plus one at the start.  The stopping test stays
    on the unpreconditioned residual ``||r||``.  A non-positive ``r.M^{-1} r``
    (a preconditioner that is not positive definite) raises ``ValueError``.
    Without one, the arithmetic is exactly that of plain CG.

    Stopping rules, checked in this order:

    * ``||r|| <= max(rtol*||b||, atol)`` (times ``sqrt(n)`` when
      ``scale_tol_sqrt_n``, the thesis' section 9.2 remedy for high
      dimension) -> ``CONVERGED``.  A zero ``b`` gives ``x = 0`` at once,
      without any matvec, whatever ``x0`` is.
    * a product or scalar is NaN/Inf -> ``NAN_OR_INF``; ``x`` is the last
      finite iterate (``x0``, or zeros, if it happens before the first update).
    * ``p.A p <= 0`` -> ``NEGATIVE_CURVATURE``; ``x`` is the
      current iterate, *not* extended along ``p``, which is returned as
      ``negative_curvature_direction``.  At iteration 0 ``x`` is
      ``x0`` (zeros without warm start): deciding what to do with such a
      direction (the descent test and steepest-descent fallback of thesis
      Algorithm 4) is the Newton layer's job.
    * ``max_iter`` iterations (default ``n``) -> ``MAX_ITER``.

    ``keep_iterates`` stores the iterates for Martens' CG backtracking
    (:class:`CGResult`).

    ``reorthogonalize`` re-imposes, after every update, what exact arithmetic
    guarantees: the new residual is made ``M^{-1}``-orthogonal to all earlier
    ones (``r <- r - sum_i u_i (u_i . M^{-1} r)`` over the normalised earlier
    residuals ``u_i``, ``u_i . M^{-1} u_i = 1``; two passes, "twice is
    enough").  In floating point CG loses that orthogonality as soon as a Ritz
    value converges to an isolated outlying eigenvalue (Paige 1976; Greenbaum
    1997, ch. 4); rounding errors along its eigenvector are then amplified
    by the residual polynomial at the outlier, a factor of tens per
    iteration for a spectrum with outliers, and two runs whose products
    differ only by rounding (one process against several MPI ranks) follow
    different iterates after a dozen iterations.  With reorthogonalization the
    iterates stay those of exact CG to rounding.  Costs: memory for one vector
    of ``n`` per iteration, about ``4 k n`` flops and three ``M^{-1}``
    applications (instead of one) at iteration ``k``; no extra product of ``a``.
    Off, the arithmetic is exactly that of CG without the option.

    ``callback(k, max_iter, |r_k| / |b|)`` is called after each iteration
    (progress output for long solves); it must not change anything CG uses.

    Computation is in the floating dtype of ``b`` (float64 for integer
    input).  No randomness and no data-dependent ordering: identical inputs
    give bitwise identical outputs.
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
    precond = None if preconditioner is None else aslinearoperator(preconditioner, n, dtype)
    if precond is not None and precond.shape != (n, n):
        raise ValueError(f"cg: preconditioner has shape {precond.shape}, b has shape {b.shape}")
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

    kept: list[tuple[int, np.ndarray]] = []
    kept_xax: list[float] = []
    schedule = keep_schedule()
    next_keep = next(schedule)

    def x_dot_ax(x: np.ndarray, r: np.ndarray | None) -> float:
        """``x.A x = b.x - r.x`` from the recursive residual ``r = b - A x``."""
        if r is None:
            return math.nan
        return float(b @ x) - float(r @ x)

    def finish(x: np.ndarray, reason: CGReason, iterations: int, matvecs: int,
               rnorm: float, r: np.ndarray | None, updates: int,
               p: np.ndarray | None = None, pap: float = math.nan) -> CGResult:
        xax = x_dot_ax(x, r)
        model = 0.5 * xax - float(b @ x) if r is not None else math.nan
        if not math.isfinite(model):
            xax = model = math.nan
        if keep_iterates and (not kept or kept[-1][0] != updates):
            kept.append((updates, x))
            kept_xax.append(xax)
        return CGResult(x, reason, iterations, matvecs, rnorm, tol, model, xax,
                        tuple(kept), tuple(kept_xax), p, pap)

    if not math.isfinite(bnorm):
        return finish(start(), CGReason.NAN_OR_INF, 0, 0, bnorm, None, 0)
    if bnorm == 0.0:
        z = np.zeros(n, dtype=dtype)
        return finish(z, CGReason.CONVERGED, 0, 0, 0.0, z, 0)

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
        return finish(x, CGReason.NAN_OR_INF, 0, matvecs, math.nan, None, 0)
    rnorm = math.sqrt(rr)
    if rnorm <= tol:
        return finish(x, CGReason.CONVERGED, 0, matvecs, rnorm, r, 0)

    def psolve(r: np.ndarray) -> tuple[np.ndarray, float]:
        """``(y, r.y)`` with ``y = M^{-1} r`` (``(r, r.r)`` without a preconditioner)."""
        y = precond.matvec(r).astype(dtype, copy=False)  # type: ignore[union-attr]
        ry = float(r @ y)
        if math.isfinite(ry) and ry <= 0.0:
            raise ValueError(f"cg: the preconditioner is not positive definite (r.M^-1 r = {ry!r})")
        return y, ry

    if precond is None:
        y, ry = r, rr
    else:
        y, ry = psolve(r)
        if not math.isfinite(ry):
            return finish(x, CGReason.NAN_OR_INF, 0, matvecs, rnorm, r, 0)

    # Reorthogonalization: rows 0..kept_residuals-1 of basis hold the earlier
    # residuals r_i / sqrt(r_i . M^-1 r_i), M^-1-orthonormal in exact arithmetic.
    basis = np.empty((0, n), dtype=dtype)
    kept_residuals = 0

    def remember(r: np.ndarray, ry: float) -> None:
        nonlocal basis, kept_residuals
        if kept_residuals == basis.shape[0]:
            grown = np.empty((max(8, 2 * basis.shape[0]), n), dtype=dtype)
            grown[:kept_residuals] = basis[:kept_residuals]
            basis = grown
        basis[kept_residuals] = r / math.sqrt(ry)
        kept_residuals += 1

    def reorthogonalized(r: np.ndarray) -> np.ndarray:
        """``r`` minus its M^-1-projection on the kept residuals, twice (CGS2)."""
        u = basis[:kept_residuals]
        for _ in range(2):
            y = r if precond is None else precond.matvec(r).astype(dtype, copy=False)
            r = r - (u @ y) @ u
        return r

    if reorthogonalize:
        remember(r, ry)

    p = y.copy()
    iterations = 0
    while iterations < max_iter:
        Ap = apply(p)
        matvecs += 1
        iterations += 1
        updates = iterations - 1
        # A non-finite entry of Ap makes pAp non-finite (p != 0 while r != 0).
        pAp = float(p @ Ap)
        if not math.isfinite(pAp):
            return finish(x, CGReason.NAN_OR_INF, iterations, matvecs, rnorm, r, updates)
        if pAp <= 0.0:
            return finish(x, CGReason.NEGATIVE_CURVATURE, iterations, matvecs, rnorm, r,
                          updates, p, pAp)
        alpha = ry / pAp
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below
            x_new = x + alpha * p
            r_new = r - alpha * Ap
            if reorthogonalize and np.all(np.isfinite(r_new)):
                r_new = reorthogonalized(r_new)
            rr_new = float(r_new @ r_new)
        if not (math.isfinite(alpha) and math.isfinite(rr_new) and np.all(np.isfinite(x_new))):
            return finish(x, CGReason.NAN_OR_INF, iterations, matvecs, rnorm, r, updates)
        x, r = x_new, r_new
        rnorm = math.sqrt(rr_new)
        if callback is not None:  # progress: iteration, cap, |r| / |b|
            callback(iterations, max_iter, rnorm / bnorm if bnorm > 0 else 0.0)
        if keep_iterates and iterations == next_keep:
            kept.append((iterations, x))
            kept_xax.append(x_dot_ax(x, r))
            next_keep = next(schedule)
        if rnorm <= tol:
            return finish(x, CGReason.CONVERGED, iterations, matvecs, rnorm, r, iterations)
        if precond is None:
            y, ry_new = r, rr_new
        else:
            y, ry_new = psolve(r)
            if not math.isfinite(ry_new):
                return finish(x, CGReason.NAN_OR_INF, iterations, matvecs, rnorm, r, iterations)
        beta = ry_new / ry
        ry = ry_new
        if reorthogonalize:
            remember(r, ry)
        p = y + beta * p
    return finish(x, CGReason.MAX_ITER, iterations, matvecs, rnorm, r, iterations)
