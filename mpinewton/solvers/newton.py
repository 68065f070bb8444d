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

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import numpy as np

from .cg import CGReason, CGResult, cg
from .gd import _value_and_grad, gd_step
from .linesearch import LineSearchResult, armijo, fixed_step

__all__ = [
    "MinimizeResult",
    "NewtonConfig",
    "NewtonState",
    "Problem",
    "StepInfo",
    "WARM_STARTS",
    "STEP_RULES",
    "minimize",
    "newton_step",
    "pure_newton",
]

WARM_STARTS = ("zero", "previous", "weights")
STEP_RULES = ("armijo", "fixed")


class Problem(Protocol):
    """The objective ``c(w)`` as the solvers see it: three callables on flat vectors."""

    def value(self, w: np.ndarray) -> float:
        """``c(w)``."""
        ...

    def value_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """``(c(w), grad c(w))``."""
        ...

    def hvp(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact Hessian-vector product ``H_c(w) v`` (thesis chapter 4)."""
        ...


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


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
        def bad(name: str, value: Any, need: str) -> ValueError:
            return ValueError(f"NewtonConfig.{name} must be {need}, got {value!r}")

        for name in ("damping", "cg_rtol", "cg_atol"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise bad(name, value, "a finite number >= 0")
        if not (_is_int(self.cg_max_iter) and self.cg_max_iter >= 1):
            raise bad("cg_max_iter", self.cg_max_iter, "an integer >= 1")
        if not isinstance(self.cg_scale_tol_sqrt_n, (bool, np.bool_)):
            raise bad("cg_scale_tol_sqrt_n", self.cg_scale_tol_sqrt_n, "a bool")
        if self.warm_start not in WARM_STARTS:
            raise bad("warm_start", self.warm_start, f"one of {WARM_STARTS}")
        t = self.descent_threshold
        if not (_is_real(t) and not math.isnan(t) and t <= 0):
            raise bad("descent_threshold", t, "a number <= 0 (thesis: T < 0; -inf allowed)")
        if self.step_rule not in STEP_RULES:
            raise bad("step_rule", self.step_rule, f"one of {STEP_RULES}")
        for name in ("armijo_beta", "armijo_gamma"):
            value = getattr(self, name)
            if not (_is_real(value) and 0 < value < 1):
                raise bad(name, value, "a number in (0, 1)")
        if not (_is_int(self.armijo_max_trials) and self.armijo_max_trials >= 1):
            raise bad("armijo_max_trials", self.armijo_max_trials, "an integer >= 1")
        lr = self.learning_rate
        if not (_is_real(lr) and math.isfinite(lr) and lr > 0):
            raise bad("learning_rate", lr, "a finite number > 0")


@dataclass(frozen=True, eq=False)
class NewtonState:
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
        for f in fields(self):
            if f.name == "cg_warm":
                continue
            value = getattr(self, f.name)
            if not (_is_int(value) and value >= 0):
                raise ValueError(f"NewtonState.{f.name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, f.name, int(value))
        if self.cg_warm is not None:
            warm = np.array(self.cg_warm, copy=True)
            if warm.ndim != 1 or not np.issubdtype(warm.dtype, np.floating):
                raise ValueError(
                    f"NewtonState.cg_warm must be a 1-D float vector or None, "
                    f"got dtype {warm.dtype} shape {warm.shape}"
                )
            warm.flags.writeable = False
            object.__setattr__(self, "cg_warm", warm)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NewtonState):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "cg_warm":
                if (a is None) != (b is None):
                    return False
                if a is not None and not (
                    a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
                ):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict: ints, and ``cg_warm`` as a numpy array copy or None."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.cg_warm is not None:
            out["cg_warm"] = np.array(self.cg_warm, copy=True)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NewtonState:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are errors.

        ``cg_warm`` may be an array or a list (e.g. after JSON).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"NewtonState.from_dict: unknown keys {unknown}; valid keys: {sorted(known)}"
            )
        kwargs = dict(data)
        warm = kwargs.get("cg_warm")
        if warm is not None:
            warm = np.asarray(warm)
            if not np.issubdtype(warm.dtype, np.floating):
                warm = warm.astype(np.float64)
            kwargs["cg_warm"] = warm
        return cls(**kwargs)


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of one :func:`newton_step`.

    ``direction_dot_grad`` is ``g.s`` for the direction actually searched
    (``-|g|^2`` after a fallback); ``cg_direction_dot_grad`` is ``g.s`` of
    the CG solution, the number the descent test looked at (NaN without CG).
    ``cg`` is None only at a zero gradient, where no step is taken.
    """

    loss: float
    new_loss: float
    grad_norm: float
    cg: CGResult | None
    direction_dot_grad: float
    fallback: bool
    step: LineSearchResult
    cg_direction_dot_grad: float = math.nan


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
    loss, g = _value_and_grad(problem, w, value_and_grad, "newton_step")
    gg = float(g @ g)
    grad_norm = math.sqrt(gg)
    if gg == 0.0:
        no_step = LineSearchResult(step=0.0, value=loss, trials=0, success=True)
        info = StepInfo(loss, loss, grad_norm, None, 0.0, False, no_step)
        return w.copy(), _replace_state(state, iteration=state.iteration + 1), info

    def matvec(v: np.ndarray) -> np.ndarray:
        return problem.hvp(w, v)

    res = cg(
        matvec,
        -g,
        x0=_warm_start(w, state, config),
        damping=config.damping,
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
    new_state = _replace_state(
        state,
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
    )
    return new_w, new_state, info


def _replace_state(state: NewtonState, **changes: Any) -> NewtonState:
    """Copy of ``state`` with ``changes`` applied (validated like a new state)."""
    kwargs = {f.name: getattr(state, f.name) for f in fields(state)}
    kwargs.update(changes)
    return NewtonState(**kwargs)


@dataclass(frozen=True)
class MinimizeResult:
    """Outcome of :func:`minimize`."""

    x: np.ndarray  # final weights
    fun: float  # c(x)
    grad_norm: float  # |grad c(x)|
    iterations: int  # Newton steps taken (pre-training not counted)
    converged: bool  # grad_norm <= gtol
    history: list[StepInfo] = field(default_factory=list)  # one entry per Newton step
    state: NewtonState = field(default_factory=NewtonState)  # final solver state
    message: str = ""  # why the loop ended
    # (loss, |g|) at the start of each pre-training gradient-descent step
    pretrain_history: list[tuple[float, float]] = field(default_factory=list)


def minimize(
    problem: Problem,
    w0: np.ndarray,
    *,
    config: NewtonConfig | None = None,
    pretrain_iters: int = 0,
    pretrain_lr: float = 1e-2,
    max_iter: int = 100,
    gtol: float = 1e-8,
    callback: Callable[[np.ndarray, NewtonState, StepInfo], bool | None] | None = None,
    state: NewtonState | None = None,
) -> MinimizeResult:
    """Run thesis Algorithm 4: pre-training by gradient descent, then Newton steps.

    After ``pretrain_iters`` steps of :func:`gd_step` with ``pretrain_lr``,
    :func:`newton_step` runs until ``|g| <= gtol`` or ``max_iter`` Newton steps.

    The loop also stops (``converged=False``) after a failed line search,
    since a deterministic repeat would fail again, or when ``callback(w,
    state, info)`` returns True.
    """
    config = NewtonConfig() if config is None else config
    state = NewtonState() if state is None else state
    if not (_is_int(pretrain_iters) and pretrain_iters >= 0):
        raise ValueError(
            f"minimize: pretrain_iters must be an integer >= 0, got {pretrain_iters!r}"
        )
    if not (_is_int(max_iter) and max_iter >= 0):
        raise ValueError(f"minimize: max_iter must be an integer >= 0, got {max_iter!r}")
    if not (_is_real(gtol) and gtol >= 0):
        raise ValueError(f"minimize: gtol must be a number >= 0, got {gtol!r}")
    w = np.array(w0, copy=True)
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float64)

    pretrain_history: list[tuple[float, float]] = []
    for _ in range(pretrain_iters):
        w, loss, gnorm = gd_step(problem, w, pretrain_lr)
        pretrain_history.append((loss, gnorm))

    history: list[StepInfo] = []
    message = f"reached max_iter={max_iter}"
    while True:
        loss, g = _value_and_grad(problem, w, None, "minimize")
        gnorm = float(np.linalg.norm(g))
        if gnorm <= gtol:
            message = f"|g| = {gnorm:.3e} <= gtol = {gtol:.3e}"
            break
        if len(history) >= max_iter:
            break
        w, state, info = newton_step(problem, w, state, config, value_and_grad=(loss, g))
        history.append(info)
        if callback is not None and callback(w, state, info):
            loss, g = _value_and_grad(problem, w, None, "minimize")
            gnorm = float(np.linalg.norm(g))
            message = "stopped by callback"
            break
        if not info.step.success:
            message = (
                f"line search failed at Newton step {len(history)} "
                f"(fallback={info.fallback}); weights kept"
            )
            break
    return MinimizeResult(
        x=w,
        fun=loss,
        grad_norm=gnorm,
        iterations=len(history),
        converged=gnorm <= gtol,
        history=history,
        state=state,
        message=message,
        pretrain_history=pretrain_history,
    )


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
    if not (_is_int(iters) and iters >= 0):
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
        res = cg(functools.partial(problem.hvp, w), -g, rtol=cg_rtol)
        if res.reason is CGReason.NAN_OR_INF:
            break
        w = w + res.x
        path.append(w.copy())
    return path
