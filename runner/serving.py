"""The logged model as MLflow serves it: `mlflow models serve` and `mlflow.pyfunc.load_model`
answer, for each image, its class, its probabilities and its logits.

A model is saved in MLflow's Keras flavour, which `runner-eval` and `runner-predict` load, with
this module as its pyfunc loader instead of `mlflow.keras`, whose pyfunc hands back the raw
output, takes only the exact input shape and answers a bad request with a server error. Images
are taken as the data loaders take them: float pixels as they are, integers as 0-255 pixels
scaled to [0, 1]; each flat, H x W x C, or H x W for one channel. A request that is not such a
batch is refused with a message and HTTP 400.
"""

import os
import sys
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

from runner.models import register_custom_objects

# What the model emits, in the MLmodel file's metadata: "logits" or "probabilities".
OUTPUT_KEY = "output"
SIGNATURE = ModelSignature(
    outputs=Schema(
        [
            ColSpec("long", "class"),
            ColSpec(Array("float"), "probabilities"),
            ColSpec(Array("float"), "logits"),
        ]
    )
)


def log_model(model: Any, name: str, output: str, pip_requirements: list[str]) -> None:
    """Log `model` (which emits `output`) to the active run as MLflow model `name`."""
    Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        flavor_name="keras",
        model=model,
        output=output,
        pip_requirements=pip_requirements,
    )


def save_model(
    model: Any, path: str, output: str, mlflow_model: Model | None = None, **kwargs: Any
) -> None:
    """`mlflow.keras.save_model`, with this module as the pyfunc loader and its signature: what
    `Model.log` calls."""
    mlflow_model = mlflow_model or Model()
    mlflow.keras.save_model(
        model, path, mlflow_model=mlflow_model, metadata={OUTPUT_KEY: output}, **kwargs
    )
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.signature = SIGNATURE
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(path: str) -> "Classifier":
    """What `mlflow.pyfunc.load_model` calls with the model's folder."""
    register_custom_objects()
    meta = Model.load(os.path.join(path, "MLmodel"))
    return Classifier(mlflow.keras.load_model(path), meta.metadata[OUTPUT_KEY])


class Classifier:
    """A Keras classifier's answers per image: class, probabilities and logits."""

    def __init__(self, model: Any, output: str):
        self.model, self.output = model, output
        self.shape = tuple(model.input_shape[1:])

    def predict(self, data: Any, params: dict | None = None) -> Any:
        import pandas as pd

        outputs = self.model.predict(self.images(data), batch_size=1000, verbose=0)
        outputs = outputs.astype(np.float32)
        if self.output == "probabilities":
            probabilities = outputs
            logits = np.log(np.maximum(outputs, np.finfo(np.float32).tiny))
        else:
            logits = outputs
            shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return pd.DataFrame(
            {
                "class": probabilities.argmax(axis=1),
                "probabilities": list(probabilities),
                "logits": list(logits),
            }
        )

    def images(self, data: Any) -> np.ndarray:
        """`data` as a batch of the model's input shape, or an `MlflowException` that the
        server answers with HTTP 400."""
        if isinstance(data, dict):
            raise _refused(f"expected one array of images, not named inputs {sorted(data)}")
        if hasattr(data, "to_numpy"):  # a DataFrame: a row per image
            data = data.to_numpy()
        try:
            x = np.asarray(data)
        except ValueError as error:  # ragged lists
            raise _refused(f"the images are not one array: {error}") from None
        if x.ndim == 0 or len(x) == 0:
            raise _refused("the batch is empty: send at least one image")
        if x.ndim == 1:
            raise _refused("send a list of images, even of one: [[...]], not [...]")
        if x.dtype.kind not in "iuf":
            raise _refused(f"pixels must be numbers, not {x.dtype} values")
        pixels = int(np.prod(self.shape))
        shapes = {self.shape, (pixels,)} | ({self.shape[:-1]} if self.shape[-1] == 1 else set())
        if tuple(x.shape[1:]) not in shapes:
            wanted = " or ".join(str(s) for s in sorted(shapes, key=len, reverse=True))
            raise _refused(f"each image must have shape {wanted}, not {tuple(x.shape[1:])}")
        if x.dtype.kind in "iu":
            if x.min() < 0 or x.max() > 255:
                raise _refused("integer pixels must lie in 0-255 (floats are taken as they are)")
            x = x / 255.0
        return x.astype(np.float32).reshape((len(x), *self.shape))


def _refused(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)
