import math

import numpy as np
import pytest

from mpinewton.solvers import gd_armijo_step, gd_step

from .problems import Quadratic, Rosenbrock, Spy, spd_matrix


def test_gd_step_is_exact_update():
    a = spd_matrix(6, 1e2, 0)
    prob = Quadratic(a, np.ones(6))
    w = np.linspace(-1, 1, 6)
    loss, g = prob.value_and_grad(w)
    new_w, l0, gn = gd_step(prob, w, 0.01)
    np.testing.assert_array_equal(new_w, w - 0.01 * g)
    assert l0 == loss and gn == np.linalg.norm(g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gd_matches_closed_form_on_quadratic(seed):
    # w_k - w* = (I - lr A)^k (w_0 - w*)
    a = spd_matrix(8, 1e2, seed)
    b = np.random.default_rng(seed).standard_normal(8)
    prob = Quadratic(a, b)
    lr = 1.0 / 1e2
    w_star = np.linalg.solve(a, b)
    w0 = np.zeros(8)
    w = w0
    for _ in range(50):
        w, _, _ = gd_step(prob, w, lr)
    expected = w_star + np.linalg.matrix_power(np.eye(8) - lr * a, 50) @ (w0 - w_star)
    np.testing.assert_allclose(w, expected, rtol=1e-10, atol=1e-12)


def test_gd_step_reuses_value_and_grad():
    spy = Spy(Rosenbrock())
    w = np.array([-1.2, 1.0])
    vg = spy.inner.value_and_grad(w)
    gd_step(spy, w, 1e-3, value_and_grad=vg)
    assert spy.vg_calls == []


def test_gd_step_refuses_non_finite_weights():
    prob = Quadratic(np.eye(2), np.array([-10.0, 0.0]))
    with pytest.raises(FloatingPointError, match="learning_rate"):
        gd_step(prob, np.zeros(2), 1e308)
    with pytest.raises(ValueError, match="-0.5"):
        gd_step(prob, np.zeros(2), -0.5)


@pytest.mark.parametrize("seed", range(4))
def test_gd_armijo_step_decreases_and_satisfies_armijo(seed):
    w = np.random.default_rng(seed).uniform(-2, 2, 4)
    prob = Rosenbrock()
    loss, g = prob.value_and_grad(w)
    new_w, l0, gn, ls = gd_armijo_step(prob, w, max_trials=60)
    assert ls.success and l0 == loss and gn == pytest.approx(np.linalg.norm(g))
    np.testing.assert_array_equal(new_w, w - ls.step * g)
    assert prob.value(new_w) - loss <= ls.step * 1e-4 * -(g @ g)
    assert ls.value == prob.value(new_w)


def test_gd_armijo_step_at_zero_gradient_and_on_failure():
    prob = Quadratic(np.eye(2), np.zeros(2))
    w = np.zeros(2)
    new_w, _, gn, ls = gd_armijo_step(prob, w)
    assert gn == 0.0 and ls.trials == 0 and np.array_equal(new_w, w)

    class Flat(Quadratic):
        def value_and_grad(self, w):
            return 1.0, self.a @ w - self.b

        def value(self, w):
            return math.inf  # every trial rejected

    new_w, _, _, ls = gd_armijo_step(Flat(np.eye(2), np.ones(2)), w, max_trials=4)
    assert not ls.success and ls.trials == 4 and np.array_equal(new_w, w)
