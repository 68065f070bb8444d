"""Solver mathematics of mpinewton, in pure numpy (no MPI, no TensorFlow).

- :mod:`.base`: the :class:`Problem` (``c(w)`` as callables), the :class:`Method`
  interface ``init(w) -> state``, ``step(problem, w, state) -> (w, state, info)``,
  parameter checks.
- :mod:`.operators`: curvature as linear operators (Hessian, damping, scipy adapter).
- :mod:`.cg`: conjugate gradients on an operator (thesis Algorithm 3).
- :mod:`.linesearch`: Armijo and fixed step sizes (thesis 9.2).
- :mod:`.gd`: gradient descent (thesis Algorithm 1); :mod:`.newton`: globalised
  Newton-CG (thesis Algorithm 4).
- :mod:`.momentum`, :mod:`.adam`, :mod:`.lbfgs`: the first-order and quasi-Newton
  baselines a user would otherwise pick (heavy ball / Nesterov, Adam, L-BFGS).
- :mod:`.steihaug`, :mod:`.trust_region`: Newton with a trust region, the
  subproblem by Steihaug-CG (Nocedal & Wright Algorithms 4.1, 7.2).
- :mod:`.kfac`: K-FAC, natural-gradient steps with a Kronecker-factored Fisher
  (Martens & Grosse 2015), the second-order method built for mini-batches.
- :mod:`.averaging`: the exponential average of the iterates (``optimizer.average``).
- :mod:`.loop`: the one loop that runs phases of methods, used by
  :func:`minimize` and by the training driver.

:data:`METHODS` maps a job's ``optimizer.method`` to its class; adding a method
is one module with a config dataclass, a state and a step, and one entry here.
"""

from .adam import Adam, AdamConfig, AdamState
from .averaging import IterateAverage
from .base import Method, ParameterError, Problem, SolverState, StepRecord
from .cg import CGReason, CGResult, cg
from .gd import GDConfig, GDInfo, GDState, GradientDescent, gd_armijo_step, gd_step
from .kfac import KFAC, KFACConfig, KFACState, KroneckerBlock
from .lbfgs import LBFGS, LBFGSConfig, LBFGSState, two_loop
from .linesearch import LineSearchResult, armijo, fixed_step
from .loop import LoopHooks, LoopReason, LoopResult, MinimizeResult, Phase, minimize, run
from .momentum import Momentum, MomentumConfig, MomentumState
from .newton import (
    STEP_RULES,
    WARM_STARTS,
    NewtonCG,
    NewtonConfig,
    NewtonState,
    StepInfo,
    newton_step,
    pure_newton,
)
from .operators import (
    CURVATURES,
    DiagonalOperator,
    GaussNewtonOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    as_scipy,
    aslinearoperator,
    curvature_operator,
    damped,
    identity,
)
from .steihaug import SteihaugReason, SteihaugResult, steihaug_cg
from .trust_region import (
    TrustRegionConfig,
    TrustRegionInfo,
    TrustRegionNewton,
    TrustRegionState,
    trust_region_step,
)

#: The methods a job's ``optimizer.method`` can name.
METHODS: dict[str, type] = {cls.name: cls for cls in (
    NewtonCG, TrustRegionNewton, GradientDescent, Momentum, Adam, LBFGS, KFAC)}

__all__ = [
    "KFAC",
    "LBFGS",
    "Adam",
    "AdamConfig",
    "AdamState",
    "CURVATURES",
    "KFACConfig",
    "KFACState",
    "KroneckerBlock",
    "LBFGSConfig",
    "LBFGSState",
    "Momentum",
    "MomentumConfig",
    "MomentumState",
    "METHODS",
    "STEP_RULES",
    "WARM_STARTS",
    "CGReason",
    "CGResult",
    "DiagonalOperator",
    "GDConfig",
    "GDInfo",
    "GDState",
    "GaussNewtonOperator",
    "GradientDescent",
    "HessianOperator",
    "IterateAverage",
    "LineSearchResult",
    "LinearOperator",
    "LoopHooks",
    "LoopReason",
    "LoopResult",
    "MatrixOperator",
    "Method",
    "MinimizeResult",
    "NewtonCG",
    "NewtonConfig",
    "NewtonState",
    "ParameterError",
    "Phase",
    "Problem",
    "SolverState",
    "StepInfo",
    "SteihaugReason",
    "SteihaugResult",
    "StepRecord",
    "TrustRegionConfig",
    "TrustRegionInfo",
    "TrustRegionNewton",
    "TrustRegionState",
    "armijo",
    "as_scipy",
    "aslinearoperator",
    "cg",
    "curvature_operator",
    "damped",
    "fixed_step",
    "gd_armijo_step",
    "gd_step",
    "identity",
    "minimize",
    "newton_step",
    "pure_newton",
    "run",
    "steihaug_cg",
    "trust_region_step",
    "two_loop",
]
