import numpy as np
import pytest

from mpinewton.analysis import hutchinson, slq
from mpinewton.solvers import MatrixOperator

from .matrices import with_spectrum


def test_hutchinson_is_exact_for_a_diagonal_matrix_with_rademacher_probes():
    d = np.arange(1.0, 31.0)
    op = MatrixOperator(np.diag(d))
    res = hutchinson(op, samples=5, seed=3)
    assert res.estimate == d.sum() and res.stderr == 0.0
    assert res.products == 5 == op.products and res.values.shape == (5,)


def test_hutchinson_covers_the_true_trace():
    a = with_spectrum(np.random.default_rng(0).uniform(0.5, 4.0, 40), seed=5)
    inside = 0
    for seed in range(20):
        res = hutchinson(a, samples=30, seed=seed)
        inside += abs(res.estimate - np.trace(a)) <= 3 * res.stderr
        assert res.stderr == pytest.approx(res.values.std(ddof=1) / np.sqrt(30))
    assert inside >= 18
    gaussian = hutchinson(a, samples=400, seed=0, distribution="gaussian")
    assert abs(gaussian.estimate - np.trace(a)) <= 4 * gaussian.stderr


def test_hutchinson_does_not_depend_on_the_block_size():
    a = with_spectrum(np.linspace(-1, 1, 13), seed=6)
    one = hutchinson(a, samples=11, seed=4, block=1)
    many = hutchinson(a, samples=11, seed=4, block=4)
    np.testing.assert_allclose(one.values, many.values, rtol=1e-14, atol=1e-14)


def test_hutchinson_refuses_bad_arguments():
    with pytest.raises(ValueError, match="samples = 1 must be an integer >= 2"):
        hutchinson(np.eye(3), samples=1)
    with pytest.raises(ValueError, match="'rademacher'.*'gaussian'"):
        hutchinson(np.eye(3), distribution="uniform")


def _two_clusters():
    rng = np.random.default_rng(1)
    eig = np.concatenate([rng.normal(1.0, 0.1, 100), rng.normal(10.0, 0.3, 100)])
    return eig, with_spectrum(eig, seed=7)


def test_slq_trace_and_density():
    eig, a = _two_clusters()
    op = MatrixOperator(a)
    res = slq(op, runs=20, steps=60, seed=0)
    assert res.nodes.shape == res.weights.shape == (20, 60)
    assert res.products == 20 * 60 == op.products and np.array_equal(res.steps, [60] * 20)
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert res.nodes.min() >= eig.min() - 1e-9 and res.nodes.max() <= eig.max() + 1e-9
    assert abs(res.trace_estimate() - eig.sum()) <= 0.05 * eig.sum()
    assert res.trace_estimate(400) == pytest.approx(2 * res.trace_estimate())
    grid = np.linspace(-10.0, 25.0, 7001)
    density = res.density(grid)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)
    # half of the mass at each cluster, none between
    for lo, hi, mass in [(0.4, 1.6, 0.5), (8.5, 11.5, 0.5), (2.0, 8.0, 0.0)]:
        part = (grid >= lo) & (grid <= hi)
        assert np.trapezoid(density[part], grid[part]) == pytest.approx(mass, abs=0.05)
    # a narrower kernel keeps the mass
    narrow = res.density(grid, sigma=0.02)
    assert np.trapezoid(narrow, grid) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="sigma = 0"):
        res.density(grid, sigma=0)


def test_slq_stops_at_a_breakdown():
    res = slq(3.0 * np.eye(10), runs=3, steps=5)
    assert np.array_equal(res.steps, [1, 1, 1]) and res.products == 3
    np.testing.assert_allclose(res.weights[:, 0], 1.0)
    assert np.all(res.weights[:, 1:] == 0)
    assert res.trace_estimate() == pytest.approx(30.0)
    grid = np.linspace(2, 4, 2001)
    assert np.trapezoid(res.density(grid), grid) == pytest.approx(1.0, abs=1e-6)
