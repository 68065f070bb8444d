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
    with pytest.raises(ObjectiveError, match="one backward pass per model output"):
        local.kfac_blocks()
    shared = keras.layers.Dense(6, activation="tanh", dtype="float64")
    inputs = keras.Input((6,), dtype="float64")
    twice = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", dtype="float64")(
        shared(shared(inputs))))
    local = LocalObjective(twice, np.ones((2, 6)), np.array([0, 2]), jit=False)
    with pytest.raises(ObjectiveError, match="'dense.*' is called more than once"):
        local.kfac_blocks()
