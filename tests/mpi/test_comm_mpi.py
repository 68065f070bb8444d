"""The MPI layer under mpirun (1, 2 or 3 ranks; expected values from comm.size).

Every value a rank contributes depends on its rank, so a collective that used
the wrong root, the wrong order or only the local value gives a wrong answer
on some rank count.
"""

import numpy as np
import pytest

from mpinewton.comm import Comm, DistributedError, launched_world, world

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm():
    return world()


# --------------------------------------------------------------------------- Allreduce


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


def test_allreduce_keeps_float32_and_shape(comm):
    local = np.full((3, 4), comm.rank + 0.5, dtype=np.float32)
    total = comm.allreduce_sum(local)
    assert total.dtype == np.float32 and total.shape == (3, 4)
    size = comm.size
    np.testing.assert_array_equal(total, np.full((3, 4), size * 0.5 + size * (size - 1) / 2))


def test_allreduce_of_a_strided_view(comm):
    base = np.arange(20.0).reshape(4, 5) * (comm.rank + 1)
    view = base[::2, ::2]  # every other row and column: not contiguous
    assert not view.flags.c_contiguous
    total = comm.allreduce_sum(view)
    size = comm.size
    np.testing.assert_array_equal(
        total, np.arange(20.0).reshape(4, 5)[::2, ::2] * size * (size + 1) / 2
    )
    np.testing.assert_array_equal(base, np.arange(20.0).reshape(4, 5) * (comm.rank + 1))


def test_stats_count_calls_and_values(comm):
    before = comm.stats.snapshot()
    comm.allreduce_sum(np.ones(13))
    comm.allreduce_sum(np.ones((2, 3), dtype=np.float32))
    middle = comm.stats.snapshot()
    assert middle["allreduce_calls"] == before["allreduce_calls"] + 2
    assert middle["allreduce_values"] == before["allreduce_values"] + 13 + 6
    assert middle["bcast_calls"] == before["bcast_calls"]
    comm.bcast_array(np.zeros(4))
    comm.bcast({"x": 1})
    after = comm.stats.snapshot()
    assert after["bcast_calls"] == middle["bcast_calls"] + 2
    assert after["allreduce_calls"] == middle["allreduce_calls"]
    assert after["allreduce_values"] == middle["allreduce_values"]


# --------------------------------------------------------------------------- broadcasts, gathers


@pytest.mark.parametrize("where", ["first", "last"])
def test_bcast_array_gives_the_roots_values(comm, where):
    root = 0 if where == "first" else comm.size - 1
    mine = np.arange(6, dtype=np.int32).reshape(2, 3) + 100 * comm.rank
    out = comm.bcast_array(mine, root=root)
    assert out.dtype == np.int32 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3) + 100 * root)
    np.testing.assert_array_equal(mine, np.arange(6).reshape(2, 3) + 100 * comm.rank)


def test_bcast_object_from_the_last_rank(comm):
    root = comm.size - 1
    obj = {"rank": comm.rank, "items": [comm.rank] * 3, "name": f"r{comm.rank}"}
    assert comm.bcast(obj, root=root) == {"rank": root, "items": [root] * 3, "name": f"r{root}"}


def test_allgather_is_in_rank_order(comm):
    got = comm.allgather(("rank", comm.rank, comm.rank**2))
    assert got == [("rank", r, r**2) for r in range(comm.size)]


@pytest.mark.parametrize("where", ["first", "last"])
def test_scatter_hands_rank_r_item_r(comm, where):
    root = 0 if where == "first" else comm.size - 1
    items = [{"for": r, "paths": [f"f{r}_{i}" for i in range(r + 1)]} for r in range(comm.size)]
    # other ranks' lists are ignored (here: a wrong one)
    given = items if comm.rank == root else ["ignored"] * (comm.size + 2)
    assert comm.scatter(given, root=root) == items[comm.rank]


@pytest.mark.parametrize("bad", ["too many", "too few", "none"])
def test_scatter_with_a_wrong_list_on_root_fails_on_every_rank(comm, bad):
    root = comm.size - 1
    items = {
        "too many": list(range(comm.size + 1)),
        "too few": list(range(comm.size - 1)),
        "none": None,
    }[bad]
    given = items if comm.rank == root else None
    with pytest.raises(DistributedError) as info:
        comm.run_agreed(lambda: comm.scatter(given, root=root), "handing out blocks")
    msg = str(info.value)
    assert info.value.ranks == list(range(comm.size))  # every rank raised, not just root
    assert msg.startswith(
        "handing out blocks failed on rank "
        + ", ".join(str(r) for r in range(comm.size))
        + ": ValueError: scatter: the root (rank "
    )
    if bad == "none":
        assert f"must give a list of {comm.size} item(s), one per rank, got NoneType" in msg
    else:
        assert f"gave {len(items)} item(s) for {comm.size} rank(s)" in msg
    # and the ranks are still in lockstep
    assert comm.allgather(comm.rank) == list(range(comm.size))


def test_scatter_root_out_of_range_fails_at_once(comm):
    with pytest.raises(
        ValueError, match=f"root {comm.size} is not a rank of this {comm.size}-rank job"
    ):
        comm.scatter([0] * comm.size, root=comm.size)


# --------------------------------------------------------------------------- run_agreed


def test_error_on_one_rank_reaches_every_rank(comm):
    last = comm.size - 1

    def step():
        if comm.rank == last:
            raise ValueError("bad label 11 at index 3")
        return comm.rank

    with pytest.raises(
        DistributedError,
        match=f"loading failed on rank {last}: ValueError: bad label 11 at index 3",
    ) as info:
        comm.run_agreed(step, "loading")
    assert info.value.ranks == [last]


def test_errors_on_two_ranks_name_both_and_the_first_message(comm):
    failing = sorted({max(comm.size - 2, 0), comm.size - 1})  # 1 rank: [0]; 2: [0, 1]; 3: [1, 2]

    def step():
        if comm.rank in failing:
            raise KeyError(f"shard of rank {comm.rank}")
        return comm.rank

    with pytest.raises(DistributedError) as info:
        comm.run_agreed(step, "reading")
    where = ", ".join(str(r) for r in failing)
    assert (
        str(info.value) == f"reading failed on rank {where}: KeyError: 'shard of rank {failing[0]}'"
    )
    assert info.value.ranks == failing


def test_run_agreed_returns_the_ranks_own_value(comm):
    out = comm.run_agreed(lambda: np.full(2, comm.rank), "step")
    assert comm.allgather(out.tolist()) == [[r, r] for r in range(comm.size)]


# --------------------------------------------------------------------------- construction


def test_launched_world_under_mpirun_is_the_world(comm):
    lw = launched_world()
    assert lw.mpi is not None
    assert (lw.rank, lw.size) == (comm.rank, comm.size)
    assert lw.allgather(lw.rank) == list(range(comm.size))


def test_one_process_comm_needs_no_mpi():
    solo = Comm(None)
    assert (solo.rank, solo.size, solo.mpi) == (0, 1, None)
    assert solo.scatter(["only"]) == "only"
    with pytest.raises(ValueError, match=r"gave 2 item\(s\) for 1 rank\(s\)"):
        solo.scatter(["a", "b"])
    x = np.arange(6, dtype=np.float32)[::2]
    out = solo.allreduce_sum(x)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, [0, 2, 4])
    out[0] = 9  # a new array, not a view of the input
    assert x[0] == 0
    assert solo.allgather("x") == ["x"] and solo.bcast("y") == "y"


# --------------------------------------------------------------------------- Gatherv


@pytest.mark.parametrize("where", ["first", "last"])
def test_gather_rows_stacks_every_ranks_rows_in_rank_order(comm, where):
    root = 0 if where == "first" else comm.size - 1
    # rank r gives r + 1 rows (rank 1 none, to test empty parts) of shape (2, 3)
    rows = 0 if comm.rank == 1 else comm.rank + 1
    mine = np.full((rows, 2, 3), comm.rank, dtype=np.float64) + np.arange(6).reshape(2, 3)
    got = comm.gather_rows(mine, root=root)
    if comm.rank != root:
        assert got is None
        return
    expected = np.concatenate([np.full((0 if r == 1 else r + 1, 2, 3), r, dtype=np.float64)
                               + np.arange(6).reshape(2, 3) for r in range(comm.size)])
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_gather_rows_keeps_integer_dtypes(comm):
    got = comm.gather_rows(np.arange(comm.rank * 10, comm.rank * 10 + 3, dtype=np.int64))
    if comm.is_root:
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, [r * 10 + i for r in range(comm.size)
                                            for i in range(3)])


def test_gather_rows_with_different_row_shapes_fails_on_every_rank(comm):
    width = 4 if comm.rank == comm.size - 1 and comm.size > 1 else 3
    mine = np.zeros((2, width), dtype=np.float32 if comm.size == 1 else np.float64)
    if comm.size == 1:
        mine = np.float64(1.0)  # one process: a scalar is the mistake to catch
    with pytest.raises(DistributedError) as info:
        comm.run_agreed(lambda: comm.gather_rows(mine), "gathering outputs")
    assert info.value.ranks == list(range(comm.size))
    assert "gather_rows:" in str(info.value)
    assert comm.allgather(comm.rank) == list(range(comm.size))  # still in lockstep
