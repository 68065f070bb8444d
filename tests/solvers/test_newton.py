import json
import math

import numpy as np
import pytest
import scipy.optimize as so

from mpinewton.solvers import (
    CGReason,
    NewtonConfig,
    NewtonState,
    StepInfo,
    minimize,
    newton_step,
    pure_newton,
)

from .problems import DoubleWell, Quadratic, Rosenbrock, Spy, SqrtOnePlusSquare, spd_matrix


def trust_ncg(x0):
    return so.minimize(
        so.rosen,
        x0,
        method="trust-ncg",
        jac=so.rosen_der,
        hessp=so.rosen_hess_prod,
        options={"gtol": 1e-8, "maxiter": 2000},
    )


# ---------------------------------------------------------------- Rosenbrock


@pytest.mark.parametrize("warm_start", ["zero", "previous", "weights"])
@pytest.mark.parametrize(
    "x0",
    [np.array([-1.2, 1.0]), np.full(100, -1.0)],
    ids=["n2-standard", "n100-minus-ones"],
)
def test_rosenbrock_matches_trust_ncg(x0, warm_start):
    res = minimize(Rosenbrock(), x0, config=NewtonConfig(warm_start=warm_start), max_iter=500)
    ref = trust_ncg(x0)
    assert res.converged, res.message
    assert res.grad_norm <= 1e-8
    assert np.linalg.norm(so.rosen_der(res.x)) <= 1e-8
    assert ref.success
    ones = np.ones_like(x0)
    np.testing.assert_allclose(res.x, ones, atol=1e-6)
    np.testing.assert_allclose(ref.x, ones, atol=1e-6)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-6)
    losses = [h.loss for h in res.history] + [res.fun]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))  # monotone (Armijo)


def test_rosenbrock_n100_standard_start_reaches_a_strict_local_minimiser():
    # From [-1.2, 1] * 50 a monotone line-search Newton method is drawn to the
    # other local minimiser of the chained Rosenbrock function (x_1 ~ -0.993,
    # c ~ 3.9866) while trust-ncg reaches all ones.  At c* ~ 4 float64 round-off
    # limits what Armijo can certify to |g| ~ 1e-7, so accept either stop.
    x0 = np.array([-1.2, 1.0] * 50)
    res = minimize(Rosenbrock(), x0, max_iter=500, gtol=1e-8)
    assert res.converged or not res.history[-1].step.success, res.message
    g = so.rosen_der(res.x)
    assert np.linalg.norm(g) <= 1e-6
    assert np.linalg.eigvalsh(so.rosen_hess(res.x)).min() > 0.1  # strict local minimiser
    assert so.rosen(res.x) < so.rosen(x0)
    # an independent solver started at our point stays there
    ref = trust_ncg(res.x)
    np.testing.assert_allclose(ref.x, res.x, atol=1e-6)
    assert trust_ncg(x0).x == pytest.approx(np.ones(100), abs=1e-6)


# ------------------------------------------------- thesis counterexample 2.3


def test_pure_newton_diverges_on_sqrt_counterexample():
    path = pure_newton(SqrtOnePlusSquare(), np.array([1.5]), iters=5)
    w = [float(p[0]) for p in path]
    assert len(w) == 6
    for k in range(5):
        assert w[k + 1] == pytest.approx(-(w[k] ** 3), rel=1e-12)
        assert abs(w[k + 1]) > abs(w[k])
    assert abs(w[-1]) > 1e13


def test_pure_newton_converges_inside_unit_interval():
    path = pure_newton(SqrtOnePlusSquare(), np.array([0.5]), iters=10)
    assert abs(path[-1][0]) < 1e-20  # w -> -w^3, cubic convergence; stops at g = 0


def test_globalised_newton_converges_on_sqrt_counterexample():
    res = minimize(SqrtOnePlusSquare(), np.array([1.5]), max_iter=50)
    assert res.converged, res.message
    assert abs(res.x[0]) <= 1e-8
    first = res.history[0]
    # the Hessian is positive: no fallback; Armijo halves the Newton step once:
    # c(1.5 - 4.875) > c(1.5), c(1.5 - 0.5 * 4.875) = c(-0.9375) passes
    assert not any(h.fallback for h in res.history)
    assert first.step.step == 0.5 and first.step.trials == 2
    assert first.direction_dot_grad == pytest.approx(-(1.5 / math.sqrt(3.25)) * 1.5 * 3.25)
    assert all(h.new_loss < h.loss for h in res.history)


# ------------------------------------------------------------------ fallback


def test_negative_curvature_triggers_steepest_descent_fallback():
    prob = DoubleWell()
    w = np.array([0.1, 0.01])
    loss, g = prob.value_and_grad(w)
    assert g @ prob.hvp(w, g) < 0  # negative curvature along -g: CG stops at x = 0
    new_w, state, info = newton_step(prob, w, NewtonState(), NewtonConfig())
    assert info.cg.reason is CGReason.NEGATIVE_CURVATURE and info.cg.iterations == 1
    assert info.fallback and state.fallbacks == 1
    assert info.cg_direction_dot_grad == 0.0
    assert info.direction_dot_grad == pytest.approx(-(g @ g))
    np.testing.assert_allclose(new_w, w - info.step.step * g, rtol=1e-15)
    assert info.new_loss < info.loss == loss
    assert info.new_loss == pytest.approx(prob.value(new_w))
    assert state.cg_warm is None


def test_descent_threshold_forces_fallback():
    a = spd_matrix(6, 10.0, 0)
    prob = Quadratic(a, np.ones(6))
    w = np.zeros(6)
    _, _, ok = newton_step(prob, w, NewtonState(), NewtonConfig(cg_rtol=1e-10))
    assert not ok.fallback
    gs = ok.cg_direction_dot_grad
    assert gs < 0
    cfg = NewtonConfig(cg_rtol=1e-10, descent_threshold=2 * gs)  # g.s > T now
    _, _, info = newton_step(prob, w, NewtonState(), cfg)
    assert info.fallback and info.cg.reason is CGReason.CONVERGED
    assert info.cg_direction_dot_grad == gs
    assert info.new_loss < info.loss


def test_ascent_direction_from_warm_start_triggers_fallback():
    a = np.diag([1.0, 100.0])
    prob = Quadratic(a, np.array([1.0, 1.0]))
    w = np.array([0.3, -0.2])
    _, g = prob.value_and_grad(w)
    x0 = 1e3 * g  # ascent guess for (A) s = -g
    # one CG step from x0, by hand, is still an ascent direction
    b = -g
    r0 = b - a @ x0
    x1 = x0 + (r0 @ r0) / (r0 @ a @ r0) * r0
    assert g @ x1 > 0
    state = NewtonState(cg_warm=x0)
    cfg = NewtonConfig(warm_start="previous", cg_max_iter=1, cg_rtol=1e-12)
    new_w, new_state, info = newton_step(prob, w, state, cfg)
    np.testing.assert_allclose(info.cg.x, x1, rtol=1e-12)
    assert info.cg.reason is CGReason.MAX_ITER
    assert info.fallback and info.cg_direction_dot_grad > 0
    assert info.new_loss < info.loss
    assert new_state.cg_warm is None


def test_nan_hessian_product_triggers_fallback():
    class NanHvp(Quadratic):
        def hvp(self, w, v):
            return np.full_like(v, np.nan)

    prob = NanHvp(np.eye(3), np.ones(3))
    new_w, state, info = newton_step(prob, np.zeros(3), NewtonState(), NewtonConfig())
    assert info.cg.reason is CGReason.NAN_OR_INF and info.fallback
    assert np.all(np.isfinite(new_w))
    assert info.new_loss < info.loss


def test_minimize_escapes_saddle_region():
    res = minimize(DoubleWell(), np.array([0.1, 0.01]), max_iter=100)
    assert res.converged, res.message
    assert res.history[0].fallback
    np.testing.assert_allclose(np.abs(res.x), [1.0, 0.0], atol=1e-8)
    assert np.linalg.eigvalsh(np.diag([3 * res.x[0] ** 2 - 1, 1.0])).min() > 0


# ---------------------------------------------------------------- warm start


def _first_hvp(warm_start, state, w=None):
    a = spd_matrix(5, 10.0, 1)
    spy = Spy(Quadratic(a, np.arange(1.0, 6.0)))
    w = np.array([0.5, -1.0, 2.0, 0.0, 1.0]) if w is None else w
    _, g = spy.inner.value_and_grad(w)
    _, new_state, info = newton_step(spy, w, state, NewtonConfig(warm_start=warm_start))
    return spy, g, w, new_state, info


def test_warm_start_previous_reuses_cg_warm():
    warm = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    spy, g, _, new_state, info = _first_hvp("previous", NewtonState(cg_warm=warm))
    np.testing.assert_array_equal(spy.hvp_calls[0], warm)
    assert info.cg.matvecs == info.cg.iterations + 1 == len(spy.hvp_calls)
    assert not info.fallback
    np.testing.assert_array_equal(new_state.cg_warm, info.cg.x)


def test_warm_start_previous_ignores_shape_mismatch_and_none():
    for state in (NewtonState(), NewtonState(cg_warm=np.ones(3))):
        spy, g, *_, info = _first_hvp("previous", state)
        np.testing.assert_array_equal(spy.hvp_calls[0], -g)  # p0 = r0 = -g
        assert info.cg.matvecs == info.cg.iterations


def test_warm_start_weights_uses_normalised_weights():
    spy, g, w, _, info = _first_hvp("weights", NewtonState(cg_warm=np.ones(5)))
    np.testing.assert_array_equal(spy.hvp_calls[0], w / np.linalg.norm(w))
    assert info.cg.matvecs == info.cg.iterations + 1
    spy0, g0, *_ = _first_hvp("weights", NewtonState(), w=np.zeros(5))
    np.testing.assert_array_equal(spy0.hvp_calls[0], -g0)


def test_warm_start_zero_ignores_state():
    spy, g, *_, info = _first_hvp("zero", NewtonState(cg_warm=np.ones(5)))
    np.testing.assert_array_equal(spy.hvp_calls[0], -g)
    assert info.cg.matvecs == info.cg.iterations


# --------------------------------------------------------- step rules, safety


def test_fixed_step_rule_takes_exact_step():
    a = spd_matrix(8, 1e2, 2)
    prob = Quadratic(a, np.ones(8))
    w = np.zeros(8)
    cfg = NewtonConfig(step_rule="fixed", learning_rate=0.7, cg_rtol=1e-12)
    spy = Spy(prob)
    new_w, _, info = newton_step(spy, w, NewtonState(), cfg)
    np.testing.assert_array_equal(new_w, w + 0.7 * info.cg.x)
    np.testing.assert_allclose(info.cg.x, np.linalg.solve(a, np.ones(8)), rtol=1e-9)
    assert info.step.step == 0.7 and info.step.trials == 1 == len(spy.value_calls)
    assert info.new_loss == prob.value(new_w)


def test_damping_solves_the_damped_newton_equation():
    a = spd_matrix(8, 1e2, 3)
    prob = Quadratic(a, np.ones(8))
    cfg = NewtonConfig(damping=0.5, cg_rtol=1e-12)
    _, _, info = newton_step(prob, np.zeros(8), NewtonState(), cfg)
    np.testing.assert_allclose(
        info.cg.x, np.linalg.solve(a + 0.5 * np.eye(8), np.ones(8)), rtol=1e-9
    )


def test_nan_weights_are_never_accepted():
    class Overflowing(Quadratic):
        def value(self, w):
            return math.nan if np.abs(w).max() > 10 else super().value(w)

    prob = Overflowing(np.eye(2) * 1e-3, np.ones(2))  # Newton step goes to w = 1000
    state = NewtonState(cg_warm=np.ones(2))
    w = np.zeros(2)
    for cfg in (
        NewtonConfig(step_rule="fixed", cg_rtol=1e-12),
        NewtonConfig(armijo_max_trials=3, cg_rtol=1e-12),
    ):
        new_w, new_state, info = newton_step(prob, w, state, cfg)
        np.testing.assert_array_equal(new_w, w)
        assert not info.step.success and info.step.step == 0.0
        assert info.new_loss == info.loss
        assert new_state.failed_linesearches == 1 and new_state.cg_warm is None


def test_inf_trial_weights_are_not_evaluated():
    class Linear:
        # c(w) = -w with a tiny positive curvature model: Newton step s = 1e308
        def value(self, w):
            return float(-w[0])

        def value_and_grad(self, w):
            return self.value(w), np.array([-1.0])

        def hvp(self, w, v):
            return 1e-308 * v

    spy = Spy(Linear())
    w = np.array([1e308])
    new_w, _, info = newton_step(spy, w, NewtonState(), NewtonConfig())
    assert info.cg.reason is CGReason.CONVERGED and info.cg.x[0] == pytest.approx(1e308)
    # sigma = 1 gives w = inf: rejected without evaluation; sigma = 0.5 accepted
    assert info.step.trials == 2 and info.step.step == 0.5
    assert len(spy.value_calls) == 1 and spy.value_calls[0][0] == pytest.approx(1.5e308)
    assert np.all(np.isfinite(new_w))


def test_zero_gradient_takes_no_step():
    spy = Spy(Quadratic(np.eye(3), np.zeros(3)))
    w = np.zeros(3)
    new_w, state, info = newton_step(spy, w, NewtonState(), NewtonConfig())
    np.testing.assert_array_equal(new_w, w)
    assert spy.hvp_calls == [] and spy.value_calls == []
    assert info.cg is None and info.step.success and state.iteration == 1


def test_value_and_grad_is_reused():
    spy = Spy(Rosenbrock())
    w = np.array([-1.2, 1.0])
    vg = spy.inner.value_and_grad(w)
    _, _, info = newton_step(spy, w, NewtonState(), NewtonConfig(), value_and_grad=vg)
    assert spy.vg_calls == []
    assert info.loss == vg[0]


def test_non_finite_loss_is_an_error():
    class Bad(Quadratic):
        def value_and_grad(self, w):
            return math.inf, np.zeros_like(w)

    with pytest.raises(FloatingPointError, match="inf"):
        newton_step(Bad(np.eye(2), np.ones(2)), np.zeros(2), NewtonState(), NewtonConfig())


def test_newton_step_is_deterministic():
    w = np.array([-1.2, 1.0] * 5)
    cfg = NewtonConfig(warm_start="weights")
    a = newton_step(Rosenbrock(), w, NewtonState(), cfg)
    b = newton_step(Rosenbrock(), w.copy(), NewtonState(), cfg)
    assert a[0].tobytes() == b[0].tobytes()
    assert a[1] == b[1]
    assert a[2].cg.x.tobytes() == b[2].cg.x.tobytes()


def test_state_counters_add_up():
    res = minimize(Rosenbrock(), np.array([-1.2, 1.0]), max_iter=200)
    st = res.state
    assert st.iteration == res.iterations == len(res.history)
    assert st.total_cg_iters == sum(h.cg.iterations for h in res.history)
    assert st.total_matvecs == sum(h.cg.matvecs for h in res.history)
    assert st.fallbacks == sum(h.fallback for h in res.history)
    assert st.failed_linesearches == sum(not h.step.success for h in res.history)
    assert all(isinstance(h, StepInfo) for h in res.history)


def test_minimize_pretraining_and_callback():
    seen = []

    def cb(w, state, info):
        seen.append(state.iteration)
        return state.iteration == 2

    res = minimize(
        Rosenbrock(), np.array([-1.2, 1.0]), pretrain_iters=3, pretrain_lr=1e-3, callback=cb
    )
    assert len(res.pretrain_history) == 3 and seen == [1, 2]
    assert res.iterations == 2 and not res.converged and "callback" in res.message
    w = np.array([-1.2, 1.0])
    for loss, gnorm in res.pretrain_history:
        assert loss == so.rosen(w) and gnorm == np.linalg.norm(so.rosen_der(w))
        w = w - 1e-3 * so.rosen_der(w)
    assert res.history[0].loss == so.rosen(w)


# ----------------------------------------------------------- config and state


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("damping", -1e-3),
        ("damping", math.inf),
        ("cg_rtol", -0.1),
        ("cg_atol", math.nan),
        ("cg_max_iter", 0),
        ("cg_max_iter", 2.5),
        ("cg_scale_tol_sqrt_n", "yes"),
        ("warm_start", "random"),
        ("descent_threshold", 1e-3),
        ("descent_threshold", math.nan),
        ("step_rule", "wolfe"),
        ("armijo_beta", 1.0),
        ("armijo_gamma", 0.0),
        ("armijo_max_trials", 0),
        ("learning_rate", 0.0),
        ("learning_rate", True),
    ],
)
def test_config_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        NewtonConfig(**{field: value})
    msg = str(err.value)
    assert f"NewtonConfig.{field}" in msg and repr(value) in msg


def test_config_defaults_and_keyword_only():
    cfg = NewtonConfig()
    assert (cfg.cg_rtol, cfg.cg_max_iter, cfg.warm_start, cfg.step_rule) == (
        1e-2,
        50,
        "previous",
        "armijo",
    )
    assert NewtonConfig(descent_threshold=-math.inf).descent_threshold == -math.inf
    with pytest.raises(TypeError):
        NewtonConfig(0.1)  # type: ignore[misc]


def test_state_round_trip():
    st = NewtonState(
        iteration=7,
        cg_warm=np.array([1.0, -2.5, 3e-300]),
        total_cg_iters=40,
        total_matvecs=47,
        fallbacks=2,
        failed_linesearches=1,
    )
    d = st.to_dict()
    assert NewtonState.from_dict(d) == st
    # JSON round trip (lists)
    j = json.loads(json.dumps({**d, "cg_warm": d["cg_warm"].tolist()}))
    back = NewtonState.from_dict(j)
    assert back == st and back.cg_warm.tobytes() == st.cg_warm.tobytes()
    assert NewtonState.from_dict(NewtonState().to_dict()) == NewtonState()
    assert NewtonState.from_dict({}) == NewtonState()
    assert st != NewtonState.from_dict({**d, "cg_warm": np.array([1.0, -2.5, 0.0])})
    # the dict is a copy: mutating it does not touch the state
    d["cg_warm"][0] = 99.0
    assert st.cg_warm[0] == 1.0
    with pytest.raises(ValueError):
        st.cg_warm[0] = 5.0  # read-only
    with pytest.raises(ValueError, match="bogus"):
        NewtonState.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="-1"):
        NewtonState(iteration=-1)
