"""A user's own Keras model, as the examples build it: nothing mpinewton-specific.

A functional network with biases, batch normalisation and dropout for the 8x8
digits of scikit-learn (64 features, 10 classes). mpinewton evaluates it with
``training=False``: dropout is off inside the objective and batch norm uses its
moving statistics, so the loss is a deterministic function of the weights.
Outputs are logits: train it with ``loss = "sparse_categorical_crossentropy"``
and ``from_logits = true``.
"""

import keras


def build(hidden: int = 32, dropout: float = 0.2, seed: int = 0) -> keras.Model:
    """Dense(hidden, tanh) -> BatchNorm -> Dropout -> Dense(10) logits, on 64 features."""
    init = keras.initializers.GlorotNormal(seed=seed)
    inputs = keras.Input(shape=(64,), name="pixels")
    h = keras.layers.Dense(hidden, activation="tanh", kernel_initializer=init)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(dropout, seed=seed)(h)
    logits = keras.layers.Dense(10, kernel_initializer=init, name="logits")(h)
    return keras.Model(inputs, logits, name="digits_mlp")
