"""The trace and the spectral density of a symmetric operator from products alone.

- :func:`hutchinson`: Hutchinson's estimator ``tr(A) ~ mean_i z_i.A z_i`` with
  Rademacher (or Gaussian) probes ``z_i`` (Hutchinson 1990, "A stochastic
  estimator of the trace of the influence matrix for Laplacian smoothing
  splines"; Avron & Toledo 2011).
- :func:`slq`: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019,
  "An investigation into neural net optimization via Hessian eigenvalue
  density"; Ubaru, Chen & Saad 2017): per run, ``m`` Lanczos steps from a
  normalised Rademacher vector give a Gauss quadrature (nodes, weights) of
  the spectral measure ``sum_i (v.u_i)^2 delta(lambda_i)``; averaged over
  runs it estimates the eigenvalue density ``(1/n) sum_i delta(lambda_i)``.

Random probes come from ``numpy.random.default_rng(seed)``, one vector at a
time in a fixed order, so every rank draws the same probes and the results
do not depend on ``block``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..solvers.base import ParameterError, is_real
from ..solvers.operators import LinearOperator
from ._common import (
    as_operator,
    check_choice,
    check_int,
    check_seed,
    product,
    products,
)
from .eigen import _basis_check, _Lanczos

__all__ = ["DISTRIBUTIONS", "SpectrumResult", "TraceResult", "hutchinson", "slq"]

#: Probe distributions of :func:`hutchinson`.
DISTRIBUTIONS = {"rademacher": "entries +-1 with probability 1/2",
                 "gaussian": "standard normal entries"}


@dataclass(frozen=True, eq=False)
class TraceResult:
    """Hutchinson's estimate of ``tr(A)``."""

    estimate: float  # mean of ``values``
    stderr: float  # std(values, ddof=1) / sqrt(samples): the estimate's standard error
    samples: int  # number of probes
    products: int  # operator products spent (one per probe)
    values: np.ndarray  # (samples,) z_i.A z_i, in drawing order
    distribution: Literal["rademacher", "gaussian"]  # the probes' distribution


def _probe(rng: np.random.Generator, n: int, distribution: str) -> np.ndarray:
    if distribution == "rademacher":
        return rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0
    return rng.standard_normal(n)


def hutchinson(op: LinearOperator | np.ndarray, *, samples: int = 100, seed: int = 0,
               distribution: Literal["rademacher", "gaussian"] = "rademacher",
               block: int = 8) -> TraceResult:
    """Hutchinson's trace estimator with ``samples`` probes, ``block`` products per ``matmat``.

    ``E[z.A z] = tr(A)`` for probes with independent entries of mean 0 and
    variance 1.  Rademacher probes have the smallest variance,
    ``2 (||A||_F^2 - sum_i A_ii^2)``: exactly 0 for a diagonal matrix;
    Gaussian probes have ``2 ||A||_F^2``.  ``samples >= 2`` so that the
    standard error can be estimated.
    """
    who = "hutchinson"
    op = as_operator(op, who)
    samples = check_int(who, "samples", samples, 2)
    block = check_int(who, "block", block, 1)
    check_choice(who, "distribution", distribution, DISTRIBUTIONS)
    rng = check_seed(who, seed)
    n = op.shape[0]
    start = op.products
    values = np.empty(samples)
    for lo in range(0, samples, block):
        count = min(block, samples - lo)
        z = np.empty((n, count))
        for j in range(count):
            z[:, j] = _probe(rng, n, distribution)
        values[lo:lo + count] = np.einsum("ij,ij->j", z, products(op, z, who))
    return TraceResult(estimate=float(values.mean()),
                       stderr=float(values.std(ddof=1) / math.sqrt(samples)),
                       samples=samples, products=op.products - start, values=values,
                       distribution=distribution)


@dataclass(frozen=True, eq=False)
class SpectrumResult:
    """Gauss quadratures of the spectral density, one per run (stochastic Lanczos quadrature).

    A run that broke down after ``steps[r] < m`` Lanczos steps (its Krylov
    space was invariant, so its quadrature is exact) is padded with nodes
    equal to its last node and weight 0.
    """

    nodes: np.ndarray  # (runs, m) eigenvalues of each run's tridiagonal T, ascending
    weights: np.ndarray  # (runs, m) squared first components of T's eigenvectors; rows sum to 1
    products: int  # operator products spent
    steps: np.ndarray  # (runs,) Lanczos steps each run took (m unless it broke down)
    n: int  # size of the operator

    @property
    def runs(self) -> int:
        """Number of start vectors."""
        return self.nodes.shape[0]

    def default_sigma(self) -> float:
        """1% of the width ``max(node) - min(node)`` of the nodes with weight > 0.

        For a spectrum of one point (width 0) it is 1% of that point's
        magnitude, or 0.01 for the zero operator.
        """
        nodes = self.nodes[self.weights > 0]
        width = float(nodes.max() - nodes.min()) if nodes.size else 0.0
        if width > 0:
            return 0.01 * width
        scale = float(np.abs(nodes).max()) if nodes.size else 0.0
        return 0.01 * scale if scale > 0 else 0.01

    def density(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """Smoothed eigenvalue density on ``grid``, Ghorbani et al. 2019 eq. (4).

        ``phi(t) = (1/runs) sum_r sum_j w_rj N(t; node_rj, sigma^2)`` with a
        Gaussian kernel of width ``sigma`` (default :meth:`default_sigma`); it
        integrates to 1 over a grid that covers the nodes by a few ``sigma``.
        """
        grid = np.asarray(grid, dtype=np.float64)
        if sigma is None:
            sigma = self.default_sigma()
        elif not (is_real(sigma) and math.isfinite(sigma) and sigma > 0):
            raise ParameterError("SpectrumResult.density", "sigma", sigma, "a finite number > 0")
        nodes, weights = self.nodes.ravel(), self.weights.ravel()
        z = (grid.reshape(-1, 1) - nodes) / sigma
        kernel = np.exp(-0.5 * z * z) / (sigma * math.sqrt(2.0 * math.pi))
        return (kernel @ weights).reshape(grid.shape) / self.runs

    def trace_estimate(self, n: int | None = None) -> float:
        """``n * mean_r sum_j w_rj node_rj``: ``tr(A)`` (``n`` defaults to :attr:`n`).

        Gauss quadrature is exact for ``f(t) = t``, so each run's term is the
        Rayleigh quotient ``v.A v`` of its unit start vector: this is
        Hutchinson's estimator with the runs' probes.
        """
        n = self.n if n is None else check_int("SpectrumResult.trace_estimate", "n", n, 1)
        return float(n * np.mean(np.sum(self.weights * self.nodes, axis=1)))


def slq(op: LinearOperator | np.ndarray, *, runs: int = 10, steps: int = 80, seed: int = 0,
        max_bytes: int | None = None) -> SpectrumResult:
    """Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019, Algorithm 1).

    Per run: a Rademacher vector normalised to unit length, ``m = min(steps,
    n)`` Lanczos steps with full reorthogonalisation (see
    :func:`~mpinewton.analysis.eigen.lanczos`), then the eigen-decomposition
    ``T = S diag(theta) S^T``: nodes ``theta_j``, weights ``S_{1j}^2``.  A run
    stops early at a breakdown (its quadrature is then exact).  ``runs * m``
    products in all; the basis of ``m + 1`` float64 vectors is bounded by
    ``max_bytes`` (default half the physical memory).
    """
    who = "slq"
    op = as_operator(op, who)
    runs = check_int(who, "runs", runs, 1)
    steps = check_int(who, "steps", steps, 1)
    rng = check_seed(who, seed)
    n = op.shape[0]
    if n == 0:
        raise ValueError(f"{who}: the operator has size 0")
    m = min(steps, n)
    _basis_check(who, "steps", m + 1, n, max_bytes)
    start = op.products
    nodes, weights = np.zeros((runs, m)), np.zeros((runs, m))
    taken = np.zeros(runs, dtype=np.int64)
    for r in range(runs):
        lz = _Lanczos(lambda v: product(op, v, who), n, m)
        lz.start(_probe(rng, n, "rademacher"))
        while lz.m < m and not lz.broken:
            lz.step()
        theta, s = lz.ritz()
        used = lz.m
        nodes[r, :used], weights[r, :used] = theta, s[0] ** 2
        nodes[r, used:] = theta[-1]
        taken[r] = used
    return SpectrumResult(nodes=nodes, weights=weights, products=op.products - start,
                          steps=taken, n=n)
