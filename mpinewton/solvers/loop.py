"""The one optimisation loop: phases of methods, stopping rules, hooks.

Thesis Algorithm 4 is a loop of phases -- gradient-descent pre-training, then
Newton steps -- and so is every baseline run.  :func:`run` runs any sequence of
:class:`Phase` (each a method on the shared interface and an iteration count)
and is used both by :func:`minimize` and by the training driver, which joins
through :class:`LoopHooks` (set the batch before a step; broadcast, log and
checkpoint after it) without the loop knowing MPI or TensorFlow.

Stopping rules, checked in this order at each iteration ``k``:

1. ``|g| <= gtol`` (only when ``gtol`` is given) -> ``CONVERGED``.
2. The step's new weights hold NaN/Inf -> ``FloatingPointError`` (never accepted).
3. ``hooks.after_step`` asks to stop: ``True`` (a signal, a callback) -> ``STOPPED``
   (interrupted, to be continued); a :class:`LoopReason` -> that reason, e.g.
   ``EARLY_STOPPED`` (validation no longer improves: a finished run).
4. The step *stalled*: its line search failed, the weights were kept, and the
   next step from the same weights would repeat it exactly (no warm start left
   to drop) -> ``STALLED``, unless every step draws a fresh batch
   (``fresh_batches``, thesis 8.2), where the next batch gives a new problem.
   A failed step that dropped a warm start is retried once from a cold start.
5. All iterations of all phases done -> ``COMPLETED``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Method, Problem, SolverState, StepRecord, check_value_and_grad, is_int, is_real
from .gd import GDConfig, GradientDescent
from .newton import NewtonCG, NewtonConfig, NewtonState, StepInfo

__all__ = ["LoopHooks", "LoopReason", "LoopResult", "MinimizeResult", "Phase", "minimize", "run"]


class LoopReason(enum.StrEnum):
    """Why :func:`run` ended."""

    COMPLETED = "completed"  # every iteration of every phase ran
    CONVERGED = "converged"  # |g| <= gtol
    STALLED = "stalled"  # a failed line search would repeat itself
    STOPPED = "stopped"  # a hook asked to stop (a signal): interrupted, not finished
    EARLY_STOPPED = "early_stopped"  # a hook ended the run as finished (validation, patience)


@dataclass(frozen=True)
class Phase:
    """``iters`` steps of ``method``, recorded under ``name`` (``pretrain``, ``newton``...)."""

    name: str
    method: Method
    iters: int

    def __post_init__(self) -> None:
        if not (is_int(self.iters) and self.iters >= 0):
            raise ValueError(f"Phase {self.name!r}: iters must be an integer >= 0, "
                             f"got {self.iters!r}")


class LoopHooks:
    """Where a caller joins :func:`run`; the defaults do nothing."""

    def before_step(self, k: int, phase: Phase) -> None:
        """Called before step ``k`` (1-based, counted over all phases)."""

    def after_step(self, k: int, phase: Phase, w: np.ndarray, state: SolverState,
                   info: StepRecord) -> tuple[np.ndarray, bool | LoopReason]:
        """Called after step ``k``; returns the weights to go on with and whether to stop.

        ``True`` stops with ``STOPPED``; a :class:`LoopReason` stops with that reason.
        """
        return w, False


@dataclass(frozen=True)
class LoopResult:
    """Where :func:`run` ended: weights, each phase's state, last iteration, reason."""

    w: np.ndarray
    states: dict[str, SolverState]
    iteration: int  # the last iteration done (counted over all phases)
    reason: LoopReason
    message: str
    grad_norm: float | None = None  # |g| at ``w`` when the loop computed it (CONVERGED)
    loss: float | None = None  # c(w) when the loop computed it (CONVERGED)


def run(
    problem: Problem,
    w0: np.ndarray,
    phases: Sequence[Phase],
    *,
    states: Mapping[str, SolverState] | None = None,
    start: int = 0,
    gtol: float | None = None,
    fresh_batches: bool = False,
    hooks: LoopHooks | None = None,
) -> LoopResult:
    """Run ``phases`` one after another from ``w0`` (stopping rules: module docstring).

    ``states`` continues each phase's method state (by phase name) and
    ``start`` skips the iterations already done: together they resume a run
    from a checkpoint.  Phases without a given state start from
    ``method.init(w)``.
    """
    hooks = LoopHooks() if hooks is None else hooks
    if gtol is not None and not (is_real(gtol) and gtol >= 0):
        raise ValueError(f"run: gtol must be a number >= 0 or None, got {gtol!r}")
    w = np.array(w0, copy=True)
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float64)
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"run: phase names must differ, got {names}")
    given = dict(states or {})
    if set(given) - set(names):
        raise ValueError(f"run: states for unknown phases {sorted(set(given) - set(names))}; "
                         f"the phases are {names}")
    now = {p.name: given[p.name] if p.name in given else p.method.init(w) for p in phases}
    k = 0
    for phase in phases:
        for _ in range(phase.iters):
            k += 1
            if k <= start:
                continue
            hooks.before_step(k, phase)
            vg = None
            reuses = getattr(phase.method, "reuses_gradient", False)
            if gtol is not None or (fresh_batches and reuses):
                # A method that keeps c and g from its last step (L-BFGS) must not
                # reuse them when the step's batch is new; on the same data the
                # convergence test takes them from it instead of recomputing.
                cached = phase.method.cached_value_and_grad(w, now[phase.name]) \
                    if reuses and not fresh_batches else None
                vg = check_value_and_grad(problem, w, cached, f"iteration {k}")
                gnorm = float(np.linalg.norm(vg[1]))
                if gtol is not None and gnorm <= gtol:
                    return LoopResult(w, now, k - 1, LoopReason.CONVERGED,
                                      f"|g| = {gnorm:.3e} <= gtol = {gtol:.3e}", gnorm, vg[0])
            w_new, now[phase.name], info = phase.method.step(problem, w, now[phase.name],
                                                             value_and_grad=vg)
            if not np.all(np.isfinite(w_new)):
                raise FloatingPointError(f"iteration {k} ({phase.name}) produced NaN/Inf weights; "
                                         "lower the learning rate or raise the damping")
            w, stop = hooks.after_step(k, phase, w_new, now[phase.name], info)
            if stop:
                reason = stop if isinstance(stop, LoopReason) else LoopReason.STOPPED
                return LoopResult(w, now, k, reason, f"{reason.value.replace('_', ' ')} after "
                                  f"iteration {k}")
            if info.stalled and not fresh_batches:
                return LoopResult(w, now, k, LoopReason.STALLED,
                                  f"line search failed at iteration {k} ({phase.name}) with "
                                  "nothing left to change; weights kept")
    return LoopResult(w, now, k, LoopReason.COMPLETED, f"completed {k} iterations")


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


class _Recorder(LoopHooks):
    """Keeps every step's info for :class:`MinimizeResult` and calls the user's callback."""

    def __init__(self, callback: Callable[[np.ndarray, Any, Any], bool | None] | None) -> None:
        self.callback = callback
        self.history: list[StepInfo] = []
        self.pretrain: list[tuple[float, float]] = []

    def after_step(self, k: int, phase: Phase, w: np.ndarray, state: SolverState,
                   info: Any) -> tuple[np.ndarray, bool]:
        if phase.name == "pretrain":
            self.pretrain.append((info.loss, info.grad_norm))
            return w, False
        self.history.append(info)
        return w, bool(self.callback is not None and self.callback(w, state, info))


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

    ``pretrain_iters`` fixed-rate gradient-descent steps with ``pretrain_lr``,
    then Newton steps until ``|g| <= gtol`` or ``max_iter`` Newton steps, by
    :func:`run` (whose stopping rules apply: a stalled line search ends the
    loop with ``converged=False``; so does ``callback(w, state, info)``
    returning True).
    """
    if not (is_int(pretrain_iters) and pretrain_iters >= 0):
        raise ValueError(
            f"minimize: pretrain_iters must be an integer >= 0, got {pretrain_iters!r}"
        )
    if not (is_int(max_iter) and max_iter >= 0):
        raise ValueError(f"minimize: max_iter must be an integer >= 0, got {max_iter!r}")
    if not (is_real(gtol) and gtol >= 0):
        raise ValueError(f"minimize: gtol must be a number >= 0, got {gtol!r}")
    phases = [Phase("pretrain", GradientDescent(GDConfig(learning_rate=pretrain_lr)),
                    pretrain_iters),
              Phase("newton", NewtonCG(config), max_iter)]
    recorder = _Recorder(callback)
    out = run(problem, w0, phases, states={"newton": state} if state is not None else None,
              gtol=gtol, hooks=recorder)
    if out.reason is LoopReason.CONVERGED:
        loss, gnorm = out.loss, out.grad_norm
    else:
        loss, g = check_value_and_grad(problem, out.w, None, "minimize")
        gnorm = float(np.linalg.norm(g))
    message = {LoopReason.COMPLETED: f"reached max_iter={max_iter}",
               LoopReason.STOPPED: "stopped by callback"}.get(out.reason, out.message)
    return MinimizeResult(
        x=out.w,
        fun=float(loss),  # type: ignore[arg-type]
        grad_norm=float(gnorm),  # type: ignore[arg-type]
        iterations=len(recorder.history),
        converged=gnorm <= gtol,  # type: ignore[operator]
        history=recorder.history,
        state=out.states["newton"],  # type: ignore[arg-type]
        message=message,
        pretrain_history=recorder.pretrain,
    )
