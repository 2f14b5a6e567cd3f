"""A network of your own for the runner, to copy. From this folder:
`uv run runner --config-dir conf model=tiny_net` (conf/model/tiny_net.yaml names this builder)."""

import keras
from keras import layers


def build(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> keras.Model:
    """A small CNN for images of any size and channels. The runner passes the data's
    `input_shape` (height, width, channels) and `num_classes`, and the config's other keys
    (`width` here); it compiles and trains the model, so return it uncompiled, emitting logits."""
    inputs = keras.Input(shape=input_shape)
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(2 * width, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    # float32 logits even under mixed precision (device.precision), as the tutorial models do.
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="tiny_net")
