"""The CNN of "A Guide to TF Layers": the raw-ops topology from stock layers and initialisers."""

import keras
from keras import layers

from runner.models.heads import emitting


def build_cnn_layers(
    input_shape: tuple[int, ...],
    num_classes: int,
    dropout_rate: float = 0.4,
    output: str = "logits",
) -> keras.Model:
    """Two 5x5 convolutions (32 and 64 filters), each max-pooled by 2, a 1024-wide dense layer
    with dropout, then the logits."""
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1); 0 turns dropout off")
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, strides=2, name="pool1")(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, strides=2, name="pool2")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout_rate)(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)  # float32 under mixed
    return emitting(keras.Model(inputs, logits, name="cnn_layers"), output)
