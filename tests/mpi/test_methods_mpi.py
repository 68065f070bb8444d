"""Every method under mpirun (1, 2 or 3 ranks) takes the steps the one-process run takes.

Each variant runs a few steps on a small MLP twice: on the distributed
objective (each rank its shard, one Allreduce per product, rank 0's weights
broadcast after each step as the trainer does) and on a one-process objective
over all the samples. The losses and weights must agree to relative 1e-10
whatever the number of ranks, and be bitwise the same on every rank.
"""

import numpy as np
import pytest

from mpinewton.comm import Comm, world
from mpinewton.data import shard_bounds
from mpinewton.local import LocalObjective
from mpinewton.models import mlp
from mpinewton.objective import DistributedObjective
from mpinewton.params import get_flat
from mpinewton.sampling import fisher_draws
from mpinewton.solvers import METHODS, GDConfig, GradientDescent, LoopHooks, Phase, run

pytestmark = pytest.mark.mpi
N = 41  # not divisible by 2 or 3

VARIANTS = {
    "newton": {},
    "newton-hf": {"curvature": "gauss_newton", "damping": 1e-2,
                  "damping_rule": "levenberg_marquardt", "preconditioner": "fisher",
                  "forcing": "eisenstat_walker", "cg_backtracking": True},
    "newton-hutchinson-nc": {"preconditioner": "hutchinson", "preconditioner_samples": 3,
                             "negative_curvature": "direction", "forcing": "sqrt_grad"},
    "trust_region": {},
    "trust_region-gn": {"curvature": "gauss_newton"},
    "lbfgs": {},
    "adam": {"learning_rate": 0.01},
    "momentum": {"learning_rate": 0.1, "nesterov": True},
    # inverse_every 3, stats_every 2: steps with and without fresh factors and inverses
    "kfac": {"learning_rate": 0.2, "inverse_every": 3, "stats_every": 2},
    # one drawn label a sample, the draws by global position (as the driver sets them);
    # inverses at steps 1, 2 (the warm-up) and 4
    "kfac-sampled": {"learning_rate": 0.2, "inverse_every": 3, "inverse_warmup": 2,
                     "fisher": "sampled"},
    # the damping adapted every step from a Gauss-Newton product and the loss, both summed
    # over the ranks; refreshes at steps 1 and 3 invert with the adapted damping
    "kfac-lm": {"learning_rate": 0.2, "inverse_every": 2, "damping_rule": "levenberg_marquardt",
                "damping_every": 1},
}


class _Broadcast(LoopHooks):
    def __init__(self, comm):
        self.comm, self.losses = comm, []

    def after_step(self, k, phase, w, state, info):
        self.losses.append(info.loss)
        return self.comm.bcast_array(np.asarray(w)), False


@pytest.fixture(scope="module")
def setup():
    comm = world()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, N)
    x = rng.integers(0, 60, (N, 5, 5, 1), dtype=np.uint8)
    x[np.arange(N), y // 2, :, 0] = 250  # a learnable signal
    model = mlp(dtype="float64", seed=1, input_shape=(5, 5, 1), hidden=(6,))
    lo, hi = shard_bounds(N, comm.rank, comm.size)
    shard = DistributedObjective(LocalObjective(model, x[lo:hi], y[lo:hi], micro_batch=4,
                                                jit=False), comm, N)
    whole = DistributedObjective(LocalObjective(model, x, y, micro_batch=N, jit=False),
                                 Comm(None), N)
    w0 = run(whole, get_flat(model), [Phase("pretrain", GradientDescent(
        GDConfig(learning_rate=0.5)), 3)]).w
    draws = fisher_draws(0, 0, N, 10)  # used by fisher = "sampled" only
    shard.local.set_draws(draws[lo:hi])
    whole.local.set_draws(draws)
    return comm, shard, whole, w0


def _method(name):
    method = name.split("-")[0]
    cls = METHODS[method]
    return method, cls(cls.config_class(**VARIANTS[name]))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_method_takes_the_same_steps_on_any_number_of_ranks(setup, name):
    comm, shard, whole, w0 = setup
    method, _ = _method(name)
    hooks = _Broadcast(comm)
    got = run(shard, w0, [Phase(method, _method(name)[1], 4)], hooks=hooks)
    ref_hooks = _Broadcast(Comm(None))
    ref = run(whole, w0, [Phase(method, _method(name)[1], 4)], hooks=ref_hooks)
    assert got.iteration == ref.iteration == 4
    np.testing.assert_allclose(hooks.losses, ref_hooks.losses, rtol=1e-10, atol=0)
    assert np.linalg.norm(got.w - ref.w) <= 1e-10 * np.linalg.norm(ref.w), name
    assert hooks.losses[-1] < hooks.losses[0], name  # every method makes progress here
    digests = comm.allgather(got.w.tobytes())
    assert all(d == digests[0] for d in digests)
