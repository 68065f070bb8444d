"""Per-rank sums over a shard: loss, gradient, exact Hessian-vector product.

Everything here is a *sum* over the rank's samples (design invariant 1, batch
additivity, thesis Definition 9.1): the distributed objective adds the sums of
all ranks and divides by the global sample count. This module knows no MPI.

The model is evaluated as a pure function of the flat weight vector through
``model.stateless_call(..., training=False)``, so batch-norm layers use their
moving statistics and dropout is off inside the objective.

Hessian-vector products are exact (thesis 4.1, 9.1; Pearlmutter):
``H v = grad_w (grad_w c(w) . v)`` by double backpropagation, or
forward-over-reverse with ``tf.autodiff.ForwardAccumulator``. Each product is
one compiled call per micro-batch (``tf.function``, optionally XLA), so
per-rank memory is bounded by ``micro_batch`` whatever the shard size.
``hvp_sum_many`` computes k products in one compiled call per micro-batch
(vectorised over the k directions; memory grows with ``k * micro_batch``).

Generalised Gauss-Newton products ``G v = sum_i J_i^T H_L,i J_i v`` (Schraudolph
2002, "Fast curvature matrix-vector products"; Martens 2010, "Deep learning via
Hessian-free optimization", sec. 4.2; Martens & Sutskever 2012) are exact too:
``J v`` by forward mode, ``H_L`` of the per-sample loss in the split variable
``z``, ``J^T`` by one reverse pass; ``J`` is never formed. For cross-entropy on
a softmax output, ``z`` is the logits and the loss the matching softmax
cross-entropy, so ``H_L = diag(p) - p p^T`` and ``G`` is positive semi-definite
(see :meth:`LocalObjective.gnvp_sum`). ``grad_squares_sum`` gives the sum of the
squared per-sample gradients (the empirical Fisher diagonal times the count).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from mpinewton.config import HVP_MODES, LOSSES, PREPROCESSES
from mpinewton.params import ParamLayout, get_flat

__all__ = ["GAUSS_NEWTON_SPLITS", "HVP_MODES", "LOSSES", "PREPROCESSES", "LocalObjective"]

#: Where a Gauss-Newton product splits the net from the loss (``gauss_newton_split``).
GAUSS_NEWTON_SPLITS = ("logits", "output")


class _ExpectedRetracing(logging.Filter):
    """Drop TensorFlow's "triggered tf.function retracing" warning, and only that.

    Every objective (training set, each evaluation split) traces its compiled
    functions once per micro-batch shape (the full ones and the last, shorter
    one): a handful of traces by design, which TensorFlow's heuristic reports
    as "excessive" at the end of every run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


tf.get_logger().addFilter(_ExpectedRetracing())

#: ImageNet channel means in BGR order, as keras.applications.resnet50.preprocess_input.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def _xla_dynamic_update_slice_grad(op: tf.Operation, grad: tf.Tensor) -> list[tf.Tensor | None]:
    """Gradient of XlaDynamicUpdateSlice, which TensorFlow does not register.

    Under XLA, TensorFlow differentiates Slice (which is the gradient of Pad)
    into this op; forward-over-reverse takes every JVP as the gradient of a
    gradient, so without this rule it fails with ``jit`` on any model that pads
    inside the net, ResNet-50 among them (before its max pooling).
    """
    update, indices = op.inputs[1], op.inputs[2]
    return [xla.dynamic_update_slice(grad, tf.zeros_like(update), indices),
            xla.dynamic_slice(grad, indices, tf.shape(update, out_type=indices.dtype)), None]


with suppress(KeyError):  # a later TensorFlow may register its own
    tf.RegisterGradient("XlaDynamicUpdateSlice")(_xla_dynamic_update_slice_grad)


# -- convolutions in batched products -------------------------------------------------
#
# ``hvp_sum_many`` vectorises one product over k directions with TensorFlow's
# ``pfor`` (``tape.jacobian``, ``tf.vectorized_map``). pfor has no vectorised
# rule for the two convolutions that a batched product of a conv net needs
# most: ``Conv2D`` of an input that is the same for every direction (the
# data, for a first layer) with a filter that is not (the filter's tangent or
# cotangent), which it runs as a ``while_loop`` of k convolutions, and
# ``Conv2DBackpropFilter`` of such an input with k output gradients, which it
# runs as one convolution with k times the channels (and with k inputs, a
# deeper layer's, as a ``while_loop``). Both are products of the input's
# patches (im2col) with a (k x filter) matrix: one matrix product, with the
# patches extracted once for all k directions. Measured on the thesis CNN
# (float64, XLA, b = 1000 in micro-batches of 500, k = 32 and 64), a batched
# product takes 48 ms a column with pfor's rules and 6 ms with these (one
# ``hvp_sum``: 10.5 ms). They are installed only while ``hvp_sum_many``
# builds its graph (:func:`_batched_conv_rules`), so every other use of pfor in
# the process, ``hessian_sum``'s ``tape.jacobian`` among them, is untouched;
# every case they do not cover (NCHW, explicit padding, groups, a dilated
# convolution's input) goes to pfor's own rule. They compute the same sums in
# another order, so results agree with ``hvp_sum`` to rounding.

_PFOR_RULES_LOCK = threading.Lock()


def _attr_str(pfor_input: Any, name: str) -> str:
    value = pfor_input.get_attr(name)
    return value.decode() if isinstance(value, bytes) else value


def _image_shape(pfor_input: Any, x: tf.Tensor) -> list[int | None]:
    """Height, width and channels of the NHWC input ``x``, which pfor may lose in a reshape."""
    shape = x.shape[-3:]
    with suppress(ValueError):
        shape = shape.merge_with(pfor_input.op.inputs[0].shape[-3:])
    return shape.as_list()


def _patches(pfor_input: Any, x: tf.Tensor, kh: int,
             kw: int) -> tuple[tf.Tensor, int, int] | None:
    """Patches of the NHWC input ``x`` as an (M, kh*kw*cin) matrix, M = b*oh*ow (im2col).

    Built from ``kh * kw`` strided slices of the padded input (ordered like a
    filter's (kh, kw, cin) axes), which XLA fuses; None where the convolution's
    attributes are ones this rule does not handle, or ``x``'s height and width
    are not known when the graph is built (a dilated convolution's input).
    """
    strides = list(pfor_input.get_attr("strides"))
    dilations = list(pfor_input.get_attr("dilations"))
    padding = _attr_str(pfor_input, "padding")
    if (_attr_str(pfor_input, "data_format") != "NHWC" or padding not in ("SAME", "VALID")
            or strides[0] != 1 or strides[3] != 1 or dilations[0] != 1 or dilations[3] != 1):
        return None
    h, w, cin = _image_shape(pfor_input, x)
    if h is None or w is None or cin is None:
        return None
    (sh, sw), (dh, dw) = strides[1:3], dilations[1:3]
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "SAME":
        oh, ow = -(-h // sh), -(-w // sw)
        ph, pw = max((oh - 1) * sh + eh - h, 0), max((ow - 1) * sw + ew - w, 0)
        x = tf.pad(x, [[0, 0], [ph // 2, ph - ph // 2], [pw // 2, pw - pw // 2], [0, 0]])
    else:
        oh, ow = (h - eh) // sh + 1, (w - ew) // sw + 1
    if oh < 1 or ow < 1:
        return None
    cols = [x[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    return tf.reshape(tf.stack(cols, axis=3), [-1, kh * kw * cin]), oh, ow


def _conv2d_rule(pfor: Any, fallback: Callable) -> Callable:
    """The pfor rule for ``Conv2D(x, filter_k)``: one input, k filters -> (k, b, oh, ow, cout)."""
    def rule(pfor_input: Any) -> Any:
        x, x_stacked, _ = pfor_input.input(0)
        f, f_stacked, _ = pfor_input.input(1)
        if x_stacked or not f_stacked:
            return fallback(pfor_input)
        kh, kw, cin, cout = f.shape[1:5]
        if None in (kh, kw, cin, cout) or _image_shape(pfor_input, x)[2] != cin:  # groups
            return fallback(pfor_input)
        got = _patches(pfor_input, x, kh, kw)
        if got is None:
            return fallback(pfor_input)
        patches, oh, ow = got
        k = tf.shape(f)[0]
        filters = tf.reshape(tf.transpose(f, [0, 4, 1, 2, 3]), [-1, kh * kw * cin])
        out = tf.reshape(tf.matmul(filters, patches, transpose_b=True), [k, cout, -1, oh, ow])
        out = tf.reshape(out, [k, -1, oh, ow, 1]) if cout == 1 else tf.transpose(
            out, [0, 2, 3, 4, 1])
        return pfor.wrap(out, True)
    return rule


def _conv2d_backprop_filter_rule(pfor: Any, fallback: Callable) -> Callable:
    """The pfor rule for ``Conv2DBackpropFilter(x, sizes, dy)`` with k inputs or k gradients.

    The filter gradient is ``patches(x)^T dy``: with one input and k gradients
    one matrix product (patches extracted once); with k inputs a batched one.
    """
    def rule(pfor_input: Any) -> Any:
        x, x_stacked, _ = pfor_input.input(0)
        _, sizes_stacked, _ = pfor_input.input(1)
        dy, dy_stacked, _ = pfor_input.input(2)
        shape = pfor_input.outputs[0].shape
        if sizes_stacked or not shape.is_fully_defined():
            return fallback(pfor_input)
        kh, kw, cin, cout = shape.as_list()
        flat = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0)) if x_stacked else x
        if _image_shape(pfor_input, flat)[2] != cin:
            return fallback(pfor_input)
        got = _patches(pfor_input, flat, kh, kw)
        if got is None:
            return fallback(pfor_input)
        patches, _, _ = got
        if not x_stacked:  # (k*cout, M) @ (M, P): one product for the k gradients
            k = tf.shape(dy)[0]
            if cout != 1:
                dy = tf.transpose(dy, [0, 4, 1, 2, 3])
            out = tf.reshape(tf.matmul(tf.reshape(dy, [k * cout, -1]), patches),
                             [k, cout, kh, kw, cin])
            return pfor.wrap(tf.transpose(out, [0, 2, 3, 4, 1]), True)
        k = tf.shape(x)[0]
        patches = tf.reshape(patches, [k, -1, kh * kw * cin])
        dy = tf.reshape(dy, [k, -1, cout]) if dy_stacked else tf.reshape(dy, [1, -1, cout])
        out = tf.matmul(patches, dy, transpose_a=True)  # (k, P, cout)
        return pfor.wrap(tf.reshape(out, [k, kh, kw, cin, cout]), True)
    return rule


@contextmanager
def _batched_conv_rules() -> Iterator[None]:
    """Use the im2col rules above for pfor while the block runs (graph building only).

    pfor's registry is private TensorFlow: where it is missing or changed, the
    block runs with pfor's own rules (the same numbers, slower).
    """
    try:
        from tensorflow.python.ops.parallel_for import pfor
        registry = pfor._pfor_converter_registry
        old = {name: registry[name] for name in ("Conv2D", "Conv2DBackpropFilter")}
    except (ImportError, AttributeError, KeyError):
        yield
        return
    with _PFOR_RULES_LOCK:
        registry["Conv2D"] = _conv2d_rule(pfor, old["Conv2D"])
        registry["Conv2DBackpropFilter"] = _conv2d_backprop_filter_rule(
            pfor, old["Conv2DBackpropFilter"])
        try:
            yield
        finally:
            registry.update(old)


def _per_sample_loss(name: str, num_classes: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Per-sample loss of integer labels and model outputs, shape (b,)."""
    if name == "categorical_crossentropy":
        def cce(y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
            return keras.losses.categorical_crossentropy(
                tf.one_hot(y, num_classes, dtype=out.dtype), out)
        return cce
    if name == "mean_squared_error":
        def mse(y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
            return keras.losses.mean_squared_error(tf.one_hot(y, num_classes, dtype=out.dtype), out)
        return mse
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")


# -- the Gauss-Newton split: logits of a softmax output ---------------------------------
#
# The GGN of cross-entropy is positive semi-definite only when the loss is
# convex in the split variable (Schraudolph 2002, matching loss functions;
# Martens & Sutskever 2012): the logits with the softmax moved into the loss
# (the "matching loss"). Keras models end in ``Dense(..., activation=softmax)``
# (or an ``Activation("softmax")`` layer), so the logits are not a tensor of the
# model: while a graph is built, the output layer's ``activation`` attribute is
# set to linear (under a lock, restored in ``finally``), which every Keras layer
# with an ``activation`` applies last in its ``call``. The compiled graph then
# holds the logits; nothing changes outside graph building. On first use the
# split is checked numerically (softmax(logits) == output on one sample) and
# falls back to the output where it fails.

_HEAD_LOCK = threading.RLock()


def _is_softmax(activation: Any) -> bool:
    return activation is keras.activations.softmax or (
        callable(activation) and getattr(activation, "__name__", None) == "softmax")


def _softmax_head(model: keras.Model) -> keras.layers.Layer | None:
    """The layer whose softmax activation makes the model's one output, or None.

    Follows the output's Keras history (functional and sequential models, also
    nested ones); a subclassed model, several outputs or a last layer without a
    softmax ``activation`` give None.
    """
    layer: Any = model
    for _ in range(32):  # nested models: follow the one that makes the output
        if not isinstance(layer, keras.Model):
            break
        try:
            outputs = layer.outputs
        except (AttributeError, ValueError):
            return None
        if not isinstance(outputs, list | tuple) or len(outputs) != 1:
            return None
        history = getattr(outputs[0], "_keras_history", None)
        if history is None:
            return None
        layer = history.operation
    return layer if _is_softmax(getattr(layer, "activation", None)) else None


@contextmanager
def _linear_head(layer: keras.layers.Layer | None) -> Iterator[None]:
    """Run the block with ``layer``'s activation replaced by the identity (None: no change)."""
    if layer is None:
        yield
        return
    with _HEAD_LOCK:
        saved = layer.activation
        layer.activation = keras.activations.linear
        try:
            yield
        finally:
            layer.activation = saved


class LocalObjective:
    """Loss, gradient and HVP sums of one model over one rank's shard.

    ``x`` holds raw uint8 samples (converted to ``dtype`` and divided by
    ``pixel_scale`` inside the compiled functions, so the resident shard stays
    small); ``y`` holds integer labels.
    """

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray, *,
                 loss: str = "categorical_crossentropy", num_classes: int = 10,
                 micro_batch: int = 10000, jit: bool = True,
                 hvp: str = "reverse_over_reverse", pixel_scale: float = 255.0,
                 preprocess: str = "scale") -> None:
        if len(x) != len(y):
            raise ValueError(f"shard has {len(x)} samples but {len(y)} labels")
        if micro_batch <= 0:
            raise ValueError(f"micro_batch must be > 0, got {micro_batch}")
        if hvp not in HVP_MODES:
            raise ValueError(f"unknown hvp mode {hvp!r}; known: {', '.join(HVP_MODES)}")
        self.model = model
        self.layout = ParamLayout.of(model)
        self.dtype = tf.as_dtype(self.layout.dtype)
        self.micro_batch = micro_batch
        self._pixel_scale = pixel_scale
        if preprocess not in PREPROCESSES:
            raise ValueError(f"unknown preprocess {preprocess!r}; known: {', '.join(PREPROCESSES)}")
        self.preprocess = preprocess
        self._loss = _per_sample_loss(loss, num_classes)
        self._num_classes = num_classes
        head = _softmax_head(model) if loss == "categorical_crossentropy" else None
        self._head: keras.layers.Layer | None = head
        self._split = "logits" if head is not None else "output"
        self._split_checked = head is None
        self._non_trainable = [v.value for v in model.non_trainable_variables]
        self.set_samples(x, y)
        def compile_(f: Callable) -> Callable:
            return tf.function(f, jit_compile=jit, reduce_retracing=True)

        self._loss_fn = compile_(self._loss_sum_graph)
        self._grad_fn = compile_(self._loss_grad_graph)
        rr = hvp == "reverse_over_reverse"
        self._hvp_fn = compile_(self._hvp_rr_graph if rr else self._hvp_fr_graph)
        self._hvp_many_fn = compile_(self._hvp_many_rr_graph if rr else self._hvp_many_fr_graph)
        self._correct_fn = compile_(self._correct_graph)
        self._gnvp_fn = compile_(self._gnvp_graph)
        self._gnvp_many_fn = compile_(self._gnvp_many_graph)
        self._split_loss_fn = compile_(self._split_loss_graph)
        self._grad_squares_fn = compile_(self._grad_squares_graph)

    def set_samples(self, x: np.ndarray, y: np.ndarray, *, pad_to: int = 0) -> None:
        """Replace the samples the sums run over (a new mini-batch part, thesis 8.2).

        With ``pad_to > 0`` every micro-batch has exactly ``min(micro_batch,
        pad_to)`` rows: the last one is filled with zero samples that a mask
        leaves out of every sum, so parts of size up to ``pad_to`` reuse one
        compiled graph instead of compiling a new one per size.
        """
        if len(x) != len(y):
            raise ValueError(f"shard has {len(x)} samples but {len(y)} labels")
        self.num_samples = len(x)
        mb = min(self.micro_batch, pad_to) if pad_to > 0 else self.micro_batch
        self._chunks = []
        for i in range(0, len(x), mb):
            xc, yc = x[i:i + mb], y[i:i + mb]
            n = len(xc)
            if pad_to > 0 and n < mb:
                xc = np.concatenate([xc, np.zeros((mb - n, *x.shape[1:]), dtype=x.dtype)])
                yc = np.concatenate([yc, np.zeros(mb - n, dtype=y.dtype)])
            self._chunks.append((tf.constant(xc), tf.constant(yc), tf.constant(n, tf.int32)))

    # -- graphs (traced once per micro-batch shape) --------------------------------

    def _unflatten(self, w: tf.Tensor) -> list[tf.Tensor]:
        parts = tf.split(w, list(self.layout.sizes))
        return [tf.reshape(p, s) for p, s in zip(parts, self.layout.shapes, strict=True)]

    def _outputs(self, w: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        """Model outputs of raw uint8 samples, preprocessed here (the shard stays uint8)."""
        inputs = tf.cast(x, self.dtype)
        if self.preprocess == "caffe":  # RGB -> BGR, minus the ImageNet means, no scaling
            if x.shape[-1] != 3:
                raise ValueError(f"caffe preprocessing needs RGB images, got shape {x.shape}")
            inputs = inputs[..., ::-1] - tf.constant(CAFFE_BGR_MEAN, self.dtype)
        else:
            inputs = inputs / tf.constant(self._pixel_scale, self.dtype)
        out, _ = self.model.stateless_call(self._unflatten(w), self._non_trainable, inputs,
                                           training=False)
        return out

    def _mask(self, y: tf.Tensor, n: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
        """1 for the first ``n`` rows of a micro-batch, 0 for padding rows."""
        return tf.cast(tf.range(tf.shape(y)[0]) < n, dtype)

    def _loss_sum_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                        n: tf.Tensor) -> tf.Tensor:
        losses = self._loss(y, self._outputs(w, x))
        return tf.reduce_sum(losses * self._mask(y, n, losses.dtype))

    def _loss_grad_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                         n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = self._loss_sum_graph(w, x, y, n)
        return loss, tape.gradient(loss, w)

    def _hvp_rr_graph(self, w: tf.Tensor, v: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                      n: tf.Tensor) -> tf.Tensor:
        """Double backpropagation: H v = d/dw (g(w) . v) (thesis 9.1)."""
        with tf.GradientTape() as outer:
            outer.watch(w)
            with tf.GradientTape() as inner:
                inner.watch(w)
                loss = self._loss_sum_graph(w, x, y, n)
            grad_dot_v = tf.tensordot(inner.gradient(loss, w), v, 1)
        return outer.gradient(grad_dot_v, w)

    def _hvp_fr_graph(self, w: tf.Tensor, v: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                      n: tf.Tensor) -> tf.Tensor:
        """Forward-over-reverse: the directional derivative of g(w) along v."""
        with tf.autodiff.ForwardAccumulator(w, v) as acc:
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = self._loss_sum_graph(w, x, y, n)
            grad = tape.gradient(loss, w)
        return acc.jvp(grad)

    def _hvp_many_rr_graph(self, w: tf.Tensor, vt: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                           n: tf.Tensor) -> tf.Tensor:
        """(H v_1, ..., H v_k) as rows: the gradient once, then k VJPs of it in one batch.

        ``vt`` is (k, n). Row j is d/dw (g(w) . v_j); ``tape.jacobian`` of the
        k numbers g . v_j vectorises the k reverse passes over the gradient's
        graph (pfor), and the forward pass and gradient are computed once.
        """
        with tf.GradientTape() as outer:
            outer.watch(w)
            with tf.GradientTape() as inner:
                inner.watch(w)
                loss = self._loss_sum_graph(w, x, y, n)
            grad_dot_v = tf.linalg.matvec(vt, inner.gradient(loss, w))
        with _batched_conv_rules():
            return outer.jacobian(grad_dot_v, w,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _hvp_many_fr_graph(self, w: tf.Tensor, vt: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                           n: tf.Tensor) -> tf.Tensor:
        """(H v_1, ..., H v_k) as rows: forward-over-reverse vectorised over the k tangents.

        ``tf.vectorized_map`` of the one-vector graph: the parts that do not
        depend on the tangent (forward pass, gradient) are computed once.
        """
        with _batched_conv_rules():
            return tf.vectorized_map(lambda v: self._hvp_fr_graph(w, v, x, y, n), vt)

    # -- Gauss-Newton graphs ------------------------------------------------------

    def _split_outputs(self, w: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        """The split variable z: the logits (softmax head made linear) or the output."""
        with _linear_head(self._head if self._split == "logits" else None):
            return self._outputs(w, x)

    def _split_losses(self, y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """Per-sample loss as a function of z: softmax cross-entropy of logits, or the loss."""
        if self._split == "logits":
            labels = tf.one_hot(y, self._num_classes, dtype=z.dtype)
            return tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=z)
        return self._loss(y, z)

    def _loss_hessian_product(self, y: tf.Tensor, z: tf.Tensor, u: tf.Tensor,
                              mask: tf.Tensor) -> tf.Tensor:
        """Rows ``H_L,i u_i`` (masked) of the per-sample loss Hessians w.r.t. z.

        Logits: ``diag(p) u - p (p . u)``, p = softmax(z) (Schraudolph 2002).
        Output: double backpropagation through the loss of the (b, K) tensor z
        only (for mean squared error, ``2/K u``).
        """
        z = tf.stop_gradient(z)
        if self._split == "logits":
            p = tf.nn.softmax(z)
            hu = p * u - p * tf.reduce_sum(p * u, axis=-1, keepdims=True)
        else:
            with tf.GradientTape() as outer:
                outer.watch(z)
                with tf.GradientTape() as inner:
                    inner.watch(z)
                    loss = tf.reduce_sum(self._loss(y, z))
                grad_dot_u = tf.reduce_sum(inner.gradient(loss, z) * u)
            hu = outer.gradient(grad_dot_u, z, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return hu * mask[:, None]

    def _gnvp_graph(self, w: tf.Tensor, v: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                    n: tf.Tensor) -> tf.Tensor:
        """``sum_i J_i^T H_L,i J_i v`` with J v by the double-VJP trick (reverse mode only).

        ``J v = d/du (J^T u . v)`` for a dummy cotangent u (linear in u, so u = 0
        will do), then ``H_L`` on the (b, K) tensor z and ``J^T`` by a third
        reverse pass. Measured on the thesis CNN (XLA, b = 1000) about 20 %
        faster than forward mode (``_gnvp_fwd_graph``), with the same numbers.
        """
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(w)
            z = tf.reshape(self._split_outputs(w, x), [tf.shape(x)[0], -1])
        u = tf.zeros_like(z)
        with tf.GradientTape() as dual:
            dual.watch(u)
            jtu = tape.gradient(z, w, output_gradients=u,
                                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            jtu_dot_v = tf.tensordot(jtu, v, 1)
        jv = dual.gradient(jtu_dot_v, u, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        hjv = self._loss_hessian_product(y, z, jv, self._mask(y, n, z.dtype))
        return tape.gradient(z, w, output_gradients=hjv,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _gnvp_fwd_graph(self, w: tf.Tensor, v: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                        n: tf.Tensor) -> tf.Tensor:
        """``sum_i J_i^T H_L,i J_i v`` with J v by forward mode, J^T by one reverse pass."""
        with tf.GradientTape() as tape:
            tape.watch(w)
            with tf.autodiff.ForwardAccumulator(w, v) as acc:
                z = tf.reshape(self._split_outputs(w, x), [tf.shape(x)[0], -1])
        jv = acc.jvp(z, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        hjv = self._loss_hessian_product(y, z, jv, self._mask(y, n, z.dtype))
        return tape.gradient(z, w, output_gradients=hjv,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def _gnvp_many_graph(self, w: tf.Tensor, vt: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                         n: tf.Tensor) -> tf.Tensor:
        """(G v_1, ..., G v_k) as rows: ``tf.vectorized_map`` of the forward-mode graph.

        What does not depend on the direction (forward pass, p) runs once.
        Vectorised, forward mode beat the double-VJP graph on the thesis CNN
        (XLA, b = 1000, k = 8 and 32: 1.5 to 1.8 times faster a column).
        """
        with _batched_conv_rules():
            return tf.vectorized_map(lambda v: self._gnvp_fwd_graph(w, v, x, y, n), vt)

    def _split_loss_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                          n: tf.Tensor) -> tf.Tensor:
        losses = self._split_losses(y, self._split_outputs(w, x))
        return tf.reduce_sum(losses * self._mask(y, n, losses.dtype))

    def _grad_squares_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                            n: tf.Tensor) -> tf.Tensor:
        """``sum_i g_i * g_i``: per-sample gradients by ``tf.vectorized_map`` over the rows."""
        def squared_gradient(row: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tf.Tensor:
            xi, yi, mi = row
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = tf.reduce_sum(self._loss(yi[None], self._outputs(w, xi[None]))) * mi
            g = tape.gradient(loss, w, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return g * g

        with _batched_conv_rules():
            rows = tf.vectorized_map(squared_gradient, (x, y, self._mask(y, n, self.dtype)))
        return tf.reduce_sum(rows, axis=0)

    def _correct_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                       n: tf.Tensor) -> tf.Tensor:
        predicted = tf.argmax(self._outputs(w, x), axis=-1, output_type=y.dtype)
        hits = tf.cast(tf.equal(predicted, y), tf.int64)
        return tf.reduce_sum(hits * self._mask(y, n, tf.int64))

    # -- numpy interface ------------------------------------------------------------

    def _w(self, w: np.ndarray) -> tf.Tensor:
        if w.shape != (self.layout.size,):
            raise ValueError(f"weight vector has shape {w.shape}, expected ({self.layout.size},)")
        return tf.constant(w, dtype=self.dtype)

    def loss_sum(self, w: np.ndarray) -> float:
        """Sum of the per-sample losses over the shard at ``w``."""
        tw = self._w(w)
        total = 0.0
        for x, y, n in self._chunks:
            total += float(self._loss_fn(tw, x, y, n))
        return total

    def loss_grad_sum(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss sum and gradient sum over the shard at ``w``."""
        tw = self._w(w)
        total, grad = 0.0, np.zeros(self.layout.size, dtype=np.float64)
        for x, y, n in self._chunks:
            loss, g = self._grad_fn(tw, x, y, n)
            total += float(loss)
            grad += g.numpy()
        return total, grad

    def hvp_sum(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact Hessian-vector product of the loss sum over the shard."""
        tw, tv = self._w(w), self._w(np.asarray(v))
        out = np.zeros(self.layout.size, dtype=np.float64)
        for x, y, n in self._chunks:
            out += self._hvp_fn(tw, tv, x, y, n).numpy()
        return out

    def hvp_sum_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact products ``H v_j`` of the loss sum for the k columns of ``v`` (n, k) -> (n, k).

        One compiled call per micro-batch computes all k products (the same
        micro-batches, padding mask and ``jit`` as :meth:`hvp_sum`; the graph is
        traced once per micro-batch shape and k). Column j equals
        ``hvp_sum(w, v[:, j])`` to rounding. By ``hvp`` mode:

        - ``reverse_over_reverse``: forward pass and gradient g once, then
          ``tape.jacobian`` of the k numbers g . v_j, i.e. k reverse passes over
          the gradient's graph, vectorised by pfor.
        - ``forward_over_reverse``: ``tf.vectorized_map`` of the forward-over-reverse
          product over the k tangents (what does not depend on them runs once).

        Measured on the thesis CNN (float64, b = 1000, 2 cores), per column, at
        k = 8 / 32 / 64: with XLA, reverse-over-reverse 10.4 / 6.4 / 5.7-6.0 ms and
        forward-over-reverse 12.6 / 7.8 / 6.4-7.4 ms, against 10.5 ms for one
        ``hvp_sum``; without XLA 15 / 10 / 8 ms and 25 / 12 / 10 ms, against 57 ms.
        Beyond k = 64 nothing is gained, and micro-batches from 200 to 1000 give
        about the same (``python -m mpinewton.bench hessian`` times a whole
        Hessian). Memory: the k tangents of every activation of a micro-batch
        (k = 64, micro-batch 1000: 400 MB a tensor for this CNN), so choose
        ``micro_batch * k`` for the memory at hand.
        """
        return self._sum_many(self._hvp_many_fn, w, v)

    def _sum_many(self, fn: Callable, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Sum over the micro-batches of ``fn``'s k products (rows) -> (n, k) columns."""
        tw = self._w(w)
        v = np.asarray(v)
        if v.ndim != 2 or v.shape[0] != self.layout.size:
            raise ValueError(f"direction matrix has shape {v.shape}, expected "
                             f"({self.layout.size}, k)")
        k = v.shape[1]
        out = np.zeros((k, self.layout.size), dtype=np.float64)
        if k == 0 or not self._chunks:
            return np.ascontiguousarray(out.T)
        tv = tf.constant(np.ascontiguousarray(v.T), dtype=self.dtype)
        for x, y, n in self._chunks:
            out += fn(tw, tv, x, y, n).numpy()
        return np.ascontiguousarray(out.T)

    @property
    def gauss_newton_split(self) -> str:
        """Where Gauss-Newton products split net and loss: "logits" or "output".

        "logits" where the loss is cross-entropy and the model's output layer
        has a softmax activation (checked numerically on the first sample once
        there are samples); "output" otherwise.
        """
        self._check_split()
        return self._split

    def _check_split(self) -> None:
        """Check once that softmax(logits) is the model's output; else split at the output."""
        if self._split_checked or not self._chunks:
            return
        x = self._chunks[0][0][:1]
        w = tf.constant(get_flat(self.model), dtype=self.dtype)
        out = self._outputs(w, x).numpy()
        with _linear_head(self._head):
            logits = self._outputs(w, x)
        probs = tf.nn.softmax(tf.reshape(logits, [1, -1])).numpy().reshape(out.shape)
        tol = 1e3 * float(np.finfo(out.dtype).eps)
        if out.shape != tuple(logits.shape) or not np.allclose(probs, out, rtol=tol, atol=tol):
            logging.getLogger(__name__).warning(
                "%s: the output layer %r has a softmax activation, but softmax of its "
                "pre-activation is not the model's output; Gauss-Newton products split at "
                "the output", self.model.name, getattr(self._head, "name", "?"))
            self._split, self._head = "output", None
        self._split_checked = True

    def split_loss_sum(self, w: np.ndarray) -> float:
        """Sum of the per-sample losses as a function of the split variable z.

        With the "logits" split, the softmax cross-entropy of the logits (no
        probability clipping: equal to :meth:`loss_sum` where Keras clips no
        probability); with the "output" split, :meth:`loss_sum` itself.
        """
        self._check_split()
        tw = self._w(w)
        return sum(float(self._split_loss_fn(tw, x, y, n)) for x, y, n in self._chunks)

    def gnvp_sum(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact generalised Gauss-Newton product ``sum_i J_i^T H_L,i J_i v`` over the shard.

        Schraudolph 2002, Martens 2010 (sec. 4.2), Martens & Sutskever 2012:
        ``J_i`` is the Jacobian of the split variable z of sample
        i w.r.t. the weights and ``H_L,i`` the Hessian of its loss w.r.t. z
        (:attr:`gauss_newton_split`). With the "logits" split (cross-entropy on
        a softmax output) ``H_L = diag(p) - p p^T`` and the product is that of
        a positive semi-definite matrix; with the "output" split ``H_L`` is the
        loss's own Hessian (mean squared error: ``2/K I``, PSD; cross-entropy
        on a non-softmax output: not PSD in general). One compiled call per
        micro-batch: ``J v`` by the double-VJP trick (two reverse passes over
        the net, J never formed), ``H_L`` on the (b, K) tensor z, ``J^T`` by a
        third reverse pass. Thesis CNN, float64, XLA, b = 1000: about 1.4 times
        a gradient and 0.8 times an :meth:`hvp_sum` (reverse-over-reverse).
        """
        self._check_split()
        tw, tv = self._w(w), self._w(np.asarray(v))
        out = np.zeros(self.layout.size, dtype=np.float64)
        for x, y, n in self._chunks:
            out += self._gnvp_fn(tw, tv, x, y, n).numpy()
        return out

    def gnvp_sum_many(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Gauss-Newton products ``G v_j`` for the k columns of ``v`` (n, k) -> (n, k).

        One compiled call per micro-batch (``tf.vectorized_map`` over the k
        directions of the product with ``J v`` by forward mode: the forward pass
        runs once); column j equals ``gnvp_sum(w, v[:, j])`` to rounding. Memory as
        :meth:`hvp_sum_many`: k tangents of every activation of a micro-batch.
        """
        self._check_split()
        return self._sum_many(self._gnvp_many_fn, w, v)

    def grad_squares_sum(self, w: np.ndarray) -> np.ndarray:
        """``sum_i g_i * g_i`` (elementwise) of the per-sample loss gradients over the shard.

        The empirical Fisher diagonal times the sample count (Martens 2010,
        sec. 4.7, its diagonal preconditioner). Per-sample gradients by
        ``tf.vectorized_map`` over the rows of a micro-batch, one compiled call
        per micro-batch; memory: ``micro_batch * n`` values for the gradients.
        """
        tw = self._w(w)
        out = np.zeros(self.layout.size, dtype=np.float64)
        for x, y, n in self._chunks:
            out += self._grad_squares_fn(tw, x, y, n).numpy()
        return out

    def correct_count(self, w: np.ndarray) -> int:
        """Number of shard samples whose arg-max prediction equals the label."""
        tw = self._w(w)
        return sum(int(self._correct_fn(tw, x, y, n)) for x, y, n in self._chunks)

    def hessian_sum(self, w: np.ndarray) -> np.ndarray:
        """Explicit Hessian of the loss sum (n x n): small models only (thesis 9.1)."""
        tw = self._w(w)
        n = self.layout.size
        out = np.zeros((n, n), dtype=np.float64)
        for x, y, n in self._chunks:
            with tf.GradientTape() as outer:
                outer.watch(tw)
                with tf.GradientTape() as inner:
                    inner.watch(tw)
                    loss = self._loss_sum_graph(tw, x, y, n)
                grad = inner.gradient(loss, tw)
            out += outer.jacobian(grad, tw).numpy()
        return out
