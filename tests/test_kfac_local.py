"""K-FAC's Kronecker factors from the model (local.py, objective.py) against exact references.

For one sample and a layer with one output position, K-FAC's ``A (x) G`` is
not an approximation: it is the layer's diagonal block of the exact
Gauss-Newton matrix (Martens & Grosse 2015, sec. 3), formed here column by
column from Gauss-Newton products (``gnvp_sum_many`` of the identity, itself
checked against ``J^T H_L J`` in tests/test_gauss_newton.py). A convolution's
input factor is checked against patches cut by hand in numpy.
"""

import keras
import numpy as np
import pytest

from mpinewton.comm import Comm
from mpinewton.local import KFAC_MAX_OUTPUTS, LocalObjective
from mpinewton.models import mlp, thesis_cnn
from mpinewton.objective import DistributedObjective, ObjectiveError
from mpinewton.params import get_flat


def _images(n, shape, seed, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n)


def _sigmoid_net():
    return keras.Sequential([
        keras.Input((6, 6, 1), dtype="float64"), keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(5, activation="tanh", dtype="float64"),
        keras.layers.Dense(4, activation="sigmoid", dtype="float64")])


def _conv_net():
    """A convolution with one output position (its kernel covers the image), with a bias."""
    return keras.Sequential([
        keras.Input((5, 5, 2), dtype="float64"),
        keras.layers.Conv2D(3, 5, padding="valid", activation="tanh", dtype="float64",
                            bias_initializer=keras.initializers.Constant(0.1)),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(4, activation="softmax", dtype="float64")])


def _exact_blocks(local, w):
    ggn = local.gnvp_sum_many(w, np.eye(w.size))
    return [ggn[np.ix_(b.indices().ravel(), b.indices().ravel())] for b in local.kfac_blocks()]


@pytest.mark.parametrize("case", ["softmax", "mse", "sigmoid", "conv"])
def test_one_sample_factors_are_the_exact_gauss_newton_blocks(case):
    if case == "sigmoid":
        model = _sigmoid_net()
        x, _ = _images(1, (6, 6, 1), 3)
        y = np.array([[1, 0, 0, 1]])
        local = LocalObjective(model, x, y, loss="binary_crossentropy", jit=False)
    elif case == "conv":
        model = _conv_net()
        x, y = _images(1, (5, 5, 2), 4, classes=4)
        local = LocalObjective(model, x, y, num_classes=4, jit=False)
    else:
        model = mlp(dtype="float64", seed=5, input_shape=(6, 6, 1), hidden=(7, 5))
        x, y = _images(1, (6, 6, 1), 2)
        loss = "categorical_crossentropy" if case == "softmax" else "mean_squared_error"
        local = LocalObjective(model, x, y, loss=loss, jit=False)
    w = get_flat(model)
    blocks = local.kfac_blocks()
    assert len(blocks) == len([v for v in model.trainable_variables if "kernel" in v.path])
    assert all(b.bias_offset >= 0 for b in blocks)  # every layer here has a bias
    for block, (a, g), exact in zip(blocks, local.kfac_factor_sums(w), _exact_blocks(local, w),
                                    strict=True):
        kron = np.kron(a, g)
        assert np.abs(kron - exact).max() <= 1e-10 * np.abs(exact).max(), block.name
        assert np.abs(exact).max() > 0


def _same_padding_patches(img, k):
    """TensorFlow's "same" patches of an (h, w, c) image for a k x k kernel, stride 1."""
    h, w, c = img.shape
    top, left = (k - 1) // 2, (k - 1) // 2
    padded = np.zeros((h + k - 1, w + k - 1, c))
    padded[top:top + h, left:left + w] = img
    return np.array([padded[i:i + k, j:j + k, :].reshape(-1)
                     for i in range(h) for j in range(w)])


def test_convolution_input_factor_is_the_mean_patch_second_moment():
    model = thesis_cnn(dtype="float64", seed=1, input_shape=(8, 8, 1))
    x, y = _images(3, (8, 8, 1), 5)
    local = LocalObjective(model, x, y, micro_batch=2, jit=False)
    (a, g), *_ = local.kfac_factor_sums(get_flat(model))
    ref = sum(p.T @ p / len(p) for p in (_same_padding_patches(xi / 255.0, 4) for xi in x))
    np.testing.assert_allclose(a, ref, rtol=1e-12, atol=1e-14)
    assert g.shape == (1, 1) and g[0, 0] > 0


def test_factors_above_max_dim_are_the_diagonals_of_the_whole_ones():
    """The thesis CNN's factors (A of orders 16, 784, 4; G of 1, 4, 10) with max_dim 10:
    the convolution's A (16 patch entries) and the dense layer's A (784 inputs) come as
    the diagonals of the whole matrices, the rest whole; XLA and the distributed means
    alike."""
    model = thesis_cnn(dtype="float64", seed=4, input_shape=(28, 28, 1))
    x, y = _images(5, (28, 28, 1), 8)
    w = get_flat(model)
    whole = LocalObjective(model, x, y, micro_batch=3, jit=False).kfac_factor_sums(w)
    local = LocalObjective(model, x, y, micro_batch=3, jit=True)
    capped = local.kfac_factor_sums(w, 10)
    assert [(a.shape, g.shape) for a, g in capped] == [((16,), (1, 1)), ((784,), (4, 4)),
                                                       ((4, 4), (10, 10))]
    for (a0, g0), (a1, g1) in zip(whole, capped, strict=True):
        np.testing.assert_allclose(a1, np.diag(a0) if a1.ndim == 1 else a0, rtol=1e-12,
                                   atol=1e-15)
        np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)
    means = DistributedObjective(local, Comm(None), 5).kfac_factors(w, 10)
    for (a, g), (sa, sg) in zip(means, capped, strict=True):
        np.testing.assert_allclose(a, sa / 5, rtol=1e-15)
        np.testing.assert_allclose(g, sg / 5, rtol=1e-15)
    again = local.kfac_factor_sums(w)  # the same objective, back to the default cap: whole
    assert [(a.shape, g.shape) for a, g in again] == [(a.shape, g.shape) for a, g in whole]
    with pytest.raises(ObjectiveError, match="max_dim"):
        local.kfac_factor_sums(w, 0)


def test_micro_batches_padding_and_jit_do_not_change_the_factors():
    model = thesis_cnn(dtype="float64", seed=2, input_shape=(8, 8, 1))
    x, y = _images(7, (8, 8, 1), 6)
    w = get_flat(model)
    ref = LocalObjective(model, x, y, micro_batch=7, jit=False).kfac_factor_sums(w)
    local = LocalObjective(model, x, y, micro_batch=3, jit=True)
    padded = LocalObjective(model, x, y, micro_batch=4, jit=True)
    padded.set_samples(x, y, pad_to=8)
    for other in (local, padded):
        for (a0, g0), (a1, g1) in zip(ref, other.kfac_factor_sums(w), strict=True):
            np.testing.assert_allclose(a1, a0, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)


def test_distributed_factors_are_means_and_the_layers_are_restored():
    model = mlp(dtype="float64", seed=3, input_shape=(6, 6, 1), hidden=(5,))
    x, y = _images(9, (6, 6, 1), 7)
    local = LocalObjective(model, x, y, micro_batch=4, jit=False)
    w = get_flat(model)
    before = local.outputs(w, x)
    own = [vars(layer).get("call") for layer in model.layers]
    sums = local.kfac_factor_sums(w)
    objective = DistributedObjective(local, Comm(None), 9)
    for (a, g), (sa, sg) in zip(objective.kfac_factors(w), sums, strict=True):
        np.testing.assert_allclose(a, sa / 9, rtol=1e-15)
        np.testing.assert_allclose(g, sg / 9, rtol=1e-15)
    assert objective.stats.kfac == 1
    assert [vars(layer).get("call") for layer in model.layers] == own  # the taps are gone
    assert model.layers[-1].activation is keras.activations.softmax
    np.testing.assert_array_equal(local.outputs(w, x), before)


def test_kfac_refuses_losses_and_models_it_cannot_factor():
    model = mlp(dtype="float64", seed=3, input_shape=(6, 6, 1), hidden=(5,))
    x, _ = _images(4, (6, 6, 1), 8)
    targets = np.random.default_rng(0).random((4, 10))
    huber = LocalObjective(model, x, targets, loss="keras:huber", jit=False)
    with pytest.raises(ObjectiveError, match="matching loss"):
        huber.kfac_blocks()
    wide = mlp(dtype="float64", seed=3, input_shape=(6, 6, 1), hidden=(5,),
               num_classes=KFAC_MAX_OUTPUTS + 1)
    local = LocalObjective(wide, x, np.arange(4), jit=False)
    w = get_flat(wide)
    with pytest.raises(ObjectiveError, match="one backward pass .*fisher = \"sampled\""):
        local.kfac_factor_sums(w)
    local.set_draws(np.full((4, KFAC_MAX_OUTPUTS + 1), 0.3))  # one pass: taken
    assert all(np.all(np.isfinite(g)) for _, g in local.kfac_factor_sums(w, sampled=True))
    shared = keras.layers.Dense(6, activation="tanh", dtype="float64")
    inputs = keras.Input((6,), dtype="float64")
    twice = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", dtype="float64")(
        shared(shared(inputs))))
    local = LocalObjective(twice, np.ones((2, 6)), np.array([0, 2]), jit=False)
    with pytest.raises(ObjectiveError, match="'dense.*' is called more than once"):
        local.kfac_blocks()


def _stratified(n, k, seed):
    """Draws (n, k): each column the n midpoints (i + 1/2) / n in its own random order.

    Each column's labels then follow the model's probabilities to within 1/n,
    and different columns are nearly independent (sigmoid's Bernoulli outputs).
    """
    rng = np.random.default_rng(seed)
    return np.stack([(rng.permutation(n) + 0.5) / n for _ in range(k)], axis=1)


@pytest.mark.parametrize("case", ["softmax", "conv", "sigmoid", "mse"])
def test_sampled_fisher_averages_to_the_exact_factors(case):
    """Monte-Carlo Fisher (one drawn label a sample): over n copies of one sample with
    stratified draws, the sampled G is the exact G (every class, K backward passes) to
    within the draws' discrepancy; A does not depend on the draws at all."""
    n = 3000
    if case == "conv":
        model, shape, classes, loss, tol = _conv_net(), (5, 5, 2), 4, None, 2e-3
    elif case == "sigmoid":
        model, shape, classes, loss, tol = _sigmoid_net(), (6, 6, 1), 4, \
            "binary_crossentropy", 0.06
    else:
        model = mlp(dtype="float64", seed=5, input_shape=(6, 6, 1), hidden=(7, 5))
        shape, classes = (6, 6, 1), 10
        loss, tol = ("categorical_crossentropy", 2e-3) if case == "softmax" else \
            ("mean_squared_error", 0.06)
    x1, y1 = _images(1, shape, 9, classes=classes)
    if case == "sigmoid":
        y1 = np.array([[1, 0, 0, 1]])
    kwargs = {"loss": loss} if loss else {"num_classes": classes}
    w = get_flat(model)
    exact = LocalObjective(model, x1, y1, jit=False, **kwargs).kfac_factor_sums(w)
    many = LocalObjective(model, np.repeat(x1, n, axis=0), np.repeat(y1, n, axis=0),
                          micro_batch=512, jit=False, **kwargs)
    many.set_draws(_stratified(n, many.output_width, 1))
    for (a, g), (sa, sg) in zip(exact, many.kfac_factor_sums(w, sampled=True), strict=True):
        np.testing.assert_allclose(sa / n, a, rtol=1e-10, atol=1e-13)
        assert np.abs(sg / n - g).max() <= tol * np.abs(g).max(), case
    # the exact path is unchanged by draws being set
    for (_, g), (_, eg) in zip(exact, many.kfac_factor_sums(w), strict=True):
        np.testing.assert_allclose(eg / n, g, rtol=1e-10, atol=1e-13)


def test_sampled_softmax_column_is_the_inverse_cdf_label():
    """One sample of a softmax net: the last layer's G is c c^T with c = p - e_y, the label y
    the first class whose cumulative probability exceeds the draw, over all the classes."""
    model = mlp(dtype="float64", seed=5, input_shape=(6, 6, 1), hidden=(7,))
    x, y = _images(1, (6, 6, 1), 2)
    local = LocalObjective(model, x, y, jit=False)
    w = get_flat(model)
    p = local.outputs(w, x)[0]
    cdf = np.cumsum(p)
    for label in range(10):
        u = (cdf[label] - p[label] / 2)  # inside class label's interval
        local.set_draws(np.full((1, 10), u))
        g_last = local.kfac_factor_sums(w, sampled=True)[-1][1]
        c = p - np.eye(10)[label]
        np.testing.assert_allclose(g_last, np.outer(c, c), rtol=1e-10, atol=1e-15)


def test_sampled_fisher_needs_checked_draws_for_its_samples():
    model = mlp(dtype="float64", seed=3, input_shape=(6, 6, 1), hidden=(5,))
    x, y = _images(5, (6, 6, 1), 8)
    local = LocalObjective(model, x, y, micro_batch=2, jit=False)
    w = get_flat(model)
    with pytest.raises(ObjectiveError, match="set_draws"):
        local.kfac_factor_sums(w, sampled=True)
    with pytest.raises(ObjectiveError, match=r"draws have shape \(5, 3\).*\(5, 10\)"):
        local.set_draws(np.zeros((5, 3)))
    with pytest.raises(ObjectiveError, match=r"in \[0, 1\)"):
        local.set_draws(np.ones((5, 10)))
    u = _stratified(5, 10, 0)
    local.set_draws(u)
    ref = local.kfac_factor_sums(w, sampled=True)
    padded = LocalObjective(model, x, y, micro_batch=4, jit=True)
    padded.set_samples(x, y, pad_to=8)
    padded.set_draws(u)
    for (a0, g0), (a1, g1) in zip(ref, padded.kfac_factor_sums(w, sampled=True), strict=True):
        np.testing.assert_allclose(a1, a0, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)
    local.set_samples(x[:3], y[:3])  # new samples: the draws belonged to the old ones
    with pytest.raises(ObjectiveError, match="set_draws"):
        local.kfac_factor_sums(w, sampled=True)


def test_a_float32_models_factors_are_summed_and_reduced_in_float32():
    """The factors travel in the model's precision (half the Allreduce for ResNet-50)
    and are the float64 model's to float32's precision."""
    x, y = _images(6, (6, 6, 1), 11)
    m64 = mlp(dtype="float64", seed=3, input_shape=(6, 6, 1), hidden=(5,))
    m32 = mlp(dtype="float32", seed=3, input_shape=(6, 6, 1), hidden=(5,))
    w = get_flat(m64)
    ref = LocalObjective(m64, x, y, micro_batch=4, jit=False).kfac_factor_sums(w)
    objective = DistributedObjective(LocalObjective(m32, x, y, micro_batch=4, jit=False),
                                     Comm(None), 6)
    for (a, g), (a32, g32) in zip(ref, objective.kfac_factors(w), strict=True):
        assert a32.dtype == g32.dtype == np.float32
        np.testing.assert_allclose(a32, a / 6, rtol=1e-5, atol=1e-6 * np.abs(a).max() / 6)
        np.testing.assert_allclose(g32, g / 6, rtol=1e-4, atol=1e-6 * np.abs(g).max() / 6)
