"""Hessian-free options of Newton-CG against hand-computed and independent references.

Levenberg-Marquardt damping (Martens 2010, section 4.1), forcing terms (Nocedal
& Wright eq. 7.3; Eisenstat & Walker 1996), diagonal preconditioners (Martens
2010, section 4.7; Bekas, Kokiopoulou & Saad 2007), Gauss-Newton curvature, CG
backtracking (Martens 2010, section 4.6), negative-curvature steps (Royer,
O'Neill & Wright 2020), and bitwise equality with the thesis step at defaults.
"""

import json
import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla

from mpinewton.solvers import (
    CGReason,
    LineSearchResult,
    MatrixOperator,
    NewtonConfig,
    NewtonState,
    armijo,
    damped,
    fixed_step,
    minimize,
    newton_step,
)
from mpinewton.solvers.newton import forcing_term, uses_hessian_free_options
from mpinewton.solvers.operators import HessianOperator
from mpinewton.solvers.preconditioners import (
    diagonal_preconditioner,
    fisher_diagonal,
    hutchinson_diagonal,
    rademacher,
)

from .problems import DoubleWell, Quadratic, Rosenbrock, spd_matrix

THESIS_RECORD_KEYS = {"loss", "new_loss", "grad_norm", "cg_iters", "cg_reason", "step_size",
                      "fallback", "linesearch_trials", "damping"}
HF_RECORD_KEYS = THESIS_RECORD_KEYS | {"rho", "cg_rtol", "preconditioner", "curvature",
                                       "backtrack_iter", "negative_curvature_step"}
THESIS_STATE_KEYS = {"iteration", "cg_warm", "total_cg_iters", "total_matvecs", "fallbacks",
                     "failed_linesearches"}


class LyingCurvature(Quadratic):
    """c(w) = 0.5 a w^2 - b w in 1-D whose curvature products claim h instead of a.

    CG on (h + lam) s = -g gives s = -g / (h + lam); with step size 1 the
    reduction ratio against the model sigma g.s + 0.5 sigma^2 h s^2 is
    rho(lam) = (h + lam - a/2) / (h/2 + lam), whatever w is.
    """

    def __init__(self, a: float, h: float) -> None:
        super().__init__(np.array([[a]]), np.array([1.0]))
        self.h = h

    def hvp(self, w, v):
        return self.h * v


class Counting(Quadratic):
    """Quadratic that counts its products and offers the optional ones."""

    def __init__(self, a, b, *, gnvp=False, many=False, fisher=None):
        super().__init__(a, b)
        self.calls = {"hvp": 0, "hvp_many": 0, "gnvp": 0, "gnvp_many": 0, "grad_squares": 0}
        self.columns = 0
        if gnvp:
            self.gnvp = self._gnvp
            if many:
                self.gnvp_many = self._gnvp_many
        if many:
            self.hvp_many = self._hvp_many
        if fisher is not None:
            self.fisher = np.asarray(fisher, dtype=float)
            self.grad_squares = self._grad_squares

    def hvp(self, w, v):
        self.calls["hvp"] += 1
        return self.a @ v

    def _hvp_many(self, w, m):
        self.calls["hvp_many"] += 1
        self.columns += m.shape[1]
        return self.a @ m

    def _gnvp(self, w, v):
        self.calls["gnvp"] += 1
        return self.a @ v

    def _gnvp_many(self, w, m):
        self.calls["gnvp_many"] += 1
        self.columns += m.shape[1]
        return self.a @ m

    def _grad_squares(self, w):
        self.calls["grad_squares"] += 1
        return self.fisher.copy()


# ------------------------------------------------- Levenberg-Marquardt damping


@pytest.mark.parametrize(("lam0", "bounds", "dampings", "rhos"), [
    # rho > 3/4 shrinks by 2/3, down to damping_min; then 1/4 <= rho <= 3/4 keeps it
    (3.0, (1.4, 1e8), [3.0, 2.0, 1.4, 1.4], [2.7 / 3.1, 1.7 / 2.1, 1.1 / 1.5, 1.1 / 1.5]),
    # rho < 0 (the loss rose: fixed step) grows by 3/2, up to damping_max
    (0.1, (1e-8, 0.2), [0.1, 0.15, 0.2, 0.2], [-1.0, -0.6, -1 / 3, -1 / 3]),
    # rho < 1/4 grows once, then stays in the band
    (0.35, (1e-8, 1e8), [0.35, 0.525, 0.525, 0.525], [0.05 / 0.45, 0.36, 0.36, 0.36]),
], ids=["shrink-to-min", "grow-to-max", "grow-then-keep"])
def test_levenberg_marquardt_sequence_by_hand(lam0, bounds, dampings, rhos):
    prob = LyingCurvature(a=1.0, h=0.2)
    cfg = NewtonConfig(damping=lam0, damping_rule="levenberg_marquardt", step_rule="fixed",
                       warm_start="previous", damping_min=bounds[0], damping_max=bounds[1],
                       cg_rtol=1e-12)
    w, state = np.array([3.0]), NewtonState()
    assert state.damping is None
    for lam, rho in zip(dampings, rhos, strict=True):
        w, state, info = newton_step(prob, w, state, cfg)
        assert info.damping == pytest.approx(lam, rel=1e-12)
        assert info.rho == pytest.approx(rho, rel=1e-9)
        assert info.record()["rho"] == info.rho and info.record()["damping"] == info.damping
        if rho <= 0:  # rejected: the warm start is dropped
            assert state.cg_warm is None
        else:
            assert state.cg_warm is not None
    nxt = min(max(lam * (1.5 if rho < 0.25 else 2 / 3 if rho > 0.75 else 1.0), bounds[0]),
              bounds[1])
    assert state.damping == pytest.approx(nxt, rel=1e-12)


def test_levenberg_marquardt_rho_uses_the_undamped_model_at_the_accepted_step():
    # Armijo halves the step: rho is measured at sigma = 1/2 against m(s/2).
    prob = LyingCurvature(a=1.0, h=0.3)  # s = -g / (0.3 + 0.1) overshoots: sigma = 1 fails
    cfg = NewtonConfig(damping=0.1, damping_rule="levenberg_marquardt", cg_rtol=1e-12)
    w = np.array([2.0])
    _, g = prob.value_and_grad(w)
    new_w, state, info = newton_step(prob, w, NewtonState(), cfg)
    sigma = info.step.step
    assert sigma == 0.5 and info.step.trials == 2
    s = -g[0] / 0.4
    predicted = -(sigma * g[0] * s + 0.5 * sigma**2 * 0.3 * s * s)
    actual = prob.value(w) - prob.value(w + sigma * s)
    assert info.rho == pytest.approx(actual / predicted, rel=1e-10)
    assert 0.25 < info.rho < 0.75 and state.damping == 0.1  # 0.46875 / 1.015625


def test_levenberg_marquardt_failed_line_search_raises_damping_and_does_not_stall():
    class NanValues(Quadratic):
        def value(self, w):
            return math.nan

        def value_and_grad(self, w):
            return 0.0, self.a @ w - self.b

    prob = NanValues(np.eye(2), np.ones(2))
    cfg = NewtonConfig(damping=1.0, damping_rule="levenberg_marquardt", armijo_max_trials=2,
                       damping_max=2.0)
    w, state = np.zeros(2), NewtonState()
    w1, state, info = newton_step(prob, w, state, cfg)
    assert not info.step.success and math.isnan(info.rho) and info.record()["rho"] is None
    assert state.damping == 1.5 and not info.stalled and state.cg_warm is None
    _, state, info = newton_step(prob, w1, state, cfg)
    assert info.damping == 1.5 and state.damping == 2.0 and not info.stalled
    _, state, info = newton_step(prob, w1, state, cfg)
    assert state.damping == 2.0 and info.stalled  # at damping_max nothing changes any more


def test_levenberg_marquardt_starts_from_damping_clipped_into_bounds():
    prob = Quadratic(spd_matrix(4, 10.0, 0), np.ones(4))
    cfg = NewtonConfig(damping=0.0, damping_rule="levenberg_marquardt", damping_min=1e-3)
    _, state, info = newton_step(prob, np.zeros(4), NewtonState(), cfg)
    assert info.damping == 1e-3
    # an exact quadratic: rho = 1 up to round-off, so the damping shrinks (to the floor)
    assert info.rho == pytest.approx(1.0, rel=1e-6) and state.damping == 1e-3
    _, state, info = newton_step(prob, np.zeros(4), NewtonState(damping=0.5), cfg)
    assert info.damping == 0.5 and state.damping == pytest.approx(0.5 * 2 / 3)


def test_fixed_damping_computes_rho_but_never_changes():
    prob = LyingCurvature(a=1.0, h=0.2)
    cfg = NewtonConfig(damping=0.1, step_rule="fixed", warm_start="zero")
    w, state, info = newton_step(prob, np.array([3.0]), NewtonState(), cfg)
    assert info.rho == pytest.approx(-1.0) and state.damping is None
    assert state.cg_warm is not None  # only Levenberg-Marquardt rejects a rho <= 0 step
    assert set(info.record()) == THESIS_RECORD_KEYS


# --------------------------------------------------------------- forcing terms


@pytest.mark.parametrize(("grad_norm", "eta"), [(4.0, 0.5), (0.25, 0.5), (0.04, 0.2),
                                                (1e-6, 1e-3)])
def test_sqrt_grad_forcing(grad_norm, eta):
    prob = Quadratic(np.diag([1.0, 2.0, 3.0]), np.zeros(3))
    w = np.zeros(3)
    g = np.array([0.0, grad_norm, 0.0])
    cfg = NewtonConfig(forcing="sqrt_grad", step_rule="fixed")
    _, _, info = newton_step(prob, w, NewtonState(), cfg, value_and_grad=(1.0, g))
    assert info.cg_rtol == pytest.approx(eta, rel=1e-12)
    assert info.cg.tolerance == pytest.approx(eta * grad_norm, rel=1e-12)
    assert info.record()["cg_rtol"] == info.cg_rtol


def test_eisenstat_walker_forcing_sequence_by_hand():
    # eta_0 = 0.5; eta_k = 0.9 (|g_k|/|g_{k-1}|)^2, raised to 0.9 eta_{k-1}^2 when that
    # exceeds 0.1, capped at 0.5:
    #   |g| = 1     -> 0.5
    #   |g| = 0.2   -> 0.9*0.04 = 0.036, guard 0.9*0.25 = 0.225 > 0.1   -> 0.225
    #   |g| = 0.18  -> 0.9*0.81 = 0.729, guard 0.9*0.225^2 = 0.0456     -> cap 0.5
    #   |g| = 0.01  -> 0.9*(1/18)^2 = 0.00278, guard 0.225             -> 0.225
    #   |g| = 0.001 -> 0.9*0.01 = 0.009, guard 0.0456 (no)              -> 0.009
    norms = [1.0, 0.2, 0.18, 0.01, 0.001]
    expect = [0.5, 0.225, 0.5, 0.225, 0.009]
    prob = Quadratic(np.eye(2), np.zeros(2))
    cfg = NewtonConfig(forcing="eisenstat_walker", step_rule="fixed", warm_start="zero")
    state = NewtonState()
    for norm, eta in zip(norms, expect, strict=True):
        g = np.array([norm, 0.0])
        _, state, info = newton_step(prob, np.zeros(2), state, cfg, value_and_grad=(1.0, g))
        assert info.cg_rtol == pytest.approx(eta, rel=1e-12)
        assert info.cg.tolerance == pytest.approx(eta * norm, rel=1e-12)
        assert state.forcing_eta == info.cg_rtol and state.forcing_grad_norm == norm


def test_forcing_term_options():
    st = NewtonState(forcing_grad_norm=1.0, forcing_eta=0.5)
    assert forcing_term(0.3, st, NewtonConfig()) == 1e-2
    cfg = NewtonConfig(forcing="eisenstat_walker", forcing_gamma=0.5, forcing_alpha=1.5,
                       forcing_max=0.9)
    # 0.5 * 0.3^1.5 = 0.0822; guard 0.5 * 0.5^1.5 = 0.177 > 0.1
    assert forcing_term(0.3, st, cfg) == pytest.approx(0.5 * 0.5**1.5)
    assert forcing_term(0.3, NewtonState(), cfg) == 0.9
    assert forcing_term(0.01, NewtonState(), NewtonConfig(forcing="sqrt_grad",
                                                          forcing_max=0.05)) == 0.05


# ------------------------------------------------------------ preconditioners


def test_rademacher_is_seeded_and_plus_minus_one():
    z = rademacher(50, 7, (3, 4))
    assert z.shape == (50, 7) and set(np.unique(z)) == {-1.0, 1.0}
    np.testing.assert_array_equal(z, rademacher(50, 7, (3, 4)))  # every rank draws the same
    assert not np.array_equal(z, rademacher(50, 7, (3, 5)))


@pytest.mark.parametrize("samples", [1, 3, 10])
def test_hutchinson_of_a_diagonal_matrix_is_exact(samples):
    d = np.array([-2.0, 0.0, 1e-3, 5.0, 7.5])
    est = hutchinson_diagonal(MatrixOperator(np.diag(d)), samples, (0, 1))
    np.testing.assert_allclose(est, d, rtol=1e-15, atol=0.0)


def test_hutchinson_of_a_dense_matrix_within_statistical_error():
    n, k = 8, 20000
    a = spd_matrix(n, 100.0, 2)
    est = hutchinson_diagonal(MatrixOperator(a), k, (7, 0))
    off = (a**2).sum(axis=1) - np.diag(a) ** 2
    std = np.sqrt(off / k)  # Bekas et al.: variance sum_{j != i} A_ij^2 per sample
    assert np.all(np.abs(est - np.diag(a)) <= 5 * std)
    assert np.abs(est - np.diag(a)).max() > 0  # it is an estimate


def test_hutchinson_uses_one_batched_product():
    a = spd_matrix(6, 10.0, 1)
    prob = Counting(a, np.ones(6), many=True)
    op = HessianOperator(prob, np.zeros(6))
    hutchinson_diagonal(op, 10, (0, 0))
    assert prob.calls["hvp_many"] == 1 and prob.calls["hvp"] == 0 and prob.columns == 10


def test_diagonal_preconditioner_formula():
    d = np.array([4.0, -1.0, 0.0, 1e-9])
    pre = diagonal_preconditioner(d, 0.5, 0.75, 1e-4)
    floor = 1e-4 * 4.0
    expect = (np.array([4.0, 1.0, floor, floor]) + 0.5) ** -0.75
    np.testing.assert_allclose(pre.diagonal, expect, rtol=1e-15)
    np.testing.assert_array_equal(diagonal_preconditioner(np.zeros(3), 0.0, 0.75,
                                                          1e-4).diagonal, np.ones(3))


def test_fisher_preconditioner_uses_grad_squares():
    d = np.logspace(-2, 2, 12)
    prob = Counting(np.diag(d), np.ones(12), fisher=d)
    w = np.zeros(12)
    cfg = NewtonConfig(preconditioner="fisher", preconditioner_power=1.0, cg_rtol=1e-10,
                       warm_start="zero")
    _, state, info = newton_step(prob, w, NewtonState(), cfg)
    assert prob.calls["grad_squares"] == 1
    assert info.cg.iterations == 1 and info.cg.converged  # M = diag(A) exactly
    _, _, plain = newton_step(prob, w, NewtonState(), NewtonConfig(cg_rtol=1e-10))
    assert plain.cg.iterations > 5
    np.testing.assert_allclose(info.cg.x, plain.cg.x, rtol=1e-8)
    assert state.total_preconditioner_matvecs == 0 and info.record()["preconditioner"] == "fisher"
    np.testing.assert_array_equal(fisher_diagonal(prob, w), d)
    with pytest.raises(TypeError, match="grad_squares"):
        newton_step(Quadratic(np.eye(2), np.ones(2)), np.zeros(2), NewtonState(), cfg)


def test_hutchinson_preconditioner_in_newton_step():
    d = np.logspace(-2, 2, 12)
    prob = Counting(np.diag(d), np.ones(12), many=True)
    cfg = NewtonConfig(preconditioner="hutchinson", preconditioner_power=1.0,
                       preconditioner_samples=4, cg_rtol=1e-10, warm_start="zero")
    _, state, info = newton_step(prob, np.zeros(12), NewtonState(), cfg)
    assert prob.calls["hvp_many"] == 1 and prob.columns == 4
    assert info.cg.iterations == 1  # Hutchinson is exact for a diagonal Hessian
    assert info.preconditioner_matvecs == 4 == state.total_preconditioner_matvecs
    assert state.total_matvecs == info.cg.matvecs + 4
    assert state.to_dict()["total_preconditioner_matvecs"] == 4


def test_hutchinson_draws_depend_on_seed_and_iteration_only():
    a = spd_matrix(10, 1e3, 3)
    prob = Quadratic(a, np.ones(10))
    cfg = NewtonConfig(preconditioner="hutchinson", preconditioner_samples=3, cg_max_iter=3)
    w = np.linspace(-1, 1, 10)
    one = newton_step(prob, w, NewtonState(iteration=5), cfg)
    two = newton_step(prob, w.copy(), NewtonState(iteration=5), cfg)  # another rank
    assert one[0].tobytes() == two[0].tobytes()
    three = newton_step(prob, w, NewtonState(iteration=6), cfg)
    assert one[2].cg.x.tobytes() != three[2].cg.x.tobytes()


# ---------------------------------------------------------- Gauss-Newton curvature


def test_gauss_newton_curvature_calls_gnvp_not_hvp():
    a = spd_matrix(6, 10.0, 4)
    prob = Counting(a, np.ones(6), gnvp=True)
    cfg = NewtonConfig(curvature="gauss_newton", cg_rtol=1e-10)
    _, _, info = newton_step(prob, np.zeros(6), NewtonState(), cfg)
    assert prob.calls["hvp"] == 0 and prob.calls["gnvp"] == info.cg.matvecs > 0
    np.testing.assert_allclose(info.cg.x, np.linalg.solve(a, np.ones(6)), rtol=1e-8)
    assert info.record()["curvature"] == "gauss_newton"
    with pytest.raises(TypeError, match="gnvp"):
        newton_step(Quadratic(a, np.ones(6)), np.zeros(6), NewtonState(), cfg)
    # Hutchinson on the Gauss-Newton matrix: one batched gnvp_many
    prob = Counting(a, np.ones(6), gnvp=True, many=True)
    newton_step(prob, np.zeros(6), NewtonState(),
                NewtonConfig(curvature="gauss_newton", preconditioner="hutchinson"))
    assert prob.calls["gnvp_many"] == 1 and prob.calls["hvp"] == prob.calls["hvp_many"] == 0


# ------------------------------------------------------------- CG backtracking


class ScriptedIterates(Quadratic):
    """c at CG's iterates x_i (scipy's CG, from zero) is (i - best)^2; 100 at w = 0."""

    def __init__(self, n, best, seed=0):
        super().__init__(spd_matrix(n, 1e3, seed), np.random.default_rng(seed).standard_normal(n))
        self.best = best
        self.refs = {i: spla.cg(self.a, self.b, rtol=0.0, atol=0.0, maxiter=i)[0]
                     for i in range(1, 16)}
        self.asked: list[int] = []

    def value(self, w):
        if not np.any(w):
            return 100.0
        i = min(self.refs, key=lambda j: np.linalg.norm(w - self.refs[j]))
        assert np.linalg.norm(w - self.refs[i]) <= 1e-6 * np.linalg.norm(w), "not a CG iterate"
        self.asked.append(i)
        return float((i - self.best) ** 2)

    def value_and_grad(self, w):
        return self.value(w), self.a @ w - self.b


@pytest.mark.parametrize(("best", "asked", "chosen"), [
    (7, [12, 11, 9, 7, 5], 7),  # walk back while c decreases, stop at the first rise
    (12, [12, 11], 12),  # the last iterate is best: one extra evaluation
    (1, [12, 11, 9, 7, 5, 4, 3, 2, 1], 1),
])
def test_cg_backtracking_picks_the_lowest_objective(best, asked, chosen):
    prob = ScriptedIterates(30, best)
    cfg = NewtonConfig(cg_backtracking=True, cg_rtol=0.0, cg_max_iter=12, warm_start="zero")
    new_w, state, info = newton_step(prob, np.zeros(30), NewtonState(), cfg)
    assert [i for i, _ in info.cg.iterates] == [1, 2, 3, 4, 5, 7, 9, 11, 12]
    assert prob.asked == asked  # the line search reused c(w + x_chosen): no more calls
    assert info.backtrack_iter == chosen and info.backtrack_values == len(asked)
    assert info.record()["backtrack_iter"] == chosen
    assert info.step.step == 1.0 and info.step.trials == 1 and info.new_loss == 0.0
    np.testing.assert_allclose(new_w, prob.refs[chosen], rtol=1e-8)
    np.testing.assert_array_equal(state.cg_warm, info.cg.x)  # the last iterate warms the next


def test_cg_backtracking_rho_uses_the_chosen_iterate():
    a = spd_matrix(10, 1e2, 1)
    prob = Quadratic(a, np.ones(10))  # exact model: rho = 1 for any iterate
    cfg = NewtonConfig(cg_backtracking=True, cg_rtol=0.0, cg_max_iter=6, warm_start="zero")
    _, _, info = newton_step(prob, np.zeros(10), NewtonState(), cfg)
    assert info.backtrack_iter == 6  # on a quadratic the last CG iterate is best
    assert info.rho == pytest.approx(1.0, rel=1e-8)


# --------------------------------------------------- negative-curvature steps


def test_negative_curvature_direction_by_hand_on_double_well():
    prob = DoubleWell()
    w = np.array([0.1, 0.01])
    _, g = prob.value_and_grad(w)
    cfg = NewtonConfig(negative_curvature="direction")
    new_w, state, info = newton_step(prob, w, NewtonState(), cfg)
    # CG meets p0 = -g with p.Hp < 0 at once; the step is |p.Hp|/|p|^2 along p/|p|
    p = -g
    php = (3 * w[0] ** 2 - 1) * p[0] ** 2 + p[1] ** 2
    assert info.cg.reason is CGReason.NEGATIVE_CURVATURE and php < 0
    d = (-php / (p @ p)) * p / np.linalg.norm(p)
    assert info.negative_curvature_step and not info.fallback
    assert info.step.step == 1.0 and state.negative_curvature_steps == 1
    np.testing.assert_allclose(new_w, w + d, rtol=1e-12)
    assert info.new_loss < prob.value(w - g) < info.loss  # farther than the thesis' -g step
    assert info.record()["negative_curvature_step"] is True


def test_negative_curvature_direction_escapes_the_saddle():
    w0 = np.array([0.1, 0.01])
    thesis = minimize(DoubleWell(), w0, max_iter=100)
    hf = minimize(DoubleWell(), w0, max_iter=100,
                  config=NewtonConfig(negative_curvature="direction"))
    assert thesis.converged and hf.converged
    assert thesis.history[0].fallback and not thesis.history[0].negative_curvature_step
    assert hf.history[0].negative_curvature_step and not hf.history[0].fallback
    for res in (thesis, hf):
        np.testing.assert_allclose(np.abs(res.x), [1.0, 0.0], atol=1e-8)
        assert 3 * res.x[0] ** 2 - 1 > 0  # a minimum, not the saddle
    assert hf.iterations < thesis.iterations


def test_negative_curvature_direction_at_a_later_cg_iteration():
    a = np.diag([1.0, 2.0, -3.0])
    prob = Quadratic(a, np.array([-1.0, -1.0, -0.1]))  # g = -b at w = 0 as in test_cg
    cfg = NewtonConfig(negative_curvature="direction", cg_rtol=1e-12, warm_start="zero")
    _, _, info = newton_step(prob, np.zeros(3), NewtonState(), cfg)
    assert info.cg.reason is CGReason.NEGATIVE_CURVATURE and info.cg.iterations >= 2
    p, pap = info.cg.negative_curvature_direction, info.cg.negative_curvature_value
    g = prob.value_and_grad(np.zeros(3))[1]
    d = -np.sign(g @ p) * (-pap / (p @ p)) * p / np.linalg.norm(p)
    new_w, _, info = newton_step(prob, np.zeros(3), NewtonState(), cfg)
    np.testing.assert_allclose(new_w, info.step.step * d, rtol=1e-12)
    assert info.negative_curvature_step and g @ d < 0
    assert info.direction_dot_grad == pytest.approx(g @ d, rel=1e-12)
    # the undamped model along d: rho computed from d.A d = |d|^2 * pap/|p|^2
    assert math.isfinite(info.rho)


# --------------------------------------------------------- config, state, record


@pytest.mark.parametrize(("field", "value"), [
    ("curvature", "fisher"),
    ("damping_rule", "adaptive"),
    ("lm_increase", 1.0),
    ("lm_decrease", 1.5),
    ("lm_rho_low", 0.0),
    ("lm_rho_high", 0.1),
    ("damping_min", -1.0),
    ("damping_max", 0.0),
    ("preconditioner", "jacobi"),
    ("preconditioner_power", 0.0),
    ("preconditioner_samples", 0),
    ("preconditioner_seed", -1),
    ("preconditioner_floor", 0.0),
    ("forcing", "quadratic"),
    ("forcing_max", 1.0),
    ("forcing_gamma", 1.5),
    ("forcing_alpha", 1.0),
    ("cg_backtracking", "yes"),
    ("negative_curvature", "ignore"),
])
def test_new_config_fields_are_validated(field, value):
    with pytest.raises(ValueError) as err:
        NewtonConfig(**{field: value})
    assert f"NewtonConfig.{field}" in str(err.value) and repr(value) in str(err.value)


def test_new_config_defaults_are_the_thesis():
    cfg = NewtonConfig()
    assert (cfg.curvature, cfg.damping_rule, cfg.preconditioner, cfg.forcing,
            cfg.cg_backtracking, cfg.negative_curvature) == (
        "hessian", "fixed", "none", "fixed", False, "discard")
    assert (cfg.lm_increase, cfg.lm_decrease, cfg.preconditioner_power,
            cfg.preconditioner_samples, cfg.forcing_max) == (1.5, 2 / 3, 0.75, 10, 0.5)
    assert not uses_hessian_free_options(cfg)
    assert uses_hessian_free_options(NewtonConfig(cg_backtracking=True))


def test_state_round_trip_with_new_fields():
    st = NewtonState(iteration=4, cg_warm=np.array([1.0, 2.0]), total_matvecs=20,
                     total_preconditioner_matvecs=10, negative_curvature_steps=1,
                     damping=0.125, forcing_grad_norm=0.3, forcing_eta=0.225)
    d = st.to_dict()
    assert set(d) == THESIS_STATE_KEYS | {"total_preconditioner_matvecs",
                                          "negative_curvature_steps", "damping",
                                          "forcing_grad_norm", "forcing_eta"}
    assert NewtonState.from_dict(d) == st
    j = json.loads(json.dumps({**d, "cg_warm": d["cg_warm"].tolist()}))
    assert NewtonState.from_dict(j) == st
    assert st != st.replace(damping=0.25) and st != st.replace(forcing_eta=None)
    # a thesis state keeps exactly its old keys (old checkpoints load, new ones match)
    assert set(NewtonState(iteration=2).to_dict()) == THESIS_STATE_KEYS
    assert NewtonState.from_dict(NewtonState(iteration=2).to_dict()).damping is None
    for bad in ({"damping": -1.0}, {"damping": math.inf}, {"forcing_eta": 1.5},
                {"forcing_grad_norm": math.nan}, {"negative_curvature_steps": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NewtonState(**bad)


def test_extended_record_is_json():
    prob = Quadratic(spd_matrix(4, 10.0, 0), np.ones(4))
    _, _, info = newton_step(prob, np.zeros(4), NewtonState(),
                             NewtonConfig(damping_rule="levenberg_marquardt", damping=1.0))
    rec = info.record()
    assert set(rec) == HF_RECORD_KEYS
    assert rec["preconditioner"] == "none" and rec["curvature"] == "hessian"
    assert rec["backtrack_iter"] is None and rec["cg_rtol"] == 1e-2
    json.dumps(rec, allow_nan=False)
    _, _, zero = newton_step(Quadratic(np.eye(2), np.zeros(2)), np.zeros(2), NewtonState(),
                             NewtonConfig(forcing="sqrt_grad"))
    assert zero.cg is None and zero.record()["rho"] is None and zero.record()["cg_rtol"] is None


# ------------------------------------------- frozen reference: the thesis step
# A copy of cg() and newton_step() as they were before the Hessian-free options
# (validation and docstrings trimmed): with every option at its default the new
# code must reproduce them bitwise.


def _reference_cg(op, b, x0, rtol, atol, max_iter, scale_tol_sqrt_n):
    n = b.size
    dtype = b.dtype

    def apply(v):
        return op.matvec(v).astype(dtype, copy=False)

    bnorm = float(np.linalg.norm(b))
    tol = max(rtol * bnorm, atol)
    if scale_tol_sqrt_n:
        tol *= math.sqrt(n)
    if bnorm == 0.0:
        return np.zeros(n, dtype=dtype), CGReason.CONVERGED, 0, 0, 0.0
    matvecs = 0
    if x0 is not None and np.any(x0):
        x = x0.astype(dtype, copy=True)
        r = b - apply(x)
        matvecs += 1
    else:
        x = np.zeros(n, dtype=dtype)
        r = b.copy()
    rr = float(r @ r)
    if not math.isfinite(rr):
        return x, CGReason.NAN_OR_INF, 0, matvecs, math.nan
    rnorm = math.sqrt(rr)
    if rnorm <= tol:
        return x, CGReason.CONVERGED, 0, matvecs, rnorm
    p = r.copy()
    iterations = 0
    while iterations < max_iter:
        Ap = apply(p)
        matvecs += 1
        iterations += 1
        pAp = float(p @ Ap)
        if not math.isfinite(pAp):
            return x, CGReason.NAN_OR_INF, iterations, matvecs, rnorm
        if pAp <= 0.0:
            return x, CGReason.NEGATIVE_CURVATURE, iterations, matvecs, rnorm
        alpha = rr / pAp
        with np.errstate(over="ignore", invalid="ignore"):
            x_new = x + alpha * p
            r_new = r - alpha * Ap
            rr_new = float(r_new @ r_new)
        if not (math.isfinite(alpha) and math.isfinite(rr_new) and np.all(np.isfinite(x_new))):
            return x, CGReason.NAN_OR_INF, iterations, matvecs, rnorm
        x, r = x_new, r_new
        rnorm = math.sqrt(rr_new)
        if rnorm <= tol:
            return x, CGReason.CONVERGED, iterations, matvecs, rnorm
        beta = rr_new / rr
        rr = rr_new
        p = r + beta * p
    return x, CGReason.MAX_ITER, iterations, matvecs, rnorm


def _reference_step(problem, w, warm_in, config):
    """Old newton_step: (new_w, warm, fallback, x, reason, iters, matvecs, rnorm, ls)."""
    loss, g = problem.value_and_grad(w)
    gg = float(g @ g)
    if config.warm_start == "previous":
        x0 = warm_in if warm_in is not None and warm_in.shape == w.shape else None
    elif config.warm_start == "weights":
        norm = float(np.linalg.norm(w))
        x0 = None if norm == 0.0 or not math.isfinite(norm) else w / norm
    else:
        x0 = None
    x, reason, iters, matvecs, rnorm = _reference_cg(
        damped(HessianOperator(problem, w), config.damping), -g, x0, config.cg_rtol,
        config.cg_atol, config.cg_max_iter, config.cg_scale_tol_sqrt_n)
    cg_dot = float(g @ x)
    fallback = (reason is CGReason.NAN_OR_INF or not math.isfinite(cg_dot)
                or cg_dot > config.descent_threshold or cg_dot >= 0.0)
    s, dot = (-g, -gg) if fallback else (x, cg_dot)

    def phi(sigma):
        with np.errstate(over="ignore", invalid="ignore"):
            trial = w + sigma * s
        if not np.all(np.isfinite(trial)):
            return math.inf
        return float(problem.value(trial))

    if config.step_rule == "armijo":
        ls = armijo(phi, loss, dot, beta=config.armijo_beta, gamma=config.armijo_gamma,
                    max_trials=config.armijo_max_trials)
    else:
        ls = fixed_step(phi, config.learning_rate)
        if not ls.success:
            ls = LineSearchResult(step=0.0, value=loss, trials=ls.trials, success=False)
    if ls.success:
        new_w, warm = w + ls.step * s, (None if fallback else x)
    else:
        new_w, warm = w.copy(), None
    return new_w, warm, fallback, x, reason, iters, matvecs, rnorm, ls


@pytest.mark.parametrize(("problem", "w0"), [
    (Rosenbrock(), np.array([-1.2, 1.0] * 5)),
    (DoubleWell(), np.array([0.1, 0.01])),
    (Quadratic(np.diag([3.0, 1.0, -0.5, 2.0]), np.array([1.0, -1.0, 0.5, 0.2])),
     np.array([0.3, 0.1, -0.2, 0.0])),
], ids=["rosenbrock", "double-well", "indefinite-quadratic"])
@pytest.mark.parametrize("config", [
    NewtonConfig(),
    NewtonConfig(warm_start="zero", damping=0.1),
    NewtonConfig(warm_start="weights", cg_scale_tol_sqrt_n=True, damping=1e-3),
    NewtonConfig(step_rule="fixed", learning_rate=0.5, cg_max_iter=3),
    NewtonConfig(cg_rtol=1e-8, armijo_max_trials=4, armijo_beta=0.3),
], ids=["default", "zero-damped", "weights-sqrtn", "fixed-lr", "tight"])
def test_defaults_are_bitwise_the_thesis_step(problem, w0, config):
    assert not uses_hessian_free_options(config)
    w, w_ref, state, warm = w0.copy(), w0.copy(), NewtonState(), None
    counters = np.zeros(4, dtype=int)
    for _ in range(12):
        w, state, info = newton_step(problem, w, state, config)
        w_ref, warm, fallback, x, reason, iters, matvecs, rnorm, ls = _reference_step(
            problem, w_ref, warm, config)
        assert w.tobytes() == w_ref.tobytes()
        assert info.cg.x.tobytes() == x.tobytes()
        assert (info.cg.reason, info.cg.iterations, info.cg.matvecs) == (reason, iters, matvecs)
        assert info.cg.residual_norm == rnorm or (math.isnan(rnorm)
                                                  and math.isnan(info.cg.residual_norm))
        assert info.fallback == fallback and info.step == ls
        assert (state.cg_warm is None) == (warm is None)
        if warm is not None:
            assert state.cg_warm.tobytes() == warm.tobytes()
        counters += [iters, matvecs, int(fallback), int(not ls.success)]
        assert [state.total_cg_iters, state.total_matvecs, state.fallbacks,
                state.failed_linesearches] == counters.tolist()
        assert set(info.record()) == THESIS_RECORD_KEYS
        assert set(state.to_dict()) == THESIS_STATE_KEYS
        if info.stalled:
            break
