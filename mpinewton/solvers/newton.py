"""Globalised inexact Newton-CG: thesis Algorithm 4 (section 9.2), with Hessian-free options.

One step: solve ``(B + alpha I) s = -g`` by CG (thesis Algorithm 3, damping
of thesis 7.2; ``B`` the Hessian or the Gauss-Newton matrix); if CG broke
down (NaN/Inf) or ``g.s > T`` (thesis: ``T < 0``) fall back to steepest
descent ``s = -g``; choose the step by Armijo backtracking or a fixed
learning rate; never accept NaN/Inf weights.

Options of :class:`NewtonConfig` (each off by default; with all of them at
their defaults a step is bitwise the thesis algorithm):

- ``curvature="gauss_newton"``: CG on the generalised Gauss-Newton matrix
  (Schraudolph 2002; Martens 2010, "Deep learning via Hessian-free
  optimization", section 4.2);
- ``damping_rule="levenberg_marquardt"``: adapt ``alpha`` by the reduction
  ratio (Martens 2010, section 4.1; Nocedal & Wright 2nd ed., section 10.3);
- ``preconditioner="fisher"|"hutchinson"``: preconditioned CG with a
  diagonal ``M`` (Martens 2010, section 4.7; Bekas, Kokiopoulou & Saad 2007;
  :mod:`.preconditioners`);
- ``forcing="sqrt_grad"|"eisenstat_walker"``: CG's relative tolerance from
  the gradient (Nocedal & Wright eq. 7.3; Eisenstat & Walker 1996, choice 2);
- ``cg_backtracking``: the best of CG's kept iterates (Martens 2010, 4.6);
- ``negative_curvature="direction"``: step along the direction of negative
  curvature CG met (Royer, O'Neill & Wright 2020, "A Newton-CG algorithm
  with complexity guarantees for smooth unconstrained optimization");
- ``cg_reorthogonalize``: CG with full reorthogonalization of its residuals
  (:func:`.cg.cg`), which keeps the iterates those of exact CG to rounding,
  so that the step does not depend on the summation order of the products
  (the number of MPI ranks) beyond rounding, however many iterations CG runs;
- ``trial_gradient``: the line search's first trial ``w + s`` is evaluated
  with its gradient, kept in the state; when the full step is accepted, the
  next step starts from it instead of a second pass over the same data. The
  iterates are bitwise those without it; one forward pass per accepted full
  step is saved, one backward pass per rejected one is spent (full batch
  only: with fresh mini-batches the next step's gradient is on a new batch).

The objective enters only through the :class:`Problem` callables on numpy
vectors, so the same code runs on one process or, with the callables
reducing over MPI, on every rank in lockstep.  Every branch depends only on
the numbers those callables return (and on random numbers seeded by the
configuration and the iteration, the same on every rank).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import (
    ParameterError,
    Problem,
    SolverState,
    cached_value_and_grad,
    check_value_and_grad,
    is_int,
    is_real,
    require,
)
from .cg import CGReason, CGResult, cg
from .linesearch import LineSearchResult, armijo, fixed_step
from .momentum import _check_cache
from .operators import CURVATURES, HessianOperator, LinearOperator, curvature_operator, damped
from .preconditioners import (
    PRECONDITIONERS,
    diagonal_preconditioner,
    fisher_diagonal,
    hutchinson_diagonal,
)

__all__ = [
    "DAMPING_RULES",
    "FORCING_RULES",
    "NEGATIVE_CURVATURE_RULES",
    "NewtonCG",
    "NewtonConfig",
    "NewtonState",
    "StepInfo",
    "WARM_STARTS",
    "STEP_RULES",
    "check_damping_rule",
    "current_damping",
    "optional_float",
    "forcing_term",
    "lm_damping_update",
    "newton_step",
    "pure_newton",
    "uses_hessian_free_options",
]

#: Step-size rules of thesis section 9.2.
STEP_RULES = ("armijo", "fixed")
#: CG starting points: zeros, the previous step's CG solution, or w/|w| (thesis 14.3).
WARM_STARTS = ("zero", "previous", "weights")
#: How the damping evolves: constant, or Levenberg-Marquardt (Martens 2010, 4.1).
DAMPING_RULES = ("fixed", "levenberg_marquardt")
#: CG's relative tolerance: cg_rtol, N&W eq. 7.3, Eisenstat & Walker 1996 choice 2.
FORCING_RULES = ("fixed", "sqrt_grad", "eisenstat_walker")
#: What to do when CG meets p.A p <= 0: keep the CG iterate, or step along p (Royer et al.).
NEGATIVE_CURVATURE_RULES = ("discard", "direction")


def _check(obj: object, name: str, ok: bool, need: str) -> None:
    """Raise :class:`ParameterError` for field ``name`` of ``obj`` unless ``ok``."""
    if not ok:
        raise ParameterError(type(obj).__name__, name, getattr(obj, name), need)


def check_damping_rule(config: Any) -> None:
    """Validate ``damping_rule`` and the Levenberg-Marquardt keys of ``config``.

    Shared by :class:`NewtonConfig` and K-FAC's config, which name them alike.
    """
    require(config, "damping_rule", "choice", choices=DAMPING_RULES)
    require(config, "lm_increase", "> 0")
    _check(config, "lm_increase", config.lm_increase > 1, "a finite number > 1")
    require(config, "lm_decrease", "(0, 1)")
    require(config, "lm_rho_low", "(0, 1)")
    require(config, "lm_rho_high", "(0, 1)")
    _check(config, "lm_rho_high", config.lm_rho_high >= config.lm_rho_low,
           f"a number in (0, 1) >= lm_rho_low = {config.lm_rho_low!r}")
    require(config, "damping_min", ">= 0")
    require(config, "damping_max", "> 0")
    _check(config, "damping_max", config.damping_max >= config.damping_min,
           f"a finite number >= damping_min = {config.damping_min!r}")


@dataclass(frozen=True, kw_only=True)
class NewtonConfig:
    """Hyper-parameters of thesis Algorithm 4 and its Hessian-free options; validated.

    ``descent_threshold`` is the thesis' ``T``: the CG direction ``s`` is
    replaced by ``-g`` when ``g.s > T``, and also whenever ``g.s >= 0``, so
    that the default ``T = 0`` means "accept any strict descent direction"
    (in particular a zero direction, e.g. from negative curvature at CG
    iteration 0, always falls back).  ``T`` is absolute, so a negative value
    must be chosen relative to the loss scale; ``-inf`` means "always
    steepest descent".  A positive ``T`` (accepting ascent directions) is
    rejected: use :func:`pure_newton` for the unglobalised method.

    With ``damping_rule="levenberg_marquardt"``, ``damping`` is the initial
    value (clipped into ``[damping_min, damping_max]``); :func:`newton_step`
    documents the rule.  Every option defaults to the thesis' behaviour.
    """

    damping: float = 0.0  # Tikhonov alpha in (B + alpha I) s = -g, thesis 7.2; >= 0
    cg_rtol: float = 1e-2  # CG stops at ||r|| <= max(cg_rtol*||g||, cg_atol) (forcing="fixed")
    cg_atol: float = 0.0  # absolute CG residual tolerance
    cg_max_iter: int = 50  # at most this many CG iterations (= curvature products) per step
    cg_scale_tol_sqrt_n: bool = False  # multiply the CG tolerance by sqrt(n), thesis 9.2
    warm_start: str = "previous"  # CG x0: "zero", "previous" CG solution, "weights" w/|w| (14.3)
    descent_threshold: float = 0.0  # T: fall back to -g iff g.s > T or g.s >= 0; T <= 0
    step_rule: str = "armijo"  # "armijo" backtracking or "fixed" learning rate, thesis 9.2
    armijo_beta: float = 0.5  # backtracking factor beta in (0, 1)
    armijo_gamma: float = 1e-4  # sufficient-decrease constant gamma in (0, 1)
    armijo_max_trials: int = 20  # loss evaluations before the line search gives up
    learning_rate: float = 1.0  # step size for step_rule="fixed" (Newton and fallback steps)
    curvature: str = "hessian"  # CG's matrix B: "hessian" or "gauss_newton" (problem.gnvp)
    damping_rule: str = "fixed"  # "fixed" or "levenberg_marquardt" (Martens 2010, 4.1)
    lm_increase: float = 1.5  # LM: damping *= lm_increase when rho < lm_rho_low; > 1
    lm_decrease: float = 2.0 / 3.0  # LM: damping *= lm_decrease when rho > lm_rho_high; (0, 1)
    lm_rho_low: float = 0.25  # LM: reduction ratio below which the damping grows
    lm_rho_high: float = 0.75  # LM: reduction ratio above which the damping shrinks
    damping_min: float = 1e-8  # LM: lower bound of the damping; >= 0
    damping_max: float = 1e8  # LM: upper bound of the damping; >= damping_min
    preconditioner: str = "none"  # "none", "fisher" (grad_squares) or "hutchinson" diagonal
    preconditioner_power: float = 0.75  # M = (diag + damping)^power (Martens 2010, 4.7)
    preconditioner_samples: int = 10  # Rademacher vectors of the Hutchinson estimate
    preconditioner_seed: int = 0  # Hutchinson vectors are seeded by (seed, iteration)
    preconditioner_floor: float = 1e-4  # diag entries below floor * max|diag| are raised to it
    forcing: str = "fixed"  # CG rtol: "fixed" (cg_rtol), "sqrt_grad", "eisenstat_walker"
    forcing_max: float = 0.5  # upper bound of the forcing term (and EW's eta_0); (0, 1)
    forcing_gamma: float = 0.9  # Eisenstat-Walker gamma in (0, 1]
    forcing_alpha: float = 2.0  # Eisenstat-Walker alpha in (1, 2]
    cg_backtracking: bool = False  # pick the best kept CG iterate (Martens 2010, 4.6)
    negative_curvature: str = "discard"  # "discard" (thesis) or "direction" (Royer et al. 2020)
    cg_reorthogonalize: bool = False  # CG keeps its residuals M^-1-orthogonal (rank invariance)
    trial_gradient: bool = False  # the first trial's gradient is kept for the next step

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
        require(self, "curvature", "choice", choices=tuple(CURVATURES))
        check_damping_rule(self)
        require(self, "preconditioner", "choice", choices=PRECONDITIONERS)
        require(self, "preconditioner_power", "> 0")
        require(self, "preconditioner_samples", "int >= 1")
        require(self, "preconditioner_seed", "int >= 0")
        require(self, "preconditioner_floor", "(0, 1)")
        require(self, "forcing", "choice", choices=FORCING_RULES)
        require(self, "forcing_max", "(0, 1)")
        _check(self, "forcing_gamma", is_real(self.forcing_gamma) and 0 < self.forcing_gamma <= 1,
               "a number in (0, 1]")
        _check(self, "forcing_alpha", is_real(self.forcing_alpha) and 1 < self.forcing_alpha <= 2,
               "a number in (1, 2]")
        require(self, "cg_backtracking", "bool")
        require(self, "negative_curvature", "choice", choices=NEGATIVE_CURVATURE_RULES)
        require(self, "cg_reorthogonalize", "bool")
        require(self, "trial_gradient", "bool")


def optional_float(owner: str, name: str, value: Any, low: float,
                   high: float) -> float | None:
    """``value`` as a finite float in ``[low, high]``, or None; ValueError naming ``owner.name``.

    The optional float fields of the Newton and K-FAC states (their adapted damping).
    """
    if value is None:
        return None
    if not (is_real(value) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{owner}.{name} must be None or a finite number in [{low}, {high}], "
                         f"got {value!r}")
    return float(value)


@dataclass(frozen=True, eq=False)
class NewtonState(SolverState):
    """What one Newton step hands to the next (and what a checkpoint stores).

    ``cg_warm`` is kept as a read-only copy.  Equality compares ``cg_warm``
    by value (bitwise, NaN-aware).  ``damping`` (Levenberg-Marquardt only) is
    the damping of the next step, None before the first one (then
    ``config.damping`` is used); ``forcing_grad_norm`` and ``forcing_eta``
    (Eisenstat-Walker only) are ``|g|`` and the forcing term of the last step.
    ``total_matvecs`` includes the Hutchinson products, which
    ``total_preconditioner_matvecs`` counts on their own.
    """

    iteration: int = 0  # Newton steps taken so far
    cg_warm: np.ndarray | None = None  # last accepted CG solution (for warm_start="previous")
    total_cg_iters: int = 0  # CG iterations summed over all steps
    total_matvecs: int = 0  # curvature products summed over all steps (warm starts, Hutchinson)
    fallbacks: int = 0  # steps that used steepest descent instead of the CG direction
    failed_linesearches: int = 0  # steps whose line search failed (weights kept)
    total_preconditioner_matvecs: int = 0  # Hutchinson products summed over all steps
    negative_curvature_steps: int = 0  # steps along a negative-curvature direction
    damping: float | None = None  # LM: damping for the next step (None: config.damping)
    forcing_grad_norm: float | None = None  # EW: |g| of the last step
    forcing_eta: float | None = None  # EW: forcing term of the last step
    cache_w: np.ndarray | None = None  # trial_gradient: the weights the last step returned
    cache_value: float | None = None  # c(cache_w)
    cache_grad: np.ndarray | None = None  # grad c(cache_w)

    def __post_init__(self) -> None:
        for name in ("iteration", "total_cg_iters", "total_matvecs", "fallbacks",
                     "failed_linesearches", "total_preconditioner_matvecs",
                     "negative_curvature_steps"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 0):
                raise ValueError(f"NewtonState.{name} must be an integer >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name, high in (("damping", math.inf), ("forcing_grad_norm", math.inf),
                           ("forcing_eta", 1.0)):
            object.__setattr__(self, name,
                               optional_float("NewtonState", name, getattr(self, name), 0.0, high))
        if self.cg_warm is not None:
            warm = np.asarray(self.cg_warm)
            if warm.ndim != 1 or not np.issubdtype(warm.dtype, np.floating):
                raise ValueError(
                    f"NewtonState.cg_warm must be a 1-D float vector or None, "
                    f"got dtype {warm.dtype} shape {warm.shape}"
                )
            object.__setattr__(self, "cg_warm", warm)
        _check_cache(self)
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields; those of the Hessian-free options only when set.

        A thesis run's state (every option at its default) has exactly the
        keys it had before those options existed, so its checkpoints do not
        change; :meth:`from_dict` gives missing keys their defaults.
        """
        out = super().to_dict()
        for name in _OPTIONAL_STATE_FIELDS:
            default = _STATE_DEFAULTS[name]
            if out[name] is default or (default is not None and out[name] == default):
                del out[name]
        return out

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


#: State fields of the Hessian-free options, left out of to_dict() at their defaults.
_OPTIONAL_STATE_FIELDS = ("total_preconditioner_matvecs", "negative_curvature_steps", "damping",
                          "forcing_grad_norm", "forcing_eta", "cache_w", "cache_value",
                          "cache_grad")
_STATE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NewtonState)}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of one :func:`newton_step`.

    ``direction_dot_grad`` is ``g.s`` for the direction actually searched
    (``-|g|^2`` after a fallback); ``cg_direction_dot_grad`` is ``g.s`` of
    the direction CG offered (its solution, the backtracked iterate or the
    negative-curvature step), the number the descent test looked at (NaN
    without CG).  ``cg`` is None only at a zero gradient, where no step is
    taken.  ``stalled``: the line search failed and the next step from the
    same weights would repeat this one (no warm start to drop, no damping
    change; a fresh Hutchinson draw does not count).

    ``damping`` is the damping used; ``rho`` the reduction ratio of the
    accepted step against the undamped model (NaN when not computed: no CG
    direction searched, failed line search, or a predicted decrease <= 0);
    ``cg_rtol`` the relative CG tolerance (forcing term) used;
    ``backtrack_iter`` the CG iteration the step came from with
    ``cg_backtracking`` (None otherwise); ``negative_curvature_step`` whether
    the direction came from negative curvature.
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
    rho: float = math.nan
    cg_rtol: float = math.nan
    preconditioner: str = "none"
    curvature: str = "hessian"
    backtrack_iter: int | None = None
    backtrack_values: int = 0  # problem.value calls of CG backtracking
    preconditioner_matvecs: int = 0  # Hutchinson products of this step
    negative_curvature_step: bool = False
    extended_record: bool = False  # record() adds the Hessian-free keys

    def record(self) -> dict[str, Any]:
        """Metrics of this step (``metrics.jsonl``); None for numbers not computed.

        The thesis' fields; with ``extended_record`` (set by :func:`newton_step`
        when a Hessian-free option is on) also ``rho``, ``cg_rtol``,
        ``preconditioner``, ``curvature``, ``backtrack_iter`` and
        ``negative_curvature_step``.
        """
        out = {"loss": self.loss, "new_loss": self.new_loss, "grad_norm": self.grad_norm,
               "cg_iters": self.cg.iterations if self.cg is not None else 0,
               "cg_reason": self.cg.reason.value if self.cg is not None else None,
               "step_size": self.step.step, "fallback": self.fallback,
               "linesearch_trials": self.step.trials, "damping": self.damping}
        if self.extended_record:
            out.update(rho=_finite_or_none(self.rho), cg_rtol=_finite_or_none(self.cg_rtol),
                       preconditioner=self.preconditioner, curvature=self.curvature,
                       backtrack_iter=self.backtrack_iter,
                       negative_curvature_step=self.negative_curvature_step)
        return out


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


def uses_hessian_free_options(config: NewtonConfig) -> bool:
    """True when any option beyond thesis Algorithm 4 is switched on."""
    return (config.curvature != "hessian" or config.damping_rule != "fixed"
            or config.preconditioner != "none" or config.forcing != "fixed"
            or config.cg_backtracking or config.negative_curvature != "discard"
            or config.cg_reorthogonalize)


def current_damping(state: Any, config: Any) -> float:
    """The damping of the next step: ``config.damping``, or the LM value in ``state``.

    Levenberg-Marquardt starts from ``config.damping`` clipped into
    ``[damping_min, damping_max]``. ``state`` and ``config`` are Newton-CG's
    (:class:`NewtonState`, :class:`NewtonConfig`) or K-FAC's, which name
    these fields alike.
    """
    if config.damping_rule == "fixed":
        return config.damping
    if state.damping is not None:
        return state.damping
    return min(max(float(config.damping), config.damping_min), config.damping_max)


def lm_damping_update(damping: float, rho: float, success: bool, config: Any) -> float:
    """Levenberg-Marquardt rule of Martens 2010, section 4.1 (cf. Nocedal & Wright Alg. 4.1).

    ``rho < lm_rho_low`` or a failed line search: ``damping * lm_increase``;
    ``rho > lm_rho_high``: ``damping * lm_decrease``; otherwise (and for a
    NaN ``rho``, not computed) unchanged; then clipped into
    ``[damping_min, damping_max]``. ``config`` is a :class:`NewtonConfig` or
    any config with those keys (K-FAC's).
    """
    if not success or rho < config.lm_rho_low:
        damping = damping * config.lm_increase
    elif rho > config.lm_rho_high:
        damping = damping * config.lm_decrease
    return min(max(damping, config.damping_min), config.damping_max)


def forcing_term(grad_norm: float, state: NewtonState, config: NewtonConfig) -> float:
    """CG's relative tolerance ``eta_k`` (the forcing term) for ``|g_k| = grad_norm``.

    - ``"fixed"``: ``cg_rtol``;
    - ``"sqrt_grad"``: ``min(forcing_max, sqrt(|g_k|))`` (Nocedal & Wright
      eq. 7.3 with ``forcing_max = 0.5``: superlinear convergence);
    - ``"eisenstat_walker"``: Eisenstat & Walker 1996, choice 2:
      ``eta_k = gamma (|g_k| / |g_{k-1}|)^alpha``, safeguarded by
      ``eta_k = max(eta_k, gamma eta_{k-1}^alpha)`` when
      ``gamma eta_{k-1}^alpha > 0.1``, then ``min(eta_k, forcing_max)``;
      ``eta_0 = forcing_max`` (no previous step in ``state``).
    """
    if config.forcing == "fixed":
        return config.cg_rtol
    if config.forcing == "sqrt_grad":
        return min(config.forcing_max, math.sqrt(grad_norm))
    prev_g, prev_eta = state.forcing_grad_norm, state.forcing_eta
    if prev_g is None or prev_eta is None or prev_g == 0.0:
        return config.forcing_max
    gamma, alpha = config.forcing_gamma, config.forcing_alpha
    eta = gamma * (grad_norm / prev_g) ** alpha
    guard = gamma * prev_eta**alpha
    if guard > 0.1:
        eta = max(eta, guard)
    return min(eta, config.forcing_max)


def _preconditioner(problem: Problem, w: np.ndarray, op: LinearOperator, damping: float,
                    iteration: int, config: NewtonConfig) -> tuple[LinearOperator | None, int]:
    """``(M^{-1}, products)`` per ``config.preconditioner`` (:mod:`.preconditioners`)."""
    if config.preconditioner == "none":
        return None, 0
    products = 0
    if config.preconditioner == "fisher":
        diag = fisher_diagonal(problem, w)
    else:
        diag = hutchinson_diagonal(op, config.preconditioner_samples,
                                   (config.preconditioner_seed, iteration))
        products = config.preconditioner_samples
    return diagonal_preconditioner(diag, damping, config.preconditioner_power,
                                   config.preconditioner_floor), products


def _negative_curvature_direction(res: CGResult, g: np.ndarray
                                  ) -> tuple[np.ndarray, float] | None:
    """Royer, O'Neill & Wright 2020 (Algorithm 3): ``d = -sign(g.p) (|p.Ap| / |p|^2) p / |p|``.

    ``p`` is CG's direction with ``p.A p < 0``; ``|d|`` is the magnitude of
    the curvature of ``A`` along ``p``.  Returns ``(d, d.A d)``, or None when
    CG met no strictly negative curvature.
    """
    p, pap = res.negative_curvature_direction, res.negative_curvature_value
    if p is None or not (math.isfinite(pap) and pap < 0.0):
        return None
    pp = float(p @ p)
    if not (math.isfinite(pp) and pp > 0.0):
        return None
    scale = (-pap / pp) / math.sqrt(pp)
    if float(g @ p) > 0.0:
        scale = -scale
    return scale * p, scale * scale * pap


def newton_step(
    problem: Problem,
    w: np.ndarray,
    state: NewtonState,
    config: NewtonConfig,
    *,
    value_and_grad: tuple[float, np.ndarray] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[np.ndarray, NewtonState, StepInfo]:
    """One iteration of thesis Algorithm 4 (section 9.2) with the Hessian-free options.

    ``progress`` is CG's ``callback`` (iteration, cap, residual ratio), for output.

    1. ``loss, g = c(w), grad c(w)`` (or the given ``value_and_grad``).
    2. CG on ``(B(w) + damping I) s = -g``, ``B`` the ``config.curvature``
       operator (``problem.hvp``, or ``problem.gnvp``), started from
       ``config.warm_start``, relative tolerance :func:`forcing_term`,
       preconditioned per ``config.preconditioner``; ``damping`` is
       :func:`current_damping`.
    3. The candidate direction: the CG solution; with
       ``negative_curvature="direction"`` and CG ending on ``p.A p < 0``, the
       step of :func:`_negative_curvature_direction` instead; otherwise with
       ``cg_backtracking`` (Martens 2010, 4.6) the kept CG iterate found by
       walking back from the last one while ``c(w + x_i)`` decreases
       (iterates that fail the descent test are skipped; each evaluation is
       one ``problem.value``, and the chosen value seeds the line search's
       trial at ``sigma = 1``).
    4. If CG ended with ``NAN_OR_INF``, or ``g.s > T``, or ``g.s >= 0``:
       ``s = -g`` (``fallback=True``).
    5. Step size by Armijo (``phi(sigma) = problem.value(w + sigma*s)``; trial
       points with NaN/Inf weights are rejected without evaluating) or by the
       fixed ``learning_rate`` (rejected if the new weights or loss are NaN/Inf).
    6. ``rho = (loss - new_loss) / -m(sigma s)`` with the undamped model
       ``m(sigma s) = sigma g.s + 0.5 sigma^2 s.B s`` (``s.B s`` from CG's
       recursions, no extra product), for a searched CG direction whose
       model predicts a decrease.  Levenberg-Marquardt updates the damping by
       :func:`lm_damping_update`; there, a step with ``rho <= 0`` (the loss
       rose under ``step_rule="fixed"``) is kept but counts as rejected.

    Returns ``(new_w, new_state, info)``.  On a failed line search ``new_w``
    is a copy of ``w``, ``info.step`` has ``step=0`` and ``value=loss``, and
    ``cg_warm`` is cleared so that a "previous" warm start does not repeat
    the failed step.  ``cg_warm`` is CG's final iterate after an accepted
    non-fallback, non-rejected step, None otherwise.  At a zero gradient
    nothing is computed beyond ``c`` and ``g``: ``w`` is returned unchanged.
    Raises ``FloatingPointError`` if the loss or gradient at ``w`` is NaN/Inf.
    """
    w = np.asarray(w)
    if w.ndim != 1:
        raise ValueError(f"newton_step: w must be a 1-D vector, got shape {w.shape}")
    if value_and_grad is None and config.trial_gradient:
        value_and_grad = cached_value_and_grad(w, state)
    loss, g = check_value_and_grad(problem, w, value_and_grad, "newton_step")
    if state.cache_w is not None:  # used or stale: never carried past this step
        state = state.replace(cache_w=None, cache_value=None, cache_grad=None)
    gg = float(g @ g)
    grad_norm = math.sqrt(gg)
    damping = current_damping(state, config)
    labels = {"preconditioner": config.preconditioner, "curvature": config.curvature,
              "extended_record": uses_hessian_free_options(config)}
    if gg == 0.0:
        no_step = LineSearchResult(step=0.0, value=loss, trials=0, success=True)
        info = StepInfo(loss, loss, grad_norm, None, 0.0, False, no_step, damping=damping,
                        **labels)
        return w.copy(), state.replace(iteration=state.iteration + 1), info

    lm = config.damping_rule == "levenberg_marquardt"
    x0 = _warm_start(w, state, config)
    curvature = curvature_operator(problem, w, config.curvature)
    pre, pre_products = _preconditioner(problem, w, curvature, damping, state.iteration, config)
    rtol = forcing_term(grad_norm, state, config)
    res = cg(
        damped(curvature, damping),
        -g,
        x0=x0,
        rtol=rtol,
        atol=config.cg_atol,
        max_iter=config.cg_max_iter,
        scale_tol_sqrt_n=config.cg_scale_tol_sqrt_n,
        preconditioner=pre,
        keep_iterates=config.cg_backtracking,
        reorthogonalize=config.cg_reorthogonalize,
        callback=progress,
    )

    def descends(dot: float) -> bool:
        return math.isfinite(dot) and dot <= config.descent_threshold and dot < 0.0

    trial_vg: list[Any] = []  # trial_gradient: (trial, c, g) of the first trial

    def value_at(s: np.ndarray, sigma: float, with_grad: bool = False) -> float:
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite trials are rejected
            trial = w + sigma * s
        if not np.all(np.isfinite(trial)):
            return math.inf
        if not with_grad:
            return float(problem.value(trial))
        value, grad = problem.value_and_grad(trial)
        grad = np.asarray(grad)
        if math.isfinite(value) and np.all(np.isfinite(grad)):
            trial_vg[:] = [trial, float(value), grad]
        return float(value)

    candidate, candidate_dad = res.x, res.x_dot_ax  # d and d.A d (A damped)
    nc_step, backtrack_iter, backtrack_values = False, None, 0
    known: float | None = None  # c(w + candidate), when backtracking evaluated it
    if config.negative_curvature == "direction" and res.reason is CGReason.NEGATIVE_CURVATURE:
        nc = _negative_curvature_direction(res, g)
        if nc is not None:
            (candidate, candidate_dad), nc_step = nc, True
    if (config.cg_backtracking and not nc_step and res.reason is not CGReason.NAN_OR_INF):
        kept = [(i, x, xax) for (i, x), xax in zip(res.iterates, res.iterate_x_dot_ax,
                                                    strict=True)
                if np.any(x) and descends(float(g @ x))]
        if kept:
            best = len(kept) - 1
            best_value = value_at(kept[best][1], 1.0)
            backtrack_values = 1
            for j in range(best - 1, -1, -1):
                v = value_at(kept[j][1], 1.0)
                backtrack_values += 1
                if not v < best_value:
                    break
                best, best_value = j, v
            backtrack_iter, candidate, candidate_dad = kept[best]
            known = best_value

    cg_dot = float(g @ candidate)
    fallback = res.reason is CGReason.NAN_OR_INF or not descends(cg_dot)
    if fallback:
        s, dot = -g, -gg
        known, nc_step = None, False
    else:
        s, dot = candidate, cg_dot

    def phi(sigma: float) -> float:
        if known is not None and sigma == 1.0:
            return known
        return value_at(s, sigma, with_grad=config.trial_gradient and sigma == 1.0)

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

    rho = math.nan
    if ls.success and not fallback:
        sbs = candidate_dad - damping * float(s @ s) if damping != 0.0 else candidate_dad
        predicted = -(ls.step * dot + 0.5 * ls.step * ls.step * sbs)
        if math.isfinite(predicted) and predicted > 0.0:
            rho = (loss - ls.value) / predicted
    new_damping = lm_damping_update(damping, rho, ls.success, config) if lm else damping
    rejected = not ls.success or (lm and rho <= 0.0)

    if ls.success:
        new_w = w + ls.step * s
        warm = None if fallback or rejected else res.x
    else:
        new_w = w.copy()
        warm = None
    changes: dict[str, Any] = {}
    if lm:
        changes["damping"] = new_damping
    if trial_vg and ls.success and ls.step == 1.0:  # new_w is bitwise the trial point
        changes.update(cache_w=new_w, cache_value=trial_vg[1], cache_grad=trial_vg[2])
    if config.forcing == "eisenstat_walker":
        changes.update(forcing_grad_norm=grad_norm, forcing_eta=rtol)
    if pre_products:
        changes["total_preconditioner_matvecs"] = state.total_preconditioner_matvecs + pre_products
    if nc_step:
        changes["negative_curvature_steps"] = state.negative_curvature_steps + 1
    new_state = state.replace(
        iteration=state.iteration + 1,
        cg_warm=warm,
        total_cg_iters=state.total_cg_iters + res.iterations,
        total_matvecs=state.total_matvecs + res.matvecs + pre_products,
        fallbacks=state.fallbacks + int(fallback),
        failed_linesearches=state.failed_linesearches + int(not ls.success),
        **changes,
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
        damping=damping,
        # A failed step from a cold (or weights-derived) start repeats itself,
        # unless the damping changed.
        stalled=(not ls.success and (x0 is None or config.warm_start != "previous")
                 and new_damping == damping),
        rho=rho,
        cg_rtol=rtol,
        backtrack_iter=backtrack_iter,
        backtrack_values=backtrack_values,
        preconditioner_matvecs=pre_products,
        negative_curvature_step=nc_step,
        **labels,
    )
    return new_w, new_state, info


class NewtonCG:
    """Globalised Newton-CG (thesis Algorithm 4) on the shared method interface."""

    name: ClassVar[str] = "newton"
    config_class: ClassVar[type] = NewtonConfig
    state_class: ClassVar[type[SolverState]] = NewtonState

    def __init__(self, config: NewtonConfig | None = None) -> None:
        self.config = NewtonConfig() if config is None else config
        #: Called after each CG iteration with (iteration, cap, |r| / |g|); set by a driver
        #: that shows progress. Output only: it changes no step.
        self.progress: Callable[[int, int, float], None] | None = None

    def init(self, w: np.ndarray) -> NewtonState:
        """No warm start and zero counters."""
        return NewtonState()

    @property
    def reuses_gradient(self) -> bool:
        """With ``trial_gradient`` a step may take ``c`` and ``g`` from the state.

        The solver loop then passes them explicitly when each step has a new
        batch (:func:`mpinewton.solvers.loop.run`).
        """
        return self.config.trial_gradient

    @staticmethod
    def cached_value_and_grad(w: np.ndarray, state: NewtonState
                              ) -> tuple[float, np.ndarray] | None:
        """What ``trial_gradient`` kept for ``w`` (bitwise ``cache_w``), else None."""
        return cached_value_and_grad(w, state)

    def step(self, problem: Problem, w: np.ndarray, state: NewtonState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, NewtonState, StepInfo]:
        """One Newton step: :func:`newton_step` with this method's configuration."""
        return newton_step(problem, w, state, self.config, value_and_grad=value_and_grad,
                           progress=self.progress)


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
