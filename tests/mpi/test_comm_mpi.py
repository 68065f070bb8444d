"""The MPI layer under mpirun (1, 2 or 3 ranks; expected values from comm.size)."""

import numpy as np
import pytest

from mpinewton.comm import DistributedError, world

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm():
    return world()


def test_allreduce_sum_is_the_sum_over_ranks(comm):
    local = np.arange(5, dtype=np.float64) + comm.rank
    total = comm.allreduce_sum(local)
    size = comm.size
    expected = size * np.arange(5) + size * (size - 1) / 2
    np.testing.assert_array_equal(total, expected)
    np.testing.assert_array_equal(local, np.arange(5) + comm.rank)  # input untouched


def test_allreduce_result_is_bitwise_identical_on_all_ranks(comm):
    rng = np.random.default_rng(comm.rank)
    total = comm.allreduce_sum(rng.standard_normal(10_000) * 1e3)
    digests = comm.allgather(total.tobytes())
    assert all(d == digests[0] for d in digests)


def test_bcast_array_gives_root_values(comm):
    out = comm.bcast_array(np.full(7, float(comm.rank + 1)))
    np.testing.assert_array_equal(out, np.ones(7))


def test_error_on_one_rank_reaches_every_rank(comm):
    last = comm.size - 1

    def step():
        if comm.rank == last:
            raise ValueError("bad label 11 at index 3")
        return comm.rank

    with pytest.raises(DistributedError, match=f"loading failed on rank {last}: ValueError: bad "
                                               "label 11 at index 3") as info:
        comm.run_agreed(step, "loading")
    assert info.value.ranks == [last]


def test_run_agreed_returns_each_ranks_value(comm):
    assert comm.run_agreed(lambda: comm.rank * 10, "step") == comm.rank * 10


def test_is_root(comm):
    assert comm.is_root == (comm.rank == 0)
