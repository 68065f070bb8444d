"""What every solver shares: the problem, the method interface, parameter checks.

A *problem* is the objective ``c(w)`` as three callables on flat numpy vectors
(:class:`Problem`); a *method* (Newton-CG, gradient descent, ...) is a pair of
functions in the style of optax: ``init(w) -> state`` and ``step(problem, w,
state) -> (w, state, info)`` (:class:`Method`).  The state is a frozen,
checkpointable value (:class:`SolverState`); ``info`` says what one step did and
becomes one line of the run's ``metrics.jsonl`` (:class:`StepRecord`).

Nothing here knows MPI or TensorFlow: a problem whose callables reduce over MPI
runs the same code on every rank in lockstep.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, Self, TypeVar, runtime_checkable

import numpy as np

__all__ = [
    "Method",
    "ParameterError",
    "Problem",
    "SolverState",
    "StepRecord",
    "WorkShare",
    "check_value_and_grad",
    "is_int",
    "is_real",
    "require",
]


@dataclasses.dataclass(frozen=True)
class WorkShare:
    """One process's part of work split among ``parts`` processes, and how to add them.

    ``add(x)`` sums ``x`` elementwise over the parts and gives every part the sum
    (a collective: every part calls it, in the same order). A method that has
    each piece computed by one part, with zeros elsewhere, gets on every part
    exactly what one process would compute (``x + 0 = x``). It comes from the
    problem (an ``Allreduce`` over the ranks): the solvers know no MPI.
    """

    part: int
    parts: int
    add: Callable[[np.ndarray], np.ndarray]

    def __post_init__(self) -> None:
        if not (is_int(self.parts) and self.parts >= 1 and is_int(self.part)
                and 0 <= self.part < self.parts):
            raise ValueError(f"WorkShare: part {self.part!r} of {self.parts!r} parts")


class Problem(Protocol):
    """The objective ``c(w)`` as the solvers see it: three callables on flat vectors.

    Optional products, used where a method's configuration asks for them (a
    problem without one gets a ``TypeError`` naming it):

    - ``hvp_many(w, V)``: ``H V`` for an ``(n, k)`` block in one call;
    - ``gnvp(w, v)`` / ``gnvp_many(w, V)``: generalised Gauss-Newton products
      ``G v = J^T H_L J v`` (:class:`~.operators.GaussNewtonOperator`);
    - ``grad_squares(w)``: the mean over samples of the squared per-sample
      gradients, the empirical Fisher diagonal (diagonal preconditioners);
    - ``work_share()``: a :class:`WorkShare` where the problem spans several
      processes, so a method can split its own linear algebra among them (K-FAC).
    """

    def value(self, w: np.ndarray) -> float:
        """``c(w)``."""
        ...

    def value_and_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """``(c(w), grad c(w))``."""
        ...

    def hvp(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact Hessian-vector product ``H_c(w) v`` (thesis chapter 4)."""
        ...


class ParameterError(ValueError):
    """A hyper-parameter outside its domain; names the owner, the field and the value.

    ``choices`` lists the valid values when the field takes one of a few
    words, so that a job loader can suggest the nearest one.
    """

    def __init__(self, owner: str, name: str, value: Any, need: str,
                 choices: tuple[str, ...] = ()) -> None:
        super().__init__(f"{owner}.{name} = {value!r} must be {need}")
        self.owner, self.name, self.value, self.need, self.choices = (
            owner, name, value, need, choices)


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, not for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """True for Python and numpy ints and floats, not for bools."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def require(obj: object, name: str, rule: str, *, choices: tuple[str, ...] = ()) -> None:
    """Check field ``name`` of the dataclass ``obj`` against ``rule``; raise ParameterError.

    Rules: ``">= 0"``, ``"> 0"``, ``"<= 0"`` (finite reals; ``"<= 0"`` also
    admits ``-inf``), ``"int >= 0"``, ``"int >= 1"``, ``"(0, 1)"``, ``"[0, 1)"``
    (a decay or momentum), ``"bool"``,
    ``"choice"`` (one of ``choices``).
    """
    value = getattr(obj, name)
    owner = type(obj).__name__
    finite = is_real(value) and math.isfinite(value)
    ok, need = {
        ">= 0": (finite and value >= 0, "a finite number >= 0"),
        "> 0": (finite and value > 0, "a finite number > 0"),
        "<= 0": (is_real(value) and not math.isnan(value) and value <= 0,
                 "a number <= 0 (-inf allowed)"),
        "int >= 0": (is_int(value) and value >= 0, "an integer >= 0"),
        "int >= 1": (is_int(value) and value >= 1, "an integer >= 1"),
        "(0, 1)": (is_real(value) and 0 < value < 1, "a number in (0, 1)"),
        "[0, 1)": (is_real(value) and 0 <= value < 1, "a number in [0, 1)"),
        "bool": (isinstance(value, (bool, np.bool_)), "true or false"),
        "choice": (isinstance(value, str) and value in choices,
                   "one of " + ", ".join(choices)),
    }[rule]
    if not ok:
        raise ParameterError(owner, name, value, need, choices)


def cached_value_and_grad(w: np.ndarray, state: Any) -> tuple[float, np.ndarray] | None:
    """``(c(w), grad c(w))`` from a state's ``cache_*`` fields if ``w`` is bitwise ``cache_w``.

    Shared by the methods that keep the value and gradient at the weights
    they returned (L-BFGS, Newton-CG with ``trial_gradient``); else None.
    """
    cw = state.cache_w
    w = np.asarray(w)
    if (cw is None or state.cache_value is None or state.cache_grad is None
            or cw.dtype != w.dtype or cw.shape != w.shape
            or cw.tobytes() != np.ascontiguousarray(w).tobytes()):
        return None
    return state.cache_value, state.cache_grad


def check_value_and_grad(problem: Problem, w: np.ndarray,
                         value_and_grad: tuple[float, np.ndarray] | None,
                         who: str) -> tuple[float, np.ndarray]:
    """Evaluate (or take) ``c(w)`` and its gradient; refuse non-finite values."""
    loss, g = value_and_grad if value_and_grad is not None else problem.value_and_grad(w)
    loss = float(loss)
    g = np.asarray(g)
    if g.shape != w.shape:
        raise ValueError(f"{who}: gradient has shape {g.shape}, weights have shape {w.shape}")
    if not math.isfinite(loss):
        raise FloatingPointError(f"{who}: loss at the current weights is {loss!r}")
    if not np.all(np.isfinite(g)):
        raise FloatingPointError(f"{who}: gradient at the current weights contains NaN or Inf")
    return loss, g


S = TypeVar("S", bound="SolverState")


#: ids of the arrays a state under construction takes as they are (see SolverState.take).
_TAKEN: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("_TAKEN",
                                                                         default=frozenset())


@dataclasses.dataclass(frozen=True, eq=False)
class SolverState:
    """Base of the methods' frozen states: plain dict round trip for checkpoints.

    Fields are ints, floats, or numpy vectors (copied, read-only) or None.
    Equality compares arrays bitwise (NaN-aware). :meth:`replace` shares the
    arrays it keeps and :meth:`take` hands fresh ones over without a copy: a
    ResNet-50 vector is 189 MB in float64, and copying a momentum or Adam
    state's vectors every step cost as much as the step's arithmetic.
    """

    def __post_init__(self) -> None:
        taken = _TAKEN.get()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                if id(value) in taken:
                    value.flags.writeable = False
                    continue
                value = np.array(value, copy=True)
                value.flags.writeable = False
                object.__setattr__(self, f.name, value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                        and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (validated like a new state).

        The arrays of ``changes`` are copied; those kept from this state are
        shared (both states hold them read-only).
        """
        return self._replace(changes, taken=())

    def take(self, **changes: Any) -> Self:
        """:meth:`replace`, taking the arrays of ``changes`` as they are, without a copy.

        The caller hands them over: arrays it computed for this state and keeps no
        other reference to (they are made read-only).
        """
        return self._replace(changes, taken=[v for v in changes.values()
                                              if isinstance(v, np.ndarray)])

    def _replace(self, changes: dict[str, Any], taken: Any) -> Self:
        kept = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in changes]
        ids = frozenset(id(v) for v in [*kept, *taken] if isinstance(v, np.ndarray))
        token = _TAKEN.set(ids)
        try:
            return dataclasses.replace(self, **changes)
        finally:
            _TAKEN.reset(token)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (arrays copied): what a checkpoint stores."""
        return {f.name: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {unknown}; "
                             f"valid keys: {sorted(known)}")
        return cls(**data)


@runtime_checkable
class StepRecord(Protocol):
    """What a method's ``info`` offers the loop and the run's metrics."""

    @property
    def loss(self) -> float:
        """``c(w)`` at the start of the step."""
        ...

    @property
    def grad_norm(self) -> float:
        """``|grad c(w)|`` at the start of the step."""
        ...

    @property
    def stalled(self) -> bool:
        """True when the step kept ``w`` and repeating it on the same data would too."""
        ...

    def record(self) -> dict[str, Any]:
        """The metrics of this step (the ``metrics.jsonl`` fields the method owns)."""
        ...


class Method(Protocol):
    """An optimiser: ``init(w) -> state`` and ``step(problem, w, state) -> (w, state, info)``.

    ``config_class`` is the frozen dataclass of its hyper-parameters; a job's
    ``[optimizer]`` table is validated by it (mpinewton.config).
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    state_class: ClassVar[type[SolverState]]

    def init(self, w: np.ndarray) -> SolverState:
        """The state before the first step from ``w``."""
        ...

    def step(self, problem: Problem, w: np.ndarray, state: Any, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, Any, StepRecord]:
        """One iteration from ``w``; ``value_and_grad`` may pass ``(c(w), grad c(w))``."""
        ...
