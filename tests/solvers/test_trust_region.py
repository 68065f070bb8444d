"""CG-Steihaug (N&W Algorithm 7.2) and trust-region Newton (N&W Algorithm 4.1).

References: scipy's own CG-Steihaug (``scipy.optimize._trustregion_ncg``) and
``scipy.optimize.minimize(method="trust-ncg")``, explicit model values, and a
radius sequence computed by hand.
"""

import json
import math

import numpy as np
import pytest
import scipy.optimize as so
from scipy.optimize._trustregion_ncg import CGSteihaugSubproblem

from mpinewton.solvers.base import ParameterError
from mpinewton.solvers.loop import LoopHooks, LoopReason, Phase, run
from mpinewton.solvers.operators import MatrixOperator
from mpinewton.solvers.steihaug import SteihaugReason, steihaug_cg
from mpinewton.solvers.trust_region import (
    TrustRegionConfig,
    TrustRegionInfo,
    TrustRegionNewton,
    TrustRegionState,
    trust_region_step,
)

from .problems import DoubleWell, Quadratic, Rosenbrock, Spy, spd_matrix

N = 20


def _indefinite(n, low, high, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * np.linspace(low, high, n)) @ q.T
    return 0.5 * (a + a.T)


def _model(g, b, p):
    return float(g @ p + 0.5 * p @ (b @ p))


def _scipy_steihaug(b, g, radius):
    """scipy's CG-Steihaug at x = 0 on the model g.p + 0.5 p.Bp (its tolerance below)."""
    sub = CGSteihaugSubproblem(np.zeros_like(g), lambda x: 0.0, lambda x: g,
                               hessp=lambda x, v: b @ v)
    return sub.solve(radius)


def _scipy_rtol(g):
    # scipy: tolerance = min(0.5, sqrt(|g|)) * |g|, i.e. N&W (7.3) forcing.
    return min(0.5, math.sqrt(float(np.linalg.norm(g))))


CASES = {
    "spd_interior": (spd_matrix(N, 1e3, 1), 1e3, "converged"),
    "spd_boundary": (spd_matrix(N, 1e3, 1), 0.3, "boundary"),
    "indefinite_negative_curvature": (_indefinite(N, -3.0, 10.0, 2), 1e3, "negative_curvature"),
    "indefinite_boundary": (_indefinite(N, -3.0, 10.0, 2), 0.05, "boundary"),
    "negative_definite": (_indefinite(N, -5.0, -1.0, 3), 2.0, "negative_curvature"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_steihaug_matches_scipy(case):
    b, radius, reason = CASES[case]
    g = np.random.default_rng(7).standard_normal(N)
    p_ref, boundary_ref = _scipy_steihaug(b, g, radius)
    op = MatrixOperator(b)
    res = steihaug_cg(op, g, radius, rtol=_scipy_rtol(g), max_iter=1000)
    assert res.reason == reason
    assert res.hit_boundary == boundary_ref
    np.testing.assert_allclose(res.x, p_ref, rtol=1e-10, atol=1e-12 * np.linalg.norm(p_ref))
    assert res.matvecs == res.iterations == op.products
    if res.hit_boundary:
        assert np.linalg.norm(res.x) == pytest.approx(radius, rel=1e-12)
    else:
        assert np.linalg.norm(res.x) < radius
        # the recursive residual is the true one, g + B x, up to rounding
        assert res.residual_norm <= res.tolerance
        assert np.linalg.norm(g + b @ res.x) == pytest.approx(res.residual_norm, rel=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_decrease_is_the_explicit_one(case):
    b, radius, _ = CASES[case]
    g = np.random.default_rng(8).standard_normal(N)
    res = steihaug_cg(b, g, radius, rtol=1e-3, max_iter=1000)
    explicit = -(float(g @ res.x) + 0.5 * float(res.x @ (b @ res.x)))
    assert res.model_decrease > 0
    assert res.model_decrease == pytest.approx(explicit, rel=1e-12, abs=1e-15)


def test_steihaug_decreases_the_model_more_than_cauchy_point():
    # Cauchy point (N&W (4.11)-(4.12)): Steihaug's first iterate, so the model decrease is >= it.
    b = _indefinite(N, -2.0, 4.0, 4)
    g = np.random.default_rng(9).standard_normal(N)
    for radius in (0.01, 0.3, 5.0):
        res = steihaug_cg(b, g, radius, rtol=1e-8, max_iter=100)
        gbg = float(g @ b @ g)
        gn = np.linalg.norm(g)
        tau = 1.0 if gbg <= 0 else min(1.0, gn**3 / (radius * gbg))
        cauchy = -tau * radius / gn * g
        assert -res.model_decrease <= _model(g, b, cauchy) + 1e-12


def test_steihaug_bitwise_reproducible():
    b, g = _indefinite(N, -1.0, 5.0, 5), np.random.default_rng(1).standard_normal(N)
    one = steihaug_cg(b, g, 0.7, rtol=1e-6)
    two = steihaug_cg(b.copy(), g.copy(), 0.7, rtol=1e-6)
    assert one.x.tobytes() == two.x.tobytes()
    assert (one.model_decrease, one.residual_norm) == (two.model_decrease, two.residual_norm)


def test_steihaug_stops():
    b, g = spd_matrix(N, 1e4, 3), np.random.default_rng(2).standard_normal(N)
    capped = steihaug_cg(b, g, 1e6, rtol=1e-12, max_iter=3)
    assert (capped.reason, capped.iterations, capped.hit_boundary) == ("max_iter", 3, False)
    assert capped.model_decrease > 0
    # atol: the larger of the two tolerances decides; a small g needs no product
    loose = steihaug_cg(b, g, 1e6, rtol=0.0, atol=1e3)
    assert (loose.reason, loose.iterations, loose.model_decrease) == ("converged", 0, 0.0)
    zero = steihaug_cg(b, np.zeros(N), 1.0, rtol=0.1)
    assert zero.reason is SteihaugReason.CONVERGED and not np.any(zero.x)
    # NaN from the second product on: the first iterate is kept
    calls = []

    def nan_after_one(v):
        calls.append(1)
        return b @ v if len(calls) == 1 else np.full(N, np.nan)

    bad = steihaug_cg(nan_after_one, g, 1e6, rtol=1e-12)
    first = steihaug_cg(b, g, 1e6, rtol=1e-12, max_iter=1)
    assert (bad.reason, bad.iterations) == ("nan_or_inf", 2)
    np.testing.assert_array_equal(bad.x, first.x)
    assert bad.model_decrease == first.model_decrease


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"radius": 0.0}, "radius"), ({"radius": math.inf}, "radius"),
    ({"rtol": -1.0}, "rtol"), ({"atol": math.nan}, "atol"), ({"max_iter": -1}, "max_iter"),
])
def test_steihaug_rejects_bad_arguments(kwargs, word):
    args = {"radius": 1.0, "rtol": 0.1} | kwargs
    with pytest.raises(ValueError, match=word):
        steihaug_cg(np.eye(3), np.ones(3), **args)


def test_nonconvex_quadratic_step_on_boundary_decreases_model_and_loss():
    a = _indefinite(N, -3.0, 3.0, 11)
    problem = Quadratic(a, np.random.default_rng(3).standard_normal(N))
    w = np.random.default_rng(4).standard_normal(N)
    method = TrustRegionNewton(TrustRegionConfig(initial_radius=0.5, cg_max_iter=200))
    new_w, state, info = method.step(problem, w, method.init(w))
    assert info.subproblem.hit_boundary
    assert info.subproblem.reason in ("negative_curvature", "boundary")
    assert info.step_norm == pytest.approx(0.5, rel=1e-12)
    g = a @ w - problem.b
    assert _model(g, a, new_w - w) < 0
    assert info.rho == pytest.approx(1.0, rel=1e-9)  # the model is exact on a quadratic
    assert info.accepted and problem.value(new_w) < problem.value(w)
    assert state.radius == 1.0  # rho > 3/4 on the boundary: doubled


class _Infos(LoopHooks):
    def __init__(self):
        self.infos = []

    def after_step(self, k, phase, w, state, info):
        self.infos.append(info)
        return w, False


def _counting(f):
    def wrapped(*args):
        wrapped.calls += 1
        return f(*args)

    wrapped.calls = 0
    return wrapped


@pytest.mark.parametrize("n", [2, 100])
def test_rosenbrock_matches_scipy_trust_ncg(n):
    x0 = np.array([-1.2, 1.0] * (n // 2))
    hessp = _counting(so.rosen_hess_prod)
    ref = so.minimize(so.rosen, x0, method="trust-ncg", jac=so.rosen_der, hessp=hessp,
                      options={"gtol": 1e-8, "maxiter": 2000})
    assert ref.success
    # scipy's radius rules and defaults: eta 0.15, radius 1 up to 1000, no CG cap
    config = TrustRegionConfig(forcing="sqrt_grad", eta=0.15, initial_radius=1.0,
                               max_radius=1000.0, cg_max_iter=10_000)
    out = run(Rosenbrock(), x0, [Phase("trust_region", TrustRegionNewton(config), 2000)],
              gtol=1e-8)
    assert out.reason is LoopReason.CONVERGED
    np.testing.assert_allclose(out.w, ref.x, atol=1e-6)
    np.testing.assert_allclose(out.w, np.ones(n), atol=1e-6)
    state = out.states["trust_region"]
    # Same algorithm, same arithmetic: with scipy 1.17 the same iterations (n=2: 30, n=100: 452).
    assert abs(out.iteration - ref.nit) <= max(2, ref.nit // 10)
    assert state.total_matvecs <= hessp.calls  # scipy spends extra products on model values
    assert 0 < state.rejected < out.iteration


def test_double_well_escapes_the_saddle_by_negative_curvature():
    hooks = _Infos()
    config = TrustRegionConfig(forcing="sqrt_grad")
    out = run(DoubleWell(), np.array([1e-3, 0.5]),
              [Phase("trust_region", TrustRegionNewton(config), 100)], gtol=1e-8, hooks=hooks)
    assert out.reason is LoopReason.CONVERGED
    np.testing.assert_allclose(np.abs(out.w), [1.0, 0.0], atol=1e-8)
    assert "negative_curvature" in [i.record()["cg_reason"] for i in hooks.infos]
    assert DoubleWell().value(out.w) == pytest.approx(-0.25)


class _Scripted:
    """1-D model with g = -1, B = 1 at every w; c(w + p) is the next scripted value."""

    def __init__(self, loss, new_losses):
        self.loss, self.new_losses = loss, list(new_losses)

    def value(self, w):
        return self.new_losses.pop(0)

    def value_and_grad(self, w):
        return self.loss, np.array([-1.0])

    def hvp(self, w, v):
        return np.array(v, dtype=float)


def test_radius_rule_against_hand_computed_sequence():
    # m(p) = -p + p^2/2: the Newton step is p = 1; inside a radius D < 1 the step is p = D and
    # predicts D - D^2/2; with D >= 1 it predicts 1/2 (p = 1, on the boundary iff D == 1).
    config = TrustRegionConfig(initial_radius=0.5, max_radius=1.5, min_radius=0.01, eta=0.1)
    steps = [  # (radius, predicted, rho wanted, accepted, next radius, on boundary)
        (0.5, 0.375, 0.9, True, 1.0, True),  # very good on the boundary: doubled
        (1.0, 0.5, 0.8, True, 1.5, True),  # doubled, capped at max_radius
        (1.5, 0.5, 0.9, True, 1.5, False),  # very good but inside: kept
        (1.5, 0.5, 0.05, False, 0.375, False),  # rho <= eta: rejected, quartered
        (0.375, 0.3046875, 0.2, True, 0.09375, True),  # accepted (rho > eta) but quartered
        (0.09375, 0.09375 - 0.09375**2 / 2, 0.5, True, 0.09375, True),  # fair: kept
        (0.09375, None, None, False, 0.0234375, True),  # c(w + p) = inf: rejected
        (0.0234375, 0.0234375 - 0.0234375**2 / 2, -1.0, False, 0.005859375, True),
        (0.005859375, 0.005859375 - 0.005859375**2 / 2, -1.0, False, 0.00146484375, True),
    ]
    loss = 10.0
    news = [math.inf if rho is None else loss - rho * pred for _, pred, rho, *_ in steps]
    problem = _Scripted(loss, news)
    method = TrustRegionNewton(config)
    w, state = np.array([0.0]), method.init(np.array([0.0]))
    for k, (radius, pred, rho, accepted, next_radius, boundary) in enumerate(steps):
        new_w, state, info = method.step(problem, w, state)
        assert info.radius == radius
        assert info.subproblem.hit_boundary == boundary
        assert info.step_norm == pytest.approx(min(radius, 1.0), rel=1e-15)
        if rho is None:
            assert math.isnan(info.rho) and info.record()["rho"] is None
        else:
            assert info.subproblem.model_decrease == pytest.approx(pred, rel=1e-15)
            assert info.rho == pytest.approx(rho, rel=1e-9)
        assert info.accepted == accepted
        assert state.radius == next_radius == info.new_radius
        np.testing.assert_array_equal(new_w, w + info.subproblem.x if accepted else w)
        # stalled only on the last step: rejected with a radius already below min_radius
        assert info.stalled == (k == len(steps) - 1)
        w = new_w
    assert state.rejected == 4 and state.iteration == len(steps)
    assert state.total_matvecs == state.total_cg_iters == len(steps)
    # run() ends on the stall
    out = run(_Scripted(loss, news), np.array([0.0]),
              [Phase("trust_region", TrustRegionNewton(config), 50)])
    assert (out.reason, out.iteration) == (LoopReason.STALLED, len(steps))


def test_radius_from_state_and_max_radius_cap():
    config = TrustRegionConfig(initial_radius=0.5, max_radius=2.0)
    problem = Quadratic(np.eye(2), np.array([100.0, 0.0]))
    for radius, used in ((0.0, 0.5), (math.nan, 0.5), (0.25, 0.25), (50.0, 2.0)):
        _, _, info = trust_region_step(problem, np.zeros(2), TrustRegionState(radius=radius),
                                       config)
        assert info.radius == used and info.step_norm == pytest.approx(used)


class _LeastSquaresRosenbrock:
    """c(w) = |r(w)|^2 / 2, r = (10 (w1 - w0^2), 1 - w0): Gauss-Newton products only."""

    def __init__(self):
        self.gnvps = 0

    @staticmethod
    def _r(w):
        return np.array([10.0 * (w[1] - w[0] ** 2), 1.0 - w[0]])

    @staticmethod
    def _j(w):
        return np.array([[-20.0 * w[0], 10.0], [-1.0, 0.0]])

    def value(self, w):
        return float(0.5 * self._r(w) @ self._r(w))

    def value_and_grad(self, w):
        return self.value(w), self._j(w).T @ self._r(w)

    def gnvp(self, w, v):
        self.gnvps += 1
        j = self._j(w)
        return j.T @ (j @ v)


def test_gauss_newton_curvature_uses_gnvp():
    problem = _LeastSquaresRosenbrock()
    x0 = np.array([-1.2, 1.0])
    ref = so.least_squares(problem._r, x0, jac=problem._j, xtol=1e-15, ftol=1e-15, gtol=1e-15)
    method = TrustRegionNewton(TrustRegionConfig(curvature="gauss_newton", cg_rtol=1e-3))
    out = run(problem, x0, [Phase("trust_region", method, 200)], gtol=1e-10)
    assert out.reason is LoopReason.CONVERGED
    np.testing.assert_allclose(out.w, ref.x, atol=1e-8)
    assert problem.gnvps == out.states["trust_region"].total_matvecs > 0
    # the Hessian path names the missing product
    with pytest.raises(TypeError, match="hvp"):
        TrustRegionNewton().step(problem, x0, TrustRegionState())


def test_zero_gradient_takes_no_step():
    problem = Spy(Quadratic(np.diag([1.0, -1.0]), np.zeros(2)))
    method = TrustRegionNewton()
    w = np.zeros(2)
    new_w, state, info = method.step(problem, w, method.init(w))
    assert new_w is not w and not np.any(new_w)
    assert problem.hvp_calls == [] and problem.value_calls == []
    assert info.subproblem is None and not info.accepted and not info.stalled
    assert state == TrustRegionState(iteration=1, radius=1.0)
    rec = info.record()
    assert (rec["cg_iters"], rec["cg_reason"], rec["step_size"], rec["new_loss"]) == (
        0, None, 0.0, 0.0)


def test_record_keys_and_given_value_and_grad():
    problem = Spy(Rosenbrock())
    w = np.array([-1.2, 1.0])
    vg = problem.inner.value_and_grad(w)
    _, _, info = TrustRegionNewton().step(problem, w, TrustRegionState(), value_and_grad=vg)
    assert problem.vg_calls == [] and len(problem.value_calls) == 1
    assert isinstance(info, TrustRegionInfo)
    rec = info.record()
    assert {"loss", "new_loss", "grad_norm", "cg_iters", "cg_reason", "step_size", "fallback",
            "linesearch_trials", "damping", "radius", "rho", "step_norm", "accepted"} <= set(rec)
    assert (rec["fallback"], rec["linesearch_trials"], rec["damping"]) == (False, 0, None)
    assert isinstance(rec["cg_reason"], str) and rec["step_size"] in (0.0, 1.0)
    json.dumps(rec)


def test_state_round_trip():
    state = TrustRegionState(iteration=7, radius=0.125, total_cg_iters=40, total_matvecs=40,
                             rejected=2)
    data = state.to_dict()
    assert TrustRegionState.from_dict(json.loads(json.dumps(data))) == state
    assert TrustRegionState.from_dict({}) == TrustRegionState()
    assert TrustRegionState(radius=math.nan) == TrustRegionState()
    with pytest.raises(ValueError, match="unknown"):
        TrustRegionState.from_dict({**data, "cg_warm": None})
    for field, bad in (("radius", -1.0), ("radius", math.inf), ("rejected", -1),
                       ("iteration", 1.5)):
        with pytest.raises(ParameterError) as err:
            TrustRegionState(**{field: bad})
        assert err.value.name == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"curvature": "fisher"}, "curvature"),
    ({"initial_radius": 0.0}, "initial_radius"),
    ({"initial_radius": 2e4}, "initial_radius"),
    ({"max_radius": math.inf}, "max_radius"),
    ({"min_radius": 1.0}, "min_radius"),
    ({"min_radius": -1.0}, "min_radius"),
    ({"eta": 0.25}, "eta"),
    ({"eta": -0.1}, "eta"),
    ({"shrink": 1.0}, "shrink"),
    ({"expand": 1.0}, "expand"),
    ({"shrink_below": 0.0}, "shrink_below"),
    ({"expand_above": 0.2}, "expand_above"),
    ({"forcing": "sqrt"}, "forcing"),
    ({"cg_rtol": -1.0}, "cg_rtol"),
    ({"cg_atol": math.nan}, "cg_atol"),
    ({"cg_max_iter": 0}, "cg_max_iter"),
    ({"cg_max_iter": 5.0}, "cg_max_iter"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ParameterError) as err:
        TrustRegionConfig(**kwargs)
    assert err.value.name == field
    assert field in str(err.value)


def test_method_interface():
    method = TrustRegionNewton()
    assert method.name == "trust_region"
    assert method.config_class is TrustRegionConfig
    assert method.state_class is TrustRegionState
    assert method.init(np.zeros(3)) == TrustRegionState(radius=1.0)
