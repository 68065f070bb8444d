"""Curvature as linear operators: one small type that every consumer takes.

CG (thesis Algorithm 3) only ever needs ``v -> A v``; so do power iteration,
Lanczos, preconditioners and trust-region subproblems.  A :class:`LinearOperator`
carries that product with its ``shape`` and ``dtype`` (like scipy's
``LinearOperator`` or curvlinops' curvature operators), and ``matmat`` for
backends that can batch several products in one call.

- :class:`HessianOperator`: ``H_c(w)`` of a :class:`~mpinewton.solvers.base.Problem`
  at fixed weights: one ``problem.hvp`` per vector, and one ``problem.hvp_many``
  per block of vectors where the problem batches them (the distributed objective).
- :class:`GaussNewtonOperator`: the generalised Gauss-Newton matrix ``J^T H_L J``
  by ``problem.gnvp`` (positive semi-definite); :func:`curvature_operator` picks
  one of :data:`CURVATURES` by name.
- :class:`DiagonalOperator`: ``diag(d)``, for preconditioners.
- ``op + alpha * identity(n)``: Tikhonov damping ``H + alpha I`` (thesis 7.2, 7.5),
  see :func:`damped`.
- :class:`MatrixOperator`: an explicit matrix (tests, small models).
- :func:`as_scipy`: hand any of them to ``scipy.sparse.linalg`` (``eigsh``, ``cg``).

Pure numpy; a product that reduces over MPI is just another ``matvec``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .base import Problem

__all__ = [
    "CURVATURES",
    "DiagonalOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ScaledIdentity",
    "SumOperator",
    "aslinearoperator",
    "as_scipy",
    "curvature_operator",
    "damped",
    "identity",
]


class LinearOperator:
    """A square linear map known by its product ``v -> A v`` (``shape == (n, n)``).

    Subclasses implement :meth:`_matvec`; :meth:`matmat` applies it column by
    column unless a subclass batches.  ``matvec`` checks shapes, so a wrong
    product fails here, named, rather than deep inside a solver.
    """

    def __init__(self, n: int, dtype: Any = np.float64) -> None:
        if int(n) != n or n < 0:
            raise ValueError(f"LinearOperator: size must be an integer >= 0, got {n!r}")
        self.shape = (int(n), int(n))
        self.dtype = np.dtype(dtype)
        #: Products computed so far (``matmat`` counts one per column).
        self.products = 0

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """``A v`` for a vector of length ``n``."""
        v = np.asarray(v)
        if v.shape != (self.shape[1],):
            raise ValueError(f"{type(self).__name__}.matvec: vector has shape {v.shape}, "
                             f"expected ({self.shape[1]},)")
        out = np.asarray(self._matvec(v))
        if out.shape != (self.shape[0],):
            raise ValueError(f"{type(self).__name__}.matvec: product has shape {out.shape}, "
                             f"expected ({self.shape[0]},)")
        self.products += 1
        return out

    def _block(self, m: np.ndarray) -> np.ndarray:
        """``m`` as an ``(n, k)`` array, or a ValueError naming both shapes."""
        m = np.asarray(m)
        if m.ndim != 2 or m.shape[0] != self.shape[1]:
            raise ValueError(f"{type(self).__name__}.matmat: matrix has shape {m.shape}, "
                             f"expected ({self.shape[1]}, k)")
        return m

    def matmat(self, m: np.ndarray) -> np.ndarray:
        """``A M`` for an ``(n, k)`` matrix: one product per column unless batched."""
        m = self._block(m)
        if m.shape[1] == 0:
            return np.zeros((self.shape[0], 0), dtype=self.dtype)
        return np.stack([self.matvec(m[:, j]) for j in range(m.shape[1])], axis=1)

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} {self.dtype}>"


class MatrixOperator(LinearOperator):
    """An explicit square matrix as an operator."""

    def __init__(self, matrix: np.ndarray) -> None:
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"MatrixOperator: need a square matrix, got shape {matrix.shape}")
        super().__init__(matrix.shape[0], matrix.dtype)
        self.matrix = matrix

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self.matrix @ v

    def matmat(self, m: np.ndarray) -> np.ndarray:
        """``A M`` in one matrix product."""
        m = self._block(m)
        self.products += m.shape[1]
        return self.matrix @ m


class _CallableOperator(LinearOperator):
    def __init__(self, matvec: Callable[[np.ndarray], np.ndarray], n: int, dtype: Any) -> None:
        super().__init__(n, dtype)
        self._fn = matvec

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self._fn(v)


class _CurvatureOperator(LinearOperator):
    """A curvature matrix of a problem at fixed weights ``w``, by the problem's products.

    Subclasses name the problem's product (``hvp``) and its batched form
    (``hvp_many``).  ``w`` is copied, so the operator stays the curvature at
    the point it was made at.
    """

    product: str = ""
    product_many: str = ""

    def __init__(self, problem: Problem, w: np.ndarray) -> None:
        w = np.asarray(w)
        if w.ndim != 1:
            raise ValueError(f"{type(self).__name__}: w must be a 1-D vector, got shape {w.shape}")
        if not callable(getattr(problem, self.product, None)):
            raise TypeError(f"{type(self).__name__}: the problem ({type(problem).__name__}) "
                            f"has no {self.product}(w, v) product")
        super().__init__(w.size, w.dtype if np.issubdtype(w.dtype, np.floating) else np.float64)
        self.problem = problem
        self.w = np.array(w, copy=True)
        self.w.flags.writeable = False

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return getattr(self.problem, self.product)(self.w, v)

    def matmat(self, m: np.ndarray) -> np.ndarray:
        """``A M`` for an ``(n, k)`` matrix: one batched product where the problem has it.

        A problem with the batched product (``hvp_many``, ``gnvp_many``)
        computes the k products in one call (the distributed objective: one
        Allreduce for the block); any other problem gets one product per
        column. Counts k products either way.
        """
        many = getattr(self.problem, self.product_many, None)
        if many is None:
            return super().matmat(m)
        m = self._block(m)
        if m.shape[1] == 0:
            return np.zeros((self.shape[0], 0), dtype=self.dtype)
        out = np.asarray(many(self.w, m))
        if out.shape != (self.shape[0], m.shape[1]):
            raise ValueError(f"{type(self).__name__}.matmat: products have shape {out.shape}, "
                             f"expected ({self.shape[0]}, {m.shape[1]})")
        self.products += m.shape[1]
        return out


class HessianOperator(_CurvatureOperator):
    """The exact Hessian ``H_c(w)`` of a problem at fixed weights ``w`` (thesis chapter 4).

    Each product is one ``problem.hvp(w, v)``; for the distributed objective
    that is one batch-additive product reduced by one Allreduce; blocks use
    ``problem.hvp_many`` where the problem has it.
    """

    product, product_many = "hvp", "hvp_many"


class GaussNewtonOperator(_CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G(w) = J^T H_L J`` (Schraudolph 2002).

    ``J`` is the Jacobian of the network's output (its logits, where the loss
    takes a softmax of them) with respect to the weights and ``H_L`` the
    Hessian of the loss with respect to that output; the loss is convex there,
    so ``G`` is positive semi-definite and CG on ``G + alpha I`` never meets
    negative curvature (Martens 2010).  Thesis chapter 6 derives the ``J^T J``
    system of squared error, the special case ``H_L = 2 I / K``.  Each product
    is one ``problem.gnvp(w, v)``; blocks use ``problem.gnvp_many``.
    """

    product, product_many = "gnvp", "gnvp_many"


#: Curvature matrices a method can build CG's operator from (``curvature`` keys).
CURVATURES: dict[str, type[_CurvatureOperator]] = {
    "hessian": HessianOperator, "gauss_newton": GaussNewtonOperator}


def curvature_operator(problem: Problem, w: np.ndarray, kind: str = "hessian") -> LinearOperator:
    """The curvature ``kind`` (a key of :data:`CURVATURES`) of ``problem`` at ``w``."""
    if kind not in CURVATURES:
        raise ValueError(f"unknown curvature {kind!r}; known: {', '.join(CURVATURES)}")
    return CURVATURES[kind](problem, w)


class DiagonalOperator(LinearOperator):
    """``diag(d)``: Jacobi-type preconditioners and their inverses."""

    def __init__(self, diagonal: np.ndarray) -> None:
        diagonal = np.asarray(diagonal)
        if diagonal.ndim != 1:
            raise ValueError(f"DiagonalOperator: need a 1-D diagonal, got shape {diagonal.shape}")
        super().__init__(diagonal.size, diagonal.dtype if np.issubdtype(diagonal.dtype, np.floating)
                         else np.float64)
        self.diagonal = np.array(diagonal, dtype=self.dtype, copy=True)
        self.diagonal.flags.writeable = False

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self.diagonal * v

    def matmat(self, m: np.ndarray) -> np.ndarray:
        """``diag(d) M`` in one broadcast product."""
        m = self._block(m)
        self.products += m.shape[1]
        return self.diagonal[:, None] * m


class ScaledIdentity(LinearOperator):
    """``alpha I``: the Tikhonov term of thesis 7.2."""

    def __init__(self, n: int, alpha: float = 1.0, dtype: Any = np.float64) -> None:
        super().__init__(n, dtype)
        self.alpha = float(alpha)

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self.alpha * v

    def __mul__(self, alpha: float) -> ScaledIdentity:
        return ScaledIdentity(self.shape[0], self.alpha * float(alpha), self.dtype)

    __rmul__ = __mul__


def identity(n: int, dtype: Any = np.float64) -> ScaledIdentity:
    """Return the identity of size ``n`` (``alpha * identity`` scales it)."""
    return ScaledIdentity(n, 1.0, dtype)


class SumOperator(LinearOperator):
    """``A + B``; the product is ``A v + B v`` in that order (bitwise reproducible)."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape != b.shape:
            raise ValueError(f"cannot add operators of shapes {a.shape} and {b.shape}")
        super().__init__(a.shape[0], np.result_type(a.dtype, b.dtype))
        self.a, self.b = a, b

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self.a.matvec(v) + self.b.matvec(v)


def damped(op: LinearOperator, damping: float) -> LinearOperator:
    """``op + damping * I`` (thesis 7.2); ``op`` itself when ``damping`` is 0."""
    damping = float(damping)
    if not np.isfinite(damping):
        raise ValueError(f"damping must be finite, got {damping!r}")
    if damping == 0.0:
        return op
    return op + damping * identity(op.shape[0], op.dtype)


def aslinearoperator(a: Any, n: int | None = None, dtype: Any = np.float64) -> LinearOperator:
    """An operator from an operator, a square matrix, or a ``matvec`` callable of size ``n``."""
    if isinstance(a, LinearOperator):
        return a
    if isinstance(a, np.ndarray):
        return MatrixOperator(a)
    if callable(a):
        if n is None:
            raise ValueError("aslinearoperator: a matvec callable needs its size n")
        return _CallableOperator(a, n, dtype)
    raise TypeError(f"aslinearoperator: cannot make an operator of {type(a).__name__}")


def as_scipy(op: LinearOperator) -> Any:
    """``op`` as a ``scipy.sparse.linalg.LinearOperator`` (symmetric: ``rmatvec = matvec``)."""
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    def matvec(v: np.ndarray) -> np.ndarray:
        return op.matvec(np.ravel(v))

    return ScipyOperator(op.shape, matvec=matvec, rmatvec=matvec, matmat=op.matmat,
                         dtype=op.dtype)
