"""Limited-memory BFGS with a strong Wolfe line search: the quasi-Newton baseline.

References are to Nocedal & Wright, *Numerical Optimization*, 2nd ed. (2006):

- direction ``d = -H g`` by the two-loop recursion (Algorithm 7.4) inside
  L-BFGS (Algorithm 7.5), with ``H0 = gamma I``, ``gamma = s.y / y.y`` of the
  newest pair (eq. 7.20);
- step size by the strong Wolfe line search (Algorithm 3.5) with ``zoom``
  (Algorithm 3.6): cubic interpolation (eq. 3.59), else quadratic, else
  bisection, each kept away from the ends of the bracket;
- a pair ``(s, y)`` enters the memory only if ``s.y > eps |s| |y|`` (the
  curvature condition ``s.y > 0``, eq. 6.7, with a rounding margin); beyond
  ``memory`` pairs the oldest is dropped.

The first step (and the first after a reset) has no curvature information:
``d = -g`` with a trial step ``alpha0`` chosen by ``initial_step``
(:data:`INITIAL_STEPS`); later steps try ``alpha0 = 1`` first.

The line search evaluates ``c`` and ``grad c`` at every trial point, so after
a step the gradient at the new weights is already known: the state keeps it
(``cache_w``, ``cache_value``, ``cache_grad``) and the next step uses it
instead of evaluating again when called with ``value_and_grad=None`` and
bitwise the same weights.  A caller that changes the objective between steps
(mini-batches) must pass ``value_and_grad`` (:attr:`LBFGS.reuses_gradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import (
    ParameterError,
    Problem,
    SolverState,
    cached_value_and_grad,
    check_value_and_grad,
    require,
)
from .linesearch import LineSearchResult
from .momentum import _check_cache, _check_counter, _float_array

__all__ = [
    "CURVATURE_EPS",
    "INITIAL_STEPS",
    "LBFGS",
    "LBFGSConfig",
    "LBFGSInfo",
    "LBFGSState",
    "strong_wolfe",
    "two_loop",
    "update_memory",
]

#: First trial step along ``-g`` when the memory is empty: ``"scaled"``
#: ``min(1, 1/|g|)`` (scipy's BFGS), ``"unit_length"`` ``1/|g|`` (a step of
#: length 1, as scipy's L-BFGS-B), ``"one"`` ``1``.
INITIAL_STEPS = ("scaled", "unit_length", "one")
#: A pair is kept only if ``s.y > CURVATURE_EPS * |s| * |y|``.
CURVATURE_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True, kw_only=True)
class LBFGSConfig:
    """Hyper-parameters of L-BFGS (Nocedal & Wright Algorithm 7.5) and its line search."""

    memory: int = 10  # m, the number of (s, y) pairs kept
    c1: float = 1e-4  # sufficient-decrease constant of the Wolfe conditions, in (0, 1)
    c2: float = 0.9  # curvature constant of the strong Wolfe conditions, in (c1, 1)
    max_linesearch: int = 20  # at most this many trial points (gradient evaluations) per step
    initial_step: str = "scaled"  # first trial step with an empty memory: INITIAL_STEPS

    def __post_init__(self) -> None:
        require(self, "memory", "int >= 1")
        require(self, "c1", "(0, 1)")
        require(self, "c2", "(0, 1)")
        if not self.c1 < self.c2:
            raise ParameterError(type(self).__name__, "c2", self.c2,
                                 f"greater than c1 = {self.c1!r}")
        require(self, "max_linesearch", "int >= 1")
        require(self, "initial_step", "choice", choices=INITIAL_STEPS)


@dataclass(frozen=True, eq=False)
class LBFGSState(SolverState):
    """Memory of (s, y) pairs (oldest first) and the value and gradient at the last new weights.

    ``S`` and ``Y`` are ``(count, n)`` float arrays, or None for an empty
    memory; ``cache_*`` are all None or all set.  Arrays may be given as
    lists (a JSON round trip): they become float arrays.
    """

    iteration: int = 0  # steps taken so far
    S: np.ndarray | None = None  # s_i = w_{i+1} - w_i, one row per pair, oldest first
    Y: np.ndarray | None = None  # y_i = g_{i+1} - g_i, one row per pair
    cache_w: np.ndarray | None = None  # the weights the last step returned
    cache_value: float | None = None  # c(cache_w)
    cache_grad: np.ndarray | None = None  # grad c(cache_w)
    evaluations: int = 0  # problem.value_and_grad calls made by the steps so far
    resets: int = 0  # memory resets: non-descent directions and failed line searches

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("iteration", "evaluations", "resets"):
            _check_counter(self, name)
        for name in ("S", "Y"):
            object.__setattr__(self, name, _float_array(getattr(self, name), owner, name, 2))
        if (self.S is None) != (self.Y is None) or (
                self.S is not None and self.Y is not None
                and (self.S.shape != self.Y.shape or self.S.shape[0] == 0)):
            raise ValueError(f"{owner}: S and Y must both be None or (count >= 1, n) arrays "
                             "of one shape")
        _check_cache(self)
        super().__post_init__()

    @property
    def count(self) -> int:
        """Number of pairs in memory."""
        return 0 if self.S is None else int(self.S.shape[0])


@dataclass(frozen=True)
class LBFGSInfo:
    """What one L-BFGS step did (loss and ``|g|`` at the old weights).

    ``new_loss`` is ``c`` at the new weights (``loss`` if they were kept);
    ``fallback``: the two-loop direction was no descent direction, the
    memory was reset and ``-g`` used; ``pair_skipped``: the new pair failed
    the curvature test; ``memory``: pairs held after the step;
    ``reused_gradient``: ``c`` and ``grad c`` at the old weights came from
    the cache; ``stalled``: the line search failed with an empty memory, so
    repeating the step would do the same.
    """

    loss: float
    new_loss: float
    grad_norm: float
    step: LineSearchResult
    direction_dot_grad: float
    fallback: bool
    pair_skipped: bool
    memory: int
    reused_gradient: bool
    stalled: bool

    def record(self) -> dict[str, Any]:
        """Metrics of this step, in the same fields as a Newton step's."""
        return {"loss": self.loss, "new_loss": self.new_loss, "grad_norm": self.grad_norm,
                "cg_iters": 0, "cg_reason": None, "step_size": self.step.step,
                "fallback": self.fallback, "linesearch_trials": self.step.trials,
                "damping": None, "memory": self.memory, "pair_skipped": self.pair_skipped}


def two_loop(g: np.ndarray, S: np.ndarray | None, Y: np.ndarray | None,
             gamma: float) -> np.ndarray:
    """``H g`` by the two-loop recursion (Nocedal & Wright Algorithm 7.4).

    ``H`` is the inverse-Hessian approximation of BFGS updates from
    ``H0 = gamma I`` with the pairs ``(S[i], Y[i])``, oldest first.  The
    search direction is ``-two_loop(g, S, Y, gamma)``.
    """
    q = np.array(g, copy=True)
    if S is None or Y is None or len(S) == 0:
        return gamma * q
    k = len(S)
    rho = [1.0 / float(Y[i] @ S[i]) for i in range(k)]
    alpha = [0.0] * k
    for i in range(k - 1, -1, -1):
        alpha[i] = rho[i] * float(S[i] @ q)
        q -= alpha[i] * Y[i]
    r = gamma * q
    for i in range(k):
        beta = rho[i] * float(Y[i] @ r)
        r += (alpha[i] - beta) * S[i]
    return r


def update_memory(S: np.ndarray | None, Y: np.ndarray | None, s: np.ndarray, y: np.ndarray,
                  memory: int) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
    """Append the pair ``(s, y)``, keeping the newest ``memory`` pairs; returns ``(S, Y, kept)``.

    The pair is skipped (``kept=False``, memory unchanged) unless
    ``s.y > CURVATURE_EPS |s| |y|`` (curvature condition, Nocedal & Wright
    eq. 6.7), which keeps ``H`` positive definite.
    """
    sy = float(s @ y)
    if not (math.isfinite(sy)
            and sy > CURVATURE_EPS * float(np.linalg.norm(s)) * float(np.linalg.norm(y))):
        return S, Y, False
    if S is None or Y is None:
        return s[None, :].copy(), y[None, :].copy(), True
    first = max(0, len(S) - (memory - 1))  # drop the oldest beyond ``memory``
    S_old, Y_old = S[first:], Y[first:]
    return np.vstack([S_old, s[None, :]]), np.vstack([Y_old, y[None, :]]), True


def _cubic_min(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float:
    """Minimiser of the cubic interpolating ``phi, phi'`` at ``a != b`` (N&W eq. 3.59).

    NaN where it does not exist.
    """
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    if not (math.isfinite(disc) and disc >= 0.0):
        return math.nan
    d2 = math.copysign(math.sqrt(disc), b - a)
    den = db - da + 2.0 * d2
    if den == 0.0:
        return math.nan
    return b - (b - a) * (db + d2 - d1) / den


def _quadratic_min(a: float, fa: float, da: float, b: float, fb: float) -> float:
    """Minimiser of the quadratic with ``phi(a), phi'(a), phi(b)``; NaN if not convex."""
    d = b - a
    if d * d == 0.0:
        return math.nan
    curv = (fb - fa - da * d) / (d * d)
    if not (math.isfinite(curv) and curv > 0.0):
        return math.nan
    return a - da / (2.0 * curv)


def strong_wolfe(
    phi: Callable[[float], tuple[float, float]],
    phi0: float,
    dphi0: float,
    *,
    alpha0: float = 1.0,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_trials: int = 20,
) -> LineSearchResult:
    """Strong Wolfe line search: Nocedal & Wright Algorithm 3.5 with zoom (Algorithm 3.6).

    ``phi(alpha)`` returns ``(c(w + alpha d), grad c(w + alpha d) . d)``;
    ``phi0 = c(w)``, ``dphi0 = grad c(w) . d < 0``.  Accepts the first trial
    with ``phi(alpha) <= phi0 + c1 alpha dphi0`` and ``|phi'(alpha)| <=
    c2 |dphi0|``; the accepted trial is always the last one evaluated.
    Bracketing doubles ``alpha``; zoom takes the cubic (eq. 3.59), else the
    quadratic interpolant, inside the middle of the bracket, else bisects.
    A non-finite trial value counts as too long a step.  After
    ``max_trials`` trials, or when the bracket shrinks to rounding, it
    returns ``success=False``, ``step=0``, ``value=phi0``.
    """
    phi0, dphi0 = float(phi0), float(dphi0)
    if not (math.isfinite(phi0) and math.isfinite(dphi0) and dphi0 < 0.0):
        raise ValueError(f"strong_wolfe: need finite phi0 and dphi0 < 0, got {phi0!r}, "
                         f"{dphi0!r}")
    trials = 0

    def evaluate(alpha: float) -> tuple[float, float]:
        nonlocal trials
        trials += 1
        f, df = phi(alpha)
        f, df = float(f), float(df)
        if not (math.isfinite(f) and math.isfinite(df)):
            return math.inf, math.nan
        return f, df

    def armijo_fails(alpha: float, f: float) -> bool:
        return f > phi0 + c1 * alpha * dphi0

    def curvature_holds(df: float) -> bool:
        return abs(df) <= -c2 * dphi0

    fail = LineSearchResult(step=0.0, value=phi0, trials=0, success=False)

    def zoom(lo: tuple[float, float, float], hi: tuple[float, float, float]) -> LineSearchResult:
        while trials < max_trials:
            a_lo, f_lo, d_lo = lo
            a_hi, f_hi, d_hi = hi
            width = a_hi - a_lo
            if abs(width) <= 4.0 * CURVATURE_EPS * max(abs(a_lo), abs(a_hi)):
                break
            left, right = min(a_lo, a_hi), max(a_lo, a_hi)
            a = math.nan
            if math.isfinite(f_hi) and math.isfinite(d_hi):
                a = _cubic_min(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi)
                margin = 0.2 * abs(width)
                if not (left + margin <= a <= right - margin):
                    a = math.nan
            if math.isnan(a) and math.isfinite(f_hi):
                a = _quadratic_min(a_lo, f_lo, d_lo, a_hi, f_hi)
                margin = 0.1 * abs(width)
                if not (left + margin <= a <= right - margin):
                    a = math.nan
            if math.isnan(a):
                a = a_lo + 0.5 * width
            f, df = evaluate(a)
            if armijo_fails(a, f) or f >= f_lo:
                hi = (a, f, df)
            else:
                if curvature_holds(df):
                    return LineSearchResult(step=a, value=f, trials=trials, success=True)
                if df * (a_hi - a_lo) >= 0.0:
                    hi = lo
                lo = (a, f, df)
        return LineSearchResult(fail.step, fail.value, trials, False)

    prev = (0.0, phi0, dphi0)
    alpha = float(alpha0)
    first = True
    while trials < max_trials:
        f, df = evaluate(alpha)
        if armijo_fails(alpha, f) or (not first and f >= prev[1]):
            return zoom(prev, (alpha, f, df))
        if curvature_holds(df):
            return LineSearchResult(step=alpha, value=f, trials=trials, success=True)
        if df >= 0.0:
            return zoom((alpha, f, df), prev)
        prev, alpha, first = (alpha, f, df), 2.0 * alpha, False
    return LineSearchResult(fail.step, fail.value, trials, False)


class LBFGS:
    """L-BFGS (Nocedal & Wright Algorithm 7.5) with a strong Wolfe line search.

    ``reuses_gradient``: with ``value_and_grad=None`` a step takes ``c`` and
    ``grad c`` at ``w`` from the previous step's line search when ``w`` is
    bitwise the weights that step returned.  A caller whose objective changes
    between steps (a new mini-batch) must pass ``value_and_grad``, or the
    step would use the previous batch's gradient.
    """

    name: ClassVar[str] = "lbfgs"
    config_class: ClassVar[type] = LBFGSConfig
    state_class: ClassVar[type[SolverState]] = LBFGSState
    reuses_gradient: ClassVar[bool] = True

    def __init__(self, config: LBFGSConfig | None = None) -> None:
        self.config = LBFGSConfig() if config is None else config

    def init(self, w: np.ndarray) -> LBFGSState:
        """Empty memory and no cached gradient."""
        return LBFGSState()

    @staticmethod
    def cached_value_and_grad(w: np.ndarray, state: LBFGSState
                              ) -> tuple[float, np.ndarray] | None:
        """``(c(w), grad c(w))`` from the cache if ``w`` is bitwise ``cache_w``, else None."""
        return cached_value_and_grad(w, state)

    def step(self, problem: Problem, w: np.ndarray, state: LBFGSState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, LBFGSState, LBFGSInfo]:
        """One L-BFGS iteration from ``w`` (module docstring); never returns NaN/Inf weights.

        On a failed line search the weights are kept and the memory cleared;
        the step is ``stalled`` if the memory was already empty.
        """
        cfg = self.config
        w = np.asarray(w)
        if w.ndim != 1:
            raise ValueError(f"lbfgs: w must be a 1-D vector, got shape {w.shape}")
        evaluations = state.evaluations
        reused = False
        if value_and_grad is None:
            value_and_grad = self.cached_value_and_grad(w, state)
            reused = value_and_grad is not None
            if not reused:
                evaluations += 1
        loss, g = check_value_and_grad(problem, w, value_and_grad, "lbfgs")
        S, Y = state.S, state.Y
        if S is not None and S.shape[1] != w.shape[0]:
            raise ValueError(f"lbfgs: memory holds vectors of length {S.shape[1]}, "
                             f"weights have length {w.shape[0]}")
        if S is not None and Y is not None and len(S) > cfg.memory:  # memory lowered on resume
            S, Y = S[-cfg.memory:], Y[-cfg.memory:]
        with np.errstate(over="ignore"):  # checked just below
            gg = float(g @ g)
        if not math.isfinite(gg):
            raise FloatingPointError("lbfgs: |grad c(w)|^2 overflows; rescale the objective")
        grad_norm = math.sqrt(gg)
        resets = state.resets
        if gg == 0.0:
            no_step = LineSearchResult(step=0.0, value=loss, trials=0, success=True)
            info = LBFGSInfo(loss, loss, grad_norm, no_step, 0.0, False, False,
                             0 if S is None else len(S), reused, False)
            return w.copy(), state.replace(
                iteration=state.iteration + 1, S=S, Y=Y, cache_w=w, cache_value=loss,
                cache_grad=g, evaluations=evaluations), info

        fallback = False
        if S is not None and Y is not None:
            with np.errstate(all="ignore"):  # a non-finite direction is caught just below
                gamma = float(np.divide(S[-1] @ Y[-1], Y[-1] @ Y[-1]))  # N&W eq. 7.20
                d = -two_loop(g, S, Y, gamma)
                dot = float(g @ d)
            if not (math.isfinite(dot) and dot < 0.0 and np.all(np.isfinite(d))):
                fallback, S, Y = True, None, None
                resets += 1
        if S is None:
            d, dot = -g, -gg
            alpha0 = {"scaled": min(1.0, 1.0 / grad_norm), "unit_length": 1.0 / grad_norm,
                      "one": 1.0}[cfg.initial_step]
        else:
            alpha0 = 1.0

        last: list[tuple[np.ndarray, float, np.ndarray]] = []

        def phi(alpha: float) -> tuple[float, float]:
            nonlocal evaluations
            last.clear()
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite trials are rejected
                trial = w + alpha * d
            if not np.all(np.isfinite(trial)):
                return math.inf, math.nan
            evaluations += 1
            f, gt = problem.value_and_grad(trial)
            f, gt = float(f), np.asarray(gt)
            if gt.shape != w.shape:
                raise ValueError(f"lbfgs: gradient has shape {gt.shape}, weights have shape "
                                 f"{w.shape}")
            if not (math.isfinite(f) and np.all(np.isfinite(gt))):
                return math.inf, math.nan
            last.append((trial, f, gt))
            return f, float(gt @ d)

        ls = strong_wolfe(phi, loss, dot, alpha0=alpha0, c1=cfg.c1, c2=cfg.c2,
                          max_trials=cfg.max_linesearch)
        if not ls.success:
            stalled = S is None
            if S is not None:
                resets += 1
            info = LBFGSInfo(loss, loss, grad_norm, ls, dot, fallback, False, 0, reused, stalled)
            new_state = state.replace(
                iteration=state.iteration + 1, S=None, Y=None, cache_w=w, cache_value=loss,
                cache_grad=g, evaluations=evaluations, resets=resets)
            return w.copy(), new_state, info

        new_w, new_loss, new_g = last[0]
        S, Y, kept = update_memory(S, Y, new_w - w, new_g - g, cfg.memory)
        info = LBFGSInfo(loss, new_loss, grad_norm, ls, dot, fallback, not kept,
                         0 if S is None else len(S), reused, False)
        new_state = state.replace(
            iteration=state.iteration + 1, S=S, Y=Y, cache_w=new_w, cache_value=new_loss,
            cache_grad=new_g, evaluations=evaluations, resets=resets)
        return new_w, new_state, info
