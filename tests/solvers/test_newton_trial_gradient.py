"""Newton-CG's ``trial_gradient``: the accepted trial's gradient starts the next step.

The iterates must be bitwise those without the option; what changes is the
calls: one ``value_and_grad`` at the first trial replaces the ``value`` there
and the next step's ``value_and_grad`` whenever the full step is accepted.
"""

import numpy as np
import pytest

from mpinewton.solvers import NewtonConfig, NewtonState, newton_step
from mpinewton.solvers.loop import Phase, run
from mpinewton.solvers.newton import NewtonCG

from .problems import Rosenbrock, Spy

W0 = np.array([-1.2, 1.0] * 5)  # scipy's standard start of Rosenbrock, n = 10


def _path(trial_gradient: bool, iters: int = 40):
    """Weights, step sizes and calls of ``iters`` Levenberg-Marquardt Newton-CG steps."""
    config = NewtonConfig(damping=1e-2, damping_rule="levenberg_marquardt", cg_rtol=0.1,
                          trial_gradient=trial_gradient)
    spy, state, w = Spy(Rosenbrock()), NewtonState(), W0.copy()
    path, steps = [w], []
    for _ in range(iters):
        w, state, info = newton_step(spy, w, state, config)
        path.append(w)
        steps.append(info.step.step)
    return path, steps, spy, state


def test_iterates_are_bitwise_those_without_it_and_a_pass_is_saved_per_full_step():
    on, steps, spy_on, _ = _path(True)
    off, steps_off, spy_off, _ = _path(False)
    assert steps == steps_off
    for a, b in zip(on, off, strict=True):
        assert a.tobytes() == b.tobytes()
    full = sum(1 for s in steps if s == 1.0)
    cut = len(steps) - full
    assert 0 < cut < full  # the path has both kinds of step, so both branches are checked
    # Without: a value_and_grad per step, a value per trial. With: the first trial of
    # every step is a value_and_grad, and a step after an accepted full step takes none.
    after_full = sum(1 for s in steps[:-1] if s == 1.0)
    assert len(spy_off.vg_calls) == len(steps)
    assert len(spy_on.vg_calls) == len(steps) + (len(steps) - after_full)
    assert len(spy_on.value_calls) == len(spy_off.value_calls) - len(steps)
    # In passes over the data: a forward pass saved per step after a full step.
    assert len(spy_on.vg_calls) + len(spy_on.value_calls) \
        == len(spy_off.vg_calls) + len(spy_off.value_calls) - after_full
    # It walks to Rosenbrock's local minimum near (-1, 1, ..., 1) (value 3.99).
    assert np.linalg.norm(Rosenbrock().value_and_grad(on[-1])[1]) < 1e-6


def test_the_kept_gradient_is_the_gradient_at_the_new_weights():
    config = NewtonConfig(damping=1e-2, damping_rule="levenberg_marquardt",
                          trial_gradient=True)
    w, state, info = newton_step(Rosenbrock(), W0, NewtonState(), config)
    assert info.step.step == 1.0 and state.cache_w.tobytes() == w.tobytes()
    value, grad = Rosenbrock().value_and_grad(w)
    assert state.cache_value == value and np.array_equal(state.cache_grad, grad)
    assert NewtonCG.cached_value_and_grad(w, state) == (value, state.cache_grad)
    assert NewtonCG.cached_value_and_grad(w + 1e-16 * np.abs(w).max(), state) is None


def test_state_round_trip_and_checks():
    _, _, _, state = _path(True, iters=3)
    assert state.cache_w is not None
    assert NewtonState.from_dict(state.to_dict()) == state
    plain = NewtonState(iteration=3)
    assert not {"cache_w", "cache_value", "cache_grad"} & set(plain.to_dict())
    with pytest.raises(ValueError, match="must all be set or all be None"):
        NewtonState(cache_w=np.zeros(2), cache_grad=np.zeros(2))
    with pytest.raises(ValueError, match="differ in shape"):
        NewtonState(cache_w=np.zeros(2), cache_value=1.0, cache_grad=np.zeros(3))
    with pytest.raises(ValueError, match="cache_value"):
        NewtonState(cache_w=np.zeros(2), cache_value=float("nan"), cache_grad=np.zeros(2))


def test_on_fresh_batches_the_loop_passes_each_batchs_own_gradient():
    """With a new batch per step, the kept gradient (of the last batch) is never used."""
    batches = iter(range(100))

    class Batches:
        """Rosenbrock shifted by the batch number: every step a different function."""

        def __init__(self):
            self.shift, self.inner = 0.0, Rosenbrock()

        def value(self, w):
            return self.inner.value(w) + self.shift

        def value_and_grad(self, w):
            value, grad = self.inner.value_and_grad(w)
            return value + self.shift, grad

        def hvp(self, w, v):
            return self.inner.hvp(w, v)

    class Hooks:
        def __init__(self, problem):
            self.problem, self.w, self.losses = problem, W0, []

        def before_step(self, k, phase):
            self.problem.shift = float(next(batches))

        def after_step(self, k, phase, w, state, info):
            # c(w_k) on this step's batch, where a kept value would be on the last one's
            self.losses.append((info.loss, Rosenbrock().value(self.w) + self.problem.shift))
            self.w = w
            return w, False

    problem = Batches()
    hooks = Hooks(problem)
    config = NewtonConfig(damping=1e-2, damping_rule="levenberg_marquardt", trial_gradient=True)
    result = run(problem, W0, [Phase("newton", NewtonCG(config), 5)], fresh_batches=True,
                 hooks=hooks)
    assert result.iteration == 5 and len(hooks.losses) == 5
    for loss, expected in hooks.losses:
        assert loss == expected
