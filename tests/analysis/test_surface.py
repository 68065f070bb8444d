import numpy as np
import pytest
import scipy.optimize as so

from mpinewton.analysis import filter_normalized_direction, line, plane

RNG = np.random.default_rng(5)
W, D1, D2 = RNG.standard_normal((3, 6))


def test_line_and_plane_are_direct_evaluations():
    alphas, betas = np.linspace(-1, 1, 3), np.array([-0.5, 0.0, 0.25, 2.0])
    values = line(so.rosen, W, D1, alphas)
    assert np.array_equal(values, [so.rosen(W + a * D1) for a in alphas])
    grid = plane(so.rosen, W, D1, D2, alphas, betas)
    assert grid.shape == (3, 4)
    expected = [[so.rosen(W + a * D1 + b * D2) for b in betas] for a in alphas]
    np.testing.assert_allclose(grid, expected, rtol=1e-15)
    assert grid[1, 1] == so.rosen(W)


def test_bad_grids_and_directions_are_refused():
    with pytest.raises(ValueError, match="alphas has no points"):
        line(so.rosen, W, D1, [])
    with pytest.raises(ValueError, match="betas has no points"):
        plane(so.rosen, W, D1, D2, [0.0], np.array([]))
    with pytest.raises(ValueError, match="the direction d2 has norm 0"):
        plane(so.rosen, W, D1, np.zeros(6), [0.0], [0.0])
    with pytest.raises(ValueError, match="the direction d has norm 0"):
        line(so.rosen, W, np.zeros(6), [0.0])
    with pytest.raises(ValueError, match="1-D"):
        line(so.rosen, W, D1, [[0.0, 1.0]])


SHAPES = [(3, 3, 2, 4), (4,), (4, 5), (5,), ()]


def test_filter_normalized_direction():
    n = sum(int(np.prod(s)) for s in SHAPES)
    w = np.random.default_rng(0).standard_normal(n)
    w[76:96].reshape(4, 5)[:, 0] = 0.0  # a dense filter (output unit 0) that is all zero
    d = filter_normalized_direction(w, SHAPES, np.random.default_rng(1))
    assert d.shape == (n,)
    conv_w, conv_d = w[:72].reshape(3, 3, 2, 4), d[:72].reshape(3, 3, 2, 4)
    for j in range(4):
        assert np.linalg.norm(conv_d[..., j]) == pytest.approx(np.linalg.norm(conv_w[..., j]))
    dense_w, dense_d = w[76:96].reshape(4, 5), d[76:96].reshape(4, 5)
    np.testing.assert_allclose(np.linalg.norm(dense_d, axis=0), np.linalg.norm(dense_w, axis=0))
    assert np.all(dense_d[:, 0] == 0) and np.all(dense_d[:, 1:] != 0)
    assert np.all(d[72:76] == 0) and np.all(d[96:] == 0)  # biases and the scalar
    assert not np.allclose(conv_d / np.linalg.norm(conv_d), conv_w / np.linalg.norm(conv_w))
    again = filter_normalized_direction(w, SHAPES, 1)  # an int seed is the same generator
    assert np.array_equal(d, again)
    with pytest.raises(ValueError, match="hold 102 numbers, but w has 101"):
        filter_normalized_direction(w[:-1], SHAPES, 0)
