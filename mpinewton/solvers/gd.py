"""Gradient descent (thesis Algorithm 1): pre-training and first-order baseline.

Used for the pre-training phase of thesis Algorithm 4 and as the baseline of
thesis section 14.3, with a fixed learning rate or Armijo steps.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .linesearch import LineSearchResult, armijo

if TYPE_CHECKING:
    from .newton import Problem

__all__ = ["gd_step", "gd_armijo_step"]


def _value_and_grad(
    problem: Problem,
    w: np.ndarray,
    value_and_grad: tuple[float, np.ndarray] | None,
    who: str,
) -> tuple[float, np.ndarray]:
    """Evaluate (or take) ``c(w)`` and its gradient; refuse non-finite values."""
    loss, g = value_and_grad if value_and_grad is not None else problem.value_and_grad(w)
    loss = float(loss)
    g = np.asarray(g)
    if g.shape != w.shape:
        raise ValueError(f"{who}: gradient has shape {g.shape}, weights have shape {w.shape}")
    if not math.isfinite(loss):
        raise FloatingPointError(f"{who}: loss at the current weights is {loss!r}")
    if not np.all(np.isfinite(g)):
        raise FloatingPointError(f"{who}: gradient at the current weights contains NaN or Inf")
    return loss, g


def gd_step(
    problem: Problem,
    w: np.ndarray,
    learning_rate: float,
    *,
    value_and_grad: tuple[float, np.ndarray] | None = None,
) -> tuple[np.ndarray, float, float]:
    """One gradient-descent step ``w - learning_rate * grad c(w)`` (thesis Algorithm 1).

    Returns ``(new_w, loss, grad_norm)``, loss and gradient norm taken at the
    *old* ``w``.  ``value_and_grad`` may pass ``(c(w), grad c(w))`` already
    computed.  Raises ``FloatingPointError`` rather than return weights with
    NaN/Inf (fixed rates can diverge on coercive losses, thesis 14.3).
    """
    learning_rate = float(learning_rate)
    if not (math.isfinite(learning_rate) and learning_rate > 0.0):
        raise ValueError(f"gd_step: learning_rate must be finite and > 0, got {learning_rate!r}")
    w = np.asarray(w)
    loss, g = _value_and_grad(problem, w, value_and_grad, "gd_step")
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        new_w = w - learning_rate * g
    if not np.all(np.isfinite(new_w)):
        raise FloatingPointError(
            f"gd_step: the step with learning_rate={learning_rate!r} gives NaN/Inf weights"
        )
    return new_w, loss, float(np.linalg.norm(g))


def gd_armijo_step(
    problem: Problem,
    w: np.ndarray,
    *,
    sigma0: float = 1.0,
    beta: float = 0.5,
    gamma: float = 1e-4,
    max_trials: int = 20,
    value_and_grad: tuple[float, np.ndarray] | None = None,
) -> tuple[np.ndarray, float, float, LineSearchResult]:
    """Steepest descent with Armijo backtracking (thesis Algorithm 1 + section 9.2).

    Returns ``(new_w, loss, grad_norm, line_search)`` with loss and gradient
    norm at the old ``w``.  At a zero gradient, or when the line search fails,
    ``new_w`` is a copy of ``w``.  Trial points with NaN/Inf weights count as
    rejections and are never passed to ``problem.value``.
    """
    w = np.asarray(w)
    loss, g = _value_and_grad(problem, w, value_and_grad, "gd_armijo_step")
    gg = float(g @ g)
    grad_norm = math.sqrt(gg)
    if gg == 0.0:
        return w.copy(), loss, grad_norm, LineSearchResult(0.0, loss, 0, True)

    def phi(sigma: float) -> float:
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite trials are rejected
            trial = w - sigma * g
        if not np.all(np.isfinite(trial)):
            return math.inf
        return float(problem.value(trial))

    ls = armijo(phi, loss, -gg, beta=beta, gamma=gamma, max_trials=max_trials, sigma0=sigma0)
    new_w = w - ls.step * g if ls.success else w.copy()
    return new_w, loss, grad_norm, ls
