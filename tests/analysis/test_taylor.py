import numpy as np
import pytest
import scipy.optimize as so

from mpinewton.analysis import taylor_test

RNG = np.random.default_rng(11)
W = RNG.standard_normal(10)
D = RNG.standard_normal(10)
X = RNG.standard_normal((30, 6))
V = RNG.standard_normal(6)


def softplus_sum(w):
    return float(np.sum(np.logaddexp(0.0, X @ w)))


def softplus_grad(w):
    return X.T @ (1 / (1 + np.exp(-(X @ w))))


def softplus_hvp(w, d):
    s = 1 / (1 + np.exp(-(X @ w)))
    return X.T @ (s * (1 - s) * (X @ d))


def _rosen():
    return taylor_test(so.rosen, W, D, grad_dot=so.rosen_der(W) @ D,
                       hess_dot=D @ so.rosen_hess_prod(W, D))


def test_correct_derivatives_give_slopes_one_two_three():
    res = _rosen()
    assert res.slope0 == pytest.approx(1, abs=0.2)
    assert res.slope1 == pytest.approx(2, abs=0.2)
    assert res.slope2 == pytest.approx(3, abs=0.2)
    # the round-off plateau of r2 is left out of the fit, the large distances are in
    assert res.used2[:3].all() and not res.used2[-1]
    assert res.used2.sum() >= 3 and res.used1.sum() >= 4
    c0 = so.rosen(W)
    for h, r1 in zip(res.distances, res.r1, strict=True):
        assert r1 == pytest.approx(abs(so.rosen(W + h * D) - c0 - h * (so.rosen_der(W) @ D)),
                                   rel=1e-9)
    res = taylor_test(softplus_sum, V, V[::-1].copy(), grad_dot=softplus_grad(V) @ V[::-1],
                      hess_dot=V[::-1] @ softplus_hvp(V, V[::-1]))
    assert (res.slope0, res.slope1, res.slope2) == (pytest.approx(1, abs=0.2),
                                                    pytest.approx(2, abs=0.2),
                                                    pytest.approx(3, abs=0.2))


def test_a_wrong_gradient_drops_the_first_order_slope_to_one():
    g = so.rosen_der(W)
    g = g + 0.01 * np.linalg.norm(g) * np.random.default_rng(0).standard_normal(10)
    res = taylor_test(so.rosen, W, D, grad_dot=g @ D, hess_dot=D @ so.rosen_hess_prod(W, D))
    assert res.slope1 == pytest.approx(1, abs=0.3)
    assert res.slope2 == pytest.approx(1, abs=0.3)


def test_a_wrong_hessian_drops_the_second_order_slope_to_two():
    hd = D @ so.rosen_hess_prod(W, D)
    res = taylor_test(so.rosen, W, D, grad_dot=so.rosen_der(W) @ D, hess_dot=1.01 * hd)
    assert res.slope1 == pytest.approx(2, abs=0.2)
    assert res.slope2 == pytest.approx(2, abs=0.2)


def test_without_a_hessian_and_for_a_quadratic():
    res = taylor_test(so.rosen, W, D, grad_dot=so.rosen_der(W) @ D)
    assert np.isnan(res.r2).all() and np.isnan(res.slope2) and not res.used2.any()
    assert res.hess_dot is None
    a = np.diag(np.arange(1.0, 11.0))
    res = taylor_test(lambda w: 0.5 * w @ a @ w, W, D, grad_dot=(a @ W) @ D, hess_dot=D @ a @ D)
    assert res.slope1 == pytest.approx(2, abs=0.05)
    assert np.isnan(res.slope2)  # the second-order model of a quadratic is exact


def test_overflow_far_out_is_skipped():
    def coercive(w):
        return np.inf if np.linalg.norm(w - W) > 0.05 * np.linalg.norm(D) else so.rosen(w)

    res = taylor_test(coercive, W, D, grad_dot=so.rosen_der(W) @ D,
                      hess_dot=D @ so.rosen_hess_prod(W, D))
    assert not res.used1[0] and not res.used2[0] and res.used2[1]
    assert res.slope2 == pytest.approx(3, abs=0.2)


def test_table_and_text():
    res = _rosen()
    rows = res.table()
    assert len(rows) == 8 and set(rows[0]) == {"distance", "r0", "r1", "r2", "used0",
                                               "used1", "used2"}
    assert rows[0]["distance"] == 0.1 and rows[3]["r2"] == res.r2[3]
    text = res.format().splitlines()
    assert len(text) == 10 and text[-1].startswith("slopes: 1.0") and text[-2].endswith("*")


def test_bad_inputs_are_refused():
    g = so.rosen_der(W) @ D
    with pytest.raises(ValueError, match="the direction d has norm 0"):
        taylor_test(so.rosen, W, np.zeros(10), grad_dot=g)
    with pytest.raises(ValueError, match="grad_dot is nan"):
        taylor_test(so.rosen, W, D, grad_dot=np.nan)
    with pytest.raises(ValueError, match="hess_dot is inf"):
        taylor_test(so.rosen, W, D, grad_dot=g, hess_dot=np.inf)
    with pytest.raises(ValueError, match="direction d contains NaN"):
        taylor_test(so.rosen, W, np.full(10, np.nan), grad_dot=g)
    with pytest.raises(ValueError, match="strictly decreasing"):
        taylor_test(so.rosen, W, D, grad_dot=g, distances=[1e-3, 1e-2])
    with pytest.raises(ValueError, match="c\\(w\\) is nan"):
        taylor_test(lambda w: np.nan, W, D, grad_dot=g)
