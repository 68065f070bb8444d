"""The exponential average of the iterates (optimizer.average) against its closed form."""

import numpy as np
import pytest

from mpinewton.solvers import IterateAverage, ParameterError


def _closed_form(iterates, decay):
    """sum_j decay^(k-j) (1 - decay) w_j / (1 - decay^k), the bias-corrected average."""
    k = len(iterates)
    weights = np.array([decay ** (k - j) * (1 - decay) for j in range(1, k + 1)])
    return weights @ np.asarray(iterates) / (1 - decay ** k)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_the_average_is_the_bias_corrected_weighted_sum(decay):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(7)
    average = IterateAverage(decay, w0)
    np.testing.assert_array_equal(average.weights, w0)  # before the first step: the start
    iterates = []
    for _ in range(30):
        iterates.append(rng.standard_normal(7))
        average.update(iterates[-1])
        np.testing.assert_allclose(average.weights, _closed_form(iterates, decay),
                                   rtol=1e-12, atol=1e-12)
    # the first step alone: the start has dropped out entirely
    first = IterateAverage(decay, w0)
    np.testing.assert_allclose(first.update(iterates[0]), iterates[0], rtol=1e-15)


def test_a_constant_sequence_is_its_own_average():
    average = IterateAverage(0.99, np.zeros(3))
    for _ in range(5):
        average.update(np.full(3, 2.5))
    np.testing.assert_allclose(average.weights, 2.5, rtol=1e-14)


def test_the_state_round_trip_continues_exactly():
    rng = np.random.default_rng(1)
    straight, halves = IterateAverage(0.8, np.zeros(4)), IterateAverage(0.8, np.zeros(4))
    steps = rng.standard_normal((10, 4))
    for w in steps:
        straight.update(w)
    for w in steps[:6]:
        halves.update(w)
    state = halves.to_dict()
    halves.weights[:] = 99.0  # the saved state is a copy
    resumed = IterateAverage.from_dict(state)
    for w in steps[6:]:
        resumed.update(w)
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    assert resumed.total == straight.total


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ParameterError, match="decay"):
        IterateAverage(decay, np.zeros(2))
