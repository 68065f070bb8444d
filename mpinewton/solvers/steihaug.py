"""CG-Steihaug: the trust-region subproblem by truncated conjugate gradients.

Nocedal & Wright, *Numerical Optimization* (2nd ed.), Algorithm 7.2: minimise
the quadratic model ``m(p) = g.p + 0.5 p.B p`` subject to ``|p| <= radius``
by CG from ``p = 0``, stopping on the boundary when an iterate would leave the
region or when a direction of non-positive curvature appears.  ``B`` is known
only by its product (a :class:`~mpinewton.solvers.operators.LinearOperator`),
so it may be an indefinite Hessian.  Pure numpy and deterministic: identical
inputs give bitwise identical outputs on every rank.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .operators import LinearOperator, aslinearoperator

__all__ = ["SteihaugReason", "SteihaugResult", "steihaug_cg"]


class SteihaugReason(enum.StrEnum):
    """Why :func:`steihaug_cg` stopped (a ``str`` enum, like :class:`~.cg.CGReason`)."""

    CONVERGED = "converged"  # |r| <= max(rtol*|g|, atol), inside the region
    NEGATIVE_CURVATURE = "negative_curvature"  # d.Bd <= 0: followed d to the boundary
    BOUNDARY = "boundary"  # the next iterate would leave the region: stopped on it
    MAX_ITER = "max_iter"  # iteration cap reached inside the region
    NAN_OR_INF = "nan_or_inf"  # a product or scalar was not finite; last finite iterate kept


@dataclass(frozen=True, eq=False)
class SteihaugResult:
    """Outcome of :func:`steihaug_cg`.

    ``iterations`` counts CG iterations, one product with ``B`` each
    (including the one that met negative curvature, the boundary or a
    non-finite value); ``matvecs`` equals it (no product is spent elsewhere).
    ``residual_norm`` is ``|g + B x|`` by the CG recursions (no extra
    product); ``model_decrease`` is ``m(0) - m(x) = -(g.x + 0.5 x.Bx)`` with
    ``B x`` accumulated from the products CG made; ``hit_boundary`` says
    ``|x| = radius`` (reasons ``BOUNDARY`` and ``NEGATIVE_CURVATURE``).
    """

    x: np.ndarray
    reason: SteihaugReason
    iterations: int
    matvecs: int
    residual_norm: float
    model_decrease: float
    hit_boundary: bool
    tolerance: float

    @property
    def converged(self) -> bool:
        """True when the residual criterion was met inside the region."""
        return self.reason is SteihaugReason.CONVERGED


def _nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"steihaug_cg: {name} must be a finite number >= 0, got {value!r}")
    return value


def _boundary_roots(z: np.ndarray, d: np.ndarray, radius: float) -> tuple[float, float]:
    """The roots ``ta <= tb`` of ``|z + t d| = radius`` for ``|z| < radius`` (so ``ta < 0 < tb``).

    The cancellation-free form of the quadratic formula (Golub & Van Loan,
    *Matrix Computations*, section 2.7), as in scipy's trust-region code.
    """
    a = float(d @ d)
    b = 2.0 * float(z @ d)
    c = min(float(z @ z) - radius * radius, 0.0)  # z is inside; rounding must not say otherwise
    aux = b + math.copysign(math.sqrt(b * b - 4.0 * a * c), b)
    if aux == 0.0:  # z = 0 and c = 0 cannot both hold (radius > 0); keep the degenerate case safe
        return 0.0, 0.0
    ta, tb = -aux / (2.0 * a), -2.0 * c / aux
    return (ta, tb) if ta <= tb else (tb, ta)


def steihaug_cg(
    op: LinearOperator | Callable[[np.ndarray], np.ndarray] | np.ndarray,
    g: np.ndarray,
    radius: float,
    *,
    rtol: float,
    atol: float = 0.0,
    max_iter: int | None = None,
) -> SteihaugResult:
    """Approximately minimise ``g.p + 0.5 p.Bp`` over ``|p| <= radius`` (N&W Algorithm 7.2).

    ``op`` is ``B`` (an operator, a square matrix, or a ``matvec`` callable),
    applied exactly once per iteration.  From ``z = 0``, ``r = g``, ``d = -g``,
    each iteration stops with, in this order:

    * ``d.Bd <= 0`` -> ``NEGATIVE_CURVATURE``: ``x = z + t d`` on the boundary,
      of the two roots ``t`` the one with the lower model value;
    * ``|z + alpha d| >= radius`` -> ``BOUNDARY``: ``x = z + t d``, ``t > 0``
      with ``|x| = radius``;
    * ``|r| <= max(rtol*|g|, atol)`` -> ``CONVERGED`` (checked first of all,
      for ``z = 0``, where a small enough ``g`` gives ``x = 0`` and no product);
    * ``max_iter`` iterations (default ``n``) -> ``MAX_ITER``;
    * a non-finite product, scalar or iterate -> ``NAN_OR_INF`` with the last
      finite iterate.

    N&W (7.3)'s superlinear forcing is ``rtol = min(0.5, sqrt(|g|))``, the
    tolerance of scipy's ``trust-ncg``.  Computation is in ``g``'s floating
    dtype (float64 for integers).
    """
    g = np.asarray(g)
    if g.ndim != 1:
        raise ValueError(f"steihaug_cg: g must be a 1-D vector, got shape {g.shape}")
    dtype = g.dtype if np.issubdtype(g.dtype, np.floating) else np.dtype(np.float64)
    g = g.astype(dtype, copy=False)
    n = g.size
    b_op = aslinearoperator(op, n, dtype)
    if b_op.shape != (n, n):
        raise ValueError(f"steihaug_cg: operator has shape {b_op.shape}, g has shape {g.shape}")
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0.0):
        raise ValueError(f"steihaug_cg: radius must be a finite number > 0, got {radius!r}")
    rtol, atol = _nonnegative("rtol", rtol), _nonnegative("atol", atol)
    if max_iter is None:
        max_iter = n
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"steihaug_cg: max_iter must be an integer >= 0, got {max_iter!r}")

    gnorm = float(np.linalg.norm(g))
    tol = max(rtol * gnorm, atol)
    z = np.zeros(n, dtype=dtype)
    bz = np.zeros(n, dtype=dtype)  # B z, accumulated from the products (no extra matvec)
    iterations = 0

    def result(x: np.ndarray, bx: np.ndarray, reason: SteihaugReason, rnorm: float,
               boundary: bool = False) -> SteihaugResult:
        decrease = -(float(g @ x) + 0.5 * float(x @ bx))
        return SteihaugResult(x, reason, iterations, iterations, rnorm, decrease, boundary, tol)

    if not math.isfinite(gnorm):
        return result(z, bz, SteihaugReason.NAN_OR_INF, gnorm)
    if gnorm <= tol:
        return result(z, bz, SteihaugReason.CONVERGED, gnorm)

    r = g.copy()  # r = g + B z, the model's gradient at z
    d = -r
    rr = float(r @ r)
    while iterations < max_iter:
        bd = np.asarray(b_op.matvec(d)).astype(dtype, copy=False)
        iterations += 1
        dbd = float(d @ bd)
        if not math.isfinite(dbd):
            return result(z, bz, SteihaugReason.NAN_OR_INF, math.sqrt(rr))
        if dbd <= 0.0:
            ta, tb = _boundary_roots(z, d, radius)
            rd = float(r @ d)
            # m(z + t d) - m(z) = t r.d + t^2 d.Bd / 2: take the lower of the two roots' values.
            t = ta if ta * rd + 0.5 * ta * ta * dbd < tb * rd + 0.5 * tb * tb * dbd else tb
            return _to_boundary(result, z, bz, r, d, bd, t, SteihaugReason.NEGATIVE_CURVATURE, rr)
        alpha = rr / dbd
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are checked
            z_next = z + alpha * d
            znorm = float(np.linalg.norm(z_next))
        if not (math.isfinite(alpha) and math.isfinite(znorm)):
            return result(z, bz, SteihaugReason.NAN_OR_INF, math.sqrt(rr))
        if znorm >= radius:
            _, tb = _boundary_roots(z, d, radius)
            return _to_boundary(result, z, bz, r, d, bd, tb, SteihaugReason.BOUNDARY, rr)
        with np.errstate(over="ignore", invalid="ignore"):
            r_next = r + alpha * bd
            bz_next = bz + alpha * bd
            rr_next = float(r_next @ r_next)
        if not (math.isfinite(rr_next) and np.all(np.isfinite(bz_next))):
            return result(z, bz, SteihaugReason.NAN_OR_INF, math.sqrt(rr))
        z, r, bz = z_next, r_next, bz_next
        if math.sqrt(rr_next) <= tol:
            return result(z, bz, SteihaugReason.CONVERGED, math.sqrt(rr_next))
        beta = rr_next / rr
        rr = rr_next
        d = -r + beta * d
    return result(z, bz, SteihaugReason.MAX_ITER, math.sqrt(rr))


def _to_boundary(result: Callable[..., SteihaugResult], z: np.ndarray, bz: np.ndarray,
                 r: np.ndarray, d: np.ndarray, bd: np.ndarray, t: float,
                 reason: SteihaugReason, rr: float) -> SteihaugResult:
    """``x = z + t d`` on the boundary, with ``B x`` and ``g + B x`` from ``B d`` (no product)."""
    with np.errstate(over="ignore", invalid="ignore"):
        x, bx, rx = z + t * d, bz + t * bd, r + t * bd
    if not (math.isfinite(t) and np.all(np.isfinite(x)) and np.all(np.isfinite(bx))):
        return result(z, bz, SteihaugReason.NAN_OR_INF, math.sqrt(rr))
    return result(x, bx, reason, float(np.linalg.norm(rx)), True)
