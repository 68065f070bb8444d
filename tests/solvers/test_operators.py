import numpy as np
import pytest
import scipy.optimize as so
import scipy.sparse.linalg as spla

from mpinewton.solvers import (
    CGReason,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    as_scipy,
    aslinearoperator,
    cg,
    damped,
    identity,
)
from mpinewton.solvers.operators import ScaledIdentity, SumOperator

from .problems import Quadratic, Rosenbrock, Spy, spd_matrix


class WSpy(Spy):
    """Spy that also records the weights each Hessian product was taken at."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.hvp_weights: list[np.ndarray] = []

    def hvp(self, w, v):
        self.hvp_weights.append(np.array(w, copy=True))
        return super().hvp(w, v)


def rng_matrix(n: int, seed: int, cols: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n if cols is None else cols))


# ------------------------------------------------------------ MatrixOperator


def test_matrix_operator_products_equal_numpy_and_are_counted():
    a = rng_matrix(5, 0)  # not symmetric: the operator must not assume it
    v = np.random.default_rng(1).standard_normal(5)
    m = rng_matrix(5, 2, cols=3)
    op = MatrixOperator(a)
    assert op.shape == (5, 5) and op.dtype == np.float64 and op.products == 0
    np.testing.assert_array_equal(op.matvec(v), a @ v)
    assert op.products == 1
    np.testing.assert_array_equal(op.matmat(m), a @ m)
    assert op.products == 4  # one per column
    np.testing.assert_array_equal(op @ v, a @ v)
    np.testing.assert_array_equal(op @ m, a @ m)
    assert op.products == 8


def test_generic_matmat_counts_one_product_per_column():
    a = rng_matrix(4, 3)
    calls = []

    def mv(v):
        calls.append(v.copy())
        return a @ v

    op = aslinearoperator(mv, n=4)
    m = rng_matrix(4, 4, cols=3)
    np.testing.assert_allclose(op.matmat(m), a @ m, rtol=1e-14)
    assert op.products == 3 and len(calls) == 3
    for j in range(3):
        np.testing.assert_array_equal(calls[j], m[:, j])
    empty = op.matmat(np.zeros((4, 0)))
    assert empty.shape == (4, 0) and op.products == 3


def test_matvec_shape_error_names_both_shapes_and_counts_nothing():
    op = MatrixOperator(np.eye(5))
    with pytest.raises(ValueError, match=r"MatrixOperator\.matvec.*\(4,\).*\(5,\)"):
        op.matvec(np.ones(4))
    with pytest.raises(ValueError, match=r"\(5, 1\).*\(5,\)"):
        op.matvec(np.ones((5, 1)))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(5, k\)"):
        op.matmat(np.ones((4, 2)))
    assert op.products == 0


def test_matvec_checks_the_product_shape():
    op = aslinearoperator(lambda v: np.ones(3), n=4)
    with pytest.raises(ValueError, match=r"product has shape \(3,\).*\(4,\)"):
        op.matvec(np.ones(4))
    assert op.products == 0


def test_non_square_matrix_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        MatrixOperator(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"square.*\(4,\)"):
        MatrixOperator(np.ones(4))


# ----------------------------------------------------------- HessianOperator


def test_hessian_of_quadratic_is_exactly_a():
    a = spd_matrix(6, 1e3, 0)
    prob = WSpy(Quadratic(a, np.ones(6)))
    w = np.linspace(-2.0, 3.0, 6)
    op = HessianOperator(prob, w)
    assert op.shape == (6, 6)
    np.testing.assert_array_equal(op.matmat(np.eye(6)), a)
    assert op.products == 6 and len(prob.hvp_calls) == 6
    for j, (wj, vj) in enumerate(zip(prob.hvp_weights, prob.hvp_calls, strict=True)):
        np.testing.assert_array_equal(wj, w)
        np.testing.assert_array_equal(vj, np.eye(6)[:, j])
    assert prob.vg_calls == [] and prob.value_calls == []


@pytest.mark.parametrize("seed", [0, 1])
def test_hessian_of_rosenbrock_matches_rosen_hess(seed):
    w = np.random.default_rng(seed).uniform(-2.0, 2.0, 7)
    prob = WSpy(Rosenbrock())
    op = HessianOperator(prob, w)
    h = op.matmat(np.eye(7))
    ref = so.rosen_hess(w)
    np.testing.assert_allclose(h, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    v = np.random.default_rng(10 + seed).standard_normal(7)
    np.testing.assert_allclose(op.matvec(v), ref @ v, rtol=1e-12,
                               atol=1e-12 * np.abs(ref).max() * np.abs(v).sum())
    assert op.products == 8 and len(prob.hvp_calls) == 8
    for wj in prob.hvp_weights:
        np.testing.assert_array_equal(wj, w)


def test_hessian_operator_refuses_non_vector_weights():
    with pytest.raises(ValueError, match=r"1-D.*\(2, 2\)"):
        HessianOperator(Rosenbrock(), np.ones((2, 2)))


# ------------------------------------------------------------------- damping


def test_damped_with_zero_is_the_operator_itself():
    op = MatrixOperator(np.eye(3))
    assert damped(op, 0) is op
    assert damped(op, 0.0) is op


@pytest.mark.parametrize("alpha", [0.25, 3.0])
def test_damped_equals_a_plus_alpha_identity(alpha):
    a = spd_matrix(5, 1e2, 1)
    op = damped(MatrixOperator(a), alpha)
    assert op.shape == (5, 5)
    np.testing.assert_array_equal(op.matmat(np.eye(5)), a + alpha * np.eye(5))
    v = np.random.default_rng(2).standard_normal(5)
    np.testing.assert_array_equal(op.matvec(v), a @ v + alpha * v)


def test_sum_with_scaled_identity_is_bitwise_a_v_plus_alpha_v():
    n = 9
    a = rng_matrix(n, 5)
    alpha = 0.1  # not a power of two: alpha * v rounds
    rng = np.random.default_rng(6)
    op = MatrixOperator(a) + alpha * identity(n)
    assert isinstance(op, SumOperator)
    for _ in range(5):
        v = rng.standard_normal(n)
        np.testing.assert_array_equal(op.matvec(v), a @ v + alpha * v)
    # the summands were each applied once per product
    assert op.a.products == 5 and op.b.products == 5 and op.products == 5


def test_scaled_identity_scaling():
    s = 2.0 * identity(4)
    assert isinstance(s, ScaledIdentity) and s.alpha == 2.0
    assert (identity(4) * 3.0).alpha == 3.0
    assert (np.float64(0.5) * identity(4)).alpha == 0.5
    v = np.arange(4.0)
    np.testing.assert_array_equal(s.matvec(v), 2.0 * v)


def test_adding_operators_of_different_shapes_is_an_error():
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(4, 4\)"):
        MatrixOperator(np.eye(3)) + identity(4)
    with pytest.raises(TypeError):
        MatrixOperator(np.eye(3)) + np.eye(3)


@pytest.mark.parametrize("alpha", [np.inf, -np.inf, np.nan])
def test_damped_refuses_non_finite_damping(alpha):
    with pytest.raises(ValueError, match="finite"):
        damped(MatrixOperator(np.eye(3)), alpha)


# ----------------------------------------------------------- aslinearoperator


def test_aslinearoperator_from_callable_with_size():
    a = rng_matrix(4, 7)
    op = aslinearoperator(lambda v: a @ v, n=4)
    assert isinstance(op, LinearOperator) and op.shape == (4, 4) and op.dtype == np.float64
    v = np.arange(4.0)
    np.testing.assert_array_equal(op.matvec(v), a @ v)
    assert op.products == 1
    assert aslinearoperator(lambda v: v, n=3, dtype=np.float32).dtype == np.float32


def test_aslinearoperator_from_ndarray_and_operator():
    a = rng_matrix(3, 8)
    op = aslinearoperator(a)
    assert isinstance(op, MatrixOperator) and op.matrix is a
    np.testing.assert_array_equal(op.matvec(np.ones(3)), a @ np.ones(3))
    assert aslinearoperator(op) is op
    assert aslinearoperator(op, n=99) is op


def test_aslinearoperator_errors():
    with pytest.raises(ValueError, match="size n"):
        aslinearoperator(lambda v: v)
    with pytest.raises(TypeError, match="list"):
        aslinearoperator([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="size"):
        aslinearoperator(lambda v: v, n=-1)


# ------------------------------------------------------------------ as_scipy


def test_eigsh_on_as_scipy_finds_top_eigenvalues():
    n = 30
    rng = np.random.default_rng(11)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    eigs = np.concatenate([np.linspace(0.1, 5.0, n - 3), [7.0, 9.0, 12.0]])
    a = (q * eigs) @ q.T
    a = 0.5 * (a + a.T)
    op = MatrixOperator(a)
    top = np.sort(spla.eigsh(as_scipy(op), k=3, return_eigenvectors=False))
    np.testing.assert_allclose(top, np.linalg.eigvalsh(a)[-3:], rtol=0, atol=1e-8)
    np.testing.assert_allclose(top, [7.0, 9.0, 12.0], rtol=0, atol=1e-8)
    assert op.products > 0  # eigsh really went through our operator


def test_as_scipy_products_and_shape():
    a = rng_matrix(5, 12)
    op = MatrixOperator(a)
    sop = as_scipy(op)
    assert sop.shape == (5, 5) and sop.dtype == np.float64
    v = np.arange(5.0)
    np.testing.assert_array_equal(sop.matvec(v), a @ v)
    np.testing.assert_array_equal(sop.matvec(v[:, None]).ravel(), a @ v)
    m = rng_matrix(5, 13, cols=2)
    np.testing.assert_array_equal(sop.matmat(m), a @ m)
    assert op.products == 4


def test_scipy_cg_on_as_scipy_damped_solves_damped_system():
    n, alpha = 12, 0.7
    a = spd_matrix(n, 1e2, 3)
    b = np.random.default_rng(4).standard_normal(n)
    x, code = spla.cg(as_scipy(damped(MatrixOperator(a), alpha)), b, rtol=1e-12, maxiter=500)
    assert code == 0
    np.testing.assert_allclose(x, np.linalg.solve(a + alpha * np.eye(n), b), rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_our_cg_on_damped_hessian_operator_matches_numpy_solve(alpha):
    n = 10
    a = spd_matrix(n, 1e3, 5)
    prob = WSpy(Quadratic(a, np.zeros(n)))
    w = np.random.default_rng(8).standard_normal(n)
    b = np.random.default_rng(9).standard_normal(n)
    res = cg(damped(HessianOperator(prob, w), alpha), b, rtol=1e-13, max_iter=10 * n)
    assert res.reason is CGReason.CONVERGED
    np.testing.assert_allclose(res.x, np.linalg.solve(a + alpha * np.eye(n), b), rtol=1e-8)
    assert len(prob.hvp_calls) == res.matvecs
    for wj in prob.hvp_weights:
        np.testing.assert_array_equal(wj, w)


def test_hessian_operator_keeps_the_point_it_was_made_at():
    w = np.array([-1.2, 1.0])
    op = HessianOperator(Rosenbrock(), w)
    before = op.matvec(np.array([1.0, 0.0]))
    w[:] = 0.0
    np.testing.assert_array_equal(op.matvec(np.array([1.0, 0.0])), before)
