"""Generalised Gauss-Newton products and the empirical Fisher diagonal (local.py, objective.py).

References are independent of the code under test: per-sample Jacobians of the
logits (computed layer by layer from the model's variables, the last layer's
pre-activation by hand) or outputs by ``tape.jacobian``, explicit loss Hessians
(``diag(p) - p p^T`` for softmax cross-entropy on logits, ``2/K I`` for mean
squared error; Schraudolph 2002, Martens & Sutskever 2012), and a per-sample
loop of eager gradients.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mpinewton.comm import Comm
from mpinewton.local import LocalObjective
from mpinewton.models import mlp, thesis_cnn
from mpinewton.objective import DistributedObjective
from mpinewton.params import get_flat

CE, MSE = "categorical_crossentropy", "mean_squared_error"


def _data(n, shape=(6, 6, 1), seed=0, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n)


def _small_mlp():
    return mlp(dtype="float64", seed=5, input_shape=(6, 6, 1), hidden=(7, 5))


def _jacobian_and_z(model, x, logits):
    """Per-sample Jacobians (b, K, n) of the logits (or outputs) and z (b, K)."""
    variables = [v.value for v in model.trainable_variables]
    inputs = tf.constant(x.astype(np.float64) / 255.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(variables)
        if logits:
            h = inputs
            for layer in model.layers[:-1]:
                h = layer(h)
            last = model.layers[-1]
            z = tf.matmul(h, last.kernel.value)
            if last.bias is not None:
                z = z + last.bias.value
        else:
            z = model(inputs, training=False)
    parts = tape.jacobian(z, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    b, k = z.shape
    jac = np.concatenate([p.numpy().reshape(b, k, -1) for p in parts], axis=2)
    return jac, z.numpy()


def _loss_hessians(z, y, loss, model, x):
    """Explicit (b, K, K) Hessians of the per-sample loss w.r.t. z."""
    b, k = z.shape
    if loss == MSE:
        return np.broadcast_to(2.0 / k * np.eye(k), (b, k, k))
    if model is not None:  # CE on a non-softmax output: per-sample Hessian by nested tapes
        zt = tf.constant(z)
        with tf.GradientTape() as outer:
            outer.watch(zt)
            with tf.GradientTape() as inner:
                inner.watch(zt)
                losses = keras.losses.categorical_crossentropy(tf.one_hot(y, k, dtype=zt.dtype),
                                                               zt)
            g = inner.gradient(losses, zt)
        return outer.batch_jacobian(g, zt).numpy()
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])


def _reference_ggn_products(model, x, y, loss, v, *, split):
    """Columns of G V with G = sum_i J_i^T H_i J_i, never forming G."""
    jac, z = _jacobian_and_z(model, x, split == "logits")
    hess = _loss_hessians(z, y, loss, model if split == "output" and loss == CE else None, x)
    jv = np.einsum("bkn,nj->bkj", jac, v)
    return np.einsum("bkn,bkl,blj->nj", jac, hess, jv)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def mlp_ce():
    model = _small_mlp()
    x, y = _data(40, seed=1)
    return LocalObjective(model, x, y, micro_batch=16, jit=False), get_flat(model), x, y


def _sigmoid_net():
    return keras.Sequential([
        keras.Input((6, 6, 1), dtype="float64"), keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(5, activation="tanh", dtype="float64"),
        keras.layers.Dense(4, activation="sigmoid", dtype="float64")])


@pytest.mark.parametrize(("net", "loss", "split"), [
    ("mlp", CE, "logits"), ("mlp", MSE, "output"), ("cnn", CE, "logits"),
    ("sigmoid", CE, "output")])
def test_gnvp_equals_explicit_ggn(net, loss, split):
    if net == "cnn":
        model, (x, y), mb = thesis_cnn(dtype="float64", seed=3), _data(5, (28, 28, 1), 2), 3
    elif net == "mlp":
        model, (x, y), mb = _small_mlp(), _data(20, seed=3), 8
    else:
        model, (x, y), mb = _sigmoid_net(), _data(12, seed=4, classes=4), 5
    classes = model.layers[-1].units
    local = LocalObjective(model, x, y, loss=loss, num_classes=classes, micro_batch=mb,
                           jit=False)
    assert local.gauss_newton_split == split
    w = get_flat(model)
    v = np.random.default_rng(7).standard_normal((w.size, 3))
    ref = _reference_ggn_products(model, x, y, loss, v, split=split)
    many = local.gnvp_sum_many(w, v)
    assert many.shape == v.shape
    for j in range(v.shape[1]):
        assert _rel(local.gnvp_sum(w, v[:, j]), ref[:, j]) <= 1e-10
        assert _rel(many[:, j], ref[:, j]) <= 1e-10
    assert model.layers[-1].activation is (keras.activations.softmax if net != "sigmoid"
                                           else keras.activations.sigmoid)


@pytest.mark.parametrize("loss", [CE, MSE])
def test_ggn_is_symmetric_positive_semidefinite(mlp_ce, loss):
    _, w, x, y = mlp_ce
    local = LocalObjective(_small_mlp(), x, y, loss=loss, micro_batch=16, jit=False)
    rng = np.random.default_rng(2)
    u, v = rng.standard_normal((2, w.size))
    ugv, vgu = u @ local.gnvp_sum(w, v), v @ local.gnvp_sum(w, u)
    assert abs(ugv - vgu) <= 1e-12 * abs(ugv)
    g = local.gnvp_sum_many(w, np.eye(w.size))
    assert np.allclose(g, g.T, rtol=0, atol=1e-12 * np.abs(g).max())
    eig = np.linalg.eigvalsh((g + g.T) / 2)
    assert eig.min() >= -1e-10 * eig.max()


def test_ggn_equals_hessian_for_model_linear_in_weights():
    model = keras.Sequential([keras.Input((6, 6, 1), dtype="float64"),
                              keras.layers.Flatten(dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    x, y = _data(15, seed=6, classes=3)
    local = LocalObjective(model, x, y, loss=MSE, num_classes=3, micro_batch=6, jit=False)
    assert local.gauss_newton_split == "output"
    w = get_flat(model) + 0.1
    rng = np.random.default_rng(3)
    for _ in range(2):
        v = rng.standard_normal(w.size)
        assert _rel(local.gnvp_sum(w, v), local.hvp_sum(w, v)) <= 1e-12


def test_loss_through_logits_equals_model_loss(mlp_ce):
    local, w, _, _ = mlp_ce
    assert local.gauss_newton_split == "logits"
    assert local.split_loss_sum(w) == pytest.approx(local.loss_sum(w), rel=1e-12)


def test_grad_squares_equals_per_sample_loop(mlp_ce):
    local, w, x, y = mlp_ce
    model = local.model
    ref = np.zeros(w.size)
    for i in range(len(x)):
        variables = [v.value for v in model.trainable_variables]
        with tf.GradientTape() as tape:
            out = model(tf.constant(x[i:i + 1].astype(np.float64) / 255.0), training=False)
            loss = keras.losses.categorical_crossentropy(tf.one_hot(y[i:i + 1], 10,
                                                                    dtype=tf.float64), out)
        g = np.concatenate([t.numpy().reshape(-1) for t in tape.gradient(loss, variables)])
        ref += g * g
    assert _rel(local.grad_squares_sum(w), ref) <= 1e-12


def test_micro_batch_and_padding_do_not_change_results(mlp_ce):
    local, w, x, y = mlp_ce
    v = np.random.default_rng(8).standard_normal((w.size, 2))
    ref = (local.gnvp_sum(w, v[:, 0]), local.gnvp_sum_many(w, v), local.grad_squares_sum(w))
    other = LocalObjective(local.model, x, y, micro_batch=7, jit=False)
    padded = LocalObjective(local.model, x[:1], y[:1], micro_batch=9, jit=False)
    padded.set_samples(x, y, pad_to=64)  # micro-batches of 9, the last one padded
    for obj in (other, padded):
        got = (obj.gnvp_sum(w, v[:, 0]), obj.gnvp_sum_many(w, v), obj.grad_squares_sum(w))
        for a, b in zip(got, ref, strict=True):
            assert _rel(a, b) <= 1e-12


def test_grad_squares_in_blocks_of_a_long_micro_batch(mlp_ce, monkeypatch):
    """Micro-batches longer than GRAD_SQUARES_BLOCK are taken in blocks: the same sums.

    Blocks of 3 rows in micro-batches of 9, the last one 4 samples padded to 9
    (its block of padding only is skipped, its block of 1 sample and 2 padding
    rows is masked), against one call per micro-batch of 16.
    """
    import mpinewton.local as local_module

    local, w, x, y = mlp_ce
    ref = local.grad_squares_sum(w)
    padded = LocalObjective(local.model, x[:1], y[:1], micro_batch=9, jit=False)
    padded.set_samples(x, y, pad_to=64)  # micro-batches of 9, the last one padded
    calls = []
    original = padded._grad_squares_fn
    monkeypatch.setattr(padded, "_grad_squares_fn",
                        lambda *a: calls.append(int(a[1].shape[0])) or original(*a))
    monkeypatch.setattr(local_module, "GRAD_SQUARES_BLOCK", 3)
    assert _rel(padded.grad_squares_sum(w), ref) <= 1e-12
    assert len(x) == 40 and calls == [3, 3, 3] * 4 + [3, 3]


def test_jit_matches_eager(mlp_ce):
    local, w, x, y = mlp_ce
    jitted = LocalObjective(local.model, x, y, micro_batch=16, jit=True)
    v = np.random.default_rng(9).standard_normal((w.size, 3))
    assert _rel(jitted.gnvp_sum(w, v[:, 0]), local.gnvp_sum(w, v[:, 0])) <= 1e-12
    assert _rel(jitted.gnvp_sum_many(w, v), local.gnvp_sum_many(w, v)) <= 1e-12
    assert _rel(jitted.grad_squares_sum(w), local.grad_squares_sum(w)) <= 1e-12


def test_cnn_jit_batched_products_and_grad_squares():
    model = thesis_cnn(dtype="float64", seed=4)
    x, y = _data(6, (28, 28, 1), seed=5)
    eager = LocalObjective(model, x, y, micro_batch=6, jit=False)
    jitted = LocalObjective(model, x, y, micro_batch=6, jit=True)
    w = get_flat(model)
    v = np.random.default_rng(1).standard_normal((w.size, 2))
    many = jitted.gnvp_sum_many(w, v)
    for j in range(2):
        assert _rel(many[:, j], eager.gnvp_sum(w, v[:, j])) <= 1e-10
    assert _rel(jitted.grad_squares_sum(w), eager.grad_squares_sum(w)) <= 1e-10


def test_softmax_head_detection():
    def net(*last):
        return keras.Sequential([keras.Input((6, 6, 1), dtype="float64"),
                                 keras.layers.Flatten(dtype="float64"), *last])

    x, y = _data(4, seed=2, classes=3)
    activation = net(keras.layers.Dense(3, dtype="float64"),
                     keras.layers.Activation("softmax", dtype="float64"))
    inputs = keras.Input((6, 6, 1), dtype="float64")
    functional = keras.Model(inputs, net(keras.layers.Dense(3, activation="softmax",
                                                            dtype="float64"))(inputs))
    layer_softmax = net(keras.layers.Dense(3, dtype="float64"),
                        keras.layers.Softmax(dtype="float64"))
    cases = [(activation, CE, "logits"), (functional, CE, "logits"),
             (layer_softmax, CE, "output"), (activation, MSE, "output")]
    for model, loss, split in cases:
        local = LocalObjective(model, x, y, loss=loss, num_classes=3, jit=False)
        assert local.gauss_newton_split == split
        w = get_flat(model)
        assert local.split_loss_sum(w) == pytest.approx(local.loss_sum(w), rel=1e-12)


class _IgnoresActivation(keras.layers.Dense):
    """A layer that names softmax as its activation but applies its own softmax."""

    def call(self, inputs):
        return keras.ops.softmax(keras.ops.matmul(inputs, self.kernel) + 1.0)


def test_split_falls_back_to_output_where_logits_do_not_match():
    model = keras.Sequential([keras.Input((6, 6, 1), dtype="float64"),
                              keras.layers.Flatten(dtype="float64"),
                              _IgnoresActivation(3, activation="softmax", dtype="float64")])
    x, y = _data(4, seed=2, classes=3)
    local = LocalObjective(model, x, y, num_classes=3, jit=False)
    assert local.gauss_newton_split == "output"


def test_distributed_objective_divides_by_count(mlp_ce):
    local, w, _, _ = mlp_ce
    comm = Comm(None)
    objective = DistributedObjective(local, comm, total_samples=80)
    v = np.random.default_rng(10).standard_normal((w.size, 3))
    calls = comm.stats.allreduce_calls
    assert np.allclose(objective.gnvp(w, v[:, 0]), local.gnvp_sum(w, v[:, 0]) / 80,
                       rtol=1e-13, atol=0)
    assert np.allclose(objective.gnvp_many(w, v), local.gnvp_sum_many(w, v) / 80,
                       rtol=1e-13, atol=0)
    assert np.allclose(objective.grad_squares(w), local.grad_squares_sum(w) / 80,
                       rtol=1e-13, atol=0)
    assert comm.stats.allreduce_calls == calls + 3
    assert (objective.stats.gnvps, objective.stats.grad_squares) == (4, 1)
    with pytest.raises(ValueError, match="gnvp_many"):
        objective.gnvp_many(w, v[:-1])
