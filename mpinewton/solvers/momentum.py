"""Gradient descent with momentum: Polyak's heavy ball and Nesterov's accelerated gradient.

First-order baselines on the shared method interface
(:class:`~mpinewton.solvers.base.Method`), with a fixed learning rate ``lr``
and momentum ``mu``:

- heavy ball (Polyak 1964, "Some methods of speeding up the convergence of
  iteration methods"): ``v <- mu v - lr g(w)``, ``w <- w + v``;
- Nesterov (Sutskever, Martens, Dahl & Hinton 2013, "On the importance of
  initialization and momentum in deep learning", eqs. 3-4), in the
  reformulation that evaluates the gradient at the iterate ``w`` itself
  (Bengio, Boulanger-Lewandowski & Pascanu 2013): ``v <- mu v - lr g(w)``,
  ``w <- w + mu v - lr g(w)``.  Here ``w = theta + mu v`` is Sutskever's
  look-ahead point, so both forms give the same sequence.

The velocity starts at zero, so the first step is ``-lr g`` (heavy ball) or
``-(1 + mu) lr g`` (Nesterov).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from .base import Problem, SolverState, check_value_and_grad, require

__all__ = ["Momentum", "MomentumConfig", "MomentumInfo", "MomentumState"]


def _float_array(value: Any, owner: str, name: str, ndim: int = 1) -> np.ndarray | None:
    """``value`` as a float array with ``ndim`` dimensions (lists from JSON accepted), or None.

    Integer arrays are converted to float64; anything else raises ``ValueError``
    naming ``owner.name``.  Shared by the baselines' states.
    """
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{owner}.{name} must be a {ndim}-D float array or None, "
                         f"got dtype {arr.dtype} shape {arr.shape}")
    return arr


def _check_cache(obj: object) -> None:
    """Validate a state's ``cache_w``, ``cache_value``, ``cache_grad`` (all set or all None)."""
    import math

    owner = type(obj).__name__
    for name in ("cache_w", "cache_grad"):
        object.__setattr__(obj, name, _float_array(getattr(obj, name), owner, name, 1))
    cache_w, value, cache_grad = obj.cache_w, obj.cache_value, obj.cache_grad  # type: ignore[attr-defined]
    if any(p is None for p in (cache_w, value, cache_grad)) and not all(
            p is None for p in (cache_w, value, cache_grad)):
        raise ValueError(f"{owner}: cache_w, cache_value and cache_grad must all be set "
                         "or all be None")
    if value is None:
        return
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(value):
        raise ValueError(f"{owner}.cache_value must be a finite number or None, "
                         f"got {obj.cache_value!r}")  # type: ignore[attr-defined]
    object.__setattr__(obj, "cache_value", float(value))
    if cache_w.shape != cache_grad.shape:
        raise ValueError(f"{owner}: cache_w and cache_grad differ in shape")


def _check_counter(obj: object, name: str) -> None:
    """Require a non-negative integer field and store it as a Python int."""
    value = getattr(obj, name)
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{type(obj).__name__}.{name} must be an integer >= 0, got {value!r}")
    object.__setattr__(obj, name, int(value))


@dataclass(frozen=True, kw_only=True)
class MomentumConfig:
    """Hyper-parameters of heavy-ball (Polyak 1964) or Nesterov (Sutskever et al. 2013) momentum."""

    learning_rate: float = 0.1  # fixed step size lr > 0
    momentum: float = 0.9  # mu in [0, 1)
    nesterov: bool = False  # Nesterov's accelerated gradient instead of the heavy ball

    def __post_init__(self) -> None:
        require(self, "learning_rate", "> 0")
        require(self, "momentum", "[0, 1)")
        require(self, "nesterov", "bool")


@dataclass(frozen=True, eq=False)
class MomentumState(SolverState):
    """Step count and velocity ``v`` (None before the first step: zero velocity).

    ``velocity`` may be given as a list (a JSON round trip): it becomes a float array.
    """

    iteration: int = 0  # steps taken so far
    velocity: np.ndarray | None = None  # v after the last step, a 1-D float vector

    def __post_init__(self) -> None:
        _check_counter(self, "iteration")
        object.__setattr__(self, "velocity",
                           _float_array(self.velocity, type(self).__name__, "velocity"))
        super().__post_init__()


@dataclass(frozen=True)
class FixedStepInfo:
    """What one fixed-rate step did (loss and ``|g|`` at the old weights).

    Subclasses add their own diagnostics as fields; :meth:`record` appends them
    to the fields every method's step writes.
    """

    loss: float
    grad_norm: float
    step_size: float  # the learning rate

    @property
    def new_loss(self) -> None:
        """A fixed-rate step does not evaluate the loss at the new weights."""
        return None

    @property
    def stalled(self) -> bool:
        """A fixed step never stalls: it always moves (or raises on NaN/Inf)."""
        return False

    def record(self) -> dict[str, Any]:
        """Metrics of this step, in the same fields as a Newton step's, then its own."""
        own = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("loss", "grad_norm", "step_size")}
        return {"loss": self.loss, "new_loss": None, "grad_norm": self.grad_norm,
                "cg_iters": 0, "cg_reason": None, "step_size": self.step_size,
                "fallback": False, "linesearch_trials": 0, "damping": None, **own}


@dataclass(frozen=True)
class MomentumInfo(FixedStepInfo):
    """What one momentum step did."""

    velocity_norm: float  # |v| after the step


class Momentum:
    """Heavy-ball (Polyak 1964) or Nesterov (Sutskever et al. 2013) momentum, fixed rate."""

    name: ClassVar[str] = "momentum"
    config_class: ClassVar[type] = MomentumConfig
    state_class: ClassVar[type[SolverState]] = MomentumState

    def __init__(self, config: MomentumConfig | None = None) -> None:
        self.config = MomentumConfig() if config is None else config

    def init(self, w: np.ndarray) -> MomentumState:
        """Zero velocity (stored as None until the first step)."""
        return MomentumState()

    def step(self, problem: Problem, w: np.ndarray, state: MomentumState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, MomentumState, MomentumInfo]:
        """One momentum step from ``w``; raises ``FloatingPointError`` on NaN/Inf weights."""
        w = np.asarray(w)
        loss, g = check_value_and_grad(problem, w, value_and_grad, "momentum")
        lr, mu = float(self.config.learning_rate), float(self.config.momentum)
        v = state.velocity
        if v is not None and v.shape != w.shape:
            raise ValueError(f"momentum: velocity has shape {v.shape}, weights have shape "
                             f"{w.shape}")
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            v_new = -lr * g if v is None else mu * v - lr * g
            new_w = w + mu * v_new - lr * g if self.config.nesterov else w + v_new
        if not (np.all(np.isfinite(new_w)) and np.all(np.isfinite(v_new))):
            raise FloatingPointError(
                f"momentum: the step with learning_rate={lr!r}, momentum={mu!r} gives NaN/Inf "
                "weights")
        info = MomentumInfo(loss, float(np.linalg.norm(g)), lr, float(np.linalg.norm(v_new)))
        return new_w, state.take(iteration=state.iteration + 1, velocity=v_new), info
