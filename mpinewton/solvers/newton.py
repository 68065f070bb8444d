"""Globalised inexact Newton-CG: thesis Algorithm 4 (section 9.2).

One step: solve ``(H + alpha I) s = -g`` by CG (thesis Algorithm 3, damping
of thesis 7.2); if CG broke down (NaN/Inf) or ``g.s > T`` (thesis: ``T < 0``)
fall back to steepest descent ``s = -g``; choose the step by Armijo
backtracking or a fixed learning rate; never accept NaN/Inf weights.

The objective enters only through the :class:`Problem` callables on numpy
vectors, so the same code runs on one process or, with the callables
reducing over MPI, on every rank in lockstep.  Every branch depends only on
the numbers those callables return.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Problem, SolverState, check_value_and_grad, is_int, require
from .cg import CGReason, CGResult, cg
from .linesearch import LineSearchResult, armijo, fixed_step
from .operators import HessianOperator, damped

__all__ = [
    "NewtonCG",
    "NewtonConfig",
    "NewtonState",
    "StepInfo",
    "WARM_STARTS",
    "STEP_RULES",
    "newton_step",
    "pure_newton",
]

#: Step-size rules of thesis section 9.2.
STEP_RULES = ("armijo", "fixed")
#: CG starting points: zeros, the previous step's CG solution, or w/|w| (thesis 14.3).
WARM_STARTS = ("zero", "previous", "weights")


@dataclass(frozen=True, kw_only=True)
class NewtonConfig:
    """Hyper-parameters of thesis Algorithm 4; validated on construction.

    ``descent_threshold`` is the thesis' ``T``: the CG direction ``s`` is
    replaced by ``-g`` when ``g.s > T``, and also whenever ``g.s >= 0``, so
    that the default ``T = 0`` means "accept any strict descent direction"
    (in particular a zero direction, e.g. from negative curvature at CG
    iteration 0, always falls back).  ``T`` is absolute, so a negative value
    must be chosen relative to the loss scale; ``-inf`` means "always
    steepest descent".  A positive ``T`` (accepting ascent directions) is
    rejected: use :func:`pure_newton` for the unglobalised method.
    """

    damping: float = 0.0  # Tikhonov alpha in (H + alpha I) s = -g, thesis 7.2; >= 0
    cg_rtol: float = 1e-2  # CG stops at ||r|| <= max(cg_rtol*||g||, cg_atol)
    cg_atol: float = 0.0  # absolute CG residual tolerance
    cg_max_iter: int = 50  # at most this many CG iterations (= Hessian products) per step
    cg_scale_tol_sqrt_n: bool = False  # multiply the CG tolerance by sqrt(n), thesis 9.2
    warm_start: str = "previous"  # CG x0: "zero", "previous" CG solution, "weights" w/|w| (14.3)
    descent_threshold: float = 0.0  # T: fall back to -g iff g.s > T or g.s >= 0; T <= 0
    step_rule: str = "armijo"  # "armijo" backtracking or "fixed" learning rate, thesis 9.2
    armijo_beta: float = 0.5  # backtracking factor beta in (0, 1)
    armijo_gamma: float = 1e-4  # sufficient-decrease constant gamma in (0, 1)
    armijo_max_trials: int = 20  # loss evaluations before the line search gives up
    learning_rate: float = 1.0  # step size for step_rule="fixed" (Newton and fallback steps)

    def __post_init__(self) -> None:
        for name in ("damping", "cg_rtol", "cg_atol"):
            require(self, name, ">= 0")
        require(self, "cg_max_iter", "int >= 1")
        require(self, "cg_scale_tol_sqrt_n", "bool")
        require(self, "warm_start", "choice", choices=WARM_STARTS)
        require(self, "descent_threshold", "<= 0")
        require(self, "step_rule", "choice", choices=STEP_RULES)
        require(self, "armijo_beta", "(0, 1)")
        require(self, "armijo_gamma", "(0, 1)")
        require(self, "armijo_max_trials", "int >= 1")
        require(self, "learning_rate", "> 0")


@dataclass(frozen=True, eq=False)
class NewtonState(SolverState):
    """What one Newton step hands to the next (and what a checkpoint stores).

    ``cg_warm`` is kept as a read-only copy.  Equality compares ``cg_warm``
    by value (bitwise, NaN-aware).
    """

    iteration: int = 0  # Newton steps taken so far
    cg_warm: np.ndarray | None = None  # last accepted CG solution (for warm_start="previous")
    total_cg_iters: int = 0  # CG iterations summed over all steps
    total_matvecs: int = 0  # Hessian products summed over all steps (incl. warm-start residuals)
    fallbacks: int = 0  # steps that used steepest descent instead of the CG direction
    failed_linesearches: int = 0  # steps whose line search failed (weights kept)

    def __post_init__(self) -> None:
        for name in ("iteration", "total_cg_iters", "total_matvecs", "fallbacks",
                     "failed_linesearches"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 0):
                raise ValueError(f"NewtonState.{name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.cg_warm is not None:
            warm = np.asarray(self.cg_warm)
            if warm.ndim != 1 or not np.issubdtype(warm.dtype, np.floating):
                raise ValueError(
                    f"NewtonState.cg_warm must be a 1-D float vector or None, "
                    f"got dtype {warm.dtype} shape {warm.shape}"
                )
            object.__setattr__(self, "cg_warm", warm)
        super().__post_init__()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NewtonState:
        """Inverse of :meth:`to_dict`; ``cg_warm`` may be an array or a list (JSON)."""
        kwargs = dict(data)
        warm = kwargs.get("cg_warm")
        if warm is not None:
            warm = np.asarray(warm)
            if not np.issubdtype(warm.dtype, np.floating):
                warm = warm.astype(np.float64)
            kwargs["cg_warm"] = warm
        return super().from_dict(kwargs)


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of one :func:`newton_step`.

    ``direction_dot_grad`` is ``g.s`` for the direction actually searched
    (``-|g|^2`` after a fallback); ``cg_direction_dot_grad`` is ``g.s`` of
    the CG solution, the number the descent test looked at (NaN without CG).
    ``cg`` is None only at a zero gradient, where no step is taken.
    ``stalled``: the line search failed and the next step from the same
    weights would repeat this one exactly (no warm start to drop).
    """

    loss: float
    new_loss: float
    grad_norm: float
    cg: CGResult | None
    direction_dot_grad: float
    fallback: bool
    step: LineSearchResult
    cg_direction_dot_grad: float = math.nan
    damping: float = 0.0
    stalled: bool = False

    def record(self) -> dict[str, Any]:
        """Metrics of this step (``metrics.jsonl``)."""
        return {"loss": self.loss, "new_loss": self.new_loss, "grad_norm": self.grad_norm,
                "cg_iters": self.cg.iterations if self.cg is not None else 0,
                "cg_reason": self.cg.reason.value if self.cg is not None else None,
                "step_size": self.step.step, "fallback": self.fallback,
                "linesearch_trials": self.step.trials, "damping": self.damping}


def _warm_start(w: np.ndarray, state: NewtonState, config: NewtonConfig) -> np.ndarray | None:
    """CG initial guess per ``config.warm_start`` (None = zeros, costs no matvec)."""
    if config.warm_start == "previous":
        if state.cg_warm is not None and state.cg_warm.shape == w.shape:
            return state.cg_warm
        return None
    if config.warm_start == "weights":
        norm = float(np.linalg.norm(w))
        if norm == 0.0 or not math.isfinite(norm):
            return None
        return w / norm
    return None


def newton_step(
    problem: Problem,
    w: np.ndarray,
    state: NewtonState,
    config: NewtonConfig,
    *,
    value_and_grad: tuple[float, np.ndarray] | None = None,
) -> tuple[np.ndarray, NewtonState, StepInfo]:
    """One iteration of thesis Algorithm 4 (section 9.2).

    1. ``loss, g = c(w), grad c(w)`` (or the given ``value_and_grad``).
    2. CG on ``(H(w) + damping I) s = -g``, matvec ``v -> problem.hvp(w, v)``,
       started from ``config.warm_start``.
    3. If CG ended with ``NAN_OR_INF``, or ``g.s > T``, or ``g.s >= 0``:
       ``s = -g`` (``fallback=True``).  ``NEGATIVE_CURVATURE`` and ``MAX_ITER``
       keep the CG iterate, subject to the same descent test.
    4. Step size by Armijo (``phi(sigma) = problem.value(w + sigma*s)``; trial
       points with NaN/Inf weights are rejected without evaluating) or by the
       fixed ``learning_rate`` (rejected if the new weights or loss are NaN/Inf).

    Returns ``(new_w, new_state, info)``.  On a failed line search ``new_w``
    is a copy of ``w``, ``info.step`` has ``step=0`` and ``value=loss``, and
    ``cg_warm`` is cleared so that a "previous" warm start does not repeat
    the failed step.  ``cg_warm`` is the CG solution after an accepted
    non-fallback step, None otherwise.  At a zero gradient nothing is
    computed beyond ``c`` and ``g``: ``w`` is returned unchanged.
    Raises ``FloatingPointError`` if the loss or gradient at ``w`` is NaN/Inf.
    """
    w = np.asarray(w)
    if w.ndim != 1:
        raise ValueError(f"newton_step: w must be a 1-D vector, got shape {w.shape}")
    loss, g = check_value_and_grad(problem, w, value_and_grad, "newton_step")
    gg = float(g @ g)
    grad_norm = math.sqrt(gg)
    if gg == 0.0:
        no_step = LineSearchResult(step=0.0, value=loss, trials=0, success=True)
        info = StepInfo(loss, loss, grad_norm, None, 0.0, False, no_step, damping=config.damping)
        return w.copy(), state.replace(iteration=state.iteration + 1), info

    x0 = _warm_start(w, state, config)
    res = cg(
        damped(HessianOperator(problem, w), config.damping),
        -g,
        x0=x0,
        rtol=config.cg_rtol,
        atol=config.cg_atol,
        max_iter=config.cg_max_iter,
        scale_tol_sqrt_n=config.cg_scale_tol_sqrt_n,
    )
    cg_dot = float(g @ res.x)
    fallback = (
        res.reason is CGReason.NAN_OR_INF
        or not math.isfinite(cg_dot)
        or cg_dot > config.descent_threshold
        or cg_dot >= 0.0
    )
    if fallback:
        s, dot = -g, -gg
    else:
        s, dot = res.x, cg_dot

    def phi(sigma: float) -> float:
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite trials are rejected
            trial = w + sigma * s
        if not np.all(np.isfinite(trial)):
            return math.inf
        return float(problem.value(trial))

    if config.step_rule == "armijo":
        ls = armijo(
            phi,
            loss,
            dot,
            beta=config.armijo_beta,
            gamma=config.armijo_gamma,
            max_trials=config.armijo_max_trials,
        )
    else:
        ls = fixed_step(phi, config.learning_rate)
        if not ls.success:
            ls = LineSearchResult(step=0.0, value=loss, trials=ls.trials, success=False)

    if ls.success:
        new_w = w + ls.step * s
        warm = None if fallback else res.x
    else:
        new_w = w.copy()
        warm = None
    new_state = state.replace(
        iteration=state.iteration + 1,
        cg_warm=warm,
        total_cg_iters=state.total_cg_iters + res.iterations,
        total_matvecs=state.total_matvecs + res.matvecs,
        fallbacks=state.fallbacks + int(fallback),
        failed_linesearches=state.failed_linesearches + int(not ls.success),
    )
    info = StepInfo(
        loss=loss,
        new_loss=ls.value,
        grad_norm=grad_norm,
        cg=res,
        direction_dot_grad=dot,
        fallback=fallback,
        step=ls,
        cg_direction_dot_grad=cg_dot,
        damping=config.damping,
        # A failed step from a cold (or weights-derived) start repeats itself.
        stalled=not ls.success and (x0 is None or config.warm_start != "previous"),
    )
    return new_w, new_state, info


class NewtonCG:
    """Globalised Newton-CG (thesis Algorithm 4) on the shared method interface."""

    name: ClassVar[str] = "newton"
    config_class: ClassVar[type] = NewtonConfig
    state_class: ClassVar[type[SolverState]] = NewtonState

    def __init__(self, config: NewtonConfig | None = None) -> None:
        self.config = NewtonConfig() if config is None else config

    def init(self, w: np.ndarray) -> NewtonState:
        """No warm start and zero counters."""
        return NewtonState()

    def step(self, problem: Problem, w: np.ndarray, state: NewtonState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, NewtonState, StepInfo]:
        """One Newton step: :func:`newton_step` with this method's configuration."""
        return newton_step(problem, w, state, self.config, value_and_grad=value_and_grad)


def pure_newton(
    problem: Problem, w0: np.ndarray, *, iters: int, cg_rtol: float = 1e-12
) -> list[np.ndarray]:
    """Unglobalised Newton method, thesis Algorithm 2 (section 2.3), for demonstrations.

    ``w_{k+1} = w_k + s_k`` with ``s_k`` from CG on ``H s = -g`` (tolerance
    ``cg_rtol``, at most ``n`` iterations) taken as-is: no descent test, no
    fallback, no step-size control -- exactly what thesis Algorithm 4 adds.
    Returns ``[w_0, ..., w_m]``, stopping early (``m < iters``) at a zero
    gradient or when the loss, gradient or CG become NaN/Inf.  On
    ``c(w) = sqrt(w^2 + 1)`` from ``|w_0| > 1`` it diverges as
    ``w_{k+1} = -w_k^3``.
    """
    if not (is_int(iters) and iters >= 0):
        raise ValueError(f"pure_newton: iters must be an integer >= 0, got {iters!r}")
    w = np.array(w0, copy=True)
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float64)
    path = [w.copy()]
    for _ in range(iters):
        loss, g = problem.value_and_grad(w)
        g = np.asarray(g)
        if not (math.isfinite(float(loss)) and np.all(np.isfinite(g))) or not np.any(g):
            break
        res = cg(HessianOperator(problem, w), -g, rtol=cg_rtol)
        if res.reason is CGReason.NAN_OR_INF:
            break
        w = w + res.x
        path.append(w.copy())
    return path
