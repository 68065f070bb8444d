"""Residual nets inside the objective (thesis 10.2, 15): dtypes, batch norm, preprocessing.

Batch norm must use its moving statistics inside the objective (design
invariant 1): then a sample's loss does not depend on the other samples of its
batch, and the HVP is the exact Hessian of a fixed function of ``w``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mpinewton.local import HVP_MODES, LocalObjective
from mpinewton.models import build_model, resnet50, resnet_mini
from mpinewton.params import get_flat

SHAPE = (8, 8, 3)


def _images(n, shape=SHAPE, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n)


def _randomise_batch_norm(model, seed):
    """Moving statistics far from (0, 1), so batch norm is not close to the identity."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.5, size))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, size))


@pytest.fixture(scope="module")
def tiny_resnet():
    """A float64 resnet_mini with two stages (369 weights) and non-trivial batch norm."""
    model = resnet_mini(dtype="float64", seed=1, input_shape=SHAPE, hidden=(2, 2), num_classes=3)
    _randomise_batch_norm(model, 2)
    rng = np.random.default_rng(3)
    w = get_flat(model) * rng.normal(1.0, 0.3, get_flat(model).size)
    w += 0.1 * rng.standard_normal(w.size)  # batch norm's beta starts at 0
    return model, w


def test_resnet_mini_default_size_and_blocks():
    model = resnet_mini()
    assert get_flat(model).size == 33_234
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bn) == 1 + 3 * 4  # stem, and 3 convolutions + projection per block
    assert {v.dtype for v in model.variables} == {"float64"}
    deeper = build_model("resnet_mini", dtype="float32", seed=0, input_shape=(16, 16, 3),
                         num_classes=5, hidden=(4, 8))
    assert {v.dtype for v in deeper.variables} == {"float32"}
    assert deeper.output_shape == (None, 5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resnet50_variables_all_have_the_dtype(dtype):
    model = resnet50(dtype=dtype, input_shape=(32, 32, 3), num_classes=1000)
    assert {v.dtype for v in model.variables} == {dtype}
    assert get_flat(model).size == 25_583_592  # Keras' ResNet-50 with its 1000-way top
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_resnet50_is_seeded():
    def build(seed):
        return get_flat(build_model("resnet50", dtype="float32", seed=seed,
                                    input_shape=(32, 32, 3), num_classes=4))

    first = build(0)
    np.testing.assert_array_equal(first, build(0))
    assert not np.array_equal(first, build(1))


def test_resnet50_input_too_small_is_an_error():
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model("resnet50", dtype="float32", seed=0, input_shape=(28, 28, 3), num_classes=10)
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        build_model("resnet18", dtype="float32", seed=0, input_shape=(28, 28, 3), num_classes=10)


@pytest.fixture(scope="module")
def tiny_hessian(tiny_resnet):
    """The explicit Hessian (Jacobian of the gradient, thesis 9.1) of 10 samples' loss sum."""
    model, w = tiny_resnet
    x, y = _images(10)
    hessian = LocalObjective(model, x, y, num_classes=3, jit=False).hessian_sum(w)
    assert np.abs(hessian).max() > 0
    return x, y, hessian


@pytest.mark.parametrize("mode", HVP_MODES)
def test_hvp_with_batch_norm_equals_explicit_hessian(tiny_resnet, tiny_hessian, mode):
    model, w = tiny_resnet
    x, y, hessian = tiny_hessian
    local = LocalObjective(model, x, y, num_classes=3, micro_batch=6, jit=False, hvp=mode)
    rng = np.random.default_rng(4)
    for _ in range(2):
        v = rng.standard_normal(w.size)
        ref = hessian @ v
        assert np.linalg.norm(local.hvp_sum(w, v) - ref) <= 1e-10 * np.linalg.norm(ref)


@pytest.mark.parametrize("mode", HVP_MODES)
def test_hvp_with_xla_equals_explicit_hessian(tiny_resnet, tiny_hessian, mode):
    model, w = tiny_resnet
    x, y, hessian = tiny_hessian
    local = LocalObjective(model, x, y, num_classes=3, micro_batch=6, jit=True, hvp=mode)
    v = np.random.default_rng(8).standard_normal(w.size)
    ref = hessian @ v
    assert np.linalg.norm(local.hvp_sum(w, v) - ref) <= 1e-10 * np.linalg.norm(ref)


def test_forward_over_reverse_with_xla_through_padding():
    # ResNet-50 pads inside the net (before its max pooling). Under XLA, TensorFlow
    # differentiates Pad into XlaDynamicUpdateSlice, and forward-over-reverse needs
    # that op's gradient, which TensorFlow lacks and mpinewton.local registers.
    d = "float64"
    model = keras.Sequential([
        keras.Input((6, 6, 1), dtype=d), keras.layers.Conv2D(2, 3, activation="tanh", dtype=d),
        keras.layers.ZeroPadding2D(1, dtype=d),
        keras.layers.Conv2D(2, 3, activation="tanh", dtype=d), keras.layers.Flatten(dtype=d),
        keras.layers.Dense(3, activation="softmax", dtype=d)])
    x, y = _images(7, shape=(6, 6, 1), seed=9)
    w = get_flat(model)
    hessian = LocalObjective(model, x, y, num_classes=3, jit=False).hessian_sum(w)
    local = LocalObjective(model, x, y, num_classes=3, jit=True, hvp="forward_over_reverse")
    v = np.random.default_rng(10).standard_normal(w.size)
    ref = hessian @ v
    assert np.linalg.norm(local.hvp_sum(w, v) - ref) <= 1e-10 * np.linalg.norm(ref)


def test_batch_norm_does_not_mix_samples(tiny_resnet):
    model, w = tiny_resnet
    x, y = _images(12, seed=5)
    local = LocalObjective(model, x, y, num_classes=3, micro_batch=12, jit=False)
    tw = tf.constant(w)
    batch_a = x[:6]
    batch_b = np.concatenate([x[:1], x[6:]])  # sample 0 among other companions
    out_a = local._outputs(tw, tf.constant(batch_a)).numpy()
    out_b = local._outputs(tw, tf.constant(batch_b)).numpy()
    np.testing.assert_allclose(out_a[0], out_b[0], rtol=1e-12, atol=0)
    singles = sum(LocalObjective(model, x[i:i + 1], y[i:i + 1], num_classes=3,
                                 jit=False).loss_sum(w) for i in range(len(x)))
    assert local.loss_sum(w) == pytest.approx(singles, rel=1e-12)
    # The check is sensitive: with batch statistics (training=True) sample 0 does change.
    a = model(batch_a.astype("float64") / 255, training=True).numpy()
    b = model(batch_b.astype("float64") / 255, training=True).numpy()
    assert np.abs(a[0] - b[0]).max() > 1e-6


def _identity_objective(dtype, preprocess, shape=(5, 6, 3)):
    """An objective whose model output is its flattened preprocessed input."""
    size = int(np.prod(shape))
    model = keras.Sequential([keras.Input(shape, dtype=dtype), keras.layers.Flatten(dtype=dtype),
                              keras.layers.Dense(size, use_bias=False, dtype=dtype)])
    x, y = _images(4, shape=shape, seed=6)
    local = LocalObjective(model, x, y % 2, num_classes=size, jit=False, preprocess=preprocess)
    return local, np.eye(size).reshape(-1), x


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_caffe_preprocessing_equals_keras_resnet50_preprocess_input(dtype):
    local, w, x = _identity_objective(dtype, "caffe")
    assert local.preprocess == "caffe"
    got = local._outputs(tf.constant(w, dtype), tf.constant(x)).numpy()
    ref = keras.applications.resnet50.preprocess_input(x.astype(dtype))
    np.testing.assert_allclose(got, ref.reshape(len(x), -1), rtol=1e-6 if dtype == "float32"
                               else 1e-14, atol=0)


def test_scale_preprocessing_is_the_default():
    local, w, x = _identity_objective("float64", "scale")
    got = local._outputs(tf.constant(w), tf.constant(x)).numpy()
    np.testing.assert_allclose(got, x.reshape(len(x), -1) / 255.0, rtol=1e-15)


def test_bad_preprocessing_is_an_error():
    x, y = _images(2, shape=(6, 6, 1))
    model = keras.Sequential([keras.Input((6, 6, 1), dtype="float64"),
                              keras.layers.Flatten(dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    with pytest.raises(ValueError, match="unknown preprocess 'torch'"):
        LocalObjective(model, x, y, num_classes=3, preprocess="torch")
    with pytest.raises(ValueError, match="needs RGB images"):  # refused before any product
        LocalObjective(model, x, y, num_classes=3, jit=False, preprocess="caffe")
