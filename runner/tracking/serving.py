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
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

from runner.models import classifier, register_custom_objects
from runner.targets import code_of, import_code, importable_from_cwd
from runner.tracking.logged_model import FOLDER_KEY, MODULE_KEY, input_shape

# What the model emits, in the MLmodel file's metadata: runner.models.classifier's LOGITS or
# PROBABILITIES.
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


def log_model(
    model: Any, *, name: str, output: str, target: str, pip_requirements: list[str]
) -> None:
    """Log `model` (which emits `output`, built by `_target_` `target`) to the active run as
    MLflow model `name`."""
    Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        flavor_name="keras",
        model=model,
        output=output,
        target=target,
        pip_requirements=pip_requirements,
    )


def save_model(
    model: Any,
    path: str,
    *,
    output: str,
    target: str,
    mlflow_model: Model | None = None,
    **kwargs: Any,
) -> None:
    """`mlflow.keras.save_model`, with this module as the pyfunc loader and its signature: what
    `Model.log` calls."""
    mlflow_model = mlflow_model or Model()
    module, folder = code_of(target)
    metadata = {OUTPUT_KEY: output, MODULE_KEY: module, FOLDER_KEY: folder}
    mlflow.keras.save_model(model, path, mlflow_model=mlflow_model, metadata=metadata, **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.signature = SIGNATURE
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(path: str) -> "Classifier":
    """What `mlflow.pyfunc.load_model` calls with the model's folder."""
    register_custom_objects()
    meta = Model.load(os.path.join(path, "MLmodel"))
    if meta.metadata.get(MODULE_KEY):  # not in models logged before it was recorded
        importable_from_cwd()
        import_code(meta.metadata[MODULE_KEY], meta.metadata.get(FOLDER_KEY))
    return Classifier(mlflow.keras.load_model(path), meta.metadata[OUTPUT_KEY])


class Classifier:
    """A Keras classifier's answers per image: class, probabilities and logits."""

    def __init__(self, model: Any, output: str):
        self.model, self.output = model, output
        self.shape = input_shape(model)

    def predict(self, data: Any, params: dict | None = None) -> Any:
        outputs = self.model.predict(self.images(data), batch_size=1000, verbose=0)
        probabilities = classifier.probabilities(outputs, self.output)
        return pd.DataFrame(
            {
                "class": classifier.classes(probabilities),
                "probabilities": list(probabilities),
                "logits": list(classifier.logits(outputs, self.output)),
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
        if x.ndim == 0:
            raise _refused(f"send a list of images, not one value ({x.item()!r:.60})")
        if len(x) == 0:
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
        elif not np.isfinite(x).all():
            first = tuple(np.argwhere(~np.isfinite(x))[0])
            raise _refused(f"pixels must be finite numbers, but image {first[0]} holds {x[first]}")
        return x.astype(np.float32).reshape((len(x), *self.shape))


def _refused(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)
