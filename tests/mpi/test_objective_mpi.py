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
