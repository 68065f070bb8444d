"""Momentum, Adam and L-BFGS against independent references (papers' formulas, scipy)."""

import json
import math

import numpy as np
import pytest
import scipy.optimize as so

from mpinewton.solvers.adam import Adam, AdamConfig, AdamState
from mpinewton.solvers.base import ParameterError
from mpinewton.solvers.lbfgs import (
    CURVATURE_EPS,
    LBFGS,
    LBFGSConfig,
    LBFGSState,
    strong_wolfe,
    two_loop,
    update_memory,
)
from mpinewton.solvers.loop import LoopReason, Phase, run
from mpinewton.solvers.momentum import Momentum, MomentumConfig, MomentumState

from .problems import Quadratic, Rosenbrock, Spy, spd_matrix


def _quadratic(n=6, cond=50.0, seed=0):
    a = spd_matrix(n, cond, seed)
    b = np.random.default_rng(seed).standard_normal(n)
    return Quadratic(a, b)


def _steps(method, problem, w, k):
    state = method.init(w)
    path, infos = [w], []
    for _ in range(k):
        w, state, info = method.step(problem, w, state)
        path.append(w)
        infos.append(info)
    return path, state, infos


# ------------------------------------------------------------------ momentum


def test_heavy_ball_matches_polyak():
    prob = _quadratic()
    lr, mu = 0.02, 0.8
    w0 = np.linspace(-1, 1, 6)
    path, state, infos = _steps(Momentum(MomentumConfig(learning_rate=lr, momentum=mu)),
                                prob, w0, 12)
    # velocity form, bitwise
    w, v = w0, np.zeros(6)
    for k in range(12):
        v = mu * v - lr * (prob.a @ w - prob.b)
        w = w + v
        np.testing.assert_array_equal(path[k + 1], w)
    np.testing.assert_array_equal(state.velocity, v)
    # Polyak's two-step form w+ = w - lr g + mu (w - w-), to rounding
    ref = [w0, w0 - lr * (prob.a @ w0 - prob.b)]
    for _ in range(11):
        ref.append(ref[-1] - lr * (prob.a @ ref[-1] - prob.b) + mu * (ref[-1] - ref[-2]))
    np.testing.assert_allclose(np.array(path), np.array(ref), rtol=0, atol=1e-15)
    assert state.iteration == 12
    rec = infos[0].record()
    assert rec["loss"] == prob.value(w0) and rec["new_loss"] is None
    assert rec["step_size"] == lr and rec["fallback"] is False and rec["cg_iters"] == 0
    assert rec["grad_norm"] == np.linalg.norm(prob.a @ w0 - prob.b) and not infos[0].stalled


def test_nesterov_matches_sutskever():
    # Sutskever et al. 2013 eqs. 3-4: v+ = mu v - lr g(theta + mu v), theta+ = theta + v+.
    # The method iterates the look-ahead point w = theta + mu v.
    prob = _quadratic(seed=1)
    lr, mu = 0.02, 0.9
    w0 = np.linspace(-1, 1, 6)
    path, _, _ = _steps(Momentum(MomentumConfig(learning_rate=lr, momentum=mu, nesterov=True)),
                        prob, w0, 15)
    theta, v = w0.copy(), np.zeros(6)
    for k in range(15):
        v = mu * v - lr * (prob.a @ (theta + mu * v) - prob.b)
        theta = theta + v
        np.testing.assert_allclose(path[k + 1], theta + mu * v, rtol=0, atol=1e-15)


def test_momentum_reuses_value_and_grad_and_guards_non_finite():
    spy = Spy(_quadratic())
    w = np.ones(6)
    Momentum().step(spy, w, MomentumState(), value_and_grad=spy.inner.value_and_grad(w))
    assert spy.vg_calls == []
    prob = Quadratic(np.eye(2), np.array([-10.0, 0.0]))
    with pytest.raises(FloatingPointError, match="learning_rate"):
        Momentum(MomentumConfig(learning_rate=1e308)).step(prob, np.zeros(2), MomentumState())
    with pytest.raises(ValueError, match="shape"):
        Momentum().step(prob, np.zeros(2), MomentumState(velocity=np.zeros(3)))


# ------------------------------------------------------------------ Adam


def _adam_reference(prob, w, k, lr, b1, b2, eps):
    """Kingma & Ba 2015, Algorithm 1, line by line."""
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = [w]
    for t in range(1, k + 1):
        g = prob.a @ w - prob.b
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(w)
    return out, m, v


@pytest.mark.parametrize(("lr", "b1", "b2", "eps"),
                         [(1e-3, 0.9, 0.999, 1e-8), (0.05, 0.5, 0.9, 1e-3), (0.1, 0.0, 0.0, 1e-8)])
def test_adam_matches_algorithm_1(lr, b1, b2, eps):
    prob = _quadratic(seed=2)
    w0 = np.linspace(-1, 1, 6)
    cfg = AdamConfig(learning_rate=lr, beta1=b1, beta2=b2, epsilon=eps)
    path, state, infos = _steps(Adam(cfg), prob, w0, 20)
    ref, m, v = _adam_reference(prob, w0, 20, lr, b1, b2, eps)
    # to rounding: the step is computed in place (axpy, one scratch vector), in another
    # order of the same operations
    for got, want in zip(path, ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(state.m, m, rtol=1e-13)
    np.testing.assert_allclose(state.v, v, rtol=1e-13)
    assert state.iteration == 20
    assert infos[0].record()["step_size"] == lr and infos[0].new_loss is None


def test_adam_first_step_is_lr_sign_g():
    prob = _quadratic(seed=3)
    w0 = np.linspace(-1, 1, 6)
    g = prob.a @ w0 - prob.b
    w1, _, info = Adam(AdamConfig(learning_rate=0.01)).step(prob, w0, AdamState())
    np.testing.assert_allclose(w1 - w0, -0.01 * np.sign(g), rtol=1e-6)
    assert info.update_norm == pytest.approx(0.01 * math.sqrt(6), rel=1e-6)


def test_adam_guards_non_finite():
    class Push:
        def value_and_grad(self, w):
            return 0.0, np.array([-1.0])

    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        Adam(AdamConfig(learning_rate=1e308)).step(Push(), np.array([1.7e308]), AdamState())

    class Huge:
        def value_and_grad(self, w):
            return 0.0, np.array([1e300])

    with pytest.raises(FloatingPointError, match="moments"):  # g*g overflows v
        Adam().step(Huge(), np.zeros(1), AdamState())


# ------------------------------------------------------------------ L-BFGS: two-loop, memory


def _pairs(n, k, seed):
    rng = np.random.default_rng(seed)
    a = spd_matrix(n, 1e2, seed)
    S = rng.standard_normal((k, n))
    return S, S @ a  # y = A s: s.y > 0


@pytest.mark.parametrize(("k", "gamma"), [(0, 0.7), (1, 1.0), (3, 0.5), (6, 2.0)])
def test_two_loop_equals_explicit_bfgs_matrix(k, gamma):
    n = 8
    S, Y = _pairs(n, k, seed=k)
    g = np.random.default_rng(10 + k).standard_normal(n)
    H = gamma * np.eye(n)
    for s, y in zip(S, Y, strict=True):
        rho = 1.0 / (s @ y)
        V = np.eye(n) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)  # (I - rho s y^T) H (I - rho y s^T) + rho s s^T
    got = two_loop(g, S if k else None, Y if k else None, gamma)
    np.testing.assert_allclose(got, H @ g, rtol=1e-12, atol=1e-12 * np.linalg.norm(H @ g))


def test_update_memory_caps_and_skips():
    S, Y = None, None
    pairs = list(zip(*_pairs(5, 7, seed=4), strict=True))
    for s, y in pairs:
        S, Y, kept = update_memory(S, Y, s, y, 3)
        assert kept
    np.testing.assert_array_equal(S, np.array([p[0] for p in pairs[-3:]]))
    np.testing.assert_array_equal(Y, np.array([p[1] for p in pairs[-3:]]))
    s = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    for y in (-s, np.array([0.0, 1.0, 0, 0, 0]),
              np.array([1.0, 1e17, 0, 0, 0])):  # s.y <= 0, = 0, <= eps |s||y|
        assert s @ y <= CURVATURE_EPS * np.linalg.norm(s) * np.linalg.norm(y)
        S2, Y2, kept = update_memory(S, Y, s, y, 3)
        assert not kept and S2 is S and Y2 is Y


# ------------------------------------------------------------------ L-BFGS: line search


@pytest.mark.parametrize("alpha0", [1e-3, 1e-1, 1.0, 10.0, 1e3])
@pytest.mark.parametrize("beta", [2.0, 0.004])
def test_strong_wolfe_on_more_thuente_function(alpha0, beta):
    # Moré & Thuente 1994, test function 1: phi(a) = -a / (a^2 + beta), c1 = 1e-3, c2 = 0.1.
    def phi(a):
        return -a / (a * a + beta), (a * a - beta) / (a * a + beta) ** 2

    phi0, dphi0 = phi(0.0)
    ls = strong_wolfe(phi, phi0, dphi0, alpha0=alpha0, c1=1e-3, c2=0.1, max_trials=30)
    assert ls.success
    f, df = phi(ls.step)
    assert ls.value == f
    assert f <= phi0 + 1e-3 * ls.step * dphi0
    assert abs(df) <= 0.1 * abs(dphi0)


def test_strong_wolfe_rejects_non_finite_and_fails_cleanly():
    calls = []

    def phi(a):  # NaN beyond a = 0.3, else a convex parabola with minimum at 1
        calls.append(a)
        return (math.nan, math.nan) if a > 0.3 else ((a - 1) ** 2, 2 * (a - 1))

    ls = strong_wolfe(phi, 1.0, -2.0, alpha0=1.0, c2=0.9)
    assert ls.success and 0 < ls.step <= 0.3 and ls.trials == len(calls)

    ls = strong_wolfe(lambda a: (-a, -1.0), 0.0, -1.0, max_trials=5)  # unbounded below
    assert not ls.success and ls.step == 0.0 and ls.value == 0.0 and ls.trials == 5
    with pytest.raises(ValueError, match="dphi0"):
        strong_wolfe(lambda a: (0.0, 0.0), 0.0, 1.0)


def test_lbfgs_accepted_steps_satisfy_strong_wolfe():
    prob = Rosenbrock()
    cfg = LBFGSConfig(c1=1e-3, c2=0.5, memory=4)
    w = np.tile([-1.2, 1.0], 5)
    method, state = LBFGS(cfg), LBFGSState()
    checked = 0
    for _ in range(40):
        f, g = prob.value_and_grad(w)
        new_w, state, info = method.step(prob, w, state)
        s = new_w - w
        if info.step.success and info.step.trials:
            f_new, g_new = prob.value_and_grad(new_w)
            assert info.new_loss == f_new
            assert f_new <= f + cfg.c1 * (g @ s) + 1e-14 * abs(f)
            assert abs(g_new @ s) <= cfg.c2 * abs(g @ s) * (1 + 1e-10)
            checked += 1
        w = new_w
    assert checked == 40


# ------------------------------------------------------------------ L-BFGS: convergence


@pytest.mark.parametrize("n", [2, 10])
def test_lbfgs_solves_rosenbrock_like_scipy(n):
    w0 = np.tile([-1.2, 1.0], n // 2)
    spy = Spy(Rosenbrock())
    out = run(spy, w0, [Phase("lbfgs", LBFGS(LBFGSConfig(memory=10)), 500)], gtol=1e-8)
    assert out.reason is LoopReason.CONVERGED
    np.testing.assert_allclose(out.w, np.ones(n), rtol=0, atol=1e-6)
    st = out.states["lbfgs"]
    nfev = 1 + st.evaluations  # c(w0), then line-search trials (the loop's gtol checks aside)
    ref = so.minimize(so.rosen, w0, jac=so.rosen_der, method="L-BFGS-B",
                      options={"maxcor": 10, "gtol": 1e-8, "ftol": 0.0, "maxiter": 500})
    assert ref.success
    print(f"\nRosenbrock n={n}: lbfgs nit={out.iteration} nfev={nfev} "
          f"(spy calls incl. loop gtol checks {len(spy.vg_calls)}); "
          f"scipy L-BFGS-B nit={ref.nit} nfev={ref.nfev}")
    assert out.iteration <= 1.5 * ref.nit + 5
    assert nfev <= 1.5 * ref.nfev + 5
    assert st.resets == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_lbfgs_solves_spd_quadratic(seed):
    # eigenvalues in [1, 100]: |w - w*| <= |g| / 1.  (Much below |g| ~ 1e-7 the loss changes
    # drown in rounding and the Wolfe search fails, as in scipy: "ABNORMAL".)
    n = 20
    prob = _quadratic(n, 1e2, seed)
    out = run(prob, np.zeros(n), [Phase("lbfgs", LBFGS(LBFGSConfig(memory=5)), 300)],
              gtol=1e-6)
    assert out.reason is LoopReason.CONVERGED and out.iteration < 100
    w_star = np.linalg.solve(prob.a, prob.b)
    np.testing.assert_allclose(out.w, w_star, rtol=0, atol=1e-6)
    assert out.states["lbfgs"].count == 5


def test_lbfgs_gradient_cache_saves_the_evaluation():
    spy = Spy(Rosenbrock())
    method = LBFGS(LBFGSConfig(memory=3))
    w = np.tile([-1.2, 1.0], 3)
    state = method.init(w)
    trials, infos = 0, []
    for k in range(8):
        new_w, state, info = method.step(spy, w, state)
        trials += info.step.trials
        infos.append(info)
        assert len(spy.vg_calls) == 1 + trials  # one per trial, none at the start of a step
        assert info.reused_gradient == (k > 0)
        np.testing.assert_array_equal(state.cache_w, new_w)
        assert state.count == min(k + 1, 3)
        np.testing.assert_array_equal(state.S[-1], new_w - w)  # newest pair last
        w = new_w
    assert state.evaluations == len(spy.vg_calls)
    assert infos[0].record()["memory"] == 1 and infos[-1].record()["memory"] == 3
    # other weights, or a given value_and_grad (a new batch), bypass the cache
    n0 = len(spy.vg_calls)
    _, _, info = method.step(spy, w + 0.0 * w + 1e-3, state)
    assert not info.reused_gradient and len(spy.vg_calls) == n0 + 1 + info.step.trials
    n0 = len(spy.vg_calls)
    vg = spy.inner.value_and_grad(w)
    _, _, info = method.step(spy, w, state, value_and_grad=vg)
    assert not info.reused_gradient and len(spy.vg_calls) == n0 + info.step.trials
    assert LBFGS.reuses_gradient is True


def test_lbfgs_skips_pair_failing_curvature_condition():
    # c(w) = w0^2/2 + K w1 (w0 - 1)^2 from (1, 0): the first step -g = (-1, 0) lands at
    # the minimum along the line, where grad c = (0, K): s.y = 1 <= eps |s| |y| = eps K.
    K = 1e20

    class Steep:
        def value_and_grad(self, w):
            return (float(w[0] ** 2 / 2 + K * w[1] * (w[0] - 1) ** 2),
                    np.array([w[0] + 2 * K * w[1] * (w[0] - 1), K * (w[0] - 1) ** 2]))

    new_w, state, info = LBFGS().step(Steep(), np.array([1.0, 0.0]), LBFGSState())
    np.testing.assert_array_equal(new_w, [0.0, 0.0])
    assert info.step.success and info.pair_skipped and info.record()["pair_skipped"]
    assert state.S is None and state.Y is None and info.memory == 0


def test_lbfgs_non_descent_memory_resets_to_steepest_descent():
    prob = Quadratic(np.diag([1.0, 4.0]), np.zeros(2))
    bad = LBFGSState(S=np.array([[1.0, 0.0]]), Y=np.array([[-1.0, 0.0]]))  # gamma = -1: ascent
    w = np.array([1.0, 1.0])
    new_w, state, info = LBFGS().step(prob, w, bad)
    assert info.fallback and info.record()["fallback"] and state.resets == 1
    g = prob.a @ w
    s = new_w - w
    assert abs(s @ g + np.linalg.norm(s) * np.linalg.norm(g)) < 1e-12  # s is along -g
    assert prob.value(new_w) < prob.value(w) and state.count == 1


def test_lbfgs_failed_line_search_keeps_weights_and_clears_memory():
    class Wall(Quadratic):  # finite only at the start
        def value_and_grad(self, w):
            if np.array_equal(w, np.ones(2)):
                return super().value_and_grad(w)
            return math.inf, np.zeros(2)

    prob = Wall(np.eye(2), np.zeros(2))
    w = np.ones(2)
    S, Y = _pairs(2, 2, seed=5)
    method = LBFGS(LBFGSConfig(max_linesearch=4))
    new_w, state, info = method.step(prob, w, LBFGSState(S=S, Y=Y))
    np.testing.assert_array_equal(new_w, w)
    assert not info.step.success and info.step.trials == 4 and not info.stalled
    assert info.new_loss == info.loss == 1.0 and state.S is None and state.resets == 1
    new_w, state, info = method.step(prob, new_w, state)  # memory empty: it would repeat
    assert info.stalled and info.reused_gradient and np.array_equal(new_w, w)
    out = run(prob, w, [Phase("lbfgs", method, 10)])
    assert out.reason is LoopReason.STALLED and out.iteration == 1


def test_lbfgs_never_returns_non_finite():
    class NaNBelow(Quadratic):  # NaN for w0 < 1
        def value_and_grad(self, w):
            if w[0] < 1:
                return math.nan, np.full(1, math.nan)
            return super().value_and_grad(w)

    spy = Spy(NaNBelow(np.eye(1), np.zeros(1)))
    new_w, _, info = LBFGS(LBFGSConfig(initial_step="one")).step(spy, np.array([3.0]),
                                                                  LBFGSState())
    assert spy.vg_calls[1][0] == 0.0  # the first trial hit the NaN region
    assert info.step.success and new_w[0] >= 1 and math.isfinite(info.new_loss)

    class Huge:
        def value_and_grad(self, w):
            return 0.0, np.array([1e200])

    with pytest.raises(FloatingPointError, match="overflows"):
        LBFGS().step(Huge(), np.zeros(1), LBFGSState())
    with pytest.raises(FloatingPointError, match="loss"):
        LBFGS().step(NaNBelow(np.eye(1), np.zeros(1)), np.zeros(1), LBFGSState())


# ------------------------------------------------------------------ states and configs


def _json_lists(d):
    return json.loads(json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                                  for k, v in d.items()}))


def test_state_replace_copies_new_arrays_and_take_hands_them_over():
    """replace copies what it is given and shares what it keeps; take keeps the array itself."""
    m, v = np.arange(3.0), np.ones(3)
    s0 = AdamState(iteration=1, m=m, v=v)
    assert not np.shares_memory(s0.m, m) and not s0.m.flags.writeable
    m[0] = 7.0  # the caller's array is not the state's
    assert s0.m[0] == 0.0
    s1 = s0.replace(iteration=2, m=np.full(3, 2.0))
    assert s1.v is s0.v and s1.m is not s0.m and not s1.m.flags.writeable
    fresh = np.full(3, 5.0)
    s2 = s1.take(iteration=3, v=fresh)
    assert s2.v is fresh and not fresh.flags.writeable and s2.m is s1.m
    with pytest.raises(ValueError, match="read-only"):
        s2.v[0] = 0.0
    # validation still runs: a taken array of the wrong kind is refused, converted ints copied
    with pytest.raises(ValueError, match="AdamState.m"):
        s2.take(m=np.zeros((2, 2)))
    ints = np.arange(3)
    s3 = s2.take(m=ints)
    assert s3.m.dtype == np.float64 and ints.flags.writeable
    assert s3 == AdamState(iteration=3, m=[0.0, 1.0, 2.0], v=[5.0, 5.0, 5.0])


def test_states_round_trip():
    prob = _quadratic(seed=6)
    w0 = np.linspace(-1, 1, 6)
    for method in (Momentum(), Adam(), LBFGS(LBFGSConfig(memory=2))):
        _, state, _ = _steps(method, prob, w0, 3)
        cls = type(state)
        d = state.to_dict()
        assert cls.from_dict(d) == state
        back = cls.from_dict(_json_lists(d))
        assert back == state
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 and not v.flags.writeable
                   for v in vars(back).values() if isinstance(v, np.ndarray | list))
        assert cls.from_dict(cls().to_dict()) == cls() == cls.from_dict({})
        with pytest.raises(ValueError, match="unknown keys"):
            cls.from_dict({**d, "bogus": 1})
    lb = _steps(LBFGS(), prob, w0, 2)[1]
    assert lb.S.shape == (2, 6) and isinstance(lb.cache_value, float)
    # integer lists become floats
    assert LBFGSState.from_dict({"S": [[1, 2]], "Y": [[3, 4]]}).S.dtype == np.float64


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (MomentumState, {"iteration": -1}, "iteration"),
    (MomentumState, {"velocity": np.zeros((2, 2))}, "velocity"),
    (AdamState, {"m": np.zeros(2)}, "m and v"),
    (AdamState, {"m": np.zeros(2), "v": -np.ones(2)}, "v must be"),
    (LBFGSState, {"S": np.zeros(3), "Y": np.zeros(3)}, "S must be"),
    (LBFGSState, {"S": np.zeros((1, 3)), "Y": np.zeros((2, 3))}, "S and Y"),
    (LBFGSState, {"S": np.zeros((0, 3)), "Y": np.zeros((0, 3))}, "S and Y"),
    (LBFGSState, {"cache_w": np.zeros(3)}, "cache_w"),
    (LBFGSState, {"cache_w": np.zeros(3), "cache_grad": np.zeros(3),
                  "cache_value": math.nan}, "cache_value"),
    (LBFGSState, {"evaluations": 1.5}, "evaluations"),
])
def test_states_validate(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(("cls", "field", "value"), [
    (MomentumConfig, "learning_rate", 0.0),
    (MomentumConfig, "momentum", 1.0),
    (MomentumConfig, "momentum", -0.1),
    (MomentumConfig, "nesterov", "yes"),
    (AdamConfig, "learning_rate", math.nan),
    (AdamConfig, "beta1", 1.0),
    (AdamConfig, "beta2", -0.5),
    (AdamConfig, "epsilon", 0.0),
    (LBFGSConfig, "memory", 0),
    (LBFGSConfig, "memory", 2.0),
    (LBFGSConfig, "c1", 0.0),
    (LBFGSConfig, "c2", 1.0),
    (LBFGSConfig, "c2", 1e-5),  # c2 <= c1
    (LBFGSConfig, "max_linesearch", 0),
    (LBFGSConfig, "initial_step", "bogus"),
])
def test_configs_name_the_field(cls, field, value):
    with pytest.raises(ParameterError, match=f"{cls.__name__}.{field} ") as err:
        cls(**{field: value})
    assert err.value.name == field
    cls()  # the defaults are valid


def test_method_interface_attributes():
    for cls, name in ((Momentum, "momentum"), (Adam, "adam"), (LBFGS, "lbfgs")):
        assert cls.name == name
        assert isinstance(cls.config_class(), cls.config_class)
        assert cls().init(np.zeros(3)) == cls.state_class()
    assert (MomentumConfig().learning_rate, MomentumConfig().momentum,
            MomentumConfig().nesterov) == (0.1, 0.9, False)
    assert (AdamConfig().learning_rate, AdamConfig().beta1, AdamConfig().beta2,
            AdamConfig().epsilon) == (1e-3, 0.9, 0.999, 1e-8)
    cfg = LBFGSConfig()
    assert (cfg.memory, cfg.c1, cfg.c2, cfg.max_linesearch, cfg.initial_step) == (
        10, 1e-4, 0.9, 20, "scaled")
