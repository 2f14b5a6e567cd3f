"""What a classifier's outputs mean, decided here alone: whether a model emits logits or
probabilities, its outputs as probabilities and as logits, the class it picks, and the accuracy
of those classes. Training, `runner-eval`, `runner-predict`, the probabilities hook and a served
model all read a model's outputs through it, so they cannot disagree.

NumPy only (Keras where a built model is inspected): the same answers on any backend."""

from typing import Any

import numpy as np

# What a `model` option's `output` says its model emits (conf/model/*.yaml), and a logged model's
# MLmodel metadata records.
LOGITS, PROBABILITIES = "logits", "probabilities"


def output(model_cfg: Any) -> str:
    """What the `model` option `model_cfg` says its model emits: logits unless it says
    probabilities."""
    return str(model_cfg.get("output", LOGITS))


def ends_in_softmax(model: Any) -> bool:
    """Whether the built `model`'s last layer is a softmax, or has one as its activation: it
    emits probabilities, whatever a config says."""
    import keras

    layers = getattr(model, "layers", None)
    if not layers:
        return False
    last = layers[-1]
    return isinstance(last, keras.layers.Softmax) or (
        getattr(last, "activation", None) is keras.activations.softmax
    )


def probabilities(outputs: Any, emitted: str) -> np.ndarray:
    """The class probabilities of a batch of `outputs`, which are `emitted` (LOGITS or
    PROBABILITIES): as they are, or the logits' softmax, in float32."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if emitted == PROBABILITIES:
        return outputs
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def logits(outputs: Any, emitted: str) -> np.ndarray:
    """The logits of a batch of `outputs`, which are `emitted`: as they are, or the log of the
    probabilities (a probability of 0 as float32's smallest), in float32."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if emitted == LOGITS:
        return outputs
    return np.log(np.maximum(outputs, np.finfo(np.float32).tiny))


def classes(outputs: Any) -> np.ndarray:
    """The class each row of `outputs` ranks first: the same for logits and probabilities."""
    return np.asarray(outputs).argmax(axis=1)


def accuracy(outputs: Any, labels: np.ndarray) -> float:
    """The share of the rows of `outputs` whose class is their label."""
    return float(np.mean(classes(outputs) == labels))
