"""The Taylor test of a gradient and a Hessian along one direction (thesis chapter 13).

Along a direction ``d`` from ``w``, with ``c0 = c(w)``, ``g.d`` and ``d.H d``:

- ``r0(h) = |c(w + h d) - c0|``                             = O(h),
- ``r1(h) = |c(w + h d) - c0 - h g.d|``                     = O(h^2) for a correct gradient,
- ``r2(h) = |c(w + h d) - c0 - h g.d - h^2/2 d.H d|``       = O(h^3) for a correct Hessian

(thesis eq. 13.1, figure 14.1, table 15.1).  On a log-log plot the slopes
are 1, 2 and 3; a wrong gradient drops the slope of ``r1`` to 1, a wrong
Hessian that of ``r2`` to 2.  Remainders stop falling at round-off
("convergence plateaus", thesis 15.2), so the slopes are fitted only where
they still carry information (see :func:`taylor_test`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import check_vector

__all__ = ["DEFAULT_DISTANCES", "TaylorResult", "taylor_test"]

#: The distances ``h`` the test uses unless told: 1e-1, 1e-2, ..., 1e-8.
DEFAULT_DISTANCES = 10.0 ** -np.arange(1, 9)

#: Round-off floor factor: remainders <= FLOOR_FACTOR * eps * max(|c0|, |c(w + h d)|) are noise.
FLOOR_FACTOR = 10.0

#: Smallest local log-log rate of a remainder that still counts as decreasing.
MIN_RATE = 0.5
#: Largest change of the local rate between neighbouring segments inside the asymptotic regime.
RATE_SPREAD = 0.3


@dataclass(frozen=True, eq=False)
class TaylorResult:
    """Remainders of the zeroth-, first- and second-order Taylor models, and their slopes.

    Arrays are indexed like ``distances`` (decreasing).  A slope is NaN when
    fewer than two points are usable, e.g. ``r2`` of a quadratic function,
    whose second-order model is exact (all its remainders are round-off).
    """

    distances: np.ndarray  # (p,) the h, strictly decreasing
    values: np.ndarray  # (p,) c(w + h d)
    c0: float  # c(w)
    grad_dot: float  # g.d as given
    hess_dot: float | None  # d.H d as given (None: no Hessian tested)
    r0: np.ndarray  # (p,) |c(w + h d) - c0|
    r1: np.ndarray  # (p,) |c(w + h d) - c0 - h g.d|
    r2: np.ndarray  # (p,) |... - h^2/2 d.H d|; NaN without hess_dot
    floor: np.ndarray  # (p,) round-off floor of each point: 10 * eps * max(|c0|, |c(w+hd)|)
    used0: np.ndarray  # (p,) bools: points of r0 in the slope fit
    used1: np.ndarray  # (p,) bools: points of r1 in the slope fit
    used2: np.ndarray  # (p,) bools: points of r2 in the slope fit
    slope0: float  # least-squares log-log slope of r0 (1 expected)
    slope1: float  # of r1 (2 for a correct gradient)
    slope2: float  # of r2 (3 for a correct Hessian); NaN without hess_dot

    def table(self) -> list[dict[str, Any]]:
        """One row per distance: ``distance, r0, r1, r2, used0..2`` (thesis table 15.1)."""
        return [{"distance": float(h), "r0": float(a), "r1": float(b), "r2": float(c),
                 "used0": bool(u0), "used1": bool(u1), "used2": bool(u2)}
                for h, a, b, c, u0, u1, u2 in zip(self.distances, self.r0, self.r1, self.r2,
                                                  self.used0, self.used1, self.used2,
                                                  strict=True)]

    def format(self) -> str:
        """The table as text, unused points marked ``*``, then the slopes."""
        lines = [f"{'distance':>10} {'err (0th)':>12} {'err (1st)':>12} {'err (2nd)':>12}"]
        for row in self.table():
            cells = [f"{row[f'r{i}']:>11.4e}{' ' if row[f'used{i}'] else '*'}" for i in range(3)]
            lines.append(f"{row['distance']:>10.1e} " + " ".join(cells))
        lines.append(f"slopes: {self.slope0:.2f} {self.slope1:.2f} {self.slope2:.2f} "
                     "(expected 1, 2, 3; * = not fitted)")
        return "\n".join(lines)


def _used(r: np.ndarray, h: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """The points a slope is fitted on (see :func:`taylor_test`)."""
    used = np.zeros(r.shape, dtype=bool)
    i = 0
    while i < r.size and not math.isfinite(r[i]):
        i += 1
    while i < r.size and math.isfinite(r[i]) and r[i] > floor[i]:
        used[i] = True
        i += 1
    index = list(np.flatnonzero(used))
    while len(index) >= 2:
        last, before = index[-1], index[-2]
        rate = math.log(r[before] / r[last]) / math.log(h[before] / h[last])
        if rate >= MIN_RATE:
            break
        used[index.pop()] = False
    # The asymptotic regime: from the smallest distance up, while the local rate of
    # each next segment stays within RATE_SPREAD of the one before (larger distances
    # carry higher-order terms, or kinks of a ReLU net).
    rates = [math.log(r[a] / r[b]) / math.log(h[a] / h[b]) for a, b in itertools.pairwise(index)]
    for j in range(len(rates) - 2, -1, -1):
        if abs(rates[j] - rates[j + 1]) > RATE_SPREAD:
            used[index[: j + 1]] = False
            break
    return used


def _slope(r: np.ndarray, h: np.ndarray, used: np.ndarray) -> float:
    if used.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log10(h[used]), np.log10(r[used]), 1)[0])


def _finite(who: str, name: str, value: Any) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{who}: {name} is {value!r}, need a finite number")
    return value


def taylor_test(value: Callable[[np.ndarray], float], w: np.ndarray, d: np.ndarray, *,
                grad_dot: float, hess_dot: float | None = None,
                distances: np.ndarray = DEFAULT_DISTANCES,
                eps: float | None = None) -> TaylorResult:
    """Remainders of the Taylor models of ``c = value`` along ``d`` at the ``distances``.

    ``grad_dot = grad c(w) . d`` and ``hess_dot = d . H_c(w) d`` (e.g.
    ``d @ problem.hvp(w, d)``) are the quantities under test.

    Which points a slope is fitted on (least squares of ``log10 r`` on
    ``log10 h``): going from the largest distance down, after skipping
    leading non-finite values (a coercive loss overflows far out), the points
    whose remainder is above the round-off floor ``10 * eps * max(|c0|,
    |c(w + h d)|)``, up to the first that is not; then, from the smallest
    distance up, points are dropped while the local rate
    ``log(r_prev / r) / log(h_prev / h)`` is below 1/2: the plateau the
    thesis notes under table 15.1, where remainders no longer decrease.
    Last, the fit keeps the asymptotic regime: from the smallest remaining
    distance up, as long as each segment's local rate is within 0.3 of the
    next smaller one's (far out, higher-order terms or a ReLU's kinks bend
    the curve).
    ``eps`` is the machine epsilon of ``c``'s arithmetic (default: that of
    ``w``'s dtype, float64 for non-floating ``w``).  Every evaluation of
    ``value`` happens in the order of ``distances``, so the test runs in
    lockstep over MPI when ``value`` reduces.
    """
    who = "taylor_test"
    w_in = np.asarray(w)
    n = w_in.size
    if w_in.ndim != 1:
        raise ValueError(f"{who}: w must be a 1-D vector, got shape {w_in.shape}")
    if eps is None:
        eps = float(np.finfo(w_in.dtype if np.issubdtype(w_in.dtype, np.floating)
                             else np.float64).eps)
    elif not (0 < float(eps) < 1):
        raise ValueError(f"{who}: eps = {eps!r} must be in (0, 1)")
    dtype = w_in.dtype if np.issubdtype(w_in.dtype, np.floating) else np.float64
    w_vec = check_vector(who, "weights w", w_in, n)
    d_vec = check_vector(who, "direction d", d, n, nonzero=True)
    gd = _finite(who, "grad_dot", grad_dot)
    hd = None if hess_dot is None else _finite(who, "hess_dot", hess_dot)
    h = np.array(distances, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"{who}: distances must be a non-empty 1-D array, got {distances!r}")
    if not (np.all(np.isfinite(h)) and np.all(h > 0) and np.all(np.diff(h) < 0)):
        raise ValueError(f"{who}: distances must be finite, > 0 and strictly decreasing, "
                         f"got {h.tolist()}")

    c0 = _finite(who, "the value c(w)", value(w_in))
    values = np.array([float(value((w_vec + t * d_vec).astype(dtype))) for t in h])
    with np.errstate(invalid="ignore", over="ignore"):
        diff = values - c0
        r0 = np.abs(diff)
        r1 = np.abs(diff - h * gd)
        r2 = np.abs(diff - h * gd - 0.5 * h * h * hd) if hd is not None else np.full(h.size,
                                                                                     np.nan)
        floor = FLOOR_FACTOR * eps * np.maximum(abs(c0), np.abs(values))
    used = [_used(r, h, floor) for r in (r0, r1, r2)]
    return TaylorResult(distances=h, values=values, c0=c0, grad_dot=gd, hess_dot=hd,
                        r0=r0, r1=r1, r2=r2, floor=floor, used0=used[0], used1=used[1],
                        used2=used[2], slope0=_slope(r0, h, used[0]),
                        slope1=_slope(r1, h, used[1]), slope2=_slope(r2, h, used[2]))
