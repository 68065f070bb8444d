"""Losses, metrics and predictions for users' own models and data (mpinewton.local).

References are independent of the code under test: loss values and metrics by
numpy formulas on ``model(x)``; gradients and Hessian-vector products against
central finite differences and the explicit Hessian; Gauss-Newton products
against ``J^T H_L J`` formed explicitly (J by ``tf.GradientTape.jacobian``, H_L
in closed form: ``diag(p) - p p^T`` for softmax cross-entropy of logits,
``diag(s (1 - s)) / k`` for binary cross-entropy of k logits, ``2/k I`` for the
mean squared error; Schraudolph 2002, Martens & Sutskever 2012).

Speed: each loss case's model and objective is built once for the module
(:class:`_Objectives`) and its samples padded to whole micro-batches, so that
every compiled function is traced once, for one shape; the halves and single
rows below reuse those graphs through ``set_samples(pad_to=MB)``.
"""

import contextlib
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

from mpinewton.comm import Comm
from mpinewton.local import LocalObjective, ObjectiveError
from mpinewton.objective import DistributedObjective
from mpinewton.params import get_flat, set_flat

N, FEATURES = 13, 4  # 13 rows in micro-batches of 5: two full ones and a shorter one
MB = 5
RR, FR = "reverse_over_reverse", "forward_over_reverse"


def _net(width, activation=None, *, seed=0, dtype="float64", inputs=(FEATURES,), name=None):
    """A small tanh MLP on float features with ``width`` outputs."""
    init = keras.initializers.GlorotUniform
    return keras.Sequential([
        keras.Input(inputs, dtype=dtype), keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(5, activation="tanh", kernel_initializer=init(seed), dtype=dtype,
                           bias_initializer=keras.initializers.RandomNormal(0.1, 0.2, seed)),
        keras.layers.Dense(width, activation=activation, kernel_initializer=init(seed + 1),
                           bias_initializer=keras.initializers.RandomNormal(0.0, 0.3, seed + 2),
                           dtype=dtype),
    ], name=name)


def _x(n=N, seed=0):
    return np.random.default_rng(seed).standard_normal((n, FEATURES))


def _labels(n=N, classes=3, seed=1):
    return np.random.default_rng(seed).integers(0, classes, n)


def _targets(shape, seed=2, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape)


def _out(model, x):
    return model(tf.constant(x), training=False).numpy()


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b)


# -- cases: (model, x, y, keywords, numpy per-sample loss of (outputs, y)) -------------

def _case(name):
    x = _x()
    if name == "cce":
        return (_net(3, "softmax"), x, _labels(), {"loss": "categorical_crossentropy"},
                lambda o, y: -np.log(o[np.arange(len(y)), y]))
    if name == "sparse_cce":
        return (_net(3, "softmax"), x, _labels(), {"loss": "sparse_categorical_crossentropy"},
                lambda o, y: -np.log(o[np.arange(len(y)), y]))
    if name == "cce_logits":
        return (_net(3), x, _labels(), {"loss": "sparse_categorical_crossentropy",
                                        "from_logits": True},
                lambda z, y: -np.log(_softmax(z)[np.arange(len(y)), y]))
    if name == "bce":
        return (_net(1, "sigmoid"), x, _labels(classes=2), {"loss": "binary_crossentropy"},
                lambda p, y: -(y * np.log(p[:, 0]) + (1 - y) * np.log(1 - p[:, 0])))
    if name == "bce_soft":  # three independent outputs, float targets in [0, 1]
        t = _targets((N, 3), low=0.0, high=1.0)
        return (_net(3, "sigmoid"), x, t, {"loss": "binary_crossentropy"},
                lambda p, t: -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(axis=1))
    if name == "bce_logits":
        return (_net(1), x, _labels(classes=2), {"loss": "binary_crossentropy",
                                                 "from_logits": True},
                lambda z, y: np.logaddexp(0, z[:, 0]) - y * z[:, 0])
    if name == "bce_logits_multi":
        t = _targets((N, 3), low=0.0, high=1.0)
        return (_net(3), x, t, {"loss": "binary_crossentropy", "from_logits": True},
                lambda z, t: (np.logaddexp(0, z) - t * z).mean(axis=1))
    if name == "mse_one_hot":
        return (_net(3, "softmax"), x, _labels(), {"loss": "mean_squared_error"},
                lambda o, y: ((o - np.eye(3)[y]) ** 2).mean(axis=1))
    if name == "mse_scalar":  # targets (N,) against an output of width 1
        return (_net(1), x, _targets(N), {"loss": "mean_squared_error"},
                lambda o, t: (o[:, 0] - t) ** 2)
    if name == "mse":
        return (_net(3), x, _targets((N, 3)), {"loss": "mean_squared_error"},
                lambda o, t: ((o - t) ** 2).mean(axis=1))
    if name == "huber":
        def huber(o, t):
            e = np.abs(o - t)
            return np.where(e <= 1.0, 0.5 * e ** 2, e - 0.5).mean(axis=1)
        return (_net(2), x, 2 * _targets((N, 2)), {"loss": "keras:huber"}, huber)
    if name == "keras_sparse_logits":
        return (_net(3), x, _labels(), {"loss": "keras:sparse_categorical_crossentropy",
                                        "from_logits": True},
                lambda z, y: -np.log(_softmax(z)[np.arange(len(y)), y]))
    if name == "log_cosh":  # any Keras loss: Gauss-Newton products only (no formula here)
        return _net(2), x, _targets((N, 2)), {"loss": "keras:log_cosh"}, None
    raise KeyError(name)


ALL = ["cce", "sparse_cce", "cce_logits", "bce", "bce_soft", "bce_logits", "bce_logits_multi",
       "mse_one_hot", "mse_scalar", "mse", "huber", "keras_sparse_logits"]


class _Case(NamedTuple):
    local: LocalObjective
    model: keras.Model
    x: np.ndarray
    y: np.ndarray
    kw: dict
    formula: object
    w: np.ndarray


class _Objectives:
    """Each case's model and objective, built once for the module (tracing once).

    The samples are padded to whole micro-batches (``set_samples(pad_to=MB)``):
    13 rows are two full micro-batches and a shorter one filled with masked
    zero rows, so every compiled function is traced for one shape only, and
    the halves and single rows swapped in by :func:`_rows` reuse its graph.
    """

    def __init__(self):
        self._cases, self._hessians = {}, {}

    def __call__(self, name, hvp=RR):
        if (name, hvp) not in self._cases:
            if hvp == RR:
                model, x, y, kw, formula = _case(name)
            else:  # the same model and samples with another Hessian-vector mode
                model, x, y, kw, formula = self(name)[1:6]
            local = LocalObjective(model, x, y, micro_batch=MB, jit=False, hvp=hvp, **kw)
            local.set_samples(x, y, pad_to=MB)
            self._cases[name, hvp] = _Case(local, model, x, y, kw, formula, get_flat(model))
        return self._cases[name, hvp]

    def hessian(self, name):
        """The explicit Hessian of the loss sum (``hessian_sum``) over one micro-batch."""
        if name not in self._hessians:
            c = self(name)
            self._hessians[name] = LocalObjective(c.model, c.x, c.y, jit=False,
                                                  **c.kw).hessian_sum(c.w)
        return self._hessians[name]


@pytest.fixture(scope="module")
def objectives():
    return _Objectives()


@contextlib.contextmanager
def _rows(case, rows):
    """The case's objective over ``rows`` of its samples only, for the ``with`` block."""
    case.local.set_samples(case.x[rows], case.y[rows], pad_to=MB)
    try:
        yield case.local
    finally:
        case.local.set_samples(case.x, case.y, pad_to=MB)


@pytest.mark.parametrize("name", ALL)
def test_loss_value_equals_numpy_formula(objectives, name):
    c = objectives(name)
    ref = c.formula(_out(c.model, c.x), c.y)
    assert ref.shape == (N,)
    # as constructed: micro-batches of 5, 5 and 3 rows, no padding
    plain = LocalObjective(c.model, c.x, c.y, micro_batch=MB, jit=False, **c.kw)
    assert plain.loss_sum(c.w) == pytest.approx(ref.sum(), rel=1e-12)
    assert c.local.loss_sum(c.w) == pytest.approx(ref.sum(), rel=1e-12)  # padded
    loss, _ = c.local.loss_grad_sum(c.w)
    assert loss == pytest.approx(ref.sum(), rel=1e-12)


def _sums(local, w, v):
    return {"loss": local.loss_sum(w), "grad": local.loss_grad_sum(w)[1],
            "hvp": local.hvp_sum(w, v), "gnvp": local.gnvp_sum(w, v),
            "squares": local.grad_squares_sum(w), "metric": local.metric_sum(w)}


@pytest.mark.parametrize("name", ["cce", "cce_logits", "bce", "bce_logits_multi", "mse_scalar",
                                  "huber"])
def test_sums_over_two_halves_equal_the_whole(objectives, name):
    c = objectives(name)
    w = c.w
    v = np.random.default_rng(3).standard_normal(w.size)
    whole = _sums(c.local, w, v)
    halves = []
    for rows in (slice(0, 6), slice(6, None)):  # 5 + 1 and 5 + 2 rows, padded
        with _rows(c, rows) as half:
            halves.append(_sums(half, w, v))
    assert sum(h["loss"] for h in halves) == pytest.approx(whole["loss"], rel=1e-13)
    for key in ("grad", "hvp", "gnvp", "squares"):
        assert _rel(sum(h[key] for h in halves), whole[key]) < 1e-12, key
    assert sum(h["metric"] for h in halves) == pytest.approx(whole["metric"],
                                                             rel=1e-13, abs=1e-13)


# -- gradient and Hessian: finite differences and the explicit Hessian ---------------

@pytest.mark.parametrize(("name", "mode"), [
    *[(name, RR) for name in ("mse", "mse_scalar", "cce_logits", "bce_logits",
                              "bce_logits_multi", "bce")],
    ("cce_logits", FR), ("bce_logits_multi", FR)])
def test_gradient_and_hvp_match_finite_differences_and_explicit_hessian(objectives, name, mode):
    c = objectives(name)  # loss and gradient do not depend on the mode
    local = objectives(name, mode).local
    w = c.w
    rng = np.random.default_rng(5)
    v = rng.standard_normal(w.size)
    v /= np.linalg.norm(v)
    h = 1e-4
    _, g = c.local.loss_grad_sum(w)
    fd = (c.local.loss_sum(w + h * v) - c.local.loss_sum(w - h * v)) / (2 * h)
    assert g @ v == pytest.approx(fd, rel=1e-7, abs=1e-9)
    hv = local.hvp_sum(w, v)
    fd_hv = (c.local.loss_grad_sum(w + h * v)[1] - c.local.loss_grad_sum(w - h * v)[1]) / (2 * h)
    assert _rel(hv, fd_hv) < 1e-6
    assert _rel(hv, objectives.hessian(name) @ v) < 1e-10
    many = local.hvp_sum_many(w, np.stack([v, rng.standard_normal(w.size)], axis=1))
    assert _rel(many[:, 0], hv) < 1e-12


def test_logits_loss_curvature_is_exact_at_zero_logits(objectives):
    """sigmoid/softmax cross-entropy of logits: second derivative right at z = 0 too."""
    c = objectives("bce_logits")  # _net(1), labels 0/1, binary cross-entropy of logits
    w = c.w.copy()
    last = c.model.layers[-1]
    n_last = int(np.prod(last.kernel.shape)) + int(np.prod(last.bias.shape))
    w[-n_last:] = 0.0  # a zero-initialised output layer: every logit exactly 0
    assert np.all(c.local.outputs(w, c.x) == 0.0)
    v = np.random.default_rng(1).standard_normal(w.size)
    h = 1e-4
    local = c.local
    fd = (local.loss_grad_sum(w + h * v)[1] - local.loss_grad_sum(w - h * v)[1]) / (2 * h)
    assert _rel(local.hvp_sum(w, v), fd) < 1e-6


def test_jit_matches_eager_for_new_losses(objectives):
    for name in ("cce_logits", "bce_logits"):
        c = objectives(name)
        w = c.w
        v = np.random.default_rng(2).standard_normal(w.size)
        eager = c.local
        jitted = LocalObjective(c.model, c.x, c.y, micro_batch=MB, jit=True, **c.kw)
        jitted.set_samples(c.x, c.y, pad_to=MB)  # one shape: one XLA compilation a function
        assert jitted.loss_sum(w) == pytest.approx(eager.loss_sum(w), rel=1e-12)
        assert _rel(jitted.hvp_sum(w, v), eager.hvp_sum(w, v)) < 1e-11
        assert _rel(jitted.gnvp_sum(w, v), eager.gnvp_sum(w, v)) < 1e-11
        assert jitted.metric_sum(w) == pytest.approx(eager.metric_sum(w), rel=1e-12)


# -- Gauss-Newton products: J^T H_L J formed explicitly --------------------------------

def _jacobian(model, x, *, pre_activation):
    """Per-sample Jacobians (b, k, n) of the outputs (or the last layer's pre-activation)."""
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(variables)
        if pre_activation:
            h = tf.constant(x)
            for layer in model.layers[:-1]:
                h = layer(h)
            last = model.layers[-1]
            z = tf.matmul(h, last.kernel.value) + last.bias.value
        else:
            z = model(tf.constant(x), training=False)
    parts = tape.jacobian(z, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    b, k = z.shape
    return np.concatenate([p.numpy().reshape(b, k, -1) for p in parts], axis=2), z.numpy()


def _loss_hessians(kind, z, y):
    b, k = z.shape
    if kind == "softmax":
        return np.stack([np.diag(p) - np.outer(p, p) for p in _softmax(z)])
    if kind == "sigmoid":
        s = _sigmoid(z)
        return np.stack([np.diag(si * (1 - si)) / k for si in s])
    if kind == "mse":
        return np.broadcast_to(2.0 / k * np.eye(k), (b, k, k))
    if kind == "log_cosh":  # d2/dz2 mean(log cosh(z - t)) = (1 - tanh^2(z - t)) / k
        return np.stack([np.diag(1 - np.tanh(zi - ti) ** 2) / k
                         for zi, ti in zip(z, y, strict=True)])
    raise KeyError(kind)


@pytest.mark.parametrize(("name", "kind", "split", "pre_activation"), [
    ("cce_logits", "softmax", "logits", False),
    ("bce_logits", "sigmoid", "logits", False),
    ("bce_logits_multi", "sigmoid", "logits", False),
    ("bce", "sigmoid", "logits", True),  # sigmoid head: split at its pre-activation
    ("bce_soft", "sigmoid", "logits", True),
    ("mse", "mse", "output", False),
    ("mse_scalar", "mse", "output", False),
    ("log_cosh", "log_cosh", "output", False),  # any Keras loss: its own Hessian in z
])
def test_gnvp_equals_explicit_ggn(objectives, name, kind, split, pre_activation):
    c = objectives(name)
    local, w = c.local, c.w
    assert local.gauss_newton_split == split
    jac, z = _jacobian(c.model, c.x, pre_activation=pre_activation)
    t = np.asarray(c.y, dtype=np.float64).reshape(len(c.y), -1)
    hess = _loss_hessians(kind, z, t)
    v = np.random.default_rng(7).standard_normal((w.size, 3))
    ref = np.einsum("bkn,bkl,blj->nj", jac, hess, np.einsum("bkn,nj->bkj", jac, v))
    # one call for the three directions and the whole matrix G (the identity's columns)
    many = local.gnvp_sum_many(w, np.concatenate([v, np.eye(w.size)], axis=1))
    for j in range(3):
        assert _rel(local.gnvp_sum(w, v[:, j]), ref[:, j]) < 1e-10
        assert _rel(many[:, j], ref[:, j]) < 1e-10
    g = many[:, 3:]
    eig = np.linalg.eigvalsh((g + g.T) / 2)
    assert eig.min() >= -1e-10 * eig.max()  # every one of these losses is convex in z
    assert local.split_loss_sum(w) == pytest.approx(local.loss_sum(w), rel=1e-10)


@pytest.mark.parametrize("name", ["cce_logits", "bce_logits", "mse", "huber"])
def test_grad_squares_equals_per_sample_loop(objectives, name):
    c = objectives(name)
    squares = c.local.grad_squares_sum(c.w)
    ref = 0.0
    for i in range(N):  # each row alone (padded with four masked rows)
        with _rows(c, slice(i, i + 1)) as single:
            ref = ref + single.loss_grad_sum(c.w)[1] ** 2
    assert _rel(squares, ref) < 1e-12


# -- metrics ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "metric"), [
    ("cce", "accuracy"), ("cce_logits", "accuracy"), ("mse_one_hot", "accuracy"),
    ("bce", "accuracy"), ("bce_logits", "accuracy"), ("bce_soft", "accuracy"),
    ("bce_logits_multi", "accuracy"), ("mse", "mae"), ("mse_scalar", "mae"), ("huber", "mae"),
    ("keras_sparse_logits", "accuracy")])
def test_metric_sum_equals_numpy(objectives, name, metric):
    local, model, x, y, kw, _, w = objectives(name)
    out = _out(model, x).reshape(N, -1)
    assert local.metric_name == metric
    if metric == "mae":
        ref = np.abs(out - np.reshape(y, (N, -1))).mean(axis=1).sum()
    elif out.shape[1] > 1 and kw["loss"] != "binary_crossentropy":
        ref = float((out.argmax(axis=1) == y).sum())
        assert local.correct_count(w) == ref
    else:
        threshold = 0.0 if kw.get("from_logits") else 0.5
        hits = (out > threshold) == (np.reshape(y, (N, -1)) > 0.5)
        ref = hits.mean(axis=1).sum()
        assert local.correct_count(w) == hits.all(axis=1).sum()
    assert local.metric_sum(w) == pytest.approx(ref, rel=1e-12)
    loss, metric_sum = local.loss_metric_sum(w)  # both from one forward pass
    assert loss == pytest.approx(local.loss_sum(w), rel=1e-12)
    assert metric_sum == pytest.approx(ref, rel=1e-12)


def test_evaluate_takes_loss_and_metric_from_one_forward_pass(objectives, monkeypatch):
    """``evaluate`` (the summary's, the validation's) runs the fused graph: the separate
    loss and metric passes are not called."""
    local, w = objectives("cce").local, objectives("cce").w
    want = (local.loss_sum(w), local.metric_sum(w))
    objective = DistributedObjective(local, Comm(None), total_samples=2 * N)

    def refuse(_w):
        raise AssertionError("a separate pass")
    monkeypatch.setattr(local, "loss_sum", refuse)
    monkeypatch.setattr(local, "metric_sum", refuse)
    result = objective.evaluate(w)
    assert result["loss"] == pytest.approx(want[0] / (2 * N), rel=1e-12)
    assert result["accuracy"] == pytest.approx(want[1] / (2 * N), rel=1e-12)


def test_distributed_metric_and_evaluate_use_one_allreduce(objectives):
    for name, metric in (("mse", "mae"), ("cce_logits", "accuracy")):
        local, w = objectives(name).local, objectives(name).w
        comm = Comm(None)
        objective = DistributedObjective(local, comm, total_samples=2 * N)
        calls = comm.stats.allreduce_calls
        result = objective.evaluate(w)
        assert comm.stats.allreduce_calls == calls + 1
        assert objective.metric_name == metric and set(result) == {"loss", metric}
        assert result["loss"] == pytest.approx(local.loss_sum(w) / (2 * N), rel=1e-13)
        assert result[metric] == pytest.approx(local.metric_sum(w) / (2 * N), rel=1e-13)
        assert objective.metric(w) == pytest.approx(result[metric], rel=1e-13)
        assert comm.stats.allreduce_calls == calls + 2
        if metric == "accuracy":
            assert objective.accuracy(w) == pytest.approx(local.correct_count(w) / (2 * N))
        else:
            with pytest.raises(ObjectiveError, match="metric is 'mae'"):
                objective.accuracy(w)
            with pytest.raises(ObjectiveError, match="correct_count"):
                local.correct_count(w)


# -- inputs and outputs ----------------------------------------------------------------

def test_outputs_equal_model_on_float_and_uint8_rows():
    model = _net(3, "softmax")
    x = _x(11)
    local = LocalObjective(model, x, _labels(11), micro_batch=4, jit=False)
    w = get_flat(model)
    np.testing.assert_allclose(local.outputs(w, x), _out(model, x), rtol=1e-13, atol=1e-15)
    assert local.outputs(w, x[:0]).shape == (0, 3)
    w2 = w + 0.1  # the weights given, not the model's own
    set_flat(model, w2)
    np.testing.assert_allclose(local.outputs(w2, x[:3]), _out(model, x[:3]), rtol=1e-13)
    images = np.random.default_rng(0).integers(0, 256, (6, 2, 2), dtype=np.uint8)
    conv = _net(2, inputs=(2, 2))
    img = LocalObjective(conv, images, _targets((6, 2)), loss="mean_squared_error",
                         micro_batch=4, jit=False, pixel_scale=255.0)
    np.testing.assert_allclose(img.outputs(get_flat(conv), images),
                               _out(conv, images / 255.0), rtol=1e-13, atol=1e-15)
    with pytest.raises(ObjectiveError, match=r"shape \(3,\)"):
        local.outputs(w, np.zeros((2, 3)))


def test_float32_features_for_float64_model_and_float32_model():
    x32 = _x().astype(np.float32)
    t = _targets((N, 3))
    m64 = _net(3)
    m32 = _net(3, dtype="float32")
    w = get_flat(m64)
    l64 = LocalObjective(m64, x32, t, loss="mean_squared_error", micro_batch=5, jit=False)
    l32 = LocalObjective(m32, _x(), t.astype(np.float32), loss="mean_squared_error",
                         micro_batch=5, jit=False)
    assert l64.loss_sum(w) == pytest.approx(((_out(m64, x32.astype(np.float64)) - t) ** 2)
                                            .mean(axis=1).sum(), rel=1e-12)
    assert l32.loss_sum(w.astype(np.float32)) == pytest.approx(l64.loss_sum(w), rel=1e-5)


def test_subclassed_model_and_higher_rank_targets():
    class Twice(keras.Model):
        def __init__(self):
            super().__init__(name="twice", dtype="float64")
            self.dense = keras.layers.Dense(6, dtype="float64")

        def call(self, x, training=False):
            return keras.ops.reshape(self.dense(x), (-1, 2, 3))

    model = Twice()
    model(np.zeros((1, FEATURES)))
    t = _targets((N, 2, 3))
    local = LocalObjective(model, _x(), t, loss="mean_squared_error", micro_batch=5, jit=False)
    w = get_flat(model)
    out = _out(model, _x())
    assert local.loss_sum(w) == pytest.approx(((out - t) ** 2).reshape(N, -1).mean(1).sum(),
                                              rel=1e-12)
    assert local.metric_sum(w) == pytest.approx(np.abs(out - t).reshape(N, -1).mean(1).sum(),
                                                rel=1e-12)


# -- errors: clear, at construction ---------------------------------------------------

def _error(model, x, y, match, **kw):
    with pytest.raises(ObjectiveError, match=match):
        LocalObjective(model, x, y, jit=False, **kw)


def test_label_errors():
    x = _x()
    big = _labels(classes=5)
    _error(_net(3, "softmax"), x, big, r"class indices in \[0, 3\).*from 0 to 4")
    _error(_net(3, "softmax"), x, big, r"\[0, 3\)", loss="mean_squared_error")
    _error(_net(3), x, big, r"\[0, 3\)", loss="keras:sparse_categorical_crossentropy",
           from_logits=True)
    _error(_net(1, "sigmoid"), x, _labels(classes=3), "labels 0 or 1.*from 0 to 2",
           loss="binary_crossentropy")
    _error(_net(3, "sigmoid"), x, _labels(classes=2), "one target an output.*"
           "sparse_categorical_crossentropy", loss="binary_crossentropy")
    _error(_net(1, "sigmoid"), x, _targets(N, low=0, high=2), r"targets in \[0, 1\]",
           loss="binary_crossentropy")
    local = LocalObjective(_net(3, "softmax"), x, _labels(), jit=False)
    with pytest.raises(ObjectiveError, match=r"\[0, 3\)"):  # a later mini-batch too
        local.set_samples(x, big)


def test_task_and_shape_errors():
    x = _x()
    _error(_net(3, "softmax"), x, _targets((N, 3)), "integer class labels.*float targets")
    _error(_net(3, "softmax"), x, _targets(N), "integer class labels",
           loss="sparse_categorical_crossentropy")
    _error(_net(3), x, _targets((N, 2)), "do not match.*outputs", loss="mean_squared_error")
    _error(_net(1), x, _targets((N, 3)), "do not match", loss="mean_squared_error")
    _error(_net(1, "sigmoid"), x, _labels(classes=1), "binary_crossentropy for two classes")
    _error(_net(1), x, _labels(classes=1), r"float targets \(y.astype",
           loss="mean_squared_error")
    _error(_net(3, "softmax"), x, _labels(), "num_classes=10, but the model outputs 3",
           num_classes=10)
    _error(_net(3, "softmax"), x, np.array(["a"] * N), "integer class labels or float")
    bad = _targets(N)
    bad[3] = np.nan
    _error(_net(1), x, bad, "NaN or Inf", loss="mean_squared_error")
    inputs = keras.Input((FEATURES,), dtype="float64")
    two = keras.Model(inputs, [keras.layers.Dense(2, dtype="float64")(inputs),
                               keras.layers.Dense(3, dtype="float64")(inputs)])
    _error(two, x, _labels(), "has 2 outputs")


def test_logits_errors():
    x = _x()
    _error(_net(3, "softmax"), x, _labels(), "from_logits is set.*applies softmax",
           from_logits=True)
    _error(_net(1, "sigmoid"), x, _labels(classes=2), "applies sigmoid",
           loss="binary_crossentropy", from_logits=True)
    _error(_net(1), x, _targets(N), "from_logits applies to cross-entropy",
           loss="mean_squared_error", from_logits=True)


def test_keras_loss_errors():
    x = _x()
    _error(_net(2), x, _targets((N, 2)), "Keras knows no loss 'no_such_loss'",
           loss="keras:no_such_loss")
    _error(_net(2), x, _targets((N, 2)), "takes no from_logits", loss="keras:huber",
           from_logits=True)
    model = keras.Sequential([keras.Input((FEATURES,), dtype="float64"),
                              keras.layers.Dense(6, dtype="float64"),
                              keras.layers.Reshape((2, 3), dtype="float64")])
    _error(model, x, _targets((N, 2, 3)), r"gives shape \(2, 2\) for 2 samples",
           loss="keras:mean_squared_error")
    _error(_net(2), x, _targets((N, 2)), "unknown loss 'hinge'", loss="hinge")


def test_keras_loss_object_by_class_name(objectives):
    _, model, x, y, _, formula, _ = objectives("huber")
    local = LocalObjective(model, x, y, loss="keras:Huber", micro_batch=5, jit=False)
    assert local.loss_sum(get_flat(model)) == pytest.approx(formula(_out(model, x), y).sum(),
                                                            rel=1e-12)
