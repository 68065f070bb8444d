"""Curvature analysis, the numerical core (thesis chapters 13-15), in pure numpy.

Everything takes a symmetric :class:`~mpinewton.solvers.operators.LinearOperator`
(or a square numpy matrix) or plain callables on flat numpy vectors, and
decides every branch from the numbers they return and from seeded numpy
generators: with an operator whose product reduces over MPI it runs on every
rank in lockstep.  No TensorFlow, no MPI, no h5py here.

- :mod:`.hessian`: :func:`explicit_hessian` (column blocks of products, a
  memory limit), :func:`summarize` (symmetry error, spectrum),
  :func:`hessian_bytes` -- thesis 14.1.
- :mod:`.eigen`: :func:`power_iteration` with deflation (thesis Algorithm 5,
  section 15.1) and :func:`lanczos` with full reorthogonalisation, both giving
  an :class:`EigenResult` with true residuals.
- :mod:`.trace`: :func:`hutchinson` (trace) and :func:`slq`, stochastic
  Lanczos quadrature of the eigenvalue density (Ghorbani, Krishnan & Xiao
  2019, "An investigation into neural net optimization via Hessian
  eigenvalue density").
- :mod:`.taylor`: :func:`taylor_test`, the Taylor-approximation error and its
  fitted slopes 1, 2, 3 (thesis chapter 13, figure 14.1, table 15.1).
- :mod:`.surface`: :func:`line` and :func:`plane` (thesis figure 15.1) and
  :func:`filter_normalized_direction` (Li, Xu, Taylor, Studer & Goldstein
  2018, "Visualizing the loss landscape of neural nets").
"""

from ._common import default_max_bytes
from .eigen import WHICH, EigenResult, lanczos, power_iteration
from .hessian import HessianResult, explicit_hessian, hessian_bytes, summarize
from .surface import filter_normalized_direction, line, plane
from .taylor import DEFAULT_DISTANCES, TaylorResult, taylor_test
from .trace import DISTRIBUTIONS, SpectrumResult, TraceResult, hutchinson, slq

__all__ = [
    "DEFAULT_DISTANCES",
    "DISTRIBUTIONS",
    "WHICH",
    "EigenResult",
    "HessianResult",
    "SpectrumResult",
    "TaylorResult",
    "TraceResult",
    "default_max_bytes",
    "explicit_hessian",
    "filter_normalized_direction",
    "hessian_bytes",
    "hutchinson",
    "lanczos",
    "line",
    "plane",
    "power_iteration",
    "slq",
    "summarize",
    "taylor_test",
]
