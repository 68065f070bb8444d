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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import suppress

import keras
import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from mpinewton.config import HVP_MODES, LOSSES, PREPROCESSES
from mpinewton.params import ParamLayout

__all__ = ["HVP_MODES", "LOSSES", "PREPROCESSES", "LocalObjective"]


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
        self._non_trainable = [v.value for v in model.non_trainable_variables]
        self.set_samples(x, y)
        def compile_(f: Callable) -> Callable:
            return tf.function(f, jit_compile=jit, reduce_retracing=True)

        self._loss_fn = compile_(self._loss_sum_graph)
        self._grad_fn = compile_(self._loss_grad_graph)
        hvp_graph = self._hvp_rr_graph if hvp == "reverse_over_reverse" else self._hvp_fr_graph
        self._hvp_fn = compile_(hvp_graph)
        self._correct_fn = compile_(self._correct_graph)

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
