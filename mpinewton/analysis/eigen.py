"""Extreme eigenpairs of a symmetric curvature operator from products alone.

- :func:`power_iteration`: thesis Algorithm 5 (section 15.1), the top pairs
  one after the other with the deflation ``A - sum_i lambda_i v_i v_i^T``;
  the largest/smallest *algebraic* pairs by a spectral shift.
- :func:`lanczos`: the Lanczos process with full reorthogonalisation, which
  reaches the same tolerance with far fewer products (Golub & Van Loan,
  *Matrix Computations*, 4th ed., section 10.1; Saad, *Numerical Methods
  for Large Eigenvalue Problems*, 2nd ed., chapter 6).

Both report residuals ``||A v - lambda v||`` computed with one true product
per pair (counted in ``products``), with ``lambda = v.A v`` the Rayleigh
quotient of that product.  Every branch depends only on the numbers the
operator returns and on a seeded generator, so with a product that reduces
over MPI all ranks run in lockstep and return the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..solvers.operators import LinearOperator
from ._common import (
    as_operator,
    check_choice,
    check_eigen_count,
    check_int,
    check_max_bytes,
    check_positive,
    check_seed,
    check_vector,
    column_signs,
    format_bytes,
    orthogonalize,
    product,
    products,
)

__all__ = ["WHICH", "EigenResult", "lanczos", "power_iteration"]

#: The eigenpairs one can ask for (``which``), SciPy ``eigsh`` style.
WHICH = {"LM": "largest magnitude", "LA": "largest algebraic", "SA": "smallest algebraic"}

Which = Literal["LM", "LA", "SA"]

_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Eigenpairs of a symmetric operator, ordered as ``which`` asks.

    ``LM``: by decreasing ``|lambda|``; ``LA``: decreasing ``lambda``; ``SA``:
    increasing ``lambda``.  ``vectors`` are unit columns, signed so that the
    entry of largest magnitude is positive; they are orthonormal up to the
    working precision.
    ``iterations[i]``: for ``power``, the iterations (products) of the run
    that found pair ``i``; for ``lanczos``, the number of Lanczos steps (the
    dimension of the Krylov basis), the same for every pair.
    """

    values: np.ndarray  # (k,) Rayleigh quotients v.A v of the returned vectors
    vectors: np.ndarray  # (n, k) unit eigenvector estimates
    residuals: np.ndarray  # (k,) ||A v - lambda v|| from one true product per pair
    tolerance: float  # the relative tolerance asked for
    converged: np.ndarray  # (k,) bools: residual <= tolerance * |lambda|
    products: int  # every product spent, the residual checks and the shift search included
    iterations: np.ndarray  # (k,) ints, see the class docstring
    method: Literal["power", "lanczos"]  # which algorithm
    which: Which  # which end of the spectrum
    shift: float = 0.0  # power iteration on LA/SA: mu of A + mu I (LA) or mu I - A (SA)

    @property
    def all_converged(self) -> bool:
        """True when every pair met ``residual <= tolerance * |lambda|``."""
        return bool(np.all(self.converged))


def _start(who: str, v0: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    v = (check_vector(who, "start vector v0", v0, n, nonzero=True) if v0 is not None
         else rng.standard_normal(n))
    return v / np.linalg.norm(v)


def _random_orthogonal(rng: np.random.Generator, basis: np.ndarray) -> np.ndarray | None:
    """A random unit vector orthogonal to the rows of ``basis`` (None if they span R^n)."""
    n = basis.shape[1]
    if basis.shape[0] >= n:
        return None
    for _ in range(10):
        v = rng.standard_normal(n)
        v /= np.linalg.norm(v)
        w = orthogonalize(v, basis)
        norm = float(np.linalg.norm(w))
        if norm > 1e-6:
            return w / norm
    return None


def _finish(op: LinearOperator, vectors: np.ndarray, k: int, which: str, tol: float,
            who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rayleigh-Ritz on the span of ``vectors`` (n, k) with ``k`` true products.

    The columns are orthonormalised (QR), multiplied by ``A`` (one product
    each), and the ``k x k`` projection ``Q^T A Q`` is diagonalised; its pairs,
    ordered as ``which`` asks, give the returned values (Rayleigh quotients),
    vectors and residuals ``||A y - lambda y||`` (``A y = (A Q) s``: the true
    products, combined).  This also removes the pairs' errors *within* the
    span, e.g. a first vector that still leans a little on the second.
    Returns values, vectors, residuals and converged (``residual <= tol * |lambda|``).
    """
    q, _ = np.linalg.qr(vectors)
    aq = products(op, q, who)
    g = q.T @ aq
    theta, s = np.linalg.eigh(0.5 * (g + g.T))
    order = _wanted(theta, k, which)
    y, ay = q @ s[:, order], aq @ s[:, order]
    signs = column_signs(y)  # deterministic: largest entry positive
    y, ay = y * signs, ay * signs
    values = np.einsum("ij,ij->j", y, ay) / np.einsum("ij,ij->j", y, y)
    residuals = np.linalg.norm(ay - y * values, axis=0)
    return values, y, residuals, residuals <= tol * np.abs(values)


def _check_common(who: str, op: LinearOperator | np.ndarray, k: int, which: str, tol: float,
                  seed: int) -> tuple[LinearOperator, int, float, np.random.Generator]:
    op = as_operator(op, who)
    k = check_eigen_count(who, k, op.shape[0])
    check_choice(who, "which", which, WHICH)
    return op, k, check_positive(who, "tol", tol), check_seed(who, seed)


def power_iteration(op: LinearOperator | np.ndarray, k: int = 1, *, which: Which = "LM",
                    tol: float = 1e-6, max_iter: int = 1000, seed: int = 0,
                    v0: np.ndarray | None = None) -> EigenResult:
    """The ``k`` extreme eigenpairs by power iteration with deflation (thesis Algorithm 5).

    Pair ``i`` is the dominant pair of the deflated operator
    ``B = S - sum_{j<i} theta_j v_j v_j^T`` (thesis 15.1, Hotelling
    deflation; ``theta_j`` the Rayleigh quotient of run ``j``), where ``S`` is
    the operator whose largest-magnitude pairs are the wanted ones:

    - ``LM``: ``S = A``.
    - ``LA``: ``S = A + mu I``; ``SA``: ``S = mu I - A``, with ``mu`` the
      spectral radius estimated by a preliminary power iteration on ``A``
      (``mu = ||A x||`` for the last unit iterate ``x``, stopped when it
      changes by at most 1e-3 relatively; it grows monotonically towards
      ``||A||_2``).  Then ``S`` is positive semi-definite up to the estimate's
      error, so its largest eigenvalues are the wanted end of the spectrum
      and deflated pairs (eigenvalue ~0) fall to its bottom.

    Stopping rule (per run): the residual ``||B x - theta x|| <= tol *
    |lambda|``, where ``theta = x.B x`` and ``lambda = sign * (theta - mu)``
    is the eigenvalue of ``A`` it stands for (a shift does not change a
    residual).  A pair whose eigenvalue is tiny against the spectral radius
    may not meet a relative tolerance below about ``eps * ||A|| / |lambda|``
    and runs to ``max_iter``; ``converged`` says so.

    Then a Rayleigh-Ritz step on the ``k`` vectors found, with one true
    product per pair, gives the reported values, vectors and residuals.  It
    matters beyond the first pair: pair 1, accurate to ``tol * |lambda_1|``,
    leaks an error of that size into the true residual of pair 2, which
    Rayleigh-Ritz removes (the error lies in the span of the later pairs).

    Start vectors: ``v0`` (else a standard normal draw, as in Algorithm 5)
    for the first run and the shift search, then fresh draws from
    ``numpy.random.default_rng(seed)``, orthogonalised against the pairs found.
    ``iterations[i]`` are the iterations of run ``i`` (which found pair ``i``
    before the Rayleigh-Ritz step, normally the same pair).
    """
    who = "power_iteration"
    op, k, tol, rng = _check_common(who, op, k, which, tol, seed)
    max_iter = check_int(who, "max_iter", max_iter, 1)
    n = op.shape[0]
    start_products = op.products
    x0 = _start(who, v0, n, rng)

    sign, mu = 1.0, 0.0
    if which != "LM":
        mu = _spectral_radius(op, x0, max_iter, who)
        sign = 1.0 if which == "LA" else -1.0

    vectors = np.zeros((0, n))
    thetas: list[float] = []
    iterations: list[int] = []
    for i in range(k):
        x = x0 if i == 0 else _random_orthogonal(rng, vectors)
        if x is None:  # pragma: no cover - k <= n leaves room for one more vector
            raise RuntimeError(f"{who}: no start vector orthogonal to {i} pairs")
        basis, deflation = vectors.copy(), np.array(thetas)

        def apply(v: np.ndarray, basis: np.ndarray = basis,
                  deflation: np.ndarray = deflation) -> np.ndarray:
            return sign * product(op, v, who) + mu * v - basis.T @ (deflation * (basis @ v))

        x, theta, its = _power_run(apply, x, tol=tol, max_iter=max_iter,
                                   eigenvalue=lambda theta: sign * (theta - mu))
        iterations.append(its)
        vectors = np.vstack([vectors, x])
        thetas.append(theta)

    values, vectors, residuals, converged = _finish(op, vectors.T, k, which, tol, who)
    return EigenResult(values=values, vectors=vectors, residuals=residuals, tolerance=tol,
                       converged=converged, products=op.products - start_products,
                       iterations=np.array(iterations, dtype=np.int64), method="power",
                       which=which, shift=mu)


def _power_run(apply, x: np.ndarray, *, tol: float, max_iter: int,
               eigenvalue) -> tuple[np.ndarray, float, int]:
    """Power iteration on ``apply`` from the unit vector ``x``: (iterate, theta, iterations)."""
    theta = 0.0
    for it in range(1, max_iter + 1):
        y = apply(x)
        theta = float(x @ y)
        if np.linalg.norm(y - theta * x) <= tol * abs(eigenvalue(theta)):
            return x, theta, it
        # The residual test above catches y == 0 (residual 0), so the norm is > 0 here.
        x = y / np.linalg.norm(y)
    return x, theta, max_iter


def _spectral_radius(op: LinearOperator, x: np.ndarray, max_iter: int, who: str) -> float:
    """``||A x_k||`` for power iterates ``x_k``: nondecreasing, towards ``||A||_2``."""
    radius = 0.0
    for _ in range(max_iter):
        y = product(op, x, who)
        previous, radius = radius, float(np.linalg.norm(y))
        if radius == 0.0 or radius - previous <= 1e-3 * radius:
            break
        x = y / radius
    return radius


class _Lanczos:
    """Lanczos tridiagonalisation with full reorthogonalisation (two Gram-Schmidt passes).

    After ``m`` steps, ``A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T`` with
    ``Q_m`` orthonormal (rows of :attr:`q` here) and ``T_m`` tridiagonal.  At a
    breakdown (``beta ~ 0``: the Krylov space is invariant) :meth:`restart`
    continues with a new start vector orthogonal to the basis and a zero
    coupling in ``T``, so the relation above still holds.
    """

    def __init__(self, apply, n: int, capacity: int) -> None:
        self.apply = apply
        self.q = np.empty((capacity + 1, n))  # pages are committed only as rows are written
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}
        self.m = 0  # steps done (products taken)
        self.scale = 0.0  # largest ||A q_j|| so far: the breakdown threshold's scale
        self.broken = False

    def start(self, v: np.ndarray) -> None:
        self.q[0] = v / np.linalg.norm(v)

    def step(self) -> None:
        j = self.m
        w = self.apply(self.q[j])
        self.scale = max(self.scale, float(np.linalg.norm(w)))
        a = float(self.q[j] @ w)
        w = w - a * self.q[j]
        if j > 0:
            w -= self.beta[j - 1] * self.q[j - 1]
        w = orthogonalize(w, self.q[:j + 1])
        b = float(np.linalg.norm(w))
        self.alpha.append(a)
        self.m = j + 1
        self.broken = b <= 1e3 * _EPS * self.scale
        self.beta.append(b)
        if not self.broken and self.m < self.q.shape[0]:
            self.q[self.m] = w / b

    def restart(self, v: np.ndarray) -> None:
        """Continue after a breakdown from ``v`` (a unit vector orthogonal to the basis)."""
        self.beta[-1] = 0.0
        self.q[self.m] = v
        self.broken = False

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of ``T_m``."""
        m = self.m
        t = np.diag(self.alpha) + np.diag(self.beta[:m - 1], 1) + np.diag(self.beta[:m - 1], -1)
        return np.linalg.eigh(t)

    @property
    def last_beta(self) -> float:
        """``beta_m``, or 0 right after a breakdown."""
        return 0.0 if self.broken else self.beta[-1]


def _basis_check(who: str, what: str, vectors: int, n: int, max_bytes: int | None) -> None:
    limit = check_max_bytes(who, max_bytes)
    need = vectors * n * 8
    if need > limit:
        raise ValueError(f"{who}: the Lanczos basis of {vectors:,} vectors of {n:,} weights needs "
                         f"{format_bytes(need)} (float64); the limit is {format_bytes(limit)} "
                         f"(max_bytes={limit:,}); lower {what} or raise max_bytes")


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LM":
        return np.argsort(-np.abs(theta), kind="stable")[:k]
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:k]
    return np.argsort(theta, kind="stable")[:k]


def lanczos(op: LinearOperator | np.ndarray, k: int = 1, *, which: Which = "LM",
            tol: float = 1e-6, max_iter: int | None = None, seed: int = 0,
            v0: np.ndarray | None = None, check_every: int = 5,
            max_bytes: int | None = None, low_memory: bool = False) -> EigenResult:
    """The ``k`` extreme eigenpairs by Lanczos with full reorthogonalisation.

    Each step takes one product ``A q_j`` and orthogonalises it against the
    whole basis twice (classical Gram-Schmidt, "twice is enough"), so the
    basis stays orthonormal to working precision and no spurious copies of
    converged Ritz values appear.  The Ritz pairs ``(theta_i, Q_m s_i)`` come
    from ``numpy.linalg.eigh`` of the tridiagonal ``T_m``.

    Stopping rule: every ``check_every`` steps (once ``m >= k``), at a
    breakdown and at the last step, the Lanczos residual estimates
    ``|beta_m s_{m,i}|`` (exactly ``||A y_i - theta_i y_i||`` in exact
    arithmetic) of the ``k`` wanted Ritz pairs are compared with
    ``tol * |theta_i|``; all below stops.  At a breakdown (``beta_m <=
    1e3 * eps * max_j ||A q_j||``: the Krylov space is invariant) the Ritz
    pairs are exact; with fewer than ``k`` steps the process restarts from a
    random vector orthogonal to the basis (zero coupling in ``T``).  Like
    every single-vector Krylov method it sees a multiple eigenvalue once per
    start vector.
    ``max_iter`` (default ``min(n, 300)``, at most ``n``) caps the steps.

    ``low_memory``: no basis is kept (:func:`_lanczos_two_pass`): a few
    vectors instead of ``m + 1``, for models whose basis would not fit beside
    the products (ResNet-50: 188 MB a vector), at twice the products.

    The returned values and residuals come from one true product per pair
    and a Rayleigh-Ritz step on the ``k`` Ritz vectors, as in
    :func:`power_iteration`.  The basis holds ``max_iter + 1`` float64
    vectors; ``max_bytes`` (default half the physical memory) bounds it.
    """
    who = "lanczos"
    op, k, tol, rng = _check_common(who, op, k, which, tol, seed)
    n = op.shape[0]
    max_iter = min(n, 300) if max_iter is None else min(check_int(who, "max_iter", max_iter, 1), n)
    if max_iter < k:
        raise ValueError(f"{who}: max_iter={max_iter} Lanczos steps cannot give k={k} pairs")
    check_every = check_int(who, "check_every", check_every, 1)
    if low_memory:
        return _lanczos_two_pass(op, k, which, tol, max_iter, check_every,
                                 _start(who, v0, n, rng), who)
    _basis_check(who, "max_iter", max_iter + 1, n, max_bytes)
    start_products = op.products

    lz = _Lanczos(lambda v: product(op, v, who), n, max_iter)
    lz.start(_start(who, v0, n, rng))
    while True:
        lz.step()
        m = lz.m
        at_end = m >= max_iter
        if m >= k and (m % check_every == 0 or lz.broken or at_end):
            theta, s = lz.ritz()
            idx = _wanted(theta, k, which)
            estimates = np.abs(lz.last_beta * s[m - 1, idx])
            if np.all(estimates <= tol * np.abs(theta[idx])) or at_end:
                break
        if at_end:  # pragma: no cover - at_end implies m >= k, handled above
            break
        if lz.broken:
            v = _random_orthogonal(rng, lz.q[:m])
            if v is None:  # pragma: no cover - m < max_iter <= n leaves room
                theta, s = lz.ritz()
                idx = _wanted(theta, k, which)
                break
            lz.restart(v)

    values, vectors, residuals, converged = _finish(op, lz.q[:m].T @ s[:, idx], k, which,
                                                    tol, who)
    return EigenResult(values=values, vectors=vectors, residuals=residuals, tolerance=tol,
                       converged=converged, products=op.products - start_products,
                       iterations=np.full(k, m, dtype=np.int64), method="lanczos", which=which)


def _good_ritz(theta: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Which Ritz values of ``T_m`` are genuine (Cullum & Willoughby 1985, ch. 4).

    Without reorthogonalisation, a converged eigenvalue comes back as
    further, *spurious* copies. A simple Ritz value that is also an
    eigenvalue of ``T_m`` without its first row and column is spurious; of a
    numerically multiple Ritz value one copy is kept.
    """
    m = theta.size
    scale = max(float(np.max(np.abs(theta))), 1e-300)
    close = 1e3 * _EPS * scale * m
    good = np.ones(m, dtype=bool)
    if m < 2:
        return good
    hat = np.linalg.eigvalsh(np.diag(alpha[1:]) + np.diag(beta[1:m - 1], 1)
                             + np.diag(beta[1:m - 1], -1))
    for i in range(m):
        if i > 0 and theta[i] - theta[i - 1] <= close:
            good[i] = False  # a copy of the previous (multiple) value: keep one
            continue
        if np.min(np.abs(hat - theta[i])) <= close:
            multiple = i + 1 < m and theta[i + 1] - theta[i] <= close
            good[i] = multiple
    return good


def _lanczos_two_pass(op: LinearOperator, k: int, which: str, tol: float, max_iter: int,
                      check_every: int, v: np.ndarray, who: str) -> EigenResult:
    """Lanczos keeping three vectors: the Ritz values, then the Ritz vectors by a second pass.

    Pass 1 runs the three-term recurrence (with the two latest vectors
    orthogonalised twice, no full basis) until the wanted *genuine* Ritz
    pairs (:func:`_good_ritz`) meet the residual estimate ``|beta_m s_mi| <=
    tol |theta_i|``; pass 2 runs it again from the same start and sums
    ``y_i = sum_j s_ji q_j``; :func:`_finish` then takes one true product per
    pair, as :func:`lanczos` does (Golub & Van Loan, 4th ed., sec. 10.3;
    Cullum & Willoughby 1985). Memory: ``3 + 3k`` vectors; products: twice
    the steps, plus ``k``.
    """
    start_products = op.products
    n = v.size
    q0 = v / np.linalg.norm(v)

    def recurrence(steps: int | None):
        """Yield (j, q_j, alpha_j, beta_j, broken) for the recurrence started at q0."""
        q_prev, q = np.zeros(n), q0.copy()
        beta_prev = 0.0
        scale = 0.0
        j = 0
        while steps is None or j < steps:
            w = product(op, q, who)
            scale = max(scale, float(np.linalg.norm(w)))
            a = float(q @ w)
            w -= a * q
            w -= beta_prev * q_prev
            for basis in (q, q_prev):  # local reorthogonalisation, twice
                w -= (basis @ w) * basis
                w -= (basis @ w) * basis
            b = float(np.linalg.norm(w))
            broken = b <= 1e3 * _EPS * scale
            yield j, q, a, b, broken
            if broken:
                return
            q_prev, q = q, w / b
            beta_prev = b
            j += 1

    alpha: list[float] = []
    beta: list[float] = []
    idx = np.arange(0)
    s = np.zeros((0, 0))
    for j, _, a, b, broken in recurrence(None):
        alpha.append(a)
        beta.append(b)
        m = j + 1
        at_end = m >= max_iter
        if m >= k and (m % check_every == 0 or broken or at_end):
            t = np.diag(alpha) + np.diag(beta[:m - 1], 1) + np.diag(beta[:m - 1], -1)
            theta, s = np.linalg.eigh(t)
            good = np.flatnonzero(_good_ritz(theta, np.asarray(alpha), np.asarray(beta)))
            if good.size >= k:
                idx = good[_wanted(theta[good], k, which)]
                estimates = np.abs((0.0 if broken else b) * s[m - 1, idx])
                if np.all(estimates <= tol * np.abs(theta[idx])) or at_end or broken:
                    break
            elif at_end or broken:
                raise ValueError(f"{who}: only {good.size} distinct eigenvalues found in "
                                 f"{m} steps without a basis (k={k}); raise max_iter or use "
                                 "the full basis (low_memory=False)")
        elif broken or at_end:
            raise ValueError(f"{who}: the Krylov space closed after {m} steps, fewer than "
                             f"k={k}; use the full basis (low_memory=False), which restarts")
    m = len(alpha)
    y = np.zeros((n, idx.size))
    for j, q, _, _, _ in recurrence(m):  # pass 2: the same vectors again, summed
        y += np.outer(q, s[j, idx])
    values, vectors, residuals, converged = _finish(op, y, k, which, tol, who)
    return EigenResult(values=values, vectors=vectors, residuals=residuals, tolerance=tol,
                       converged=converged, products=op.products - start_products,
                       iterations=np.full(k, m, dtype=np.int64), method="lanczos", which=which)
