"""Gradient descent (thesis Algorithm 1): pre-training and first-order baseline.

Used for the pre-training phase of thesis Algorithm 4 and as the baseline of
thesis section 14.3.  :class:`GradientDescent` is the method on the shared
interface (:class:`~mpinewton.solvers.base.Method`), with a fixed learning
rate (:func:`gd_step`), as in the thesis; :func:`gd_armijo_step` is steepest
descent with Armijo backtracking as a plain function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Problem, SolverState, check_value_and_grad, require
from .linesearch import LineSearchResult, armijo

__all__ = ["GDConfig", "GDInfo", "GDState", "GradientDescent", "gd_armijo_step", "gd_step"]

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
    loss, g = check_value_and_grad(problem, w, value_and_grad, "gd_step")
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
    loss, g = check_value_and_grad(problem, w, value_and_grad, "gd_armijo_step")
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


@dataclass(frozen=True, kw_only=True)
class GDConfig:
    """Hyper-parameters of gradient descent with a fixed learning rate (thesis Algorithm 1).

    A fixed rate, as in the thesis' baseline (section 14.3); Armijo steps
    for gradient descent are :func:`gd_armijo_step`.
    """

    learning_rate: float = 1.0  # fixed step size

    def __post_init__(self) -> None:
        require(self, "learning_rate", "> 0")


@dataclass(frozen=True, eq=False)
class GDState(SolverState):
    """Gradient descent keeps only a step count."""

    iteration: int = 0  # steps taken so far

    def __post_init__(self) -> None:
        require(self, "iteration", "int >= 0")
        super().__post_init__()


@dataclass(frozen=True)
class GDInfo:
    """What one gradient-descent step did (loss and |g| at the old weights)."""

    loss: float
    grad_norm: float
    step: LineSearchResult  # the step size taken; ``trials`` 0 for a fixed rate

    @property
    def stalled(self) -> bool:
        """A fixed step never stalls: it always moves (or raises on NaN/Inf)."""
        return False

    def record(self) -> dict[str, Any]:
        """Metrics of this step, in the same fields as a Newton step's."""
        return {"loss": self.loss, "new_loss": None if self.step.trials == 0 else self.step.value,
                "grad_norm": self.grad_norm, "cg_iters": 0, "cg_reason": None,
                "step_size": self.step.step, "fallback": False,
                "linesearch_trials": self.step.trials, "damping": None}


class GradientDescent:
    """Gradient descent on the shared method interface (thesis Algorithm 1)."""

    name: ClassVar[str] = "gd"
    config_class: ClassVar[type] = GDConfig
    state_class: ClassVar[type[SolverState]] = GDState

    def __init__(self, config: GDConfig | None = None) -> None:
        self.config = GDConfig() if config is None else config

    def init(self, w: np.ndarray) -> GDState:
        """No state beyond counters."""
        return GDState()

    def step(self, problem: Problem, w: np.ndarray, state: GDState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, GDState, GDInfo]:
        """One fixed-rate step, :func:`gd_step`."""
        lr = self.config.learning_rate
        new_w, loss, grad_norm = gd_step(problem, w, lr, value_and_grad=value_and_grad)
        step = LineSearchResult(step=lr, value=math.nan, trials=0, success=True)
        return new_w, state.replace(iteration=state.iteration + 1), GDInfo(loss, grad_norm, step)
