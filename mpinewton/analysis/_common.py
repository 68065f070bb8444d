"""Helpers shared by the analysis modules: argument checks, products, memory limits.

Every check raises a :class:`~mpinewton.solvers.base.ParameterError` (a
``ValueError``) that names the function, the argument and the bad value.
Products go through :func:`product` / :func:`products`, which compute in
float64, hand the operator vectors of its own dtype and refuse non-finite
results (the same numbers on every rank, so every rank raises together).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..solvers.base import ParameterError, is_int, is_real
from ..solvers.operators import LinearOperator, MatrixOperator

#: Machine memory assumed when ``os.sysconf`` cannot tell (bytes).
FALLBACK_MEMORY = 8 * 1024**3

GIB = 1024**3
TIB = 1024**4


def as_operator(op: Any, who: str) -> LinearOperator:
    """``op`` as a :class:`LinearOperator`: an operator itself, or a square numpy matrix."""
    if isinstance(op, LinearOperator):
        return op
    if isinstance(op, np.ndarray):
        return MatrixOperator(op)
    raise TypeError(f"{who}: need a LinearOperator or a square numpy matrix, got "
                    f"{type(op).__name__}; wrap a matvec callable with "
                    "mpinewton.solvers.aslinearoperator(fn, n)")


def product(op: LinearOperator, v: np.ndarray, who: str) -> np.ndarray:
    """``op @ v`` in float64 (one counted product); non-finite results are refused."""
    out = np.asarray(op.matvec(np.asarray(v, dtype=work_dtype(op))), dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise FloatingPointError(f"{who}: an operator product contains NaN or Inf")
    return out


def products(op: LinearOperator, m: np.ndarray, who: str) -> np.ndarray:
    """``op @ M`` for an ``(n, k)`` matrix in float64 (``k`` counted products)."""
    out = np.asarray(op.matmat(np.asarray(m, dtype=work_dtype(op))), dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise FloatingPointError(f"{who}: an operator product contains NaN or Inf")
    return out


def work_dtype(op: LinearOperator) -> np.dtype:
    """The dtype the operator's products take: its own when floating, else float64."""
    return op.dtype if np.issubdtype(op.dtype, np.floating) else np.dtype(np.float64)


def check_int(who: str, name: str, value: Any, minimum: int) -> int:
    """An integer ``>= minimum`` (not a bool), else ParameterError."""
    if not (is_int(value) and value >= minimum):
        raise ParameterError(who, name, value, f"an integer >= {minimum}")
    return int(value)


def check_positive(who: str, name: str, value: Any) -> float:
    """A finite real ``> 0``, else ParameterError."""
    if not (is_real(value) and math.isfinite(value) and value > 0):
        raise ParameterError(who, name, value, "a finite number > 0")
    return float(value)


def check_choice(who: str, name: str, value: Any, choices: dict[str, str]) -> str:
    """One of the keys of ``choices`` (key -> meaning), else ParameterError naming them."""
    if not (isinstance(value, str) and value in choices):
        need = "one of " + ", ".join(f"{key!r} ({meaning})" for key, meaning in choices.items())
        raise ParameterError(who, name, value, need, tuple(choices))
    return value


def check_seed(who: str, seed: Any) -> np.random.Generator:
    """A seeded numpy Generator from an integer seed >= 0 (the same draws on every rank)."""
    return np.random.default_rng(check_int(who, "seed", seed, 0))


def check_vector(who: str, name: str, v: Any, n: int, *, nonzero: bool = False) -> np.ndarray:
    """A finite float64 copy of a vector of length ``n``; ``nonzero`` refuses norm 0."""
    v = np.array(v, dtype=np.float64, copy=True)
    if v.shape != (n,):
        raise ValueError(f"{who}: {name} has shape {v.shape}, expected ({n},)")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{who}: {name} contains NaN or Inf")
    if nonzero and not np.any(v):
        raise ValueError(f"{who}: the {name} has norm 0")
    return v


def check_eigen_count(who: str, k: Any, n: int) -> int:
    """``1 <= k <= n``: a wanted number of eigenpairs of an ``n x n`` operator."""
    k = check_int(who, "k", k, 1)
    if k > n:
        raise ValueError(f"{who}: more eigenpairs (k={k}) than weights (n={n})")
    return k


def orthogonalize(v: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``v`` minus its projection on the orthonormal rows of ``basis``, two Gram-Schmidt passes."""
    if basis.shape[0] == 0:
        return v
    for _ in range(2):
        v = v - basis.T @ (basis @ v)
    return v


def physical_memory() -> int:
    """Bytes of physical memory (``os.sysconf``), :data:`FALLBACK_MEMORY` when unknown."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return FALLBACK_MEMORY
    return pages * size if pages > 0 and size > 0 else FALLBACK_MEMORY


def default_max_bytes() -> int:
    """Half the machine's physical memory: the default limit for dense arrays here."""
    return physical_memory() // 2


def check_max_bytes(who: str, max_bytes: Any) -> int:
    """``max_bytes`` as an int (``None``: :func:`default_max_bytes`)."""
    if max_bytes is None:
        return default_max_bytes()
    return check_int(who, "max_bytes", max_bytes, 0)


def format_bytes(nbytes: int) -> str:
    """``'745,058 GiB (728 TiB)'``, ``'1.5 GiB'``, ``'0.0020 GiB'``: sizes in GiB for messages."""
    gib = nbytes / GIB
    text = f"{gib:,.0f} GiB" if gib >= 10 else f"{gib:.2g} GiB"
    if nbytes >= TIB:
        text += f" ({nbytes / TIB:,.0f} TiB)"
    return text


def column_signs(vectors: np.ndarray) -> np.ndarray:
    """+-1 per column: the sign of the column's entry of largest magnitude."""
    if vectors.size == 0:
        return np.ones(vectors.shape[1])
    rows = np.argmax(np.abs(vectors), axis=0)
    return np.where(vectors[rows, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
