"""Solver mathematics of mpinewton, in pure numpy (no MPI, no TensorFlow).

Conjugate gradients (thesis Algorithm 3), Armijo / fixed step sizes (thesis
9.2), gradient descent (thesis Algorithm 1) and the globalised Newton method
(thesis Algorithm 4).  Everything receives callables and numpy vectors.
"""

from .cg import CGReason, CGResult, cg
from .gd import gd_armijo_step, gd_step
from .linesearch import LineSearchResult, armijo, fixed_step
from .newton import (
    STEP_RULES,
    WARM_STARTS,
    MinimizeResult,
    NewtonConfig,
    NewtonState,
    Problem,
    StepInfo,
    minimize,
    newton_step,
    pure_newton,
)

__all__ = [
    "STEP_RULES",
    "WARM_STARTS",
    "CGReason",
    "CGResult",
    "LineSearchResult",
    "MinimizeResult",
    "NewtonConfig",
    "NewtonState",
    "Problem",
    "StepInfo",
    "armijo",
    "cg",
    "fixed_step",
    "gd_armijo_step",
    "gd_step",
    "minimize",
    "newton_step",
    "pure_newton",
]
