"""Adam (Kingma & Ba 2015, "Adam: A method for stochastic optimization", Algorithm 1).

First-order baseline on the shared method interface
(:class:`~mpinewton.solvers.base.Method`), exactly Algorithm 1 of the paper::

    t <- t + 1
    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g*g
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)
    w <- w - lr m_hat / (sqrt(v_hat) + epsilon)

(not the paper's "more efficient" reordering of section 2, which moves
``epsilon``).  ``m`` and ``v`` start at zero, so the first step is
``lr g / (|g| + epsilon)``, about ``lr sign(g)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Problem, SolverState, check_value_and_grad, require
from .momentum import FixedStepInfo, _check_counter, _float_array

__all__ = ["Adam", "AdamConfig", "AdamInfo", "AdamState"]


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    """Hyper-parameters of Adam (Kingma & Ba 2015, Algorithm 1; defaults from the paper)."""

    learning_rate: float = 1e-3  # alpha, the step size > 0
    beta1: float = 0.9  # decay of the first-moment estimate, in [0, 1)
    beta2: float = 0.999  # decay of the second-moment estimate, in [0, 1)
    epsilon: float = 1e-8  # added to sqrt(v_hat), > 0

    def __post_init__(self) -> None:
        require(self, "learning_rate", "> 0")
        require(self, "beta1", "[0, 1)")
        require(self, "beta2", "[0, 1)")
        require(self, "epsilon", "> 0")


@dataclass(frozen=True, eq=False)
class AdamState(SolverState):
    """Step count ``t`` and the moment estimates ``m``, ``v`` (None before the first step).

    ``m`` and ``v`` may be given as lists (a JSON round trip): they become float arrays.
    """

    iteration: int = 0  # t, the steps taken so far
    m: np.ndarray | None = None  # biased first-moment estimate, a 1-D float vector
    v: np.ndarray | None = None  # biased second raw-moment estimate, a 1-D float vector

    def __post_init__(self) -> None:
        _check_counter(self, "iteration")
        owner = type(self).__name__
        for name in ("m", "v"):
            object.__setattr__(self, name, _float_array(getattr(self, name), owner, name))
        if (self.m is None) != (self.v is None) or (
                self.m is not None and self.v is not None and self.m.shape != self.v.shape):
            raise ValueError(f"{owner}: m and v must both be None or vectors of one shape")
        if self.v is not None and np.any(self.v < 0):
            raise ValueError(f"{owner}.v must be >= 0 (a mean of squares)")
        super().__post_init__()


@dataclass(frozen=True)
class AdamInfo(FixedStepInfo):
    """What one Adam step did (``step_size`` is the learning rate alpha)."""

    update_norm: float  # |w_new - w|


class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1) on the shared method interface."""

    name: ClassVar[str] = "adam"
    config_class: ClassVar[type] = AdamConfig
    state_class: ClassVar[type[SolverState]] = AdamState

    def __init__(self, config: AdamConfig | None = None) -> None:
        self.config = AdamConfig() if config is None else config

    def init(self, w: np.ndarray) -> AdamState:
        """``t = 0`` and zero moments (stored as None until the first step)."""
        return AdamState()

    def step(self, problem: Problem, w: np.ndarray, state: AdamState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, AdamState, AdamInfo]:
        """One step of Algorithm 1; raises ``FloatingPointError`` on NaN/Inf weights or moments."""
        w = np.asarray(w)
        loss, g = check_value_and_grad(problem, w, value_and_grad, "adam")
        if state.m is not None and state.m.shape != w.shape:
            raise ValueError(f"adam: moments have shape {state.m.shape}, weights have shape "
                             f"{w.shape}")
        cfg = self.config
        lr, b1, b2, eps = (float(cfg.learning_rate), float(cfg.beta1), float(cfg.beta2),
                           float(cfg.epsilon))
        t = state.iteration + 1
        from scipy.linalg.blas import daxpy

        g = np.asarray(g, dtype=np.float64)
        # In place, one scratch vector (BLAS axpy for the running means): on ResNet-50
        # each temporary vector would be 189 MB of fresh pages.
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            m = np.multiply(g, 1.0 - b1)
            v = np.multiply(g, g)
            v *= 1.0 - b2
            if state.m is not None:  # AdamState holds both moments or neither
                m = daxpy(state.m, m, a=b1)  # m = b1 m0 + (1 - b1) g
                v = daxpy(state.v, v, a=b2)  # v = b2 v0 + (1 - b2) g*g
            step = np.divide(v, 1.0 - b2**t)  # v_hat, then sqrt(v_hat) + eps
            np.sqrt(step, out=step)
            step += eps
            np.divide(m, step, out=step)  # then lr m_hat / (sqrt(v_hat) + eps)
            step *= lr / (1.0 - b1**t)
            new_w = np.subtract(w, step, out=np.empty_like(w, dtype=np.result_type(w, step)),
                                casting="same_kind")
        if not (np.all(np.isfinite(new_w)) and np.all(np.isfinite(m))
                and np.all(np.isfinite(v))):
            raise FloatingPointError(
                f"adam: step {t} with learning_rate={lr!r} gives NaN/Inf weights or moments")
        info = AdamInfo(loss, float(np.linalg.norm(g)), lr, float(np.linalg.norm(new_w - w)))
        return new_w, state.take(iteration=t, m=m, v=v), info
