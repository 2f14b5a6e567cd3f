"""The runner's own small CNN for `experiment=speedrun`: few weights, batch-normalised, so that a
short, fast schedule reaches 99.2% on MNIST in seconds of CPU."""

import keras
from keras import layers

from runner.models.heads import emitting


def build_speedrun(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    filters: tuple[int, ...] = (16, 32, 64),
    kernel_size: int = 3,
    dense_units: int = 0,
    dropout_rate: float = 0.0,
    norm_momentum: float = 0.9,
    output: str = "logits",
) -> keras.Model:
    """One block per entry of `filters`: a same-padded convolution without bias, batch norm
    (its shift is the bias; its moving statistics, which evaluation uses, keep `norm_momentum`
    of themselves a step), ReLU, then a 2x2 max pool. The last block's maps are flattened, go
    through a ReLU layer of `dense_units` (none if 0), are dropped with `dropout_rate` while
    training, and are mapped to the logits. Batch norm is what lets a high learning rate train
    such a net in one or two epochs."""
    if not filters:
        raise ValueError("filters must name at least one convolution's channels")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1); 0 turns dropout off")
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = inputs
    for i, channels in enumerate(filters, start=1):
        x = layers.Conv2D(
            int(channels), kernel_size, padding="same", use_bias=False, name=f"conv{i}"
        )(x)
        x = layers.BatchNormalization(momentum=norm_momentum, name=f"norm{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten()(x)
    if dense_units:
        x = layers.Dense(int(dense_units), activation="relu", name="dense")(x)
    if dropout_rate:
        x = layers.Dropout(dropout_rate)(x)
    logits = layers.Dense(num_classes, name="logits", dtype="float32")(x)  # float32 under mixed
    return emitting(keras.Model(inputs, logits, name="speedrun"), output)
