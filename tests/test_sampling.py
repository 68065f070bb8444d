"""Mini-batch sampling (thesis 8.2): seeded epochs, disjoint batches, exact state."""

import numpy as np
import pytest

from mpinewton.sampling import MiniBatchSampler


def test_batches_of_an_epoch_are_disjoint_sorted_and_cover_the_permutation():
    s = MiniBatchSampler(103, 10, seed=4)
    batches = [s.next() for _ in range(10)]  # 103 // 10 = 10 batches per epoch
    assert all(b.size == 10 and np.all(np.diff(b) > 0) for b in batches)
    rows = np.concatenate(batches)
    assert np.unique(rows).size == 100
    np.testing.assert_array_equal(np.sort(rows), np.sort(s.permutation(0)[:100]))
    assert s.epoch == 0 and s.position == 100
    nxt = s.next()  # 3 samples left over: the next batch opens epoch 1
    assert s.epoch == 1 and s.position == 10
    np.testing.assert_array_equal(nxt, np.sort(s.permutation(1)[:10]))


def test_epochs_draw_different_permutations_and_the_seed_fixes_them():
    a, b, c = MiniBatchSampler(50, 5, seed=1), MiniBatchSampler(50, 5, seed=1), \
        MiniBatchSampler(50, 5, seed=2)
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    np.testing.assert_array_equal(a.permutation(3), b.permutation(3))
    assert not np.array_equal(a.permutation(0), c.permutation(0))
    for _ in range(23):
        np.testing.assert_array_equal(a.next(), b.next())


def test_state_round_trip_continues_the_same_sequence():
    straight = MiniBatchSampler(37, 6, seed=9)
    expected = [straight.next() for _ in range(15)]
    first = MiniBatchSampler(37, 6, seed=9)
    got = [first.next() for _ in range(8)]
    resumed = MiniBatchSampler.from_state(first.state(), num_samples=37, batch_size=6)
    got += [resumed.next() for _ in range(7)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)


def test_resuming_with_another_data_set_or_batch_size_is_refused():
    state = MiniBatchSampler(37, 6).state()
    with pytest.raises(ValueError, match="batches of 6 from 37 samples"):
        MiniBatchSampler.from_state(state, num_samples=37, batch_size=7)
    with pytest.raises(ValueError, match="draws 6 from 40"):
        MiniBatchSampler.from_state(state, num_samples=40, batch_size=6)


@pytest.mark.parametrize("n, b", [(10, 0), (10, 11)])
def test_bad_batch_sizes_are_errors(n, b):
    with pytest.raises(ValueError, match="batch size"):
        MiniBatchSampler(n, b)


def test_curvature_rows_are_a_seeded_subset_of_the_right_size():
    from mpinewton.sampling import curvature_count, curvature_rows

    rows = curvature_rows(1000, 0.1, seed=3, iteration=5)
    assert rows.size == curvature_count(1000, 0.1) == 100
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 1000
    np.testing.assert_array_equal(rows, curvature_rows(1000, 0.1, seed=3, iteration=5))
    assert not np.array_equal(rows, curvature_rows(1000, 0.1, seed=3, iteration=6))
    assert not np.array_equal(rows, curvature_rows(1000, 0.1, seed=4, iteration=5))
    np.testing.assert_array_equal(curvature_rows(7, 1.0, seed=0, iteration=1), np.arange(7))
    assert curvature_count(7, 0.01) == 1 and curvature_count(7, 0.5) == 4
    with pytest.raises(ValueError, match="curvature fraction"):
        curvature_count(10, 0.0)
    with pytest.raises(ValueError, match="curvature fraction"):
        curvature_count(10, 1.5)


def test_the_ranks_curvature_rows_add_up_to_the_subset():
    from mpinewton.data import shard_bounds
    from mpinewton.sampling import curvature_rows
    from mpinewton.train.subsample import local_curvature_rows

    whole = curvature_rows(101, 0.3, seed=1, iteration=2)
    for size in (1, 2, 3):
        parts = []
        for rank in range(size):
            lo, hi = shard_bounds(101, rank, size)
            rows, m, first = local_curvature_rows(101, 0.3, 1, 2, lo, hi)
            assert m == whole.size and np.all((rows >= 0) & (rows < hi - lo))
            assert first == sum(len(p) for p in parts)  # its place in the subset
            parts.append(rows + lo)
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_fisher_draws_are_seeded_by_iteration_and_uniform():
    from mpinewton.sampling import fisher_draws

    u = fisher_draws(3, 7, 400, 10)
    assert u.shape == (400, 10) and u.dtype == np.float64
    assert np.all((u >= 0) & (u < 1)) and abs(u.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(u, fisher_draws(3, 7, 400, 10))
    assert not np.array_equal(u, fisher_draws(3, 8, 400, 10))
    assert not np.array_equal(u, fisher_draws(4, 7, 400, 10))


def test_norm_test_against_hand_computed_sizes():
    from mpinewton.sampling import norm_test

    # b = 10, mean |g_i|^2 = 5, |g|^2 = 1: V = 10/9 * 4 = 40/9; V/b = 0.444 <= 0.81 passes
    assert norm_test(10, 5.0, 1.0, 0.9) is None
    # theta = 0.5: 0.444 > 0.25 fails; the next batch needs ceil(V / 0.25) = ceil(17.78) = 18
    assert norm_test(10, 5.0, 1.0, 0.5) == 18
    # no variance (every g_i equal) always passes; a zero gradient or b < 2 never decides
    assert norm_test(100, 1.0, 1.0, 0.1) is None
    assert norm_test(100, 1.0, 0.0, 0.1) is None and norm_test(1, 9.0, 1.0, 0.1) is None


def test_geometric_growth_against_hand_computed_sizes():
    from mpinewton.sampling import grow_geometric

    # b = 10, every 3 steps, factor 2, at most 50: steps 1-3 use 10, 4-6 use 20, 7-9 40, then 50
    s = MiniBatchSampler(100, 10, seed=0)
    sizes, grown = [], []
    for step in range(1, 13):
        sizes.append(s.next().size)
        grown.append(grow_geometric(s, step, 3, 2.0, batch_max=50))
    assert sizes == [10] * 3 + [20] * 3 + [40] * 3 + [50] * 3
    assert grown == [None, None, 20, None, None, 40, None, None, 50, None, None, None]
    # factor 1.5 rounds up (ceil(1.5 * 7) = 11), and without batch_max stops at all samples
    s = MiniBatchSampler(20, 7, seed=0)
    assert [grow_geometric(s, k, 1, 1.5) for k in (1, 2, 3)] == [11, 17, 20]
    assert grow_geometric(s, 4, 1, 1.5) is None
    for every, factor in ((0, 2.0), (1, 1.0)):
        with pytest.raises(ValueError, match="geometric growth"):
            grow_geometric(s, 1, every, factor)


def test_grow_batch_follows_the_jobs_rule():
    from mpinewton.config import load_job
    from mpinewton.train.loop import grow_batch

    def job(*keys):
        return load_job(None, ["optimizer.batch_size=10", *keys]).optimizer

    geometric = job("optimizer.batch_growth='geometric'", "optimizer.batch_every=2")
    s = MiniBatchSampler(100, 10)
    # the norm test's numbers do not matter to the geometric rule, only the step does
    assert grow_batch(s, geometric, 1, 1e9, 1e-9) is None and s.batch_size == 10
    assert grow_batch(s, geometric, 2, 0.0, 0.0) == 20 and s.batch_size == 20
    # the norm test: b = 10, mean |g_i|^2 = 5, |g|^2 = 1, theta 0.5 asks for 18 (above)
    norm = job("optimizer.batch_growth='norm_test'", "optimizer.batch_theta=0.5")
    s = MiniBatchSampler(100, 10)
    assert grow_batch(s, norm, 1, 5.0, 1.0) == 18 and s.batch_size == 18
    assert grow_batch(MiniBatchSampler(100, 10), job(), 2, 5.0, 1.0) is None
    assert grow_batch(None, geometric, 2, 0.0, 0.0) is None


def test_sampler_grows_and_restores_a_grown_size():
    s = MiniBatchSampler(50, 5, seed=1)
    s.next()
    assert s.grow(3) == 5 and s.grow(12) == 12 and s.grow(500) == 50
    s = MiniBatchSampler(50, 5, seed=1)
    s.next()
    s.grow(12)
    batch = s.next()
    assert batch.size == 12
    state = s.state()
    with pytest.raises(ValueError, match="resuming would not continue"):
        MiniBatchSampler.from_state(state, num_samples=50, batch_size=5)
    restored = MiniBatchSampler.from_state(state, num_samples=50, batch_size=5, growing=True)
    assert restored.batch_size == 12
    np.testing.assert_array_equal(restored.next(), s.next())



def test_curvature_growth_follows_the_hand_computed_sequence():
    """Levels from the running average of log(damping) (smoothing 1/2, threshold 2), by hand.

    ref = log 1e-2. 8e-2: avg = ref + 1.5 ln 2 > ref + ln 2, level 1, avg back to ref;
    1e-2: ref; 3e-2: ref + 0.5 ln 3 < ln 2 (stays); 3e-2: ref + 0.75 ln 3 > ln 2, level 2;
    a NaN or None changes nothing; 1e3 twice: level 3 = 0.4, the cap, where it stays.
    """
    from mpinewton.sampling import CurvatureGrowth

    g = CurvatureGrowth(0.05, 1e-2, threshold=2.0, fraction_max=0.4, smoothing=0.5)
    assert g.current() == 0.05 and g.fractions() == [0.05, 0.1, 0.2, 0.4]
    got = [g.update(x) for x in (8e-2, 1e-2, 3e-2, 3e-2, float("nan"), None, 1e3, 1e3, 1e3)]
    assert got == [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4]
    assert g.level == 3 == g.max_level


def test_curvature_growth_never_shrinks_and_caps_between_levels():
    """Low damping never lowers the fraction; a cap between two levels is the last one."""
    from mpinewton.sampling import CurvatureGrowth

    g = CurvatureGrowth(0.05, 1e-2, threshold=2.0, fraction_max=0.3, smoothing=0.0)
    assert g.fractions() == [0.05, 0.1, 0.2, 0.3]
    assert [g.update(x) for x in (1e-1, 1e-6, 1e-6, 1e-1, 1e-1, 1e-1, 1e-1)] == \
        [0.1, 0.1, 0.1, 0.2, 0.3, 0.3, 0.3]


def test_curvature_growth_state_continues_the_same_sequence():
    from mpinewton.sampling import CurvatureGrowth

    damping = [1e-2, 3e-2, 5e-2, 2e-2, 8e-2, 8e-2, 1e-2, 9e-2, 9e-2, 9e-2]
    straight = CurvatureGrowth(0.05, 1e-2)
    expected = [straight.update(x) for x in damping]
    first = CurvatureGrowth(0.05, 1e-2)
    for x in damping[:3]:
        first.update(x)
    resumed = CurvatureGrowth(0.05, 1e-2)
    resumed.restore(first.state())
    assert [resumed.update(x) for x in damping[3:]] == expected[3:]
    assert expected[0] == expected[3] < expected[-1], expected  # it grows after the restart
    fresh = CurvatureGrowth(0.05, 1e-2)  # before any step: nothing to restore but level 0
    fresh.restore(CurvatureGrowth(0.05, 1e-2).state())
    assert fresh.state() == {"level": 0, "log_avg": None}


@pytest.mark.parametrize("kwargs", [
    {"fraction": 0.0}, {"fraction": 0.5, "fraction_max": 0.4}, {"damping": 0.0},
    {"threshold": 1.0}, {"threshold": float("inf")}, {"smoothing": 1.0},
    {"fraction_max": 1.5}])
def test_curvature_growth_rejects_bad_settings(kwargs):
    from mpinewton.sampling import CurvatureGrowth

    with pytest.raises(ValueError, match="curvature growth"):
        CurvatureGrowth(**{"fraction": 0.1, "damping": 1e-2, **kwargs})
