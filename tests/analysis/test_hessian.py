import numpy as np
import pytest
import scipy.optimize as so
from solvers.problems import Rosenbrock

from mpinewton.analysis import HessianResult, explicit_hessian, hessian_bytes, summarize
from mpinewton.solvers import HessianOperator, MatrixOperator, aslinearoperator, damped

from .matrices import with_spectrum


def test_explicit_hessian_of_a_matrix_is_the_matrix():
    eig = np.linspace(-3.0, 5.0, 9)
    a = with_spectrum(eig, seed=0)
    op = MatrixOperator(a)
    res = explicit_hessian(op, block=4)
    assert isinstance(res, HessianResult) and res.complete
    assert np.array_equal(res.matrix, a)
    assert res.products == 9 == op.products
    assert res.symmetry_error < 1e-15
    np.testing.assert_allclose(res.eigenvalues, eig, atol=1e-12)
    assert np.array_equal(res.columns, np.arange(9))


def test_explicit_hessian_of_rosenbrock_matches_scipy():
    w = np.random.default_rng(3).standard_normal(7)
    op = HessianOperator(Rosenbrock(), w)
    res = explicit_hessian(op, block=3)  # blocks of 3, 3, 1 columns
    expected = so.rosen_hess(w)
    np.testing.assert_allclose(res.matrix, expected, rtol=1e-13, atol=1e-12)
    assert res.products == 7 == op.products
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(expected), rtol=1e-10,
                               atol=1e-10)
    # damping is just another operator: H + 2 I
    damped_res = explicit_hessian(damped(HessianOperator(Rosenbrock(), w), 2.0))
    np.testing.assert_allclose(damped_res.matrix, expected + 2 * np.eye(7), atol=1e-12)


def test_columns_give_the_block_and_count_only_their_products():
    a = with_spectrum(np.arange(1.0, 11.0), seed=1)
    op = MatrixOperator(a)
    res = explicit_hessian(op, columns=range(2, 5), block=2)
    assert res.matrix.shape == (10, 3)
    assert np.array_equal(res.matrix, a[:, 2:5])
    assert res.products == 3 == op.products
    assert res.symmetry_error is None and res.eigenvalues is None and not res.complete
    assert np.array_equal(res.columns, [2, 3, 4])
    res = explicit_hessian(a, columns=np.array([7, 0]))
    assert np.array_equal(res.matrix, a[:, [7, 0]])
    # the ranks' blocks, gathered, summarise like the whole matrix
    blocks = [explicit_hessian(a, columns=range(lo, min(lo + 4, 10))).matrix
              for lo in range(0, 10, 4)]
    gathered = summarize(np.hstack(blocks), products=10)
    np.testing.assert_allclose(gathered.eigenvalues, np.arange(1.0, 11.0), atol=1e-12)
    with pytest.raises(ValueError, match=r"columns must lie in \[0, 10\)"):
        explicit_hessian(a, columns=[3, 10])


def test_symmetry_error_of_a_nonsymmetric_matrix():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 6))
    res = explicit_hessian(MatrixOperator(a))
    expected = np.sqrt(np.sum((a - a.T) ** 2)) / np.sqrt(np.sum(a**2))
    assert res.symmetry_error == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh((a + a.T) / 2), atol=1e-12)
    zero = summarize(np.zeros((3, 3)))
    assert zero.symmetry_error == 0.0 and np.array_equal(zero.eigenvalues, np.zeros(3))
    with pytest.raises(ValueError, match="square"):
        summarize(np.zeros((3, 2)))


def test_too_large_a_hessian_is_refused_before_any_product():
    n = 10**7
    op = aslinearoperator(lambda v: v, n=n)
    with pytest.raises(ValueError) as info:
        explicit_hessian(op, max_bytes=2**30)
    text = str(info.value)
    assert "10,000,000 weights" in text
    assert "745,058 GiB (728 TiB)" in text
    assert "1 GiB" in text and "max_bytes=1,073,741,824" in text
    assert "eigen/trace/spectrum" in text
    assert op.products == 0
    with pytest.raises(ValueError, match="10,000,000 weights"):  # the default limit too
        explicit_hessian(op)
    with pytest.raises(ValueError, match="3 columns of the explicit Hessian"):
        explicit_hessian(op, columns=range(3), max_bytes=100)


def test_hessian_bytes():
    assert hessian_bytes(25_557_032) == 25_557_032**2 * 8
    assert hessian_bytes(3192, np.float32) == 3192**2 * 4
    with pytest.raises(ValueError, match="n = -1"):
        hessian_bytes(-1)
