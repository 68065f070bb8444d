"""Trust-region Newton-CG: Nocedal & Wright (2nd ed.) Algorithm 4.1 with CG-Steihaug.

One step: from ``c(w)``, ``g`` and the curvature ``B`` (exact Hessian or
generalised Gauss-Newton, :func:`~.operators.curvature_operator`) solve the
subproblem ``min g.p + 0.5 p.Bp, |p| <= radius`` by CG-Steihaug (N&W
Algorithm 7.2, :func:`~.steihaug.steihaug_cg`), evaluate ``c(w + p)`` once,
compare the actual with the predicted decrease (``rho``, N&W (4.4)), accept
or reject the step and adapt the radius.  No line search: a negative-
curvature direction of an indefinite Hessian is followed to the boundary.

The objective enters only through the :class:`Problem` callables, and every
branch depends only on the numbers they return, so ranks reducing over MPI
stay in lockstep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import ParameterError, Problem, SolverState, check_value_and_grad, is_real, require
from .operators import CURVATURES, curvature_operator
from .steihaug import SteihaugResult, steihaug_cg

__all__ = [
    "FORCING",
    "TrustRegionConfig",
    "TrustRegionInfo",
    "TrustRegionNewton",
    "TrustRegionState",
    "trust_region_step",
]

#: CG-Steihaug relative tolerances: ``cg_rtol`` or N&W (7.3) ``min(0.5, sqrt(|g|))``.
FORCING = ("fixed", "sqrt_grad")


@dataclass(frozen=True, kw_only=True)
class TrustRegionConfig:
    """Hyper-parameters of N&W Algorithm 4.1 (2nd ed.) with CG-Steihaug; validated on construction.

    Radius update, with ``rho`` = actual / predicted decrease (N&W (4.4)):
    ``rho < shrink_below`` (or not a number, or no decrease predicted) ->
    ``radius *= shrink``; ``rho > expand_above`` with the step on the boundary
    -> ``radius = min(expand * radius, max_radius)``; otherwise unchanged.
    The shrink scales the radius, not ``|p|`` (2nd ed. Algorithm 4.1 and
    scipy's ``trust-ncg``), so a rejected interior step may be proposed again
    until the radius falls below its length.  A step is accepted iff
    ``rho > eta``; ``eta < shrink_below`` (N&W: ``eta in [0, 1/4)``) so that a
    rejected step always shrinks the radius and is never repeated forever.
    """

    curvature: str = "hessian"  # B: "hessian" (hvp) or "gauss_newton" (gnvp, PSD)
    initial_radius: float = 1.0  # radius of the first step (and of a state without one)
    max_radius: float = 1000.0  # N&W's Delta-hat: the radius never grows past it
    min_radius: float = 1e-12  # a rejected step whose radius is below this counts as stalled
    eta: float = 0.1  # accept the step iff rho > eta; N&W eta in [0, 1/4)
    shrink: float = 0.25  # radius factor after a poor step (rho < shrink_below)
    expand: float = 2.0  # radius factor after a very good boundary step (rho > expand_above)
    shrink_below: float = 0.25  # N&W's 1/4
    expand_above: float = 0.75  # N&W's 3/4
    forcing: str = "fixed"  # CG tolerance: "fixed" cg_rtol, or "sqrt_grad" min(0.5, sqrt|g|)
    cg_rtol: float = 0.1  # CG stops at |r| <= max(rtol*|g|, cg_atol) (forcing="fixed")
    cg_atol: float = 0.0  # absolute CG residual tolerance
    cg_max_iter: int = 50  # at most this many CG iterations (= curvature products) per step

    def __post_init__(self) -> None:
        require(self, "curvature", "choice", choices=tuple(CURVATURES))
        for name in ("initial_radius", "max_radius"):
            require(self, name, "> 0")
        require(self, "min_radius", ">= 0")
        if self.initial_radius > self.max_radius:
            raise ParameterError(type(self).__name__, "initial_radius", self.initial_radius,
                                 f"<= max_radius ({self.max_radius!r})")
        if self.min_radius >= self.initial_radius:
            raise ParameterError(type(self).__name__, "min_radius", self.min_radius,
                                 f"< initial_radius ({self.initial_radius!r})")
        for name in ("shrink", "shrink_below", "expand_above"):
            require(self, name, "(0, 1)")
        require(self, "expand", "> 0")
        if self.expand <= 1:
            raise ParameterError(type(self).__name__, "expand", self.expand, "a number > 1")
        if self.expand_above <= self.shrink_below:
            raise ParameterError(type(self).__name__, "expand_above", self.expand_above,
                                 f"> shrink_below ({self.shrink_below!r})")
        require(self, "eta", ">= 0")
        if self.eta >= self.shrink_below:
            raise ParameterError(type(self).__name__, "eta", self.eta,
                                 f"a number in [0, shrink_below = {self.shrink_below!r})")
        require(self, "forcing", "choice", choices=FORCING)
        require(self, "cg_rtol", ">= 0")
        require(self, "cg_atol", ">= 0")
        require(self, "cg_max_iter", "int >= 1")


@dataclass(frozen=True, eq=False)
class TrustRegionState(SolverState):
    """What one trust-region step hands to the next (and what a checkpoint stores).

    ``radius`` 0 means "not set": the next step uses ``initial_radius``
    (NaN is read as 0, so that states compare equal).
    """

    iteration: int = 0  # steps taken so far (accepted, rejected, or at a zero gradient)
    radius: float = 0.0  # the radius of the next step; 0 = initial_radius
    total_cg_iters: int = 0  # CG-Steihaug iterations summed over all steps
    total_matvecs: int = 0  # curvature products summed over all steps
    rejected: int = 0  # steps with rho <= eta (weights kept)

    def __post_init__(self) -> None:
        for name in ("iteration", "total_cg_iters", "total_matvecs", "rejected"):
            require(self, name, "int >= 0")
            object.__setattr__(self, name, int(getattr(self, name)))
        if is_real(self.radius) and math.isnan(self.radius):
            object.__setattr__(self, "radius", 0.0)
        require(self, "radius", ">= 0")
        object.__setattr__(self, "radius", float(self.radius))
        super().__post_init__()


@dataclass(frozen=True)
class TrustRegionInfo:
    """Diagnostics of one :func:`trust_region_step`.

    ``radius`` is the radius this step used, ``new_radius`` the next one's;
    ``rho`` is NaN where no ratio was formed (zero gradient, no predicted
    decrease, non-finite trial weights or loss).  ``new_loss`` is ``c(w + p)``
    (``loss`` where the trial was not evaluated).  ``subproblem`` is None only
    at a zero gradient, where no step is taken.
    """

    loss: float
    new_loss: float
    grad_norm: float
    subproblem: SteihaugResult | None
    radius: float
    new_radius: float
    rho: float
    step_norm: float
    accepted: bool
    stalled: bool = False

    def record(self) -> dict[str, Any]:
        """Metrics of this step (``metrics.jsonl``), in the Newton step's fields and more."""
        sub = self.subproblem
        return {"loss": self.loss, "new_loss": self.new_loss if math.isfinite(self.new_loss)
                else None, "grad_norm": self.grad_norm,
                "cg_iters": sub.iterations if sub is not None else 0,
                "cg_reason": sub.reason.value if sub is not None else None,
                "step_size": 1.0 if self.accepted else 0.0, "fallback": False,
                "linesearch_trials": 0, "damping": None, "radius": self.radius,
                "new_radius": self.new_radius,
                "rho": self.rho if math.isfinite(self.rho) else None,
                "step_norm": self.step_norm, "accepted": self.accepted}


def trust_region_step(
    problem: Problem,
    w: np.ndarray,
    state: TrustRegionState,
    config: TrustRegionConfig,
    *,
    value_and_grad: tuple[float, np.ndarray] | None = None,
) -> tuple[np.ndarray, TrustRegionState, TrustRegionInfo]:
    """One iteration of N&W Algorithm 4.1 with the CG-Steihaug subproblem (Algorithm 7.2).

    1. ``loss, g = c(w), grad c(w)`` (or the given ``value_and_grad``); at a
       zero gradient nothing more is computed and ``w`` is kept.
    2. ``p`` by :func:`steihaug_cg` on ``B = curvature_operator(problem, w,
       config.curvature)`` within ``radius`` (the state's, capped at
       ``max_radius``; ``initial_radius`` when unset).
    3. ``new_loss = c(w + p)`` (one ``problem.value``), ``rho = (loss -
       new_loss) / model_decrease``; ``rho = NaN`` (rejected, radius shrunk)
       when the model predicts no decrease, ``w + p`` is not finite (then not
       evaluated) or ``new_loss`` is not finite.
    4. Radius update per :class:`TrustRegionConfig`; accept ``w + p`` iff
       ``rho > eta`` and ``new_loss`` is finite, else return a copy of ``w``.

    ``info.stalled``: the step was rejected with a radius already below
    ``min_radius``.  Raises ``FloatingPointError`` if the loss or gradient at
    ``w`` is NaN/Inf.
    """
    w = np.asarray(w)
    if w.ndim != 1:
        raise ValueError(f"trust_region_step: w must be a 1-D vector, got shape {w.shape}")
    loss, g = check_value_and_grad(problem, w, value_and_grad, "trust_region_step")
    grad_norm = float(np.linalg.norm(g))
    radius = min(state.radius if state.radius > 0.0 else config.initial_radius,
                 config.max_radius)
    if grad_norm == 0.0:
        info = TrustRegionInfo(loss, loss, grad_norm, None, radius, radius, math.nan, 0.0, False)
        return w.copy(), state.replace(iteration=state.iteration + 1, radius=radius), info

    rtol = config.cg_rtol if config.forcing == "fixed" else min(0.5, math.sqrt(grad_norm))
    sub = steihaug_cg(curvature_operator(problem, w, config.curvature), g, radius,
                      rtol=rtol, atol=config.cg_atol, max_iter=config.cg_max_iter)
    predicted = sub.model_decrease
    new_loss, rho = loss, math.nan
    if math.isfinite(predicted) and predicted > 0.0:
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite trials are rejected
            trial = w + sub.x
        if np.all(np.isfinite(trial)):
            new_loss = float(problem.value(trial))
            if math.isfinite(new_loss):
                with np.errstate(over="ignore"):
                    rho = (loss - new_loss) / predicted
    accepted = rho > config.eta  # False for NaN

    if not rho >= config.shrink_below:  # also NaN: no usable ratio
        new_radius = config.shrink * radius
    elif rho > config.expand_above and sub.hit_boundary:
        new_radius = min(config.expand * radius, config.max_radius)
    else:
        new_radius = radius

    new_w = w + sub.x if accepted else w.copy()
    new_state = state.replace(
        iteration=state.iteration + 1,
        radius=new_radius,
        total_cg_iters=state.total_cg_iters + sub.iterations,
        total_matvecs=state.total_matvecs + sub.matvecs,
        rejected=state.rejected + int(not accepted),
    )
    info = TrustRegionInfo(
        loss=loss, new_loss=new_loss, grad_norm=grad_norm, subproblem=sub, radius=radius,
        new_radius=new_radius, rho=rho, step_norm=float(np.linalg.norm(sub.x)),
        accepted=accepted, stalled=not accepted and radius < config.min_radius)
    return new_w, new_state, info


class TrustRegionNewton:
    """Trust-region Newton-CG (N&W Algorithm 4.1 + 7.2) on the shared method interface."""

    name: ClassVar[str] = "trust_region"
    config_class: ClassVar[type] = TrustRegionConfig
    state_class: ClassVar[type[SolverState]] = TrustRegionState

    def __init__(self, config: TrustRegionConfig | None = None) -> None:
        self.config = TrustRegionConfig() if config is None else config

    def init(self, w: np.ndarray) -> TrustRegionState:
        """Zero counters and the configured initial radius."""
        return TrustRegionState(radius=self.config.initial_radius)

    def step(self, problem: Problem, w: np.ndarray, state: TrustRegionState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, TrustRegionState, TrustRegionInfo]:
        """One trust-region step: :func:`trust_region_step` with this method's configuration."""
        return trust_region_step(problem, w, state, self.config, value_and_grad=value_and_grad)
