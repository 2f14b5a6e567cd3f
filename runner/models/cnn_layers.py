"""The CNN of "A Guide to TF Layers": the raw-ops topology from stock layers and initialisers."""

import keras
from keras import layers


def build_cnn_layers(dropout_rate: float) -> keras.Model:
    inputs = keras.Input(shape=(784,), name="pixels")
    x = layers.Reshape((28, 28, 1))(inputs)
    x = layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, strides=2, name="pool1")(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, strides=2, name="pool2")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout_rate)(x)
    logits = layers.Dense(10, name="logits", dtype="float32")(x)  # float32 under mixed
    return keras.Model(inputs, logits, name="cnn_layers")
