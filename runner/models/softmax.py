"""Softmax regression of "Deep MNIST for Experts": y = xW + b, W and b starting at zero."""

import keras

from runner.models.heads import emitting


def build_softmax(
    input_shape: tuple[int, ...], num_classes: int, output: str = "logits"
) -> keras.Model:
    """One dense layer from the flattened pixels to the classes."""
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer="zeros",
        bias_initializer="zeros",
        name="logits",
        dtype="float32",
    )(keras.layers.Flatten()(inputs))
    return emitting(keras.Model(inputs, logits, name="softmax"), output)
