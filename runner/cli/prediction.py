"""The work of `runner-predict` once its command line is checked: read the images, load the
logged model on its backend and classify them. Here, apart from `runner.cli.predict`, so that
the command answers `--help` and a wrong command line without loading MLflow."""

from pathlib import Path
from typing import NamedTuple

import numpy as np

from runner import backends
from runner.config.schema import PredictConf
from runner.data.images import open_image, pixels
from runner.models import classifier
from runner.tracking import logged_model, store


class Prediction(NamedTuple):
    """An image's class and the probability of each class."""

    path: Path
    label: int
    probabilities: np.ndarray

    def __str__(self) -> str:
        """The line `runner-predict` prints for the image."""
        shown = np.array2string(self.probabilities, precision=3, max_line_width=10**6)
        return f"{self.path}: class {self.label}, probabilities = {shown}"


def predict(settings: PredictConf, paths: list[Path]) -> list[Prediction]:
    """Each image's class and probabilities. The images and the store are checked before the
    backend loads, which takes seconds."""
    images = [open_image(p) for p in paths]
    store.connect(settings.tracking.uri)
    uri = logged_model.locate(settings.run_id, settings.model_uri)
    backends.select(str(settings.backend or logged_model.backend_of(uri)))  # before Keras loads
    found = logged_model.load(uri)
    shape = logged_model.input_shape(found.model)
    inputs = [pixels(i, p, shape, settings.invert) for i, p in zip(images, paths, strict=True)]
    if len({x.shape for x in inputs}) == 1:
        outputs = found.model.predict(np.stack(inputs), verbose=0)
    else:  # a model of any image size, given images of several sizes: one at a time
        outputs = np.concatenate([found.model.predict(x[np.newaxis], verbose=0) for x in inputs])
    probabilities = classifier.probabilities(outputs, logged_model.emitted(found))
    picked = classifier.classes(probabilities)
    return [
        Prediction(p, int(c), row) for p, c, row in zip(paths, picked, probabilities, strict=True)
    ]
