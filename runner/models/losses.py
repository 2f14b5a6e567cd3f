"""Losses written as a tutorial writes them, where that differs from Keras's own."""

from collections.abc import Callable

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="runner")
def cross_entropy_of_probabilities(labels, probabilities):
    """The R edition's `-reduce_sum(y_ * log(y), 1)` on softmax outputs, without the clipping
    Keras applies to probabilities; Keras averages it over the batch, as its `reduce_mean` does.

    With one-hot `y_` the sum has one non-zero term, -log(y[label]); taking that term alone
    also spares the other classes' 0 * log(0) = NaN when a probability underflows.
    """
    labels = ops.cast(ops.reshape(labels, (-1, 1)), "int32")
    return -ops.squeeze(ops.take_along_axis(ops.log(probabilities), labels, axis=-1), axis=-1)


def probabilities_cross_entropy() -> Callable:
    """`cross_entropy_of_probabilities` itself, for `conf/loss/`: a config's `_target_` is
    called, and Keras takes the function as the loss."""
    return cross_entropy_of_probabilities
