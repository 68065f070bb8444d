"""Model builders: the thesis' simple CNN and small MLPs, with Xavier-like init.

Thesis section 10.1 (network layout) and section 11 (weight initialisation):
``W ~ N(0, sqrt(2 / (fan_in + fan_out)))`` — the second argument is the
standard deviation.
"""

from __future__ import annotations

import math

import keras
import numpy as np


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


def build_model(name: str, *, dtype: str, seed: int, input_shape: tuple[int, ...],
                num_classes: int, hidden: tuple[int, ...] = (32,)) -> keras.Model:
    """Build a model by its job-file name (``model.name``)."""
    if name == "thesis_cnn":
        if len(input_shape) != 3:
            raise ValueError(f"thesis_cnn needs images of shape (H, W, C), got {input_shape}")
        return thesis_cnn(dtype=dtype, seed=seed, input_shape=input_shape,  # type: ignore[arg-type]
                          num_classes=num_classes)
    if name == "mlp":
        return mlp(dtype=dtype, seed=seed, input_shape=input_shape, hidden=hidden,
                   num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; known: thesis_cnn, mlp")
