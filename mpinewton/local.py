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

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from mpinewton.params import ParamLayout

LOSSES = ("categorical_crossentropy", "mean_squared_error")
HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")


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
                 hvp: str = "reverse_over_reverse", pixel_scale: float = 255.0) -> None:
        if len(x) != len(y):
            raise ValueError(f"shard has {len(x)} samples but {len(y)} labels")
        if micro_batch <= 0:
            raise ValueError(f"micro_batch must be > 0, got {micro_batch}")
        if hvp not in HVP_MODES:
            raise ValueError(f"unknown hvp mode {hvp!r}; known: {', '.join(HVP_MODES)}")
        self.model = model
        self.layout = ParamLayout.of(model)
        self.dtype = tf.as_dtype(self.layout.dtype)
        self.num_samples = len(x)
        self.micro_batch = micro_batch
        self._pixel_scale = pixel_scale
        self._loss = _per_sample_loss(loss, num_classes)
        self._non_trainable = [v.value for v in model.non_trainable_variables]
        self._chunks = [(tf.constant(x[i:i + micro_batch]), tf.constant(y[i:i + micro_batch]))
                        for i in range(0, len(x), micro_batch)]
        def compile_(f: Callable) -> Callable:
            return tf.function(f, jit_compile=jit, reduce_retracing=True)

        self._loss_fn = compile_(self._loss_sum_graph)
        self._grad_fn = compile_(self._loss_grad_graph)
        hvp_graph = self._hvp_rr_graph if hvp == "reverse_over_reverse" else self._hvp_fr_graph
        self._hvp_fn = compile_(hvp_graph)
        self._correct_fn = compile_(self._correct_graph)

    # -- graphs (traced once per micro-batch shape) --------------------------------

    def _unflatten(self, w: tf.Tensor) -> list[tf.Tensor]:
        parts = tf.split(w, list(self.layout.sizes))
        return [tf.reshape(p, s) for p, s in zip(parts, self.layout.shapes, strict=True)]

    def _outputs(self, w: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        inputs = tf.cast(x, self.dtype) / tf.constant(self._pixel_scale, self.dtype)
        out, _ = self.model.stateless_call(self._unflatten(w), self._non_trainable, inputs,
                                           training=False)
        return out

    def _loss_sum_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(self._loss(y, self._outputs(w, x)))

    def _loss_grad_graph(self, w: tf.Tensor, x: tf.Tensor,
                         y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = self._loss_sum_graph(w, x, y)
        return loss, tape.gradient(loss, w)

    def _hvp_rr_graph(self, w: tf.Tensor, v: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Double backpropagation: H v = d/dw (g(w) . v) (thesis 9.1)."""
        with tf.GradientTape() as outer:
            outer.watch(w)
            with tf.GradientTape() as inner:
                inner.watch(w)
                loss = self._loss_sum_graph(w, x, y)
            grad_dot_v = tf.tensordot(inner.gradient(loss, w), v, 1)
        return outer.gradient(grad_dot_v, w)

    def _hvp_fr_graph(self, w: tf.Tensor, v: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Forward-over-reverse: the directional derivative of g(w) along v."""
        with tf.autodiff.ForwardAccumulator(w, v) as acc:
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = self._loss_sum_graph(w, x, y)
            grad = tape.gradient(loss, w)
        return acc.jvp(grad)

    def _correct_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        predicted = tf.argmax(self._outputs(w, x), axis=-1, output_type=y.dtype)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, y), tf.int64))

    # -- numpy interface ------------------------------------------------------------

    def _w(self, w: np.ndarray) -> tf.Tensor:
        if w.shape != (self.layout.size,):
            raise ValueError(f"weight vector has shape {w.shape}, expected ({self.layout.size},)")
        return tf.constant(w, dtype=self.dtype)

    def loss_sum(self, w: np.ndarray) -> float:
        """Sum of the per-sample losses over the shard at ``w``."""
        tw = self._w(w)
        total = 0.0
        for x, y in self._chunks:
            total += float(self._loss_fn(tw, x, y))
        return total

    def loss_grad_sum(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss sum and gradient sum over the shard at ``w``."""
        tw = self._w(w)
        total, grad = 0.0, np.zeros(self.layout.size, dtype=np.float64)
        for x, y in self._chunks:
            loss, g = self._grad_fn(tw, x, y)
            total += float(loss)
            grad += g.numpy()
        return total, grad

    def hvp_sum(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact Hessian-vector product of the loss sum over the shard."""
        tw, tv = self._w(w), self._w(np.asarray(v))
        out = np.zeros(self.layout.size, dtype=np.float64)
        for x, y in self._chunks:
            out += self._hvp_fn(tw, tv, x, y).numpy()
        return out

    def correct_count(self, w: np.ndarray) -> int:
        """Number of shard samples whose arg-max prediction equals the label."""
        tw = self._w(w)
        return sum(int(self._correct_fn(tw, x, y)) for x, y in self._chunks)

    def hessian_sum(self, w: np.ndarray) -> np.ndarray:
        """Explicit Hessian of the loss sum (n x n): small models only (thesis 9.1)."""
        tw = self._w(w)
        n = self.layout.size
        out = np.zeros((n, n), dtype=np.float64)
        for x, y in self._chunks:
            with tf.GradientTape() as outer:
                outer.watch(tw)
                with tf.GradientTape() as inner:
                    inner.watch(tw)
                    loss = self._loss_sum_graph(tw, x, y)
                grad = inner.gradient(loss, tw)
            out += outer.jacobian(grad, tw).numpy()
        return out
