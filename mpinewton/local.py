"""Per-rank sums over a shard: loss, gradient, exact Hessian-vector product, metric.

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

Users' own models and data: samples of any shape (uint8 images preprocessed
here, float features as they are), integer class labels (classification) or
float targets (regression), the losses of :class:`LocalObjective` (Keras'
definitions: per sample, the mean over the outputs), ``from_logits``, any Keras
loss by name, a batch-additive metric (:meth:`LocalObjective.metric_sum`:
accuracy or the mean absolute error) and the model's outputs for prediction
(:meth:`LocalObjective.outputs`). Data, model and loss that do not fit are
refused at construction with an :class:`ObjectiveError` that says what and why.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

from mpinewton.config import HVP_MODES, KERAS_LOSS_PREFIX, LOSSES, PREPROCESSES, ObjectiveConfig
from mpinewton.objective import ObjectiveError
from mpinewton.params import ParamLayout, get_flat

__all__ = ["GAUSS_NEWTON_SPLITS", "HVP_MODES", "LOSSES", "METRICS", "PREPROCESSES",
           "SOFTMAX_LOSSES", "LocalObjective", "ObjectiveError"]

#: Where a Gauss-Newton product splits the net from the loss (``gauss_newton_split``).
GAUSS_NEWTON_SPLITS = ("logits", "output")
#: Rows per compiled call of the per-sample squared gradients (``grad_squares_sum``): a
#: micro-batch longer than this is taken in blocks of it. Their per-sample gradients
#: (rows x weights) then stay in the caches: on the thesis CNN, 2 ranks, blocks of 250
#: took 0.10 s where micro-batches of 500 took 0.18 s (docs/benchmarks.md).
GRAD_SQUARES_BLOCK = 250


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


# -- losses ----------------------------------------------------------------------------
#
# Every loss is a per-sample function ``loss(y, out) -> (b,)`` of the stored
# targets y and the model's outputs (or the split variable z, flattened to
# (b, -1)): sums over samples are then batch additive (design invariant 1).
# Integer labels are class indices (classification), float targets are values
# (regression); see :class:`LocalObjective` for what each loss accepts.

#: Softmax cross-entropy of integer labels (the two names are one loss here).
SOFTMAX_LOSSES = ("categorical_crossentropy", "sparse_categorical_crossentropy")
#: What ``LocalObjective.metric_sum`` sums, by task.
METRICS = ("accuracy", "mae")


def _size(shape: tuple[int | None, ...]) -> int | None:
    """Number of values of a per-sample shape, None where a dimension is unknown."""
    return None if None in shape else int(np.prod(shape, dtype=np.int64))


def _micro_batches(a: np.ndarray, rows: int, pad: bool,
                   fill: float = 0) -> Iterator[tuple[np.ndarray, int]]:
    """``a`` cut into parts of ``rows`` rows, each with its count of real rows.

    With ``pad`` the last part is filled up to ``rows`` rows of ``fill`` (rows a
    mask leaves out of every sum), so that every part has one shape.
    """
    for i in range(0, len(a), rows):
        part = a[i:i + rows]
        n = len(part)
        if pad and n < rows:
            part = np.concatenate([part, np.full((rows - n, *a.shape[1:]), fill,
                                                 dtype=a.dtype)])
        yield part, n


def _fits(targets: tuple[int | None, ...], outputs: tuple[int | None, ...]) -> bool:
    """Whether per-sample targets match outputs value for value (dimensions of 1 aside)."""
    if targets == outputs:
        return True
    squeeze = [tuple(d for d in s if d != 1) for s in (targets, outputs)]
    return None not in squeeze[0] + squeeze[1] and squeeze[0] == squeeze[1]


def _flat(t: tf.Tensor) -> tf.Tensor:
    """(b, ...) -> (b, m): per-sample values in one row."""
    return tf.reshape(t, [tf.shape(t)[0], -1])


def _model_output_shape(model: keras.Model, sample_shape: tuple[int, ...],
                        input_dtype: str) -> tuple[int | None, ...]:
    """Per-sample shape of the model's one output.

    From the model's own ``output_shape`` (functional, sequential), else traced
    symbolically (``compute_output_spec``, a subclassed model), else from one
    call on a zero sample.
    """
    shape: Any = None
    with suppress(AttributeError, ValueError, TypeError):
        shape = model.output_shape
    if shape is None:
        with suppress(AttributeError, ValueError, TypeError, NotImplementedError, RuntimeError):
            spec = model.compute_output_spec(keras.KerasTensor((None, *sample_shape),
                                                               dtype=input_dtype))
            shape = [s.shape for s in spec] if isinstance(spec, list | tuple) else spec.shape
    if shape is None:
        out = model(np.zeros((1, *sample_shape), dtype=input_dtype), training=False)
        shape = [o.shape for o in out] if isinstance(out, list | tuple) else out.shape
    if isinstance(shape, list) and shape and not isinstance(shape[0], int | None):
        if len(shape) != 1:
            raise ObjectiveError(f"model {model.name!r} has {len(shape)} outputs; the objective "
                                 "takes a model with one output")
        shape = shape[0]
    return tuple(None if d is None else int(d) for d in tuple(shape)[1:])


def _keras_loss(name: str, from_logits: bool) -> Callable[..., tf.Tensor]:
    """Keras loss ``name`` as an unreduced function of (targets, outputs).

    ``keras.losses.get`` gives a function (``"huber"``) or a ``Loss`` object
    (``"Huber"``); an object's ``call`` is its unreduced loss. ``from_logits``
    goes to the losses that take it and is an error for the others.
    """
    try:
        found = keras.losses.get(name)
    except (ValueError, TypeError) as err:
        raise ObjectiveError(f"loss {KERAS_LOSS_PREFIX}{name}: Keras knows no loss {name!r} "
                             f"({err})") from err
    if found is None:
        raise ObjectiveError(f"loss {KERAS_LOSS_PREFIX}{name}: Keras knows no loss {name!r}")
    if isinstance(found, keras.losses.Loss):
        if from_logits:
            config = found.get_config()
            if "from_logits" not in config:
                raise ObjectiveError(f"loss {KERAS_LOSS_PREFIX}{name} takes no from_logits; "
                                     "set from_logits = false")
            found = type(found).from_config({**config, "from_logits": True})
        return found.call
    if from_logits:
        if "from_logits" not in inspect.signature(found).parameters:
            raise ObjectiveError(f"loss {KERAS_LOSS_PREFIX}{name} takes no from_logits; "
                                 "set from_logits = false")
        return functools.partial(found, from_logits=True)
    return found


# -- the Gauss-Newton split: logits of a softmax (sigmoid) output ---------------------
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
# falls back to the output where it fails. Binary cross-entropy on a sigmoid
# output is split the same way (the matching loss of the logistic function:
# H_L = diag(s (1 - s)) / k). A model that outputs logits itself
# (``from_logits``) is split at its output with these same closed forms.

_HEAD_LOCK = threading.RLock()


def _is_activation(activation: Any, name: str) -> bool:
    return activation is getattr(keras.activations, name) or (
        callable(activation) and getattr(activation, "__name__", None) == name)


def _output_layer(model: keras.Model) -> Any:
    """The layer that makes the model's one output, or None where that is not known.

    Follows the output's Keras history (functional and sequential models, also
    nested ones); a subclassed model or several outputs give None.
    """
    layer: Any = model
    for _ in range(32):  # nested models: follow the one that makes the output
        if not isinstance(layer, keras.Model):
            return layer
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
    return None


def _activation_head(model: keras.Model, name: str) -> keras.layers.Layer | None:
    """The layer whose ``name`` activation ("softmax", "sigmoid") makes the output, or None."""
    layer = _output_layer(model)
    return layer if _is_activation(getattr(layer, "activation", None), name) else None


def _softmax_head(model: keras.Model) -> keras.layers.Layer | None:
    """The layer whose softmax activation makes the model's one output, or None."""
    return _activation_head(model, "softmax")


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


# -- K-FAC taps: a layer's input and pre-activation while a graph is built ------------
#
# K-FAC's factors (mpinewton.solvers.kfac) need, for every Dense and Conv2D
# layer, the layer's input a and the derivative of the loss factor w.r.t. its
# pre-activation s. Neither is an output of the model, so while the K-FAC graph
# is built the layer's ``call`` is wrapped to record a, and its ``activation``
# (applied last in every Keras Dense and Conv2D ``call``) to record s; both are
# restored in ``finally`` under the same lock as the Gauss-Newton head. Nothing
# changes outside graph building.

#: Layers K-FAC gives a Kronecker block; every other weight takes the plain step.
KFAC_LAYER_TYPES = (keras.layers.Dense, keras.layers.Conv2D)
#: K-FAC's exact output factor takes one backward pass per model output: above this
#: many outputs (ImageNet's 1,000 classes) only the sampled Fisher (one pass) is taken.
KFAC_MAX_OUTPUTS = 100


@contextmanager
def _kfac_taps(layers: list[Any], taps: dict[int, list[tf.Tensor]]) -> Iterator[None]:
    """Record ``[input, pre-activation]`` of each layer in ``taps[id(layer)]`` (graph building)."""
    with _HEAD_LOCK:
        saved = []
        try:
            for layer in layers:
                call, activation = layer.call, layer.activation
                saved.append((layer, vars(layer).get("call"), activation))

                def tapped_call(inputs: Any, *args: Any, _layer: Any = layer, _call: Any = call,
                                **kwargs: Any) -> Any:
                    if id(_layer) in taps:
                        raise ObjectiveError(f"kfac: layer {_layer.name!r} is called more than "
                                             "once in the model; K-FAC needs one use a layer")
                    taps[id(_layer)] = [inputs]
                    return _call(inputs, *args, **kwargs)

                def tapped_activation(s: tf.Tensor, _layer: Any = layer,
                                      _activation: Any = activation) -> tf.Tensor:
                    taps[id(_layer)].append(s)
                    return _activation(s)

                layer.call, layer.activation = tapped_call, tapped_activation
            yield
        finally:
            for layer, own_call, activation in saved:
                layer.activation = activation
                if own_call is None:
                    del layer.call  # the instance attribute: the class's call shows again
                else:
                    layer.call = own_call


def _walk_layers(model: Any) -> Iterator[Any]:
    """Every layer of ``model``, nested models' layers included, in order."""
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _walk_layers(layer)


class LocalObjective:
    """Loss, gradient, curvature and metric sums of one model over one rank's shard.

    Samples ``x`` have any shape. uint8 samples are images: converted to the
    model's dtype and divided by ``pixel_scale`` (or ``caffe``-preprocessed)
    inside the compiled functions, so the resident shard stays small; float
    samples are cast to the model's dtype and used as they are; other integer
    samples (token ids for an embedding) reach the model unchanged.

    Targets ``y`` say the task: integer class labels (classification) or float
    targets (regression). Losses (``loss``; ``from_logits`` where the model
    outputs logits rather than probabilities):

    - ``categorical_crossentropy``, ``sparse_categorical_crossentropy`` (one
      loss here): one integer label per sample, below the output width K > 1.
      On probabilities Keras' cross-entropy of the one-hot labels (the
      thesis' loss); from logits the stable
      ``tf.nn.softmax_cross_entropy_with_logits`` of the one-hot labels (the
      sparse op has no second derivative in TensorFlow).
    - ``binary_crossentropy``: one target per output (width 1, or k
      independent outputs): labels 0/1 or float targets in [0, 1]; the mean
      over the outputs (Keras), from logits by
      ``tf.nn.sigmoid_cross_entropy_with_logits``.
    - ``mean_squared_error``: integer labels against their one-hot vectors
      (thesis chapter 6), or float targets: the mean over the outputs (Keras).
    - ``keras:<name>``: any Keras loss (``keras.losses.get``), per sample, of
      (targets, outputs): float targets shaped like the outputs, integer labels
      as given; checked once to give one value per sample.

    Float targets of shape (N,) go with an output of width 1 (and any targets
    with outputs that hold the same values, dimensions of 1 aside).
    ``num_classes`` (None: the model's output width) must equal the width
    where labels become one-hot vectors. Data and model that do not fit raise
    :class:`ObjectiveError` here, before anything is compiled.
    """

    def __init__(self, model: keras.Model, x: np.ndarray, y: np.ndarray, *,
                 loss: str = "categorical_crossentropy", from_logits: bool = False,
                 num_classes: int | None = None,
                 micro_batch: int = ObjectiveConfig.micro_batch, jit: bool = True,
                 hvp: str = "reverse_over_reverse", pixel_scale: float = 255.0,
                 preprocess: str = "scale") -> None:
        self._where = where = f"model {model.name!r}, loss {loss!r}"
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ObjectiveError(f"{where}: shard has {len(x)} samples but {len(y)} labels")
        if micro_batch <= 0:
            raise ObjectiveError(f"micro_batch must be > 0, got {micro_batch}")
        if hvp not in HVP_MODES:
            raise ObjectiveError(f"unknown hvp mode {hvp!r}; known: {', '.join(HVP_MODES)}")
        if preprocess not in PREPROCESSES:
            raise ObjectiveError(f"unknown preprocess {preprocess!r}; known: "
                                 f"{', '.join(PREPROCESSES)}")
        self.model = model
        self.layout = ParamLayout.of(model)
        self.dtype = tf.as_dtype(self.layout.dtype)
        self.micro_batch = micro_batch
        self._pixel_scale = pixel_scale
        self.preprocess = preprocess
        self.loss_name = loss
        self.from_logits = bool(from_logits)
        self._sample_shape = tuple(x.shape[1:])
        self._check_inputs(x)
        if y.dtype.kind in "iub":
            self.task = "classification"
        elif y.dtype.kind == "f":
            self.task = "regression"
        else:
            raise ObjectiveError(f"{where}: targets y must be integer class labels or float "
                                 f"values, got dtype {y.dtype}")
        self._out_shape = _model_output_shape(model, self._sample_shape, self._input_dtype(x))
        self._setup_loss(y, num_classes)
        self._non_trainable = [v.value for v in model.non_trainable_variables]
        self.set_samples(x, y)
        if self.loss_name.startswith(KERAS_LOSS_PREFIX):
            self._probe_loss()
        def compile_(f: Callable) -> Callable:
            return tf.function(f, jit_compile=jit, reduce_retracing=True)

        self._loss_fn = compile_(self._loss_sum_graph)
        self._grad_fn = compile_(self._loss_grad_graph)
        rr = hvp == "reverse_over_reverse"
        self._hvp_fn = compile_(self._hvp_rr_graph if rr else self._hvp_fr_graph)
        self._hvp_many_fn = compile_(self._hvp_many_rr_graph if rr else self._hvp_many_fr_graph)
        self._correct_fn = compile_(self._correct_graph)
        self._metric_fn = compile_(self._metric_graph)
        self._loss_metric_fn = compile_(self._loss_metric_graph)
        self._outputs_fn = compile_(self._outputs)
        self._gnvp_fn = compile_(self._gnvp_graph)
        self._gnvp_many_fn = compile_(self._gnvp_many_graph)
        self._split_loss_fn = compile_(self._split_loss_graph)
        self._grad_squares_fn = compile_(self._grad_squares_graph)
        self._kfac_fn = compile_(self._kfac_graph)
        self._kfac_layers: list[tuple[Any, Any]] | None = None

    # -- what the data and the loss ask of each other (checked before compiling) -----

    def _input_dtype(self, x: np.ndarray) -> str:
        """The dtype the model sees: the model's for uint8 and float samples, else x's own."""
        return self.dtype.name if x.dtype == np.uint8 or x.dtype.kind == "f" else x.dtype.name

    def _check_inputs(self, x: np.ndarray) -> None:
        if x.dtype.kind not in "biuf":
            raise ObjectiveError(f"{self._where}: samples x must be numbers, got dtype {x.dtype}")
        if tuple(x.shape[1:]) != self._sample_shape:
            raise ObjectiveError(f"{self._where}: samples of shape {tuple(x.shape[1:])}, the "
                                 f"objective was built for {self._sample_shape}")
        if x.dtype == np.uint8 and self.preprocess == "caffe" and (
                x.ndim < 2 or x.shape[-1] != 3):
            raise ObjectiveError(f"{self._where}: caffe preprocessing needs RGB images "
                                 f"(..., 3), got samples of shape {tuple(x.shape[1:])}")

    def _setup_loss(self, y: np.ndarray, num_classes: int | None) -> None:
        """The per-sample loss, target layout, curvature split and metric of ``loss_name``."""
        where, loss, logits = self._where, self.loss_name, self.from_logits
        out = self._out_shape or (1,)  # an output (b,) is one value a sample: (b, 1)
        known = None not in out
        width = out[-1]
        ty = tuple(y.shape[1:])
        classify = self.task == "classification"
        shown_y, shown_out = f"y of shape {(len(y), *ty)}", f"outputs of shape {(None, *out)}"
        self._num_classes: int | None = None  # labels are class indices below this
        self._binary_targets = False
        self._target_shape: tuple[int | None, ...] | None = None  # y rows reshaped to this
        self._head: keras.layers.Layer | None = None
        curvature = "loss"
        if loss.startswith(KERAS_LOSS_PREFIX):
            fn = _keras_loss(loss.removeprefix(KERAS_LOSS_PREFIX), logits)
            if not classify and known and _fits(ty, out):
                self._target_shape = out
            elif classify and _size(ty) == 1 and len(out) == 1 and width is not None and width > 1:
                self._num_classes = width

            def keras_loss(y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
                return fn(y, tf.reshape(z, [tf.shape(z)[0], *out]) if known else z)
            self._loss = keras_loss
        elif loss not in LOSSES:
            raise ObjectiveError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}, or "
                                 f"{KERAS_LOSS_PREFIX}<name> for any Keras loss")
        elif loss in SOFTMAX_LOSSES or (loss == "mean_squared_error" and classify):
            if not classify:
                raise ObjectiveError(
                    f"{where}: a classification loss needs integer class labels, but y holds "
                    f"float targets ({y.dtype}); for regression use mean_squared_error or a "
                    f"{KERAS_LOSS_PREFIX}<name> loss, for probability targets "
                    f"{KERAS_LOSS_PREFIX}categorical_crossentropy")
            if len(out) != 1 or width is None:
                raise ObjectiveError(f"{where}: class labels need model outputs of shape "
                                     f"(batch, K), the model has {shown_out}")
            if _size(ty) != 1:
                raise ObjectiveError(f"{where}: needs one class label a sample, got {shown_y}")
            if width == 1:
                fix = ("use binary_crossentropy for two classes on one output, or an output of "
                       "width K for K classes" if loss in SOFTMAX_LOSSES else
                       "pass float targets (y.astype('float32')) for regression on one output")
                raise ObjectiveError(f"{where}: the model has one output a sample, and labels "
                                     f"against one-hot vectors of width 1 say nothing; {fix}")
            if num_classes is not None and num_classes != width:
                raise ObjectiveError(f"{where}: num_classes={num_classes}, but the model outputs "
                                     f"{width} values a sample (labels are one-hot vectors of the "
                                     "output width; leave num_classes out for your own model)")
            self._num_classes, self._target_shape = width, ()
            if loss == "mean_squared_error":
                if logits:
                    raise ObjectiveError(f"{where}: from_logits applies to cross-entropy losses")
                self._loss, curvature = self._mse_one_hot, "mse"
            elif logits:
                self._loss, curvature = self._cce_logits, "softmax"
            else:
                self._loss = self._cce
                self._head = _activation_head(self.model, "softmax")
                curvature = "softmax" if self._head is not None else "loss"
        elif loss == "binary_crossentropy":
            if not _fits(ty, out):
                hint = (f"; for {width} classes use sparse_categorical_crossentropy"
                        if classify and _size(ty) == 1 and width is not None and width > 1 else "")
                raise ObjectiveError(f"{where}: binary cross-entropy takes one target an output, "
                                     f"got {shown_y} for {shown_out}{hint}")
            self._target_shape = out if known else ty
            self._binary_targets = True
            if logits:
                self._loss, curvature = self._bce_logits, "sigmoid"
            else:
                self._loss = self._bce
                self._head = _activation_head(self.model, "sigmoid")
                curvature = "sigmoid" if self._head is not None else "loss"
        else:  # mean squared error of float targets: regression
            if logits:
                raise ObjectiveError(f"{where}: from_logits applies to cross-entropy losses")
            if not _fits(ty, out):
                raise ObjectiveError(f"{where}: targets do not match the model's outputs: "
                                     f"{shown_y} for {shown_out}")
            self._target_shape = out if known else ty
            self._loss, curvature = self._mse, "mse"
        if loss in (*SOFTMAX_LOSSES, "binary_crossentropy"):
            self._check_activation()
        self._curvature = curvature
        self._split = "logits" if curvature in ("softmax", "sigmoid") else "output"
        self._split_checked = self._head is None
        if loss == "binary_crossentropy":
            self._metric: str | None = "threshold"
        elif classify:
            self._metric = ("argmax" if _size(ty) == 1 and len(out) == 1 and width is not None
                            and width > 1 else "threshold" if _fits(ty, out) else None)
        else:
            self._metric = "mae" if _fits(ty, out) else None
        self._threshold = 0.0 if logits else 0.5

    def _check_activation(self) -> None:
        """Cross-entropy: logits from a model without a probability head, and the reverse."""
        if self.from_logits:
            for name in ("softmax", "sigmoid"):
                layer = _activation_head(self.model, name)
                if layer is not None:
                    raise ObjectiveError(
                        f"{self._where}: from_logits is set, but the output layer "
                        f"{layer.name!r} applies {name}: its outputs are probabilities, not "
                        "logits; set from_logits = false, or give the layer no activation")
            return
        layer = _output_layer(self.model)
        if layer is not None and _is_activation(getattr(layer, "activation", None), "linear"):
            logging.getLogger(__name__).warning(
                "%s: the output layer %r has a linear activation, but the loss takes "
                "probabilities; if the model outputs logits, set from_logits = true",
                self._where, layer.name)

    def _targets(self, y: np.ndarray) -> np.ndarray:
        """``y`` in the layout the loss reads (checked against the model's outputs)."""
        where = self._where
        kind = "classification" if y.dtype.kind in "iub" else "regression"
        if y.dtype.kind not in "iubf" or kind != self.task:
            raise ObjectiveError(f"{where}: targets of dtype {y.dtype}, but the objective was "
                                 f"built for {self.task}")
        if self._target_shape is not None and None not in self._target_shape:
            if _size(y.shape[1:]) != _size(self._target_shape):
                raise ObjectiveError(f"{where}: targets of shape {y.shape} do not match the "
                                     f"model's outputs {(None, *self._target_shape)}")
            y = y.reshape((len(y), *self._target_shape))
        if self.task == "classification" and self._target_shape is not None and (
                y.dtype not in (np.int32, np.int64)):
            y = y.astype(np.int64)  # tf.one_hot takes int32/int64 indices
        if not y.size:
            return y
        if self._num_classes is not None and (y.min() < 0 or y.max() >= self._num_classes):
            raise ObjectiveError(
                f"{where}: labels must be class indices in [0, {self._num_classes}) for the "
                f"model's {self._num_classes} outputs, y holds labels from {y.min()} to "
                f"{y.max()}")
        if self._binary_targets and (self.task == "classification" and (
                y.min() < 0 or y.max() > 1)):
            raise ObjectiveError(
                f"{where}: binary cross-entropy needs labels 0 or 1, y holds labels from "
                f"{y.min()} to {y.max()}; for K classes use sparse_categorical_crossentropy "
                "with an output of width K")
        if self.task == "regression":
            if not np.isfinite(y).all():
                raise ObjectiveError(f"{where}: targets y hold NaN or Inf")
            if self._binary_targets and (y.min() < 0 or y.max() > 1):
                raise ObjectiveError(f"{where}: binary cross-entropy needs targets in [0, 1], "
                                     f"y holds targets from {y.min()} to {y.max()}")
        return y

    def _probe_loss(self) -> None:
        """A Keras loss must give one value a sample: checked once, on two samples."""
        if None in (self._out_shape or (1,)):
            return
        out = tf.fill([2, *(self._out_shape or (1,))], tf.constant(0.5, self.dtype))
        y = tf.zeros([2, *self._stored_target_shape], self._target_dtype)
        try:
            value = self._loss(y, out)
        except (ValueError, TypeError, tf.errors.OpError) as err:
            raise ObjectiveError(f"{self._where}: the Keras loss fails on targets of shape "
                                 f"{tuple(y.shape)} and outputs of shape {tuple(out.shape)}: "
                                 f"{err}") from err
        if tuple(value.shape) != (2,):
            raise ObjectiveError(f"{self._where}: the Keras loss gives shape "
                                 f"{tuple(value.shape)} for 2 samples, not one value a sample")

    # -- per-sample losses (b,) of stored targets and outputs (or the split variable) ----

    def _cce(self, y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        """Keras' cross-entropy of probabilities and one-hot labels (the thesis' loss)."""
        return keras.losses.categorical_crossentropy(
            tf.one_hot(y, self._num_classes, dtype=out.dtype), out)

    def _cce_logits(self, y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """Softmax cross-entropy of logits, stable and twice differentiable."""
        return tf.nn.softmax_cross_entropy_with_logits(
            labels=tf.one_hot(y, self._num_classes, dtype=z.dtype), logits=_flat(z))

    def _mse_one_hot(self, y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        """Mean squared error against one-hot labels (thesis chapter 6)."""
        return keras.losses.mean_squared_error(
            tf.one_hot(y, self._num_classes, dtype=out.dtype), out)

    def _mse(self, y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        """Mean over the sample's outputs of the squared errors (Keras' definition)."""
        return keras.losses.mean_squared_error(tf.cast(_flat(y), out.dtype), _flat(out))

    def _bce(self, y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        """Keras' binary cross-entropy of probabilities, the mean over the outputs."""
        if out.shape.rank != 2:
            y, out = _flat(y), _flat(out)
        return keras.losses.binary_crossentropy(tf.cast(y, out.dtype), out)

    def _bce_logits(self, y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """Binary cross-entropy of logits (stable), the mean over the outputs."""
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
            labels=tf.cast(_flat(y), z.dtype), logits=_flat(z)), axis=-1)

    def set_samples(self, x: np.ndarray, y: np.ndarray, *, pad_to: int = 0) -> None:
        """Replace the samples the sums run over (a new mini-batch part, thesis 8.2).

        With ``pad_to > 0`` every micro-batch has exactly ``min(micro_batch,
        pad_to)`` rows: the last one is filled with zero samples that a mask
        leaves out of every sum, so parts of size up to ``pad_to`` reuse one
        compiled graph instead of compiling a new one per size. Targets are
        checked as at construction (labels below the output width, ...).
        """
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ObjectiveError(f"{self._where}: shard has {len(x)} samples but {len(y)} "
                                 "labels")
        self._check_inputs(x)
        y = self._targets(y)
        self._stored_target_shape, self._target_dtype = tuple(y.shape[1:]), y.dtype
        self.num_samples = len(x)
        mb = min(self.micro_batch, pad_to) if pad_to > 0 else self.micro_batch
        self._chunks = []
        self._draws: list[tf.Tensor] | None = None  # they belong to the samples they came with
        self._chunk_rows, self._padded = mb, pad_to > 0
        for (xc, n), (yc, _) in zip(_micro_batches(x, mb, self._padded),
                                    _micro_batches(y, mb, self._padded), strict=True):
            self._chunks.append((tf.constant(xc), tf.constant(yc), tf.constant(n, tf.int32)))

    @property
    def output_width(self) -> int:
        """K, the numbers of one sample's model output (the classes of a softmax)."""
        width = _size(self._out_shape or (1,))
        if width is None:
            raise ObjectiveError(f"{self._where}: the model's output shape "
                                 f"{self._out_shape} is not known before it runs")
        return width

    def set_draws(self, u: np.ndarray | None) -> None:
        """Uniform draws in [0, 1), (samples, K), for a sampled Fisher (:meth:`kfac_factor_sums`).

        Row i belongs to sample i of the samples set last; the driver draws them from
        the sample's global position, so any number of ranks draws the same labels
        (:func:`mpinewton.sampling.fisher_draws`). None removes them.
        """
        if u is None:
            self._draws = None
            return
        u = np.asarray(u, dtype=self.dtype.as_numpy_dtype)
        if u.shape != (self.num_samples, self.output_width):
            raise ObjectiveError(f"{self._where}: draws have shape {u.shape}, the samples "
                                 f"need ({self.num_samples}, {self.output_width})")
        if u.size and not (np.all(u >= 0) and np.all(u < 1)):
            raise ObjectiveError(f"{self._where}: draws must lie in [0, 1)")
        self._draws = [tf.constant(part) for part, _ in  # padding rows: masked out of every sum
                       _micro_batches(u, self._chunk_rows, self._padded, fill=0.5)]

    # -- graphs (traced once per micro-batch shape) --------------------------------

    def _unflatten(self, w: tf.Tensor) -> list[tf.Tensor]:
        parts = tf.split(w, list(self.layout.sizes))
        return [tf.reshape(p, s) for p, s in zip(parts, self.layout.shapes, strict=True)]

    def _outputs(self, w: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        """Model outputs of raw samples, preprocessed here (the shard stays as it came).

        uint8 images: cast, then divided by ``pixel_scale`` or ``caffe``; float
        samples: cast to the model's dtype; other integers: unchanged.
        """
        if x.dtype == tf.uint8:
            inputs = tf.cast(x, self.dtype)
            if self.preprocess == "caffe":  # RGB -> BGR, minus the ImageNet means, no scaling
                if x.shape[-1] != 3:
                    raise ObjectiveError(f"caffe preprocessing needs RGB images, got shape "
                                         f"{x.shape}")
                inputs = inputs[..., ::-1] - tf.constant(CAFFE_BGR_MEAN, self.dtype)
            else:
                inputs = inputs / tf.constant(self._pixel_scale, self.dtype)
        elif x.dtype.is_floating:
            inputs = tf.cast(x, self.dtype)
        else:
            inputs = x
        out, _ = self.model.stateless_call(self._unflatten(w), self._non_trainable, inputs,
                                           training=False)
        return out

    def _mask(self, y: tf.Tensor, n: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
        """1 for the first ``n`` rows of a micro-batch, 0 for padding rows."""
        return tf.cast(tf.range(tf.shape(y)[0]) < n, dtype)

    def _loss_of(self, y: tf.Tensor, out: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        """Sum over the samples (padding rows masked out) of the loss of outputs ``out``."""
        losses = self._loss(y, out)
        return tf.reduce_sum(losses * self._mask(y, n, losses.dtype))

    def _loss_sum_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                        n: tf.Tensor) -> tf.Tensor:
        return self._loss_of(y, self._outputs(w, x), n)

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
        """The split variable z: the logits (probability head made linear) or the output."""
        with _linear_head(self._head):
            return self._outputs(w, x)

    def _split_losses(self, y: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """Per-sample loss as a function of z: cross-entropy of logits, or the loss itself."""
        if self._curvature == "softmax":
            return self._cce_logits(y, z)
        if self._curvature == "sigmoid":
            return self._bce_logits(y, z)
        return self._loss(y, z)

    def _loss_hessian_product(self, y: tf.Tensor, z: tf.Tensor, u: tf.Tensor,
                              mask: tf.Tensor) -> tf.Tensor:
        """Rows ``H_L,i u_i`` (masked) of the per-sample loss Hessians w.r.t. z (b, K).

        Closed forms (Schraudolph 2002): softmax cross-entropy of logits
        ``diag(p) u - p (p . u)``, p = softmax(z); binary cross-entropy of
        logits, the mean over K outputs, ``s (1 - s) u / K``, s = sigmoid(z);
        mean squared error over K outputs ``2/K u``. Any other loss: double
        backpropagation through the loss of the tensor z only (exact).
        """
        z = tf.stop_gradient(z)
        k = tf.cast(tf.shape(z)[-1], z.dtype)
        if self._curvature == "softmax":
            p = tf.nn.softmax(z)
            hu = p * u - p * tf.reduce_sum(p * u, axis=-1, keepdims=True)
        elif self._curvature == "sigmoid":
            s = tf.math.sigmoid(z)
            hu = s * (1 - s) * u / k
        elif self._curvature == "mse":
            hu = 2 * u / k
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

    def _loss_factor(self, z: tf.Tensor) -> list[tf.Tensor]:
        """Columns ``c_k`` (each (b, K)) with ``H_L,i = sum_k c_k,i c_k,i^T`` for every sample.

        Softmax cross-entropy of logits: ``c_k = sqrt(p_k) (e_k - p)``, so that
        ``sum_k c_k c_k^T = diag(p) - p p^T``, the Fisher of the model's own
        predictive distribution in expectation over its labels (no sampling);
        binary cross-entropy of logits: ``sqrt(s_k (1 - s_k) / K) e_k``; mean
        squared error: ``sqrt(2 / K) e_k``.
        """
        z = tf.stop_gradient(z)
        k = int(z.shape[-1])
        eye = tf.eye(k, dtype=z.dtype)
        if self._curvature == "softmax":
            p = tf.nn.softmax(z)
            return [tf.sqrt(p[:, j:j + 1]) * (eye[j][None, :] - p) for j in range(k)]
        if self._curvature == "sigmoid":
            s = tf.math.sigmoid(z)
            return [tf.sqrt(s[:, j:j + 1] * (1 - s[:, j:j + 1]) / k) * eye[j][None, :]
                    for j in range(k)]
        scale = tf.sqrt(tf.constant(2.0 / k, z.dtype))
        return [scale * tf.ones_like(z[:, :1]) * eye[j][None, :] for j in range(k)]

    def _sampled_column(self, z: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        """One column ``c_i`` a sample with ``E[c_i c_i^T] = H_L,i``, drawn by the uniforms ``u``.

        The Monte-Carlo Fisher of Martens & Grosse (2015, sec. 5): softmax, a
        label y ~ p drawn by inverse CDF from ``u[:, 0]``, ``c = p - e_y``
        (the gradient of ``-log p_y``); sigmoid, ``y_k ~ Bernoulli(s_k)`` from
        ``u_k``, ``c = (s - y) / sqrt(K)``; mean squared error, random signs
        ``c = sqrt(2/K) sign(u - 1/2)``. Unbiased: their means over the draws are
        :meth:`_loss_factor`'s ``sum_k c_k c_k^T``.
        """
        z = tf.stop_gradient(z)
        k = int(z.shape[-1])
        if self._curvature == "softmax":
            p = tf.nn.softmax(z)
            below = tf.cast(tf.cumsum(p, axis=-1)[:, :-1] <= u[:, :1], tf.int32)
            label = tf.reduce_sum(below, axis=-1)  # the first k with u < cdf_k (at most K - 1)
            return p - tf.one_hot(label, k, dtype=z.dtype)
        if self._curvature == "sigmoid":
            s = tf.math.sigmoid(z)
            return (s - tf.cast(u < s, z.dtype)) / tf.sqrt(tf.constant(float(k), z.dtype))
        sign = tf.where(u < 0.5, tf.constant(-1.0, z.dtype), tf.constant(1.0, z.dtype))
        return tf.sqrt(tf.constant(2.0 / k, z.dtype)) * sign

    def _kfac_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                    n: tf.Tensor, max_dim: int, u: tf.Tensor | None = None) -> list[tf.Tensor]:
        """Sums over the micro-batch of every K-FAC layer's ``A`` and ``G`` (in layer order).

        ``A = sum_i mean_t a_it a_it^T`` over the layer's input vectors (a
        Dense layer's input rows, a Conv2D layer's patches; a 1 appended for
        the bias), ``G = sum_i sum_t sum_k g_itk g_itk^T`` over the
        backpropagated columns of :meth:`_loss_factor` at the pre-activation
        (Martens & Grosse 2015, sec. 3; Grosse & Martens 2016 for the positions
        t of a convolution). One forward pass and K backward passes. A factor
        of order above ``max_dim`` is summed as its diagonal only (a vector).
        With draws ``u`` (b, K), ``G`` is sampled: one backward pass of the
        column :meth:`_sampled_column` (Martens & Grosse 2015, sec. 5).
        """
        layers = [layer for layer, _ in self._kfac_layers or []]
        taps: dict[int, list[tf.Tensor]] = {}
        mask = self._mask(y, n, self.dtype)
        with _linear_head(self._head), _kfac_taps(layers, taps), \
                tf.GradientTape(persistent=True) as tape:
            tape.watch(w)
            z = tf.reshape(self._outputs(w, x), [tf.shape(x)[0], _size(self._out_shape)])
        missing = [layer.name for layer in layers if len(taps.get(id(layer), [])) != 2]
        if missing:
            raise ObjectiveError(f"kfac: layers {missing} were not run as Dense/Conv2D layers "
                                 "with an activation in the model's forward pass")

        def second_moment(flat: tf.Tensor) -> tf.Tensor:
            """``flat^T flat``, or its diagonal above ``max_dim``."""
            if int(flat.shape[-1]) > max_dim:
                return tf.reduce_sum(flat * flat, axis=0)
            return tf.matmul(flat, flat, transpose_a=True)

        pre = [taps[id(layer)][1] for layer in layers]
        gs: list[tf.Tensor | float] = [0.0 for _ in pre]
        columns = self._loss_factor(z) if u is None else [self._sampled_column(z, u)]
        for column in columns:
            back = tape.gradient(z, pre, output_gradients=column * mask[:, None],
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for i, g in enumerate(back):
                gs[i] += second_moment(tf.reshape(g, [-1, g.shape[-1]]))
        out = []
        for i, layer in enumerate(layers):
            a = taps[id(layer)][0]
            if isinstance(layer, keras.layers.Conv2D):
                kh, kw = layer.kernel_size
                a = tf.image.extract_patches(
                    a, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1],
                    rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())
            a = tf.reshape(a, [tf.shape(a)[0], -1, a.shape[-1]])  # (b, positions, rows)
            positions = tf.cast(tf.shape(a)[1], self.dtype)
            a = a * mask[:, None, None]
            if layer.use_bias:
                a = tf.concat([a, tf.ones_like(a[..., :1]) * mask[:, None, None]], axis=-1)
            out += [second_moment(tf.reshape(a, [-1, a.shape[-1]])) / positions, gs[i]]
        return out

    def _hits(self, y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        """(b, m) booleans: arg-max equals the label (m = 1), or each thresholded output."""
        if self._metric == "argmax":
            predicted = tf.argmax(_flat(out), axis=-1, output_type=tf.int64)
            return tf.equal(predicted, tf.cast(tf.reshape(y, [-1]), tf.int64))[:, None]
        truth = tf.cast(_flat(y), tf.float64) > 0.5
        return tf.equal(_flat(out) > tf.constant(self._threshold, out.dtype), truth)

    def _correct_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                       n: tf.Tensor) -> tf.Tensor:
        hits = tf.cast(tf.reduce_all(self._hits(y, self._outputs(w, x)), axis=-1), tf.int64)
        return tf.reduce_sum(hits * self._mask(y, n, tf.int64))

    def _metric_of(self, y: tf.Tensor, out: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        """Sum over the samples of the metric of ``out`` (float64): hits, or mean abs errors."""
        if self._metric == "mae":
            values = tf.reduce_mean(tf.abs(tf.cast(_flat(out), tf.float64)
                                           - tf.cast(_flat(y), tf.float64)), axis=-1)
        else:
            values = tf.reduce_mean(tf.cast(self._hits(y, out), tf.float64), axis=-1)
        return tf.reduce_sum(values * self._mask(y, n, tf.float64))

    def _metric_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                      n: tf.Tensor) -> tf.Tensor:
        """Sum over the samples of the metric (float64)."""
        return self._metric_of(y, self._outputs(w, x), n)

    def _loss_metric_graph(self, w: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                           n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The loss sum and the metric sum from one forward pass."""
        out = self._outputs(w, x)
        return self._loss_of(y, out, n), self._metric_of(y, out, n)

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

        "logits" where the loss is cross-entropy of logits: ``from_logits``
        (the output is the logits), or a softmax (binary: sigmoid) output layer
        whose pre-activation is taken (checked numerically on the first sample
        once there are samples); "output" otherwise.
        """
        self._check_split()
        return self._split

    def _check_split(self) -> None:
        """Check once that softmax (sigmoid) of the logits is the output; else split there."""
        if self._split_checked or not self._chunks:
            return
        x = self._chunks[0][0][:1]
        w = tf.constant(get_flat(self.model), dtype=self.dtype)
        out = self._outputs(w, x).numpy()
        with _linear_head(self._head):
            logits = self._outputs(w, x)
        if self._curvature == "softmax":
            probs = tf.nn.softmax(tf.reshape(logits, [1, -1])).numpy().reshape(out.shape)
        else:
            probs = tf.math.sigmoid(logits).numpy()
        tol = 1e3 * float(np.finfo(out.dtype).eps)
        if out.shape != tuple(logits.shape) or not np.allclose(probs, out, rtol=tol, atol=tol):
            logging.getLogger(__name__).warning(
                "%s: the output layer %r has a %s activation, but %s of its pre-activation "
                "is not the model's output; Gauss-Newton products split at the output",
                self.model.name, getattr(self._head, "name", "?"), self._curvature,
                self._curvature)
            self._split, self._head, self._curvature = "output", None, "loss"
        self._split_checked = True

    def split_loss_sum(self, w: np.ndarray) -> float:
        """Sum of the per-sample losses as a function of the split variable z.

        With the "logits" split, the softmax (binary) cross-entropy of the
        logits (no probability clipping: equal to :meth:`loss_sum` where Keras
        clips no probability); with the "output" split, :meth:`loss_sum` itself.
        """
        self._check_split()
        tw = self._w(w)
        return sum(float(self._split_loss_fn(tw, x, y, n)) for x, y, n in self._chunks)

    def gnvp_sum(self, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exact generalised Gauss-Newton product ``sum_i J_i^T H_L,i J_i v`` over the shard.

        Schraudolph 2002, Martens 2010 (sec. 4.2), Martens & Sutskever 2012:
        ``J_i`` is the Jacobian of the split variable z of sample
        i w.r.t. the weights and ``H_L,i`` the Hessian of its loss w.r.t. z
        (:attr:`gauss_newton_split`). With the "logits" split (cross-entropy of
        logits: a softmax output or ``from_logits``) ``H_L = diag(p) - p p^T``,
        binary cross-entropy of logits ``diag(s (1 - s)) / K``, and the product
        is that of a positive semi-definite matrix; with the "output" split
        ``H_L`` is the loss's own Hessian (mean squared error: ``2/K I``, PSD;
        any other loss by double backpropagation in z: cross-entropy on a
        non-softmax output is not PSD in general). One compiled call per
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
        per micro-batch or per block of :data:`GRAD_SQUARES_BLOCK` rows of it;
        memory: ``min(micro_batch, GRAD_SQUARES_BLOCK) * n`` values for the gradients.
        """
        tw = self._w(w)
        out = np.zeros(self.layout.size, dtype=np.float64)
        for x, y, n in self._chunks:
            rows, count = int(x.shape[0]), int(n)
            if rows <= GRAD_SQUARES_BLOCK:
                out += self._grad_squares_fn(tw, x, y, n).numpy()
                continue
            # Blocks of a long micro-batch in turn; the padding rows come last, so a
            # block of padding only is left out.
            for lo in range(0, min(rows, count), GRAD_SQUARES_BLOCK):
                real = min(count - lo, GRAD_SQUARES_BLOCK)
                out += self._grad_squares_fn(tw, x[lo:lo + GRAD_SQUARES_BLOCK],
                                             y[lo:lo + GRAD_SQUARES_BLOCK],
                                             tf.constant(real, tf.int32)).numpy()
        return out

    def _kfac_setup(self) -> list[tuple[Any, Any]]:
        """The K-FAC layers and their blocks, found once; refuses what K-FAC cannot take."""
        if self._kfac_layers is not None:
            return self._kfac_layers
        from mpinewton.solvers.kfac import KroneckerBlock

        self._check_split()
        where = self._where
        if self._curvature not in ("softmax", "sigmoid", "mse"):
            raise ObjectiveError(
                f"{where}: kfac needs the Fisher of a matching loss: softmax or binary "
                "cross-entropy of a softmax (sigmoid) output or of logits, or mean squared "
                "error; this loss has no closed-form curvature")
        if _size(self._out_shape or (None,)) is None:
            raise ObjectiveError(f"{where}: kfac needs the number of the model's outputs a "
                                 "sample, which is not known before it runs")
        offsets = dict(zip(self.layout.names, np.cumsum((0, *self.layout.sizes))[:-1],
                           strict=True))
        found = []
        for layer in _walk_layers(self.model):
            if not isinstance(layer, KFAC_LAYER_TYPES) or not layer.trainable:
                continue
            if isinstance(layer, keras.layers.Conv2D) and (
                    layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1
                    or layer.padding not in ("same", "valid")):
                continue  # its weights take the plain step
            if len(getattr(layer, "_inbound_nodes", ())) > 1:
                raise ObjectiveError(f"{where}: kfac: layer {layer.name!r} is called more than "
                                     "once in the model; K-FAC needs one use a layer")
            kernel = layer.kernel
            if kernel.path not in offsets:
                continue
            shape = tuple(int(d) for d in kernel.shape)
            rows, cols = int(np.prod(shape[:-1])), shape[-1]
            bias = getattr(layer, "bias", None) if layer.use_bias else None
            bias_offset = int(offsets[bias.path]) if bias is not None and bias.path in offsets \
                else -1
            if layer.use_bias and bias_offset < 0:
                continue  # a frozen bias: not a block this method can step
            found.append((layer, KroneckerBlock(layer.name, int(offsets[kernel.path]), rows, cols,
                                                bias_offset)))
        if not found:
            raise ObjectiveError(f"{where}: kfac found no trainable Dense or Conv2D layer in "
                                 f"model {self.model.name!r}")
        self._kfac_layers = found
        self._kfac_blocks = tuple(block for _, block in found)
        return found

    def kfac_blocks(self) -> tuple[Any, ...]:
        """The :class:`~mpinewton.solvers.kfac.KroneckerBlock` of each Dense and Conv2D layer.

        Layers in model order (nested models included); a Conv2D layer that is
        not NHWC with "same"/"valid" padding and one group, or a layer whose
        kernel or bias is frozen, gets none (its weights take K-FAC's plain
        step). The tuple is the same object on every call.
        """
        self._kfac_setup()
        return self._kfac_blocks

    def kfac_factor_sums(self, w: np.ndarray, max_dim: int | None = None, *,
                         sampled: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per block, the sums over the shard of ``A`` and ``G`` (:meth:`_kfac_graph`).

        Divided by the global sample count they are K-FAC's factors
        (Martens & Grosse 2015): batch additive, so the distributed objective
        adds the ranks' sums. A factor of order above ``max_dim`` comes as its
        diagonal, shape (n,) (None: K-FAC's default ``max_factor_dim``). One
        compiled call per micro-batch. ``sampled``: ``G`` from one label a sample
        drawn by :meth:`set_draws`' uniforms, one backward pass instead of K.
        """
        from mpinewton.solvers.kfac import KFACConfig, factor_shapes

        if max_dim is None:
            max_dim = KFACConfig.max_factor_dim
        if not (isinstance(max_dim, (int, np.integer)) and max_dim >= 1):
            raise ObjectiveError(f"kfac: max_dim must be an integer >= 1, got {max_dim!r}")
        blocks = self._kfac_setup()
        if not sampled and self.output_width > KFAC_MAX_OUTPUTS:
            raise ObjectiveError(f"{self._where}: kfac's exact Fisher takes one backward pass "
                                 f"per model output; the model has {self.output_width} outputs "
                                 f"a sample (at most {KFAC_MAX_OUTPUTS}): take "
                                 "optimizer.fisher = \"sampled\" (one pass)")
        if sampled and self._draws is None and self._chunks:
            raise ObjectiveError(f"{self._where}: kfac: a sampled Fisher needs the driver's "
                                 "draws for these samples (set_draws)")
        tw = self._w(w)
        # in the model's precision: a float32 model's factors travel as float32 (ResNet-50's
        # are 358 MB in float64, Allreduced at every new sample)
        sums = [np.zeros(shape, dtype=self.dtype.as_numpy_dtype)
                for _, b in blocks for shape in factor_shapes(b, int(max_dim))]
        for i, (x, y, n) in enumerate(self._chunks):
            u = self._draws[i] if sampled and self._draws is not None else None
            for total, part in zip(sums, self._kfac_fn(tw, x, y, n, int(max_dim), u),
                                   strict=True):
                total += part.numpy()
        return [(sums[2 * i], sums[2 * i + 1]) for i in range(len(blocks))]

    def correct_count(self, w: np.ndarray) -> int:
        """Number of shard samples classified correctly (classification only).

        Arg-max of the outputs equal to the label (width > 1); for binary
        outputs, every output thresholded (0.5 on probabilities, 0 on logits)
        equal to its target.
        """
        if self.metric_name != "accuracy":
            raise ObjectiveError(f"{self._where}: correct_count counts classified samples, "
                                 f"but the metric of these targets is {self.metric_name!r}")
        tw = self._w(w)
        return sum(int(self._correct_fn(tw, x, y, n)) for x, y, n in self._chunks)

    @property
    def metric_name(self) -> str | None:
        """What :meth:`metric_sum` sums: "accuracy", "mae" (float targets) or None."""
        return {"argmax": "accuracy", "threshold": "accuracy", "mae": "mae"}.get(
            self._metric or "")

    def metric_sum(self, w: np.ndarray) -> float:
        """Sum over the shard of the per-sample metric (batch additive: divide by N).

        Accuracy (Keras ``accuracy`` / ``binary_accuracy``): 1 where the arg-max
        of the outputs is the label (width > 1); for binary outputs the
        fraction of the sample's outputs that, thresholded at 0.5 (0 for
        logits), equal their targets (thresholded at 0.5). MAE: the mean over
        the sample's outputs of the absolute errors (Keras ``mae``).
        """
        if self._metric is None:
            raise ObjectiveError(f"{self._where}: no metric for targets of shape "
                                 f"{(None, *self._stored_target_shape)} and outputs "
                                 f"{(None, *self._out_shape)}")
        tw = self._w(w)
        return sum(float(self._metric_fn(tw, x, y, n)) for x, y, n in self._chunks)

    def loss_metric_sum(self, w: np.ndarray) -> tuple[float, float]:
        """:meth:`loss_sum` and :meth:`metric_sum` from one forward pass over the shard.

        An evaluation's two numbers for the price of one pass (the summary's, the
        validation's): the same sums, to rounding (another compiled graph).
        """
        if self._metric is None:
            return self.loss_sum(w), 0.0
        tw = self._w(w)
        loss = metric = 0.0
        for x, y, n in self._chunks:
            part_loss, part_metric = self._loss_metric_fn(tw, x, y, n)
            loss += float(part_loss)
            metric += float(part_metric)
        return loss, metric

    def outputs(self, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The model's outputs at ``w`` for rows ``x`` (prediction), (len(x), *output shape).

        Preprocessed like the training samples, dropout off (``training=False``),
        in compiled micro-batches of ``micro_batch`` rows.
        """
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self._sample_shape or x.dtype.kind not in "biuf":
            raise ObjectiveError(f"{self._where}: outputs of rows of shape {tuple(x.shape[1:])} "
                                 f"({x.dtype}); the model takes samples of shape "
                                 f"{self._sample_shape}")
        tw = self._w(w)
        parts = [self._outputs_fn(tw, tf.constant(x[i:i + self.micro_batch])).numpy()
                 for i in range(0, len(x), self.micro_batch)]
        if parts:
            return np.concatenate(parts)
        return np.zeros((0, *(d or 0 for d in self._out_shape)), dtype=self.dtype.as_numpy_dtype)

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
