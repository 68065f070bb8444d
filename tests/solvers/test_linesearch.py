import math

import numpy as np
import pytest
import scipy.optimize as so

from mpinewton.solvers import LineSearchResult, armijo, fixed_step

from .problems import Quadratic, spd_matrix


class CountingPhi:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.sigmas: list[float] = []

    def __call__(self, sigma):
        self.sigmas.append(sigma)
        return self.fn(sigma)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("gamma", "accept_unit"), [(1e-4, True), (0.49, True), (0.51, False)])
def test_newton_direction_on_quadratic(seed, gamma, accept_unit):
    # c(w+s) - c(w) = 0.5 g.s exactly for the Newton step s = -A^{-1} g, so sigma = 1
    # passes the Armijo test iff gamma <= 1/2.
    n = 10
    a = spd_matrix(n, 1e2, seed)
    rng = np.random.default_rng(seed)
    prob = Quadratic(a, rng.standard_normal(n))
    w = rng.standard_normal(n)
    f0, g = prob.value_and_grad(w)
    s = -np.linalg.solve(a, g)
    phi = CountingPhi(lambda t: prob.value(w + t * s))
    res = armijo(phi, f0, float(g @ s), gamma=gamma)
    assert res.success
    if accept_unit:
        assert (res.step, res.trials) == (1.0, 1)
        assert res.value == pytest.approx(prob.value(np.linalg.solve(a, prob.b)), rel=1e-10)
    else:
        assert res.step == 0.5 and res.trials == 2
    assert phi.sigmas == [1.0, 0.5][: res.trials]


@pytest.mark.parametrize(
    ("beta", "gamma", "expected_step", "expected_trials"),
    [
        # phi(t) = (1 - 10 t)^2, phi0 = 1, phi'(0) = -20.  The Armijo test
        # 100 t^2 - 20 t <= -20 gamma t  <=>  t <= 0.2 (1 - gamma).
        (0.5, 1e-4, 0.125, 4),  # 1, .5, .25 rejected; .125 <= .19998
        (0.3, 1e-4, 0.09, 3),  # 1, .3 rejected; .09
        (0.5, 0.5, 0.0625, 5),  # bound 0.1: 1, .5, .25, .125 rejected
        (0.9, 1e-4, 0.9**16, 17),  # 0.9^15 = 0.2059 > 0.19998 >= 0.9^16 = 0.1853
    ],
)
def test_backtracking_count_by_hand(beta, gamma, expected_step, expected_trials):
    phi = CountingPhi(lambda t: (1.0 - 10.0 * t) ** 2)
    res = armijo(phi, 1.0, -20.0, beta=beta, gamma=gamma, max_trials=30)
    assert res.success
    assert res.trials == expected_trials == len(phi.sigmas)
    assert res.step == pytest.approx(expected_step, rel=1e-14)
    assert res.value == pytest.approx((1.0 - 10.0 * expected_step) ** 2, rel=1e-14)
    np.testing.assert_allclose(phi.sigmas, beta ** np.arange(expected_trials), rtol=1e-14)


def test_sigma0_scales_the_sequence():
    res = armijo(lambda t: (1.0 - 10.0 * t) ** 2, 1.0, -20.0, sigma0=0.4)
    assert (res.step, res.trials) == (0.1, 3)  # 0.4, 0.2 rejected; 0.1 accepted


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_are_rejected(bad):
    # phi(t) = 1 - t for small t would pass everywhere, but is NaN/Inf for t > 0.3
    phi = CountingPhi(lambda t: bad if t > 0.3 else 1.0 - t)
    res = armijo(phi, 1.0, -1.0)
    assert res.success and res.step == 0.25 and res.trials == 3
    assert res.value == 0.75


def test_failure_returns_zero_step_and_phi0():
    phi = CountingPhi(lambda t: 2.0)  # never a decrease
    res = armijo(phi, 1.0, -1.0, max_trials=7)
    assert res == LineSearchResult(step=0.0, value=1.0, trials=7, success=False)
    assert len(phi.sigmas) == 7


@pytest.mark.parametrize("seed", range(6))
def test_accepted_point_satisfies_and_previous_violates_armijo(seed):
    # steepest descent on Rosenbrock from random points: independent check of the test
    rng = np.random.default_rng(seed)
    w = rng.uniform(-2, 2, size=5)
    f0, g = so.rosen(w), so.rosen_der(w)
    s = -g
    beta, gamma = 0.5, 1e-4
    res = armijo(
        lambda t: so.rosen(w + t * s), f0, float(g @ s), beta=beta, gamma=gamma, max_trials=60
    )
    assert res.success
    assert so.rosen(w + res.step * s) - f0 <= res.step * gamma * (g @ s)
    assert res.step == beta ** (res.trials - 1)
    if res.trials > 1:
        prev = res.step / beta
        assert so.rosen(w + prev * s) - f0 > prev * gamma * (g @ s)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"beta": 1.0}, "beta"),
        ({"beta": 0.0}, "beta"),
        ({"gamma": 1.5}, "1.5"),
        ({"gamma": -0.1}, "-0.1"),
        ({"max_trials": 0}, "max_trials"),
        ({"sigma0": -1.0}, "-1.0"),
    ],
)
def test_invalid_parameters(kwargs, needle):
    with pytest.raises(ValueError) as err:
        armijo(lambda t: 0.0, 1.0, -1.0, **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("derphi0", [0.0, 0.5, math.nan])
def test_non_descent_direction_is_an_error(derphi0):
    with pytest.raises(ValueError) as err:
        armijo(lambda t: 0.0, 1.0, derphi0)
    assert "derphi0" in str(err.value) and repr(derphi0) in str(err.value)


def test_fixed_step():
    phi = CountingPhi(lambda t: 3.0 - t)
    res = fixed_step(phi, 0.25)
    assert res == LineSearchResult(step=0.25, value=2.75, trials=1, success=True)
    assert phi.sigmas == [0.25]
    blind = fixed_step(None, 0.1)
    assert blind.step == 0.1 and blind.trials == 0 and blind.success and math.isnan(blind.value)
    bad = fixed_step(lambda t: math.nan, 1.0)
    assert not bad.success and bad.trials == 1
    with pytest.raises(ValueError, match="-1.0"):
        fixed_step(None, -1.0)
