"""Exactness of the per-rank products (design invariant 4, thesis 14.2).

References are independent of the code under test: the explicit Hessian
(Jacobian of the gradient, thesis 9.1), central finite differences of the
gradient, and symmetry u.Hv = v.Hu.
"""

import numpy as np
import pytest

from mpinewton.local import LocalObjective
from mpinewton.models import mlp, thesis_cnn
from mpinewton.params import get_flat


def _data(n, shape=(28, 28, 1), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.fixture(scope="module")
def cnn_problem():
    model = thesis_cnn(dtype="float64", seed=3)
    x, y = _data(24)
    local = LocalObjective(model, x, y, micro_batch=10, jit=False)
    return local, get_flat(model)


@pytest.fixture(scope="module")
def mlp_problem():
    model = mlp(dtype="float64", seed=5, input_shape=(6, 6, 1), hidden=(7, 5))
    x, y = _data(40, shape=(6, 6, 1), seed=1)
    local = LocalObjective(model, x, y, micro_batch=16, jit=False)
    return local, get_flat(model)


def test_thesis_cnn_has_3192_weights():
    assert get_flat(thesis_cnn()).size == 3192


_HESSIANS = {}


def _explicit_hessian(name, local, w):
    """The explicit Hessian of a module fixture's problem, computed once (thesis 9.1)."""
    if name not in _HESSIANS:
        _HESSIANS[name] = local.hessian_sum(w)
    return _HESSIANS[name]


@pytest.mark.parametrize("name", ["cnn_problem", "mlp_problem"])
@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_hvp_equals_explicit_hessian(request, name, mode):
    local, w = request.getfixturevalue(name)
    other = LocalObjective(local.model, *_unchunk(local), micro_batch=local.micro_batch,
                           jit=False, hvp=mode)
    hessian = _explicit_hessian(name, local, w)
    rng = np.random.default_rng(11)
    for _ in range(3):
        v = rng.standard_normal(w.size)
        hv = other.hvp_sum(w, v)
        ref = hessian @ v
        assert np.linalg.norm(hv - ref) <= 1e-10 * np.linalg.norm(ref)


def _unchunk(local):
    xs = np.concatenate([x.numpy()[:n] for x, _, n in local._chunks])
    ys = np.concatenate([y.numpy()[:n] for _, y, n in local._chunks])
    return xs, ys


def test_explicit_hessian_is_symmetric_and_hvp_symmetric(mlp_problem):
    local, w = mlp_problem
    hessian = local.hessian_sum(w)
    assert np.allclose(hessian, hessian.T, rtol=0, atol=1e-12 * np.abs(hessian).max())
    rng = np.random.default_rng(2)
    u, v = rng.standard_normal((2, w.size))
    uhv, vhu = u @ local.hvp_sum(w, v), v @ local.hvp_sum(w, u)
    assert abs(uhv - vhu) <= 1e-12 * abs(uhv)


def test_hvp_matches_central_differences_to_second_order(mlp_problem):
    # The MLP is smooth (tanh, softmax), so the central difference of the gradient
    # has an O(h^2) error: halving h divides it by about 4.
    local, w = mlp_problem
    rng = np.random.default_rng(4)
    v = rng.standard_normal(w.size)
    v /= np.linalg.norm(v)
    hv = local.hvp_sum(w, v)
    errors = []
    for h in (4e-2, 2e-2, 1e-2):
        fd = (local.loss_grad_sum(w + h * v)[1] - local.loss_grad_sum(w - h * v)[1]) / (2 * h)
        errors.append(np.linalg.norm(fd - hv))
    rates = [np.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(1.8 < r < 2.2 for r in rates), (errors, rates)


def test_cnn_hvp_matches_small_step_central_differences(cnn_problem):
    # ReLU makes the thesis CNN only piecewise C^2 (thesis 10.1): use a step small
    # enough not to cross a kink and compare to the difference quotient.
    local, w = cnn_problem
    v = np.random.default_rng(4).standard_normal(w.size)
    v /= np.linalg.norm(v)
    hv = local.hvp_sum(w, v)
    h = 1e-5
    fd = (local.loss_grad_sum(w + h * v)[1] - local.loss_grad_sum(w - h * v)[1]) / (2 * h)
    assert np.linalg.norm(fd - hv) <= 1e-6 * np.linalg.norm(hv)


def test_micro_batch_size_does_not_change_sums(cnn_problem):
    local, w = cnn_problem
    x, y = _unchunk(local)
    whole = LocalObjective(local.model, x, y, micro_batch=len(x), jit=True)
    v = np.random.default_rng(7).standard_normal(w.size)
    loss_a, grad_a = local.loss_grad_sum(w)
    loss_b, grad_b = whole.loss_grad_sum(w)
    assert loss_a == pytest.approx(loss_b, rel=1e-13)
    np.testing.assert_allclose(grad_a, grad_b, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(local.hvp_sum(w, v), whole.hvp_sum(w, v), rtol=1e-10, atol=1e-12)


def test_loss_sum_is_batch_additive(cnn_problem):
    local, w = cnn_problem
    x, y = _unchunk(local)
    halves = [LocalObjective(local.model, x[s], y[s], micro_batch=7, jit=False)
              for s in (slice(0, 9), slice(9, None))]
    assert sum(h.loss_sum(w) for h in halves) == pytest.approx(local.loss_sum(w), rel=1e-13)
    np.testing.assert_allclose(sum(h.loss_grad_sum(w)[1] for h in halves),
                               local.loss_grad_sum(w)[1], rtol=1e-11, atol=1e-14)


def test_empty_shard_contributes_zero():
    model = thesis_cnn()
    x, y = _data(0)
    local = LocalObjective(model, x, y)
    w = get_flat(model)
    assert local.loss_sum(w) == 0.0
    assert not local.loss_grad_sum(w)[1].any()
    assert not local.hvp_sum(w, np.ones_like(w)).any()
    assert local.correct_count(w) == 0


def test_wrong_weight_shape_is_an_error(cnn_problem):
    local, _ = cnn_problem
    with pytest.raises(ValueError, match=r"expected \(3192,\)"):
        local.loss_sum(np.zeros(5))


def test_float32_model_matches_float64_products():
    x, y = _data(12, shape=(6, 6, 1), seed=9)
    m64 = mlp(dtype="float64", seed=2, input_shape=(6, 6, 1), hidden=(5,))
    m32 = mlp(dtype="float32", seed=2, input_shape=(6, 6, 1), hidden=(5,))
    w = get_flat(m64)
    l64 = LocalObjective(m64, x, y, micro_batch=5, jit=False)
    l32 = LocalObjective(m32, x, y, micro_batch=5, jit=False)
    assert l32.dtype.name == "float32"
    v = np.random.default_rng(0).standard_normal(w.size)
    ref = l64.hvp_sum(w, v)
    assert np.linalg.norm(l32.hvp_sum(w, v) - ref) <= 1e-4 * np.linalg.norm(ref)
    assert l32.loss_sum(w) == pytest.approx(l64.loss_sum(w), rel=1e-5)


def test_padded_micro_batches_give_the_same_sums(mlp_problem):
    """Mini-batch parts padded to full micro-batches (masked rows) change no sum."""
    local, w = mlp_problem
    xs, ys = _unchunk(local)
    keep = np.arange(len(xs)) % 3 != 1  # an odd-sized subset, so the last chunk is padded
    exact = LocalObjective(local.model, xs[keep], ys[keep], micro_batch=7, jit=False)
    padded = LocalObjective(local.model, xs[:1], ys[:1], micro_batch=7, jit=False)
    padded.set_samples(xs[keep], ys[keep], pad_to=100)
    assert keep.sum() % 7 != 0 and padded.num_samples == keep.sum()
    assert all(int(x.shape[0]) == 7 for x, _, _ in padded._chunks)
    rng = np.random.default_rng(5)
    v = rng.standard_normal(w.size)
    assert padded.loss_sum(w) == pytest.approx(exact.loss_sum(w), rel=1e-13)
    _, g_pad = padded.loss_grad_sum(w)
    _, g_ref = exact.loss_grad_sum(w)
    np.testing.assert_allclose(g_pad, g_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(padded.hvp_sum(w, v), exact.hvp_sum(w, v), rtol=1e-11, atol=1e-13)
    assert padded.correct_count(w) == exact.correct_count(w)
    padded.set_samples(xs[:0], ys[:0], pad_to=100)  # a rank whose part of the batch is empty
    assert padded.loss_sum(w) == 0.0 and not padded.loss_grad_sum(w)[1].any()


def test_only_the_expected_retracing_warning_is_filtered():
    import logging

    import tensorflow as tf

    def record(msg):
        return logging.LogRecord("tensorflow", logging.WARNING, __file__, 1, msg, None, None)

    logger = tf.get_logger()
    retrace = record("5 out of the last 9 calls to <f> triggered tf.function retracing. Tracing")
    assert not all(f.filter(retrace) for f in logger.filters)
    assert all(f.filter(record("something else went wrong")) for f in logger.filters)


# -- batched products: hvp_sum_many ---------------------------------------------------

def _assert_columns_close(got, ref, rel):
    assert got.shape == ref.shape
    for j in range(ref.shape[1]):
        assert np.linalg.norm(got[:, j] - ref[:, j]) <= rel * np.linalg.norm(ref[:, j]), j


@pytest.mark.parametrize("name", ["cnn_problem", "mlp_problem"])
@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
# one column on whole micro-batches, five on padded ones (padding with several columns: the
# mask applied to each): the other two pairs went the same ways and took a minute
@pytest.mark.parametrize(("padded", "k"), [(False, 1), (True, 5)])
def test_hvp_sum_many_equals_hvp_sum_columns_and_explicit_hessian(request, name, mode, k,
                                                                  padded):
    local, w = request.getfixturevalue(name)
    xs, ys = _unchunk(local)
    if padded:  # micro-batches of 7 rows, the last one padded with masked rows
        other = LocalObjective(local.model, xs[:1], ys[:1], micro_batch=7, jit=False, hvp=mode)
        other.set_samples(xs, ys, pad_to=100)
        assert len(xs) % 7 and all(int(x.shape[0]) == 7 for x, _, _ in other._chunks)
    else:  # micro-batches smaller than the shard, the last one shorter
        other = LocalObjective(local.model, xs, ys, micro_batch=local.micro_batch, jit=False,
                               hvp=mode)
        assert len(other._chunks) > 1
    v = np.random.default_rng(k).standard_normal((w.size, k))
    hv = other.hvp_sum_many(w, v)
    assert hv.shape == (w.size, k) and hv.dtype == np.float64
    _assert_columns_close(hv, np.stack([other.hvp_sum(w, v[:, j]) for j in range(k)], axis=1),
                          1e-12)
    _assert_columns_close(hv, _explicit_hessian(name, local, w) @ v, 1e-10)


def test_hvp_sum_many_with_xla_traces_once_per_shape_and_k(cnn_problem):
    local, w = cnn_problem
    xs, ys = _unchunk(local)
    jitted = LocalObjective(local.model, xs[:20], ys[:20], micro_batch=10, jit=True)
    v = np.random.default_rng(3).standard_normal((w.size, 4))
    hv = jitted.hvp_sum_many(w, v)
    _assert_columns_close(hv, np.stack([jitted.hvp_sum(w, v[:, j]) for j in range(4)], axis=1),
                          1e-12)
    traces = jitted._hvp_many_fn.experimental_get_tracing_count()
    jitted.hvp_sum_many(w, 2 * v)
    assert jitted._hvp_many_fn.experimental_get_tracing_count() == traces == 1


def test_hvp_sum_many_on_strided_multichannel_convolutions():
    """The batched convolution rules (im2col) on strides, 'valid' padding, several channels."""
    import keras

    model = keras.Sequential([
        keras.Input((9, 9, 2), dtype="float64"),
        keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh", dtype="float64"),
        keras.layers.Conv2D(2, 2, padding="valid", activation="tanh", dtype="float64"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(10, activation="softmax", dtype="float64"),
    ])
    x, y = _data(10, shape=(9, 9, 2), seed=4)  # two micro-batches of one shape: one trace
    w = get_flat(model)
    v = np.random.default_rng(8).standard_normal((w.size, 3))
    reference = None
    for mode in ("reverse_over_reverse", "forward_over_reverse"):
        for jit in (False, True):
            local = LocalObjective(model, x, y, micro_batch=5, jit=jit, hvp=mode)
            if reference is None:  # hvp_sum is checked against the explicit Hessian above
                reference = np.stack([local.hvp_sum(w, v[:, j]) for j in range(3)], axis=1)
            _assert_columns_close(local.hvp_sum_many(w, v), reference, 1e-12)


def test_hvp_sum_many_leaves_pfor_rules_as_they_were(mlp_problem, cnn_problem):
    from tensorflow.python.ops.parallel_for import pfor

    rules = dict(pfor._pfor_converter_registry)
    local, w = cnn_problem
    local.hvp_sum_many(w, np.ones((w.size, 2)))
    assert dict(pfor._pfor_converter_registry) == rules


def test_hvp_sum_many_edge_cases(mlp_problem):
    local, w = mlp_problem
    assert local.hvp_sum_many(w, np.zeros((w.size, 0))).shape == (w.size, 0)
    with pytest.raises(ValueError, match=r"direction matrix has shape \(5, 2\)"):
        local.hvp_sum_many(w, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="direction matrix"):
        local.hvp_sum_many(w, np.zeros(w.size))
    x, y = _data(0, shape=(6, 6, 1))
    empty = LocalObjective(local.model, x, y, jit=False)
    hv = empty.hvp_sum_many(w, np.ones((w.size, 3)))
    assert hv.shape == (w.size, 3) and not hv.any()
