import math

import numpy as np
import pytest
import scipy.sparse.linalg as spla

from mpinewton.solvers import CGReason, CGResult, MatrixOperator, aslinearoperator, cg, damped
from mpinewton.solvers.cg import keep_schedule
from mpinewton.solvers.operators import DiagonalOperator

from .problems import spd_matrix


class Counting:
    """Matvec that counts its calls and can inject a non-finite product."""

    def __init__(self, a: np.ndarray, poison_at: int | None = None, poison=np.nan) -> None:
        self.a = a
        self.calls = 0
        self.poison_at = poison_at
        self.poison = poison

    def __call__(self, v):
        self.calls += 1
        out = self.a @ v
        if self.poison_at is not None and self.calls >= self.poison_at:
            out = out.copy()
            out[0] = self.poison
        return out


@pytest.mark.parametrize("n", [6, 40])
@pytest.mark.parametrize("cond", [1e1, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_matches_numpy_solve(n, cond, seed, damping):
    a = spd_matrix(n, cond, seed)
    b = np.random.default_rng(100 + seed).standard_normal(n)
    rtol = 1e-12
    res = cg(damped(MatrixOperator(a), damping), b, rtol=rtol, max_iter=10 * n)
    m = a + damping * np.eye(n)
    exact = np.linalg.solve(m, b)
    assert res.reason is CGReason.CONVERGED
    assert res.residual_norm <= res.tolerance == rtol * np.linalg.norm(b)
    # error <= kappa * relative residual (allow a little for the recursive residual drift)
    kappa = np.linalg.cond(m)
    err = np.linalg.norm(res.x - exact) / np.linalg.norm(exact)
    assert err <= 10 * kappa * rtol + 1e-12
    true_res = np.linalg.norm(b - m @ res.x)
    assert true_res <= 10 * res.tolerance + 1e-13 * kappa * np.linalg.norm(b)
    assert res.matvecs == res.iterations


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_converges_within_n_iterations(seed):
    n = 8
    a = spd_matrix(n, 10.0, seed)
    b = np.random.default_rng(seed).standard_normal(n)
    res = cg(lambda v: a @ v, b, rtol=1e-10)
    assert res.reason is CGReason.CONVERGED
    assert res.iterations <= n
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_iterations_equal_number_of_distinct_eigenvalues(seed):
    # CG terminates after as many steps as A has distinct eigenvalues (Krylov property).
    n = 30
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.repeat([1.0, 4.0, 9.0], n // 3)
    a = (q * eig) @ q.T
    b = rng.standard_normal(n)
    res = cg(lambda v: a @ v, b, rtol=1e-10)
    assert res.reason is CGReason.CONVERGED
    assert res.iterations == 3


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_iterates_match_scipy_cg(k):
    n = 25
    a = spd_matrix(n, 1e3, 7)
    b = np.random.default_rng(7).standard_normal(n)
    ours = cg(lambda v: a @ v, b, rtol=0.0, max_iter=k)
    ref, _ = spla.cg(a, b, rtol=0.0, atol=0.0, maxiter=k)
    assert ours.reason is CGReason.MAX_ITER and ours.iterations == k
    np.testing.assert_allclose(ours.x, ref, rtol=1e-10, atol=1e-12)


def test_warm_start_from_exact_solution_takes_zero_iterations():
    n = 20
    a = spd_matrix(n, 1e2, 3)
    b = np.random.default_rng(3).standard_normal(n)
    exact = np.linalg.solve(a + 0.1 * np.eye(n), b)
    mv = Counting(a)
    res = cg(damped(aslinearoperator(mv, n), 0.1), b, x0=exact, rtol=1e-8)
    assert res.reason is CGReason.CONVERGED
    assert res.iterations == 0
    assert res.matvecs == 1 == mv.calls
    np.testing.assert_array_equal(res.x, exact)


def test_warm_start_with_damping_solves_damped_system():
    n = 15
    a = spd_matrix(n, 1e3, 4)
    rng = np.random.default_rng(4)
    b, x0 = rng.standard_normal(n), rng.standard_normal(n)
    mv = Counting(a)
    res = cg(damped(aslinearoperator(mv, n), 2.0), b, x0=x0, rtol=1e-12, max_iter=10 * n)
    assert res.reason is CGReason.CONVERGED
    np.testing.assert_allclose(res.x, np.linalg.solve(a + 2.0 * np.eye(n), b), rtol=1e-9)
    assert mv.calls == res.matvecs == res.iterations + 1


def test_zero_x0_costs_no_matvec():
    a = spd_matrix(10, 10.0, 0)
    b = np.ones(10)
    mv_zero, mv_none = Counting(a), Counting(a)
    r1 = cg(mv_zero, b, x0=np.zeros(10))
    r2 = cg(mv_none, b)
    assert mv_zero.calls == mv_none.calls == r1.matvecs == r1.iterations
    np.testing.assert_array_equal(r1.x, r2.x)


@pytest.mark.parametrize("max_iter", [1, 3, 7])
def test_one_matvec_per_iteration(max_iter):
    a = spd_matrix(30, 1e4, 5)
    mv = Counting(a)
    res = cg(mv, np.ones(30), rtol=0.0, max_iter=max_iter)
    assert res.reason is CGReason.MAX_ITER
    assert res.iterations == res.matvecs == mv.calls == max_iter
    assert res.residual_norm > res.tolerance


def test_max_iter_default_is_n():
    n = 12
    mv = Counting(spd_matrix(n, 1e4, 1))
    res = cg(mv, np.ones(n), rtol=0.0)
    assert res.reason is CGReason.MAX_ITER and res.iterations == n == mv.calls


def test_zero_rhs():
    mv = Counting(np.eye(4))
    res = cg(mv, np.zeros(4), x0=np.arange(4.0))
    assert res.reason is CGReason.CONVERGED
    assert res.iterations == res.matvecs == mv.calls == 0
    np.testing.assert_array_equal(res.x, np.zeros(4))


def test_negative_curvature_at_first_iteration_returns_start():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a = (q * np.array([-1.0, 1.0, 2.0, 3.0, 4.0])) @ q.T
    b = q[:, 0]  # an eigenvector of eigenvalue -1: p0.A p0 = -1
    res = cg(lambda v: a @ v, b)
    assert res.reason is CGReason.NEGATIVE_CURVATURE
    assert res.iterations == 1
    np.testing.assert_array_equal(res.x, np.zeros(5))
    # damping that makes the system positive definite removes the negative curvature
    res2 = cg(damped(MatrixOperator(a), 1.5), b, rtol=1e-12)
    assert res2.reason is CGReason.CONVERGED
    np.testing.assert_allclose(res2.x, b / 0.5, rtol=1e-10)


def test_negative_curvature_later_returns_current_iterate():
    a = np.diag([1.0, 2.0, -3.0])
    b = np.array([1.0, 1.0, 0.1])  # b.A b > 0: the first step is taken
    assert b @ a @ b > 0
    res = cg(lambda v: a @ v, b, rtol=1e-12)
    assert res.reason is CGReason.NEGATIVE_CURVATURE
    k = res.iterations
    assert k >= 2
    capped = cg(lambda v: a @ v, b, rtol=1e-12, max_iter=k - 1)
    np.testing.assert_array_equal(res.x, capped.x)
    assert b @ res.x > 0  # a CG iterate from 0 is a descent direction for -b


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("poison_at", [1, 3])
def test_nan_or_inf_returns_last_finite_iterate(poison, poison_at):
    n = 10
    a = spd_matrix(n, 1e3, 2)
    b = np.ones(n)
    mv = Counting(a, poison_at=poison_at, poison=poison)
    res = cg(mv, b, rtol=1e-12)
    assert res.reason is CGReason.NAN_OR_INF
    assert res.iterations == poison_at == mv.calls
    capped = cg(lambda v: a @ v, b, rtol=1e-12, max_iter=poison_at - 1)
    np.testing.assert_array_equal(res.x, capped.x)
    assert np.all(np.isfinite(res.x))


def test_nan_in_warm_start_residual():
    mv = Counting(np.eye(3), poison_at=1)
    x0 = np.array([1.0, 2.0, 3.0])
    res = cg(mv, np.ones(3), x0=x0)
    assert res.reason is CGReason.NAN_OR_INF
    assert res.iterations == 0 and res.matvecs == 1
    np.testing.assert_array_equal(res.x, x0)


def test_non_finite_rhs():
    res = cg(lambda v: v, np.array([1.0, np.nan]))
    assert res.reason is CGReason.NAN_OR_INF and res.matvecs == 0


@pytest.mark.parametrize("n", [4, 100, 1000])
@pytest.mark.parametrize(("rtol", "atol"), [(1e-3, 0.0), (0.0, 1e-2), (1e-6, 1e-2)])
def test_sqrt_n_scaling_of_tolerance(n, rtol, atol):
    a = spd_matrix(n, 1e3, 0) if n <= 100 else np.diag(np.logspace(0, 3, n))
    b = np.random.default_rng(n).standard_normal(n)
    plain = cg(lambda v: a @ v, b, rtol=rtol, atol=atol)
    scaled = cg(lambda v: a @ v, b, rtol=rtol, atol=atol, scale_tol_sqrt_n=True)
    base = max(rtol * np.linalg.norm(b), atol)
    assert plain.tolerance == base
    assert scaled.tolerance == base * math.sqrt(n)
    assert scaled.tolerance / plain.tolerance == pytest.approx(math.sqrt(n), rel=1e-15)
    assert plain.residual_norm <= plain.tolerance
    assert scaled.residual_norm <= scaled.tolerance
    assert scaled.iterations <= plain.iterations


def test_deterministic_bitwise():
    a = spd_matrix(50, 1e4, 9)
    b = np.random.default_rng(9).standard_normal(50)
    x0 = np.random.default_rng(10).standard_normal(50)
    r1 = cg(damped(MatrixOperator(a), 1e-3), b, x0=x0, rtol=1e-9)
    r2 = cg(damped(MatrixOperator(a), 1e-3), b.copy(), x0=x0.copy(), rtol=1e-9)
    assert r1.x.tobytes() == r2.x.tobytes()
    assert (r1.reason, r1.iterations, r1.matvecs) == (r2.reason, r2.iterations, r2.matvecs)
    assert r1.residual_norm == r2.residual_norm


def test_float32_stays_float32():
    a = spd_matrix(10, 10.0, 0).astype(np.float32)
    b = np.ones(10, dtype=np.float32)
    res = cg(lambda v: a @ v, b, rtol=1e-4)
    assert res.x.dtype == np.float32
    assert res.reason is CGReason.CONVERGED
    np.testing.assert_allclose(res.x, np.linalg.solve(a.astype(float), b), rtol=1e-3)


def test_result_and_reason_types():
    res = cg(lambda v: v, np.ones(3))
    assert isinstance(res, CGResult)
    assert res.reason == "converged" and res.reason is CGReason.CONVERGED
    assert res.iterations == 1
    with pytest.raises(AttributeError):
        res.iterations = 2  # frozen


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"rtol": -1.0}, "-1.0"),
        ({"atol": float("nan")}, "nan"),
        ({"max_iter": -2}, "-2"),
        ({"x0": np.ones(4)}, "(4,)"),
    ],
)
def test_invalid_arguments(kwargs, needle):
    with pytest.raises(ValueError) as err:
        cg(lambda v: v, np.ones(3), **kwargs)
    assert needle in str(err.value)


def test_damping_must_be_finite():
    with pytest.raises(ValueError, match="inf"):
        damped(MatrixOperator(np.eye(3)), float("inf"))


def test_matvec_of_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        cg(lambda v: np.ones(2), np.ones(3))


# ------------------------------------------- preconditioning (N&W Algorithm 5.3)


def test_pcg_with_exact_diagonal_converges_in_one_iteration():
    d = np.logspace(-3, 3, 40)
    b = np.random.default_rng(0).standard_normal(40)
    plain = cg(MatrixOperator(np.diag(d)), b, rtol=1e-10)
    res = cg(MatrixOperator(np.diag(d)), b, rtol=1e-10, preconditioner=DiagonalOperator(1.0 / d))
    assert res.reason is CGReason.CONVERGED and res.iterations == 1 == res.matvecs
    assert plain.iterations > 10
    np.testing.assert_allclose(res.x, b / d, rtol=1e-12)


def _badly_scaled(n, seed):
    s = np.logspace(0, 3, n)  # row/column scales: D A D with a well-conditioned A
    a = s[:, None] * spd_matrix(n, 10.0, seed) * s[None, :]
    return 0.5 * (a + a.T)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pcg_jacobi_matches_scipy_and_needs_fewer_iterations(seed):
    n = 60
    a = _badly_scaled(n, seed)
    b = np.random.default_rng(seed).standard_normal(n)
    inv_diag = 1.0 / np.diag(a)
    res = cg(MatrixOperator(a), b, rtol=1e-10, max_iter=20 * n,
             preconditioner=lambda v: inv_diag * v)
    plain = cg(MatrixOperator(a), b, rtol=1e-10, max_iter=20 * n)
    ref, info = spla.cg(a, b, rtol=1e-12, atol=0.0, maxiter=20 * n,
                        M=spla.LinearOperator((n, n), matvec=lambda v: inv_diag * v))
    assert info == 0 and res.reason is CGReason.CONVERGED
    exact = np.linalg.solve(a, b)
    np.testing.assert_allclose(res.x, ref, rtol=1e-6, atol=1e-8 * np.abs(exact).max())
    np.testing.assert_allclose(res.x, exact, rtol=1e-6, atol=1e-8 * np.abs(exact).max())
    assert res.iterations < plain.iterations / 2
    assert res.residual_norm <= res.tolerance  # the test is on the unpreconditioned residual


@pytest.mark.parametrize("k", [1, 3, 6])
def test_pcg_iterates_match_scipy(k):
    n = 30
    a = _badly_scaled(n, 5)
    b = np.random.default_rng(5).standard_normal(n)
    m = spla.LinearOperator((n, n), matvec=lambda v: v / np.diag(a))
    ours = cg(MatrixOperator(a), b, rtol=0.0, max_iter=k,
              preconditioner=DiagonalOperator(1 / np.diag(a)))
    ref, _ = spla.cg(a, b, rtol=0.0, atol=0.0, maxiter=k, M=m)
    np.testing.assert_allclose(ours.x, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def test_pcg_identity_preconditioner_is_plain_cg():
    a = spd_matrix(20, 1e3, 4)
    b = np.random.default_rng(4).standard_normal(20)
    plain = cg(MatrixOperator(a), b, rtol=1e-9)
    pre = cg(MatrixOperator(a), b, rtol=1e-9, preconditioner=lambda v: v.copy())
    assert plain.iterations == pre.iterations
    np.testing.assert_allclose(pre.x, plain.x, rtol=1e-12)


def test_pcg_rejects_indefinite_preconditioner():
    with pytest.raises(ValueError, match="positive definite"):
        cg(MatrixOperator(np.eye(3)), np.ones(3), preconditioner=lambda v: -v)


# ---------------------------------------------- model value, iterates, curvature


def _explicit_model(a, b, x):
    return 0.5 * x @ a @ x - b @ x


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("max_iter", [1, 4, 100])
@pytest.mark.parametrize("damping", [0.0, 0.7])
@pytest.mark.parametrize("precondition", [False, True])
def test_model_value_equals_explicit_quadratic(warm, max_iter, damping, precondition):
    n = 25
    a = spd_matrix(n, 1e3, 8)
    rng = np.random.default_rng(8)
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n) if warm else None
    pre = DiagonalOperator(1 / (np.diag(a) + damping)) if precondition else None
    res = cg(damped(MatrixOperator(a), damping), b, x0=x0, rtol=1e-10, max_iter=max_iter,
             preconditioner=pre)
    m = a + damping * np.eye(n)
    assert res.model_value == pytest.approx(_explicit_model(m, b, res.x), rel=1e-9, abs=1e-12)
    assert res.x_dot_ax == pytest.approx(res.x @ m @ res.x, rel=1e-9, abs=1e-12)
    # the undamped curvature from the damped one, as the Newton layer gets it
    undamped = res.x_dot_ax - damping * res.x @ res.x
    assert undamped == pytest.approx(res.x @ a @ res.x, rel=1e-8)


def test_model_value_of_zero_rhs_and_negative_curvature():
    res = cg(lambda v: v, np.zeros(3))
    assert res.model_value == 0.0 and res.x_dot_ax == 0.0
    a = np.diag([1.0, 2.0, -3.0])
    b = np.array([1.0, 1.0, 0.1])
    res = cg(lambda v: a @ v, b, rtol=1e-12)
    assert res.reason is CGReason.NEGATIVE_CURVATURE
    assert res.model_value == pytest.approx(_explicit_model(a, b, res.x), rel=1e-12)


def test_keep_schedule_is_ceil_of_powers_of_1_3():
    it = keep_schedule()
    got = [next(it) for _ in range(14)]
    expect = sorted({math.ceil(1.3**j) for j in range(40)})[:14]
    assert got == expect == [1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 24, 31, 40, 52]


@pytest.mark.parametrize("warm", [False, True])
def test_kept_iterates_are_plain_cg_iterates(warm):
    n = 40
    a = spd_matrix(n, 1e4, 3)
    rng = np.random.default_rng(3)
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n) if warm else None
    res = cg(MatrixOperator(a), b, x0=x0, rtol=0.0, max_iter=20, keep_iterates=True)
    plain = cg(MatrixOperator(a), b, x0=x0, rtol=0.0, max_iter=20)
    assert res.x.tobytes() == plain.x.tobytes()  # keeping iterates changes nothing
    assert [i for i, _ in res.iterates] == [1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 20]
    assert res.iterates[-1][1] is res.x
    assert len(res.iterate_x_dot_ax) == len(res.iterates)
    for (i, x), xax in zip(res.iterates, res.iterate_x_dot_ax, strict=True):
        capped = cg(MatrixOperator(a), b, x0=x0, rtol=0.0, max_iter=i)
        assert x.tobytes() == capped.x.tobytes(), i
        assert xax == pytest.approx(x @ a @ x, rel=1e-9)


def test_kept_iterates_end_with_the_returned_iterate():
    a = spd_matrix(10, 10.0, 0)
    res = cg(MatrixOperator(a), np.ones(10), rtol=1e-10, keep_iterates=True)
    assert res.reason is CGReason.CONVERGED
    assert res.iterates[-1][0] == res.iterations and res.iterates[-1][1] is res.x
    assert len({i for i, _ in res.iterates}) == len(res.iterates)  # no duplicates
    assert cg(MatrixOperator(a), np.ones(10)).iterates == ()  # off by default


def test_negative_curvature_direction_is_returned():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a = (q * np.array([-1.0, 1.0, 2.0, 3.0, 4.0])) @ q.T
    b = q[:, 0]
    res = cg(lambda v: a @ v, b, keep_iterates=True)
    assert res.reason is CGReason.NEGATIVE_CURVATURE
    assert res.iterations == 1
    np.testing.assert_array_equal(res.negative_curvature_direction, b)  # p0 = r0 = b
    assert res.negative_curvature_value == pytest.approx(-1.0, rel=1e-12)
    assert res.iterates == ((0, res.x),)
    # later: p is CG's direction at the breaking iteration, p.A p <= 0
    a2 = np.diag([1.0, 2.0, -3.0])
    res2 = cg(lambda v: a2 @ v, np.array([1.0, 1.0, 0.1]), rtol=1e-12)
    p = res2.negative_curvature_direction
    assert res2.iterations >= 2
    assert res2.negative_curvature_value == pytest.approx(p @ a2 @ p, rel=1e-12)
    assert res2.negative_curvature_value <= 0.0
    # no negative curvature: nothing returned
    ok = cg(lambda v: v, np.ones(3))
    assert ok.negative_curvature_direction is None and math.isnan(ok.negative_curvature_value)
