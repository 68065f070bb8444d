"""Rank invariance of Gauss-Newton + Fisher-preconditioned Newton-CG steps.

One process sums the products over all samples; two ranks sum over two halves
and add the halves: the products agree to rounding (~1e-16), but finite
precision CG loses the orthogonality of its residuals once a Ritz value
converges to an outlying eigenvalue (Paige 1976; Greenbaum 1997, ch. 4) and
then amplifies that rounding by a factor of tens per iteration: after 15-30
iterations the steps differed by 1e-5 relative on the thesis CNN.
``cg_reorthogonalize`` keeps the iterates those of exact CG, and the steps
agree to rounding.
"""

import numpy as np
import pytest

from mpinewton.comm import Comm
from mpinewton.local import LocalObjective
from mpinewton.models import thesis_cnn
from mpinewton.objective import DistributedObjective
from mpinewton.params import get_flat
from mpinewton.solvers import NewtonCG
from mpinewton.solvers.cg import cg
from mpinewton.solvers.newton import NewtonConfig

GN_FISHER = dict(curvature="gauss_newton", preconditioner="fisher", damping=1e-3,
                 damping_rule="levenberg_marquardt", warm_start="previous")


class LeastSquares:
    """``c(w) = mean_i 0.5 (x_i.w - y_i)^2``, every sum taken over ``parts`` row blocks."""

    def __init__(self, x, y, parts):
        self.x, self.y, self.n = x, y, len(y)
        self.blocks = np.array_split(np.arange(len(y)), parts)

    def _sum(self, f):
        return sum(f(self.x[b], self.y[b]) for b in self.blocks) / self.n

    def value(self, w):
        return float(self._sum(lambda x, y: 0.5 * np.sum((x @ w - y) ** 2)))

    def value_and_grad(self, w):
        return self.value(w), self._sum(lambda x, y: x.T @ (x @ w - y))

    def hvp(self, w, v):
        return self._sum(lambda x, y: x.T @ (x @ v))

    gnvp = hvp

    def grad_squares(self, w):
        return self._sum(lambda x, y: np.sum(((x @ w - y)[:, None] * x) ** 2, axis=0))


def _least_squares_data():
    """Badly scaled columns, three of them dominant: a spectrum with outliers."""
    rng = np.random.default_rng(0)
    n_samples, n = 600, 120
    scales = np.exp(rng.normal(0.0, 1.0, n))
    scales[:3] *= 20.0
    x = rng.normal(size=(n_samples, n)) * scales + 0.3 * rng.normal(size=(n_samples, 1))
    return x, rng.normal(size=n_samples), 0.1 * rng.normal(size=n)


def _steps(problems, w0, config, steps=1):
    method = NewtonCG(config)
    out = []
    for problem in problems:
        w, state = w0, method.init(w0)
        iters = []
        for _ in range(steps):
            w, state, info = method.step(problem, w, state)
            iters.append(info.cg.iterations)
        out.append((w, iters))
    return out


def _rel(a, b, w0):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a - w0))


@pytest.mark.parametrize("preconditioner", ["fisher", "none"])
def test_least_squares_steps_agree_across_summation_orders(preconditioner):
    x, y, w0 = _least_squares_data()
    problems = [LeastSquares(x, y, parts) for parts in (1, 2, 3)]
    base = dict(GN_FISHER, preconditioner=preconditioner, cg_rtol=1e-8, cg_max_iter=40)
    plain = _steps(problems, w0, NewtonConfig(**base))
    fixed = _steps(problems, w0, NewtonConfig(**base, cg_reorthogonalize=True))
    for w, iters in plain:
        assert iters == [40]  # long enough for the amplification to show
        assert w is plain[0][0] or _rel(plain[0][0], w, w0) > 1e-10  # the defect (1e-4)
    for w, iters in fixed:
        assert iters == [40]
        assert _rel(fixed[0][0], w, w0) < 1e-12  # measured: 5e-14


def test_reorthogonalized_cg_solves_the_system():
    x, y, _ = _least_squares_data()
    a = x.T @ x / len(y) + 1e-3 * np.eye(x.shape[1])
    b = x.T @ y / len(y)
    minv = 1.0 / np.diag(a) ** 0.75
    res = cg(a, b, rtol=1e-10, max_iter=300, preconditioner=lambda v: minv * v,
             reorthogonalize=True)
    assert res.converged
    exact = np.linalg.solve(a, b)
    assert np.linalg.norm(res.x - exact) <= 1e-6 * np.linalg.norm(exact)
    plain = cg(a, b, rtol=1e-10, max_iter=300, preconditioner=lambda v: minv * v)
    assert res.iterations <= plain.iterations  # no loss of convergence speed


class _TwoRanks:
    """The local sums of two ranks, added as ``Allreduce`` adds them."""

    def __init__(self, first, second):
        self.parts = (first, second)

    def loss_sum(self, w):
        return self.parts[0].loss_sum(w) + self.parts[1].loss_sum(w)

    def loss_grad_sum(self, w):
        (l0, g0), (l1, g1) = (p.loss_grad_sum(w) for p in self.parts)
        return l0 + l1, g0 + g1

    def hvp_sum(self, w, v):
        return self.parts[0].hvp_sum(w, v) + self.parts[1].hvp_sum(w, v)

    def gnvp_sum(self, w, v):
        return self.parts[0].gnvp_sum(w, v) + self.parts[1].gnvp_sum(w, v)

    def grad_squares_sum(self, w):
        return self.parts[0].grad_squares_sum(w) + self.parts[1].grad_squares_sum(w)


def test_thesis_cnn_gauss_newton_fisher_steps_agree_on_one_and_two_ranks():
    rng = np.random.default_rng(1)
    n = 400
    x = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    model = thesis_cnn(input_shape=(8, 8, 1))
    whole = DistributedObjective(LocalObjective(model, x, y, micro_batch=n, jit=False),
                                 Comm(), n)
    halves = DistributedObjective(
        _TwoRanks(LocalObjective(model, x[:n // 2], y[:n // 2], micro_batch=n, jit=False),
                  LocalObjective(model, x[n // 2:], y[n // 2:], micro_batch=n, jit=False)),
        Comm(), n)
    w0 = get_flat(model)
    base = dict(GN_FISHER, cg_rtol=1e-6, cg_max_iter=30)
    (w1, it1), (w2, it2) = _steps([whole, halves], w0, NewtonConfig(**base), steps=2)
    assert it1 == it2 and sum(it1) >= 30
    assert _rel(w1, w2, w0) > 1e-10  # the defect (measured: 7e-5)
    config = NewtonConfig(**base, cg_reorthogonalize=True)
    (w1, it1), (w2, it2) = _steps([whole, halves], w0, config, steps=2)
    assert it1 == it2 and sum(it1) >= 30
    assert _rel(w1, w2, w0) < 1e-10  # measured: 1e-14


def test_cg_callback_reports_each_iteration_and_changes_nothing():
    from mpinewton.solvers.cg import cg

    rng = np.random.default_rng(3)
    q = rng.normal(size=(30, 30))
    a = q @ q.T + 30 * np.eye(30)
    b = rng.normal(size=30)
    calls = []
    with_cb = cg(a, b, rtol=1e-10, max_iter=25, callback=lambda *c: calls.append(c))
    plain = cg(a, b, rtol=1e-10, max_iter=25)
    assert np.array_equal(with_cb.x, plain.x) and with_cb.iterations == plain.iterations
    assert [c[0] for c in calls] == list(range(1, plain.iterations + 1))
    assert all(c[1] == 25 for c in calls)
    assert calls[-1][2] == pytest.approx(plain.residual_norm / np.linalg.norm(b))
