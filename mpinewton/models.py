"""Model builders: the thesis' simple CNN, small MLPs and residual nets; start weights.

Thesis section 10.1 (network layout) and section 11 (weight initialisation):
``W ~ N(0, sqrt(2 / (fan_in + fan_out)))`` — the second argument is the
standard deviation. Section 10.2: Keras' ResNet-50 (batch norm after every
convolution, bottleneck blocks, global average pooling, softmax), and
``resnet_mini``, the same building blocks at a few tens of thousands of weights
for fast tests. Section 15.3: start from given weights, perturbed elementwise.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import h5py
import keras
import numpy as np

from mpinewton.config import MODEL_NAMES
from mpinewton.params import ParamLayout, set_flat

#: The models a job's ``model.name`` can name (the list lives in mpinewton.config).
MODELS = MODEL_NAMES


def xavier_normal(fan_in: int, fan_out: int, seed: int) -> keras.initializers.Initializer:
    """Thesis section 11: N(0, sqrt(2/(fan_in+fan_out))), not truncated."""
    return keras.initializers.RandomNormal(
        mean=0.0, stddev=math.sqrt(2.0 / (fan_in + fan_out)), seed=seed)


def thesis_cnn(*, dtype: str = "float64", seed: int = 0,
               input_shape: tuple[int, int, int] = (28, 28, 1),
               num_classes: int = 10) -> keras.Model:
    """The thesis' simple CNN (section 10.1): 3,192 weights on MNIST, no biases.

    conv 4x4, 1 filter, same padding, ReLU -> flatten (784) -> dense 4, sigmoid
    -> dense 10, softmax.
    """
    h, w, c = input_shape
    kernel = 4
    return keras.Sequential([
        keras.Input(input_shape, dtype=dtype),
        keras.layers.Conv2D(1, kernel, padding="same", activation="relu", use_bias=False,
                            dtype=dtype, name="conv",
                            kernel_initializer=xavier_normal(kernel * kernel * c,
                                                             kernel * kernel, seed)),
        keras.layers.Flatten(dtype=dtype, name="flatten"),
        keras.layers.Dense(4, activation="sigmoid", use_bias=False, dtype=dtype, name="dense1",
                           kernel_initializer=xavier_normal(h * w, 4, seed + 1)),
        keras.layers.Dense(num_classes, activation="softmax", use_bias=False, dtype=dtype,
                           name="dense2",
                           kernel_initializer=xavier_normal(4, num_classes, seed + 2)),
    ], name="thesis_cnn")


def mlp(*, dtype: str = "float64", seed: int = 0, input_shape: tuple[int, ...] = (28, 28, 1),
        hidden: tuple[int, ...] = (32,), num_classes: int = 10) -> keras.Model:
    """A small fully connected net (tanh hidden layers, softmax output), with biases."""
    layers: list[keras.layers.Layer] = [keras.Input(input_shape, dtype=dtype),
                                        keras.layers.Flatten(dtype=dtype)]
    fan_in = int(np.prod(input_shape))
    for i, width in enumerate(hidden):
        layers.append(keras.layers.Dense(width, activation="tanh", dtype=dtype, name=f"dense{i}",
                                         kernel_initializer=xavier_normal(fan_in, width, seed + i)))
        fan_in = width
    layers.append(keras.layers.Dense(num_classes, activation="softmax", dtype=dtype, name="out",
                                     kernel_initializer=xavier_normal(fan_in, num_classes,
                                                                      seed + len(hidden))))
    return keras.Sequential(layers, name="mlp")


#: Keras' ResNet-50 accepts images of at least 32 x 32 pixels (five stride-2 stages).
RESNET50_MIN_SIZE = 32


@contextmanager
def _global_dtype_policy(dtype: str) -> Iterator[None]:
    """Build Keras layers that take no ``dtype`` argument (keras.applications) in ``dtype``."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def resnet50(*, dtype: str = "float32", seed: int = 0,
             input_shape: tuple[int, int, int] = (224, 224, 3),
             num_classes: int = 1000) -> keras.Model:
    """Keras' ResNet-50 (thesis section 10.2), random weights, no download.

    Every variable is created in ``dtype`` (float32 as in the thesis; float64
    works too, which the thesis could not do, section 15.2). Keras' own
    initialisers draw their seeds from Python's ``random``, seeded here with
    ``seed`` (and restored after), so every rank builds the same weights.
    Inputs are expected after 'caffe' preprocessing (``data.preprocess``).
    """
    h, w, c = input_shape
    if min(h, w) < RESNET50_MIN_SIZE:
        raise ValueError(f"resnet50 needs images of at least {RESNET50_MIN_SIZE}x"
                         f"{RESNET50_MIN_SIZE} pixels, got {input_shape}; resize the dataset "
                         "(mpinewton.data.resize)")
    state = random.getstate()
    random.seed(seed)
    try:
        with _global_dtype_policy(dtype):
            model = keras.applications.ResNet50(
                weights=None, include_top=True, input_shape=(h, w, c), classes=num_classes,
                classifier_activation="softmax")
    finally:
        random.setstate(state)
    wrong = [v.path for v in model.variables if v.dtype != dtype]
    if wrong:  # a Keras change that ignores the global policy would break exactness silently
        raise RuntimeError(f"resnet50: variable {wrong[0]} is not {dtype}")
    return model


def _bottleneck(x: keras.KerasTensor, filters: int, stride: int, *, dtype: str, seed: int,
                name: str, projection: bool) -> keras.KerasTensor:
    """ResNet-50's bottleneck block (1x1, 3x3, 1x1 convolutions, each with batch norm).

    As Keras' ``residual_block_v1``: the stride sits on the first 1x1
    convolution, the output has ``4 * filters`` channels, and a projection
    shortcut (1x1 convolution + batch norm) matches shapes. Convolutions have no
    bias: batch norm's beta already shifts, and a redundant bias would only add
    exactly flat directions to the Hessian.
    """
    cin = int(x.shape[-1])

    def conv(t: keras.KerasTensor, n: int, k: int, s: int, i: int, cin: int) -> keras.KerasTensor:
        t = keras.layers.Conv2D(n, k, strides=s, padding="same", use_bias=False, dtype=dtype,
                                name=f"{name}_{i}_conv",
                                kernel_initializer=xavier_normal(k * k * cin, k * k * n,
                                                                 seed + i))(t)
        return keras.layers.BatchNormalization(epsilon=1.001e-5, dtype=dtype,
                                               name=f"{name}_{i}_bn")(t)

    shortcut = conv(x, 4 * filters, 1, stride, 0, cin) if projection else x
    y = keras.layers.Activation("relu", dtype=dtype)(conv(x, filters, 1, stride, 1, cin))
    y = keras.layers.Activation("relu", dtype=dtype)(conv(y, filters, 3, 1, 2, filters))
    y = conv(y, 4 * filters, 1, 1, 3, filters)
    y = keras.layers.Add(dtype=dtype, name=f"{name}_add")([shortcut, y])
    return keras.layers.Activation("relu", dtype=dtype, name=f"{name}_out")(y)


def resnet_mini(*, dtype: str = "float64", seed: int = 0,
                input_shape: tuple[int, int, int] = (32, 32, 3),
                hidden: tuple[int, ...] = (8, 16, 32), blocks: int = 1,
                num_classes: int = 10) -> keras.Model:
    """A small residual net with ResNet-50's building blocks, for fast tests.

    conv 3x3 (``hidden[0]`` filters, stride 2) - batch norm - ReLU; then one
    stage per entry of ``hidden`` (bottleneck width; stride 2 from the second
    stage on) of ``blocks`` bottleneck blocks, the first with a projection
    shortcut; global average pooling; dense softmax. The default has 33,234
    weights. Xavier-like initialisation (thesis section 11).
    """
    if not hidden or min(hidden) < 1 or blocks < 1:
        raise ValueError(f"resnet_mini needs positive stage widths and blocks, got hidden="
                         f"{hidden}, blocks={blocks}")
    c = input_shape[-1]
    inputs = keras.Input(input_shape, dtype=dtype)
    x = keras.layers.Conv2D(hidden[0], 3, strides=2, padding="same", use_bias=False, dtype=dtype,
                            name="stem_conv",
                            kernel_initializer=xavier_normal(9 * c, 9 * hidden[0], seed))(inputs)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, dtype=dtype, name="stem_bn")(x)
    x = keras.layers.Activation("relu", dtype=dtype, name="stem_relu")(x)
    for stage, filters in enumerate(hidden):
        for block in range(blocks):
            x = _bottleneck(x, filters, 2 if stage > 0 and block == 0 else 1, dtype=dtype,
                            seed=seed + 100 * (stage + 1) + 10 * block,
                            name=f"stage{stage + 1}_block{block + 1}", projection=block == 0)
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="avg_pool")(x)
    fan_in = int(x.shape[-1])
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype=dtype, name="predictions",
                                 kernel_initializer=xavier_normal(fan_in, num_classes,
                                                                  seed + 1))(x)
    return keras.Model(inputs, outputs, name="resnet_mini")


def build_model(name: str, *, dtype: str, seed: int, input_shape: tuple[int, ...],
                num_classes: int, hidden: tuple[int, ...] = (32,)) -> keras.Model:
    """Build a model by its job-file name (``model.name``).

    ``hidden`` is the hidden widths of ``mlp`` and the bottleneck widths per
    stage of ``resnet_mini``; ``resnet50`` ignores it and keeps Keras' own
    initialisers (seeded by ``seed``), as the thesis did.
    """
    if name in ("thesis_cnn", "resnet50", "resnet_mini") and len(input_shape) != 3:
        raise ValueError(f"{name} needs images of shape (H, W, C), got {input_shape}")
    if name == "thesis_cnn":
        return thesis_cnn(dtype=dtype, seed=seed, input_shape=input_shape,  # type: ignore[arg-type]
                          num_classes=num_classes)
    if name == "mlp":
        return mlp(dtype=dtype, seed=seed, input_shape=input_shape, hidden=hidden,
                   num_classes=num_classes)
    if name == "resnet50":
        return resnet50(dtype=dtype, seed=seed, input_shape=input_shape,  # type: ignore[arg-type]
                        num_classes=num_classes)
    if name == "resnet_mini":
        return resnet_mini(dtype=dtype, seed=seed, input_shape=input_shape,  # type: ignore[arg-type]
                           hidden=hidden, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


class FactoryError(ValueError):
    """``model.factory`` does not name a function that builds a Keras model."""


def resolve_factory(path: str) -> Any:
    """The function named by ``"package.module:function"`` (the current directory importable)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise FactoryError(f'model.factory = {path!r}: expected "package.module:function"')
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
        raise FactoryError(f"model.factory = {path!r}: cannot import {module_name!r}: "
                           f"{type(exc).__name__}: {exc} (is its package on PYTHONPATH or in "
                           "the current directory?)") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise FactoryError(f"model.factory = {path!r}: module {module_name!r} has no "
                               f"attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise FactoryError(f"model.factory = {path!r}: {attr!r} is not callable")
    return fn


def check_user_model(model: Any, *, dtype: str, where: str) -> keras.Model:
    """A built Keras model with trainable float weights in ``dtype``, or a clear error."""
    if not isinstance(model, keras.Model):
        raise FactoryError(f"{where}: expected a keras.Model, got {type(model).__name__}")
    if not model.built or not model.trainable_variables:
        raise FactoryError(
            f"{where}: the model {model.name!r} has no weights yet; build it before training "
            "(start it from keras.Input(shape) or call it once on a batch of inputs)")
    dtypes = sorted({str(v.dtype) for v in model.trainable_variables})
    if dtypes != [dtype]:
        raise FactoryError(
            f"{where}: the model {model.name!r} has {'/'.join(dtypes)} weights, but model.dtype "
            f"is {dtype!r}; build it under keras.config.set_floatx({dtype!r}) (or "
            f"dtype={dtype!r} on its layers), or set model.dtype")
    return model


def from_factory(path: str, args: Mapping[str, Any], *, dtype: str, seed: int) -> keras.Model:
    """Build the user's model: ``function(**args)`` from ``model.factory``.

    The factory runs with Keras' default dtype policy set to ``dtype`` and
    Keras' random seed set to ``seed`` (so its initial weights do not depend on
    the rank; rank 0's are broadcast anyway); it receives ``seed`` and
    ``dtype`` as keyword arguments too where its signature takes them and
    ``[model.args]`` does not set them.
    """
    fn = resolve_factory(path)
    kwargs = dict(args)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for name, value in (("seed", seed), ("dtype", dtype)):
        if name in params and name not in kwargs:
            kwargs[name] = value
    keras.utils.set_random_seed(seed)
    with _global_dtype_policy(dtype):
        try:
            model = fn(**kwargs)
        except TypeError as exc:
            raise FactoryError(f"model.factory = {path!r} with [model.args] "
                               f"{sorted(kwargs)}: {exc}") from None
    return check_user_model(model, dtype=dtype, where=f"model.factory = {path!r}")


def model_from_job(model_config: Any, seed: int) -> keras.Model:
    """The model a job's ``[model]`` table describes: its factory's, or a built-in one."""
    m = model_config
    if m.factory:
        return from_factory(m.factory, m.args, dtype=m.dtype, seed=seed)
    return build_model(m.name, dtype=m.dtype, seed=seed, input_shape=tuple(m.input_shape),
                       num_classes=m.num_classes, hidden=m.hidden)


# -- start weights (thesis section 15.3) -----------------------------------------------


def perturb_weights(w: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Thesis section 15.3: ``w * p`` with ``p ~ N(1, std)`` elementwise (std, not variance).

    Deterministic in ``seed``, so every rank computes the same start. ``std = 0``
    returns an unchanged copy.
    """
    if not std >= 0:
        raise ValueError(f"perturbation std must be >= 0, got {std}")
    w = np.asarray(w)
    if std == 0:
        return w.copy()
    p = np.random.default_rng(seed).normal(1.0, std, size=w.shape)
    return (w * p).astype(w.dtype, copy=False)


def load_initial_weights(model: keras.Model, path: str | os.PathLike[str]) -> str:
    """Load start weights into ``model``; return which format the file had.

    Accepts a Keras ``.weights.h5`` file (``model.save_weights``: every
    variable, batch-norm statistics included) or an mpinewton ``weights.h5``
    (``variables/<variable path>`` per variable, else the flat vector ``w``).
    Nothing is assigned unless every variable matches; otherwise the error
    names the first mismatching variable and both shapes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"start weights {path} do not exist")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise ValueError(f"start weights {path} are not a readable HDF5 file: {e}") from e
    with f:
        if "variables" in f or "w" in f:
            _load_mpinewton_weights(model, f, path)
            return "mpinewton"
        if "layers" in f or "vars" in f:
            _check_keras_weights(model, f, path)
        else:
            raise ValueError(f"start weights {path}: neither a Keras .weights.h5 file (no "
                             "'layers' group) nor an mpinewton weights.h5 (no 'variables' or "
                             "'w')")
    try:
        model.load_weights(path)
    except ValueError as e:  # a structure difference the shape check cannot see
        raise ValueError(f"start weights {path} do not fit model {model.name!r}: {e}") from e
    return "keras"


def _load_mpinewton_weights(model: keras.Model, f: h5py.File, path: str) -> None:
    """``variables/<path>`` per trainable variable (and batch-norm statistics if present)."""
    layout = ParamLayout.of(model)
    if "variables" not in f:
        w = np.asarray(f["w"])
        if w.shape != (layout.size,):
            raise ValueError(f"start weights {path}: flat vector 'w' has shape {w.shape}, model "
                             f"{model.name!r} has ({layout.size},) weights")
        set_flat(model, w)
        return
    group = f["variables"]
    values = []
    for var in model.variables:
        if var.path not in group:
            if var.trainable:
                raise ValueError(f"start weights {path}: no variable {var.path!r} (model "
                                 f"{model.name!r} variable {len(values) + 1}); the file has e.g. "
                                 f"{_first_dataset(group)!r}")
            continue  # moving statistics: only files that store them restore them
        value = np.asarray(group[var.path])
        if value.shape != tuple(var.shape):
            raise ValueError(f"start weights {path}: variable {var.path!r} has shape "
                             f"{value.shape} in the file, {tuple(var.shape)} in the model")
        values.append((var, value))
    for var, value in values:
        var.assign(value.astype(var.dtype))


def _first_dataset(group: h5py.Group) -> str:
    found: list[str] = []
    group.visititems(lambda name, obj: found.append(name)
                     if isinstance(obj, h5py.Dataset) and not found else None)
    return found[0] if found else ""


def _check_keras_weights(model: keras.Model, f: h5py.File, path: str) -> None:
    """Compare a Keras weights file with the model's own, variable by variable.

    The model writes its expected file (the same layout Keras loads by); the
    first dataset whose shape differs, or is missing, is reported with the
    model variable it belongs to.
    """
    with tempfile.TemporaryDirectory() as tmp:
        expected = os.path.join(tmp, "expected.weights.h5")
        model.save_weights(expected)
        with h5py.File(expected, "r") as ref:
            wanted: list[tuple[str, tuple[int, ...], str]] = []

            def visit(name: str, obj: h5py.HLObject) -> None:
                if isinstance(obj, h5py.Dataset):
                    layer = str(obj.parent.attrs.get("name", obj.parent.name))
                    wanted.append((name, tuple(obj.shape), layer))

            ref.visititems(visit)
    layers = {layer.name: (i, layer) for i, layer in enumerate(_all_layers(model))}
    wanted.sort(key=lambda item: layers.get(item[2], (-1, None))[0])  # the model's order
    for name, shape, layer_name in wanted:
        found = tuple(f[name].shape) if isinstance(f.get(name), h5py.Dataset) else None
        if found == shape:
            continue
        variable = _variable_name(layers.get(layer_name, (0, None))[1], name)
        have = "is missing" if found is None else f"has shape {found}"
        raise ValueError(f"start weights {path}: variable {variable} ({name} in the file) "
                         f"{have} there, model {model.name!r} expects {shape}")


def _all_layers(model: keras.Layer) -> Iterator[keras.Layer]:
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


def _variable_name(layer: keras.Layer | None, dataset: str) -> str:
    """The model variable that a Keras file dataset ``.../vars/<i>`` is loaded into."""
    index = dataset.rsplit("/", 1)[-1]
    if layer is not None and index.isdigit():
        variables = list(layer.trainable_weights) + list(layer.non_trainable_weights)
        if int(index) < len(variables):
            return repr(variables[int(index)].path)
    return repr(dataset)
