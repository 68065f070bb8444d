"""Step-size rules of thesis section 9.2: Armijo backtracking and a fixed rate.

Both work on the one-dimensional restriction ``phi(sigma) = c(w + sigma*s)``
and know nothing about how ``c`` is evaluated (locally, or reduced over MPI).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LineSearchResult", "armijo", "fixed_step"]


@dataclass(frozen=True)
class LineSearchResult:
    """Accepted step size, objective there, number of ``phi`` calls, success."""

    step: float
    value: float
    trials: int
    success: bool


def _check_open_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"armijo: {name} must lie in (0, 1), got {value!r}")
    return value


def armijo(
    phi: Callable[[float], float],
    phi0: float,
    derphi0: float,
    *,
    beta: float = 0.5,
    gamma: float = 1e-4,
    max_trials: int = 20,
    sigma0: float = 1.0,
) -> LineSearchResult:
    """Armijo backtracking (thesis section 9.2, "Armijo step size adaption").

    Tries ``sigma = sigma0, sigma0*beta, sigma0*beta**2, ...`` and accepts the
    first with ``phi(sigma) - phi0 <= sigma * gamma * derphi0``, where
    ``derphi0 = grad c(w) . s < 0``.  A NaN/Inf ``phi(sigma)`` is a rejection.
    After ``max_trials`` rejections it returns ``success=False``, ``step=0.0``
    and ``value=phi0``: the caller keeps the old weights.
    """
    beta = _check_open_unit("beta", beta)
    gamma = _check_open_unit("gamma", gamma)
    phi0 = float(phi0)
    derphi0 = float(derphi0)
    sigma0 = float(sigma0)
    if not math.isfinite(phi0):
        raise ValueError(f"armijo: phi0 must be finite, got {phi0!r}")
    if not (math.isfinite(derphi0) and derphi0 < 0.0):
        raise ValueError(
            f"armijo: derphi0 must be finite and < 0 (a descent direction), got {derphi0!r}"
        )
    if not (math.isfinite(sigma0) and sigma0 > 0.0):
        raise ValueError(f"armijo: sigma0 must be finite and > 0, got {sigma0!r}")
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise ValueError(f"armijo: max_trials must be an integer >= 1, got {max_trials!r}")

    for trial in range(max_trials):
        sigma = sigma0 * beta**trial
        value = float(phi(sigma))
        if math.isfinite(value) and value - phi0 <= sigma * gamma * derphi0:
            return LineSearchResult(step=sigma, value=value, trials=trial + 1, success=True)
    return LineSearchResult(step=0.0, value=phi0, trials=max_trials, success=False)


def fixed_step(phi: Callable[[float], float] | None, learning_rate: float) -> LineSearchResult:
    """Take the fixed learning rate as step size (thesis section 9.2, "Learning rate").

    With ``phi`` given, it is evaluated once at ``learning_rate`` so the caller
    learns the new loss (``trials=1``); ``success`` is False when that value is
    NaN/Inf, and the caller must then keep the old weights.  Without ``phi``,
    ``trials=0``, ``value`` is NaN (unknown) and ``success`` is True.
    """
    learning_rate = float(learning_rate)
    if not (math.isfinite(learning_rate) and learning_rate > 0.0):
        raise ValueError(f"fixed_step: learning_rate must be finite and > 0, got {learning_rate!r}")
    if phi is None:
        return LineSearchResult(step=learning_rate, value=math.nan, trials=0, success=True)
    value = float(phi(learning_rate))
    return LineSearchResult(step=learning_rate, value=value, trials=1, success=math.isfinite(value))
