"""The explicit Hessian of a small model, assembled from Hessian-vector products.

Thesis 14.1 evaluates the full Hessian of the simple CNN (3,192 weights) to
check its quality (symmetry, the Taylor test of chapter 13, the spectrum).
Here the matrix is assembled column block by column block,
``H [e_j, ..., e_{j+b-1}] = op.matmat(identity columns)``, so any curvature
operator serves (:class:`~mpinewton.solvers.operators.HessianOperator`, damped,
Gauss-Newton) and the distributed driver can split the columns across ranks
(``columns=``) and gather the blocks; :func:`summarize` then reports on the
assembled matrix.

``n`` weights need ``n**2`` numbers: 82 MB for the simple CNN, thousands of
TiB for ResNet-50.  :func:`explicit_hessian` refuses a matrix that would not
fit in ``max_bytes`` before it computes a single product; the product-only
tools (:mod:`.eigen`, :mod:`.trace`) work at any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..solvers.operators import LinearOperator
from ._common import as_operator, check_int, check_max_bytes, format_bytes, products, work_dtype

__all__ = ["HessianResult", "explicit_hessian", "hessian_bytes", "summarize"]


@dataclass(frozen=True, eq=False)
class HessianResult:
    """An explicit Hessian (or a block of its columns) and what it says.

    For a column block (``explicit_hessian(..., columns=...)``) the matrix is
    ``(n, len(columns))`` and ``symmetry_error`` and ``eigenvalues`` are None:
    they need the whole matrix (gather the blocks, then :func:`summarize`).
    """

    matrix: np.ndarray  # (n, n), or (n, len(columns)) for a column block
    columns: np.ndarray  # the column indices held in ``matrix``, in order
    symmetry_error: float | None  # ||H - H^T||_F / ||H||_F (0 for a zero matrix); None for a block
    eigenvalues: np.ndarray | None  # eigvalsh of (H + H^T)/2, ascending; None for a block
    products: int  # operator products (matvecs) spent

    @property
    def complete(self) -> bool:
        """True when ``matrix`` is the whole square Hessian."""
        return self.eigenvalues is not None


def hessian_bytes(n: int, dtype: Any = np.float64) -> int:
    """Bytes of an ``n x n`` matrix of ``dtype`` (a Python int: no overflow for huge ``n``)."""
    n = check_int("hessian_bytes", "n", n, 0)
    return n * n * np.dtype(dtype).itemsize


def summarize(matrix: np.ndarray, *, products: int = 0) -> HessianResult:
    """Symmetry error and spectrum of a square matrix assembled elsewhere (e.g. gathered).

    ``symmetry_error = ||H - H^T||_F / ||H||_F`` (0 for a zero matrix) measures
    how far the products are from exact (thesis 14.1 reports 3.19e-16 between
    two implementations); ``eigenvalues`` are those of the symmetric part
    ``(H + H^T) / 2`` (``numpy.linalg.eigvalsh``, ascending).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"summarize: need a square matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("summarize: the matrix contains NaN or Inf")
    norm = float(np.linalg.norm(matrix))
    error = float(np.linalg.norm(matrix - matrix.T)) / norm if norm > 0 else 0.0
    eigenvalues = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    return HessianResult(matrix=matrix, columns=np.arange(matrix.shape[0]),
                         symmetry_error=error, eigenvalues=eigenvalues,
                         products=check_int("summarize", "products", products, 0))


def explicit_hessian(op: LinearOperator | np.ndarray, *, block: int = 32,
                     max_bytes: int | None = None,
                     columns: range | np.ndarray | list[int] | None = None) -> HessianResult:
    """Assemble ``H`` from ``op.matmat`` on blocks of ``block`` identity columns.

    ``columns``: compute only these columns (indices in ``[0, n)``) and return
    the ``(n, len(columns))`` block, so that ranks can share the work.
    ``max_bytes`` (default: half the machine's physical memory) bounds the
    result matrix; a larger one is refused before any product is spent.
    Summarising the whole matrix needs about two more matrices of the same
    size (the symmetric part and the eigensolver's copy).
    """
    who = "explicit_hessian"
    op = as_operator(op, who)
    n = op.shape[0]
    block = check_int(who, "block", block, 1)
    limit = check_max_bytes(who, max_bytes)
    if columns is None:
        cols = np.arange(n)
    else:
        cols = np.asarray(columns)
        if cols.ndim != 1 or not (cols.size == 0 or np.issubdtype(cols.dtype, np.integer)):
            raise ValueError(f"{who}: columns must be a 1-D range or array of integers, "
                             f"got {columns!r}")
        if cols.size and (cols.min() < 0 or cols.max() >= n):
            raise ValueError(f"{who}: columns must lie in [0, {n}), got indices from "
                             f"{cols.min()} to {cols.max()}")
        cols = cols.astype(np.int64)
    dtype = work_dtype(op)
    need = n * cols.size * dtype.itemsize
    if need > limit:
        what = (f"the explicit Hessian of {n:,} weights" if columns is None else
                f"{cols.size:,} columns of the explicit Hessian of {n:,} weights")
        raise ValueError(f"{who}: {what} needs {format_bytes(need)} ({dtype}); the limit is "
                         f"{format_bytes(limit)} (max_bytes={limit:,}); use eigen/trace/"
                         "spectrum, which need only products")
    start = op.products
    matrix = np.empty((n, cols.size), dtype=dtype)
    for lo in range(0, cols.size, block):
        chunk = cols[lo:lo + block]
        unit = np.zeros((n, chunk.size), dtype=dtype)
        unit[chunk, np.arange(chunk.size)] = 1
        matrix[:, lo:lo + chunk.size] = products(op, unit, who)
    spent = op.products - start
    if columns is None:
        return summarize(matrix, products=spent)
    return HessianResult(matrix=matrix, columns=cols, symmetry_error=None, eigenvalues=None,
                         products=spent)
