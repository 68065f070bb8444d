import numpy as np
import pytest

from mpinewton.analysis import lanczos, power_iteration
from mpinewton.solvers import MatrixOperator, aslinearoperator

from .matrices import gapped_spectrum, with_spectrum

TOL = 1e-10
SPECTRUM = gapped_spectrum()
A = with_spectrum(SPECTRUM, seed=2)
EXPECTED = {"LM": [10.0, -9.0, 6.0], "LA": [10.0, 6.0, 4.0], "SA": [-9.0, -5.0, -3.0]}
METHODS = [power_iteration, lanczos]


def _reference_vector(value):
    values, vectors = np.linalg.eigh(A)
    return vectors[:, np.argmin(np.abs(values - value))]


@pytest.mark.parametrize("method", METHODS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_top_three_pairs_match_eigh(method, which):
    op = MatrixOperator(A)
    res = method(op, 3, which=which, tol=TOL)
    reference = np.linalg.eigvalsh(A)
    for value, expected in zip(res.values, EXPECTED[which], strict=True):
        exact = reference[np.argmin(np.abs(reference - expected))]
        assert abs(value - exact) <= 1e-8 * abs(exact)
    for i, expected in enumerate(EXPECTED[which]):
        assert abs(res.vectors[:, i] @ _reference_vector(expected)) >= 1 - 1e-6
    # residuals recomputed here, independently of the result
    true = np.linalg.norm(A @ res.vectors - res.vectors * res.values, axis=0)
    np.testing.assert_allclose(res.residuals, true, rtol=1e-6, atol=1e-14)
    assert np.all(true <= TOL * np.abs(res.values))
    assert res.all_converged and res.converged.dtype == bool
    np.testing.assert_allclose(res.vectors.T @ res.vectors, np.eye(3), atol=1e-12)
    assert res.products == op.products
    assert res.method == ("power" if method is power_iteration else "lanczos")
    assert res.which == which and res.tolerance == TOL and res.iterations.shape == (3,)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_lanczos_needs_far_fewer_products_than_power_iteration(which):
    power = power_iteration(A, 3, which=which, tol=TOL)
    krylov = lanczos(A, 3, which=which, tol=TOL)
    assert krylov.products * 5 < power.products
    # power iteration spends its iterations, a shift search for LA/SA, and one check per pair
    assert power.products >= power.iterations.sum() + 3
    assert (power.shift > 0) == (which != "LM")
    assert krylov.products == krylov.iterations[0] + 3


def test_power_iteration_from_an_eigenvector_stops_at_once():
    u = _reference_vector(10.0)
    res = power_iteration(A, 1, tol=TOL, v0=3 * u)
    assert res.iterations[0] == 1 and res.products == 2
    assert res.values[0] == pytest.approx(10.0, rel=1e-12)


def test_unconverged_pairs_are_reported_as_such():
    res = power_iteration(A, 2, tol=TOL, max_iter=5)
    assert not res.converged.all()
    assert np.array_equal(res.iterations, [5, 5])
    assert np.all(res.residuals[~res.converged] > TOL * np.abs(res.values[~res.converged]))


def test_lanczos_whole_spectrum_and_invariant_subspaces():
    small = with_spectrum([3.0, -2.0, 1.0, 0.5, -0.25], seed=4)
    res = lanczos(small, 5, which="LA", tol=1e-12)
    np.testing.assert_allclose(res.values, [3.0, 1.0, 0.5, -0.25, -2.0], atol=1e-12)
    # 2 I: every Krylov space is invariant after one step; a restart finds the second pair
    for method in METHODS:
        res = method(2.0 * np.eye(4), 2, tol=TOL)
        np.testing.assert_allclose(res.values, [2.0, 2.0], rtol=1e-14)
        np.testing.assert_allclose(res.vectors.T @ res.vectors, np.eye(2), atol=1e-14)
        assert res.all_converged
        zero = method(np.zeros((4, 4)), 2, tol=TOL)
        assert np.array_equal(zero.values, [0.0, 0.0]) and zero.all_converged


def test_results_are_deterministic_given_the_seed():
    for method in METHODS:
        one, two = method(A, 2, seed=7), method(A, 2, seed=7)
        assert np.array_equal(one.vectors, two.vectors) and np.array_equal(one.values, two.values)
        assert one.products == two.products


def test_a_matvec_callable_wrapped_as_an_operator():
    op = aslinearoperator(lambda v: A @ v, n=A.shape[0])
    res = lanczos(op, 1, which="SA", tol=TOL)
    assert res.values[0] == pytest.approx(-9.0, rel=1e-10) and res.products == op.products
    with pytest.raises(TypeError, match="aslinearoperator"):
        lanczos(lambda v: A @ v, 1)


@pytest.mark.parametrize("method", METHODS, ids=lambda f: f.__name__)
def test_bad_arguments_are_refused(method):
    with pytest.raises(ValueError, match=r"more eigenpairs \(k=61\) than weights \(n=60\)"):
        method(A, 61)
    with pytest.raises(ValueError, match="k = 0 must be an integer >= 1"):
        method(A, 0)
    with pytest.raises(ValueError, match="'LM' \\(largest magnitude\\), 'LA'.*'SA'"):
        method(A, 1, which="BE")
    with pytest.raises(ValueError, match="the start vector v0 has norm 0"):
        method(A, 1, v0=np.zeros(60))
    with pytest.raises(ValueError, match=r"v0 has shape \(3,\)"):
        method(A, 1, v0=np.ones(3))
    with pytest.raises(ValueError, match="tol = -1"):
        method(A, 1, tol=-1.0)


def test_lanczos_limits():
    with pytest.raises(ValueError, match="max_iter=2 Lanczos steps cannot give k=3"):
        lanczos(A, 3, max_iter=2)
    op = aslinearoperator(lambda v: v, n=10**8)
    with pytest.raises(ValueError, match="Lanczos basis of 301 vectors of 100,000,000 weights"):
        lanczos(op, 1, max_bytes=2**30)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_low_memory_lanczos_matches_eigh_and_the_full_basis(which):
    """Two passes without a basis: the same pairs as eigh, twice the steps' products."""
    op = MatrixOperator(A)
    res = lanczos(op, 3, which=which, tol=TOL, low_memory=True)
    full = lanczos(A, 3, which=which, tol=TOL)
    reference = np.linalg.eigvalsh(A)
    for value, expected in zip(res.values, EXPECTED[which], strict=True):
        exact = reference[np.argmin(np.abs(reference - expected))]
        assert abs(value - exact) <= 1e-8 * abs(exact)
    true = np.linalg.norm(A @ res.vectors - res.vectors * res.values, axis=0)
    assert np.all(true <= TOL * np.abs(res.values)) and res.all_converged
    np.testing.assert_allclose(res.values, full.values, rtol=1e-10)
    assert res.products == op.products == 2 * res.iterations[0] + 3


def test_low_memory_lanczos_drops_the_spurious_copies_of_converged_values():
    """Run long past convergence: without reorthogonalisation the top eigenvalue
    comes back as ghost copies; the second eigenvalue must still be the second."""
    spectrum = np.concatenate([[100.0, 50.0], np.linspace(0.0, 1.0, 398)])
    a = with_spectrum(spectrum, seed=3)
    res = lanczos(a, 2, tol=1e-300, max_iter=150, check_every=150, low_memory=True)
    np.testing.assert_allclose(res.values, [100.0, 50.0], rtol=1e-10)
    # ... and the ghosts were there: the plain Ritz values hold 100 more than once
    from mpinewton.analysis.eigen import _good_ritz

    alpha, beta, q_prev, q = [], [], np.zeros(400), np.ones(400) / 20.0
    b = 0.0
    for _ in range(150):
        w = a @ q - b * q_prev
        alpha.append(q @ w)
        w -= alpha[-1] * q
        b = np.linalg.norm(w)
        beta.append(b)
        q_prev, q = q, w / b
    t = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    theta = np.linalg.eigvalsh(t)
    assert np.sum(np.abs(theta - 100.0) < 1e-6) >= 2
    good = theta[_good_ritz(theta, np.array(alpha), np.array(beta))]
    assert np.sum(np.abs(good - 100.0) < 1e-6) == 1
