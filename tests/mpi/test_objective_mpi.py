"""DistributedObjective under mpirun: the global c, g and Hv equal the serial ones."""

import numpy as np
import pytest

from mpinewton.comm import world
from mpinewton.data import shard_bounds
from mpinewton.local import LocalObjective
from mpinewton.models import mlp
from mpinewton.objective import DistributedObjective
from mpinewton.params import get_flat

pytestmark = pytest.mark.mpi
N = 37  # not divisible by 2 or 3


@pytest.fixture(scope="module")
def setup():
    comm = world()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N, 5, 5, 1), dtype=np.uint8)
    y = rng.integers(0, 10, N)
    model = mlp(dtype="float64", seed=1, input_shape=(5, 5, 1), hidden=(6,))
    lo, hi = shard_bounds(N, comm.rank, comm.size)
    shard = LocalObjective(model, x[lo:hi], y[lo:hi], micro_batch=4, jit=False)
    whole = LocalObjective(model, x, y, micro_batch=N, jit=False)
    return comm, DistributedObjective(shard, comm, N), whole, get_flat(model)


def test_value_grad_hvp_match_serial(setup):
    comm, objective, whole, w = setup
    v = np.random.default_rng(5).standard_normal(w.size)
    loss, grad = objective.value_and_grad(w)
    ref_loss, ref_grad = whole.loss_grad_sum(w)
    assert loss == pytest.approx(ref_loss / N, rel=1e-13)
    assert objective.value(w) == pytest.approx(ref_loss / N, rel=1e-13)
    np.testing.assert_allclose(grad, ref_grad / N, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(objective.hvp(w, v), whole.hvp_sum(w, v) / N, rtol=1e-10,
                               atol=1e-14)
    assert objective.accuracy(w) == pytest.approx(whole.correct_count(w) / N)


def test_one_allreduce_per_product(setup):
    comm, objective, _, w = setup
    calls = comm.stats.allreduce_calls
    objective.value_and_grad(w)
    objective.hvp(w, w)
    objective.value(w)
    assert comm.stats.allreduce_calls - calls == 3


def test_results_identical_on_every_rank(setup):
    comm, objective, _, w = setup
    _, grad = objective.value_and_grad(w)
    hv = objective.hvp(w, grad)
    digests = comm.allgather(grad.tobytes() + hv.tobytes())
    assert all(d == digests[0] for d in digests)


@pytest.fixture(scope="module")
def explicit_hessian(setup):
    """The one-process explicit Hessian of the mean loss (thesis 9.1), the reference."""
    _, _, whole, w = setup
    return whole.hessian_sum(w) / N


def test_hvp_many_equals_serial_explicit_hessian_and_k_hvps(setup, explicit_hessian):
    comm, objective, _, w = setup
    v = np.random.default_rng(9).standard_normal((w.size, 4))
    hvps, calls = objective.stats.hvps, comm.stats.allreduce_calls
    hv = objective.hvp_many(w, v)
    assert comm.stats.allreduce_calls - calls == 1
    assert objective.stats.hvps - hvps == 4
    assert hv.shape == (w.size, 4)
    ref = explicit_hessian @ v
    singles = np.stack([objective.hvp(w, v[:, j]) for j in range(4)], axis=1)
    for j in range(4):
        assert np.linalg.norm(hv[:, j] - ref[:, j]) <= 1e-10 * np.linalg.norm(ref[:, j])
        assert np.linalg.norm(hv[:, j] - singles[:, j]) <= 1e-12 * np.linalg.norm(singles[:, j])
    digests = comm.allgather(hv.tobytes())
    assert all(d == digests[0] for d in digests)


def test_hessian_operator_matmat_is_one_allreduce(setup, explicit_hessian):
    from mpinewton.solvers import HessianOperator

    comm, objective, _, w = setup
    op = HessianOperator(objective, w)
    v = np.random.default_rng(10).standard_normal((w.size, 3))
    calls = comm.stats.allreduce_calls
    hv = op.matmat(v)
    assert comm.stats.allreduce_calls - calls == 1
    assert op.products == 3
    np.testing.assert_allclose(hv, explicit_hessian @ v, rtol=1e-10,
                               atol=1e-10 * np.abs(explicit_hessian @ v).max())
    assert op.matmat(np.zeros((w.size, 0))).shape == (w.size, 0)  # no product, no collective
    assert comm.stats.allreduce_calls - calls == 1 and op.products == 3


def test_hvp_many_without_columns_still_reduces_once(setup):
    comm, objective, _, w = setup
    calls = comm.stats.allreduce_calls
    assert objective.hvp_many(w, np.zeros((w.size, 0))).shape == (w.size, 0)
    assert comm.stats.allreduce_calls - calls == 1


@pytest.fixture(scope="module")
def regression():
    """Float features and float targets (regression, mean squared error) across the ranks."""
    import keras

    comm = world()
    rng = np.random.default_rng(1)
    x, t = rng.standard_normal((N, 4)), rng.standard_normal((N, 2))
    init = keras.initializers.GlorotUniform  # seeded: the same weights on every rank
    model = keras.Sequential([keras.Input((4,), dtype="float64"),
                              keras.layers.Dense(3, activation="tanh", dtype="float64",
                                                 kernel_initializer=init(1)),
                              keras.layers.Dense(2, dtype="float64", kernel_initializer=init(2))])
    lo, hi = shard_bounds(N, comm.rank, comm.size)
    shard = LocalObjective(model, x[lo:hi], t[lo:hi], loss="mean_squared_error", micro_batch=4,
                           jit=False)
    whole = LocalObjective(model, x, t, loss="mean_squared_error", micro_batch=N, jit=False)
    return comm, DistributedObjective(shard, comm, N), whole, get_flat(model)


@pytest.mark.parametrize("case", ["setup", "regression"])
def test_evaluate_and_metric_match_serial_in_one_allreduce(request, case):
    comm, objective, whole, w = request.getfixturevalue(case)
    name = "accuracy" if case == "setup" else "mae"
    calls = comm.stats.allreduce_calls
    result = objective.evaluate(w)
    assert comm.stats.allreduce_calls - calls == 1
    assert objective.metric_name == name and set(result) == {"loss", name}
    assert result["loss"] == pytest.approx(whole.loss_sum(w) / N, rel=1e-13)
    assert result[name] == pytest.approx(whole.metric_sum(w) / N, rel=1e-13)
    assert objective.metric(w) == pytest.approx(result[name], rel=1e-13)
    digests = comm.allgather(np.array([result["loss"], result[name]]).tobytes())
    assert all(d == digests[0] for d in digests)
