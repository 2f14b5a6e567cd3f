"""The work of `runner-eval` once its command line is checked: load the logged model on its
backend and score it on a test set. Here, apart from `runner.cli.evaluate`, so that the command
answers `--help` and a wrong command line without loading MLflow."""

from typing import Any

import numpy as np
from omegaconf import OmegaConf

from runner import backends, data
from runner.config.schema import DataKeys, EvaluateConf
from runner.config.settings import runner_keys
from runner.data import Split
from runner.errors import UserError
from runner.models import classifier
from runner.tracking import logged_model, store
from runner.tracking.recorded import logged_environment


def evaluate(settings: EvaluateConf) -> dict[str, float | int | None]:
    """Loss, accuracy and the optimizer step the model reached. The store is checked before
    the backend loads, which takes seconds."""
    store.connect(settings.tracking.uri)
    uri = logged_model.locate(settings.run_id, settings.model_uri)
    backend = backends.select(str(settings.backend or logged_model.backend_of(uri)))
    from runner.training.fitting import evaluate_outputs  # Keras, once its backend is chosen

    found = logged_model.load(uri)
    data_cfg = test_data(settings.data, found)
    if found.run is not None and data_cfg.get("path"):  # a file whose change the run can tell
        data.warn_if_changed(data_cfg, logged_environment(found.run).get("data_file"))
    own = runner_keys(data_cfg, DataKeys, "data")
    test = fitted(data.load_test(data_cfg, own), found.model)
    outputs, loss = evaluate_outputs(found.model, test, own.eval_batch_size, backend)
    return {
        "loss": loss,
        "accuracy": classifier.accuracy(outputs, test.y),
        "global_step": logged_model.reached_step(found),
    }


def fitted(test: Split, model: Any) -> Split:
    """`test` with its images laid out as `model` takes them (a model logged before the runner
    kept images as (height, width, channels) takes them as flat rows), refused where its images
    or its labels are not of the shape and the classes the model takes."""
    shape = logged_model.input_shape(model)
    found = test.x.shape[1:]
    if len(found) == len(shape) and all(s in (None, f) for s, f in zip(shape, found, strict=True)):
        laid_out = test
    elif None not in shape and int(np.prod(shape)) == int(np.prod(found)):
        laid_out = Split(test.x.reshape(len(test.x), *shape), test.y)
    else:
        raise UserError(
            f"the model takes inputs of shape {shape} but the test images are {found}: evaluate "
            f"it on the data it trained on (leave data= out), or on data of its shape"
        )
    classes = _classes(model, laid_out.x)
    if len(laid_out.y) and int(laid_out.y.max()) >= classes:
        raise UserError(
            f"the model scores {classes} classes but the test labels reach "
            f"{int(laid_out.y.max())}: evaluate it on the data it trained on (leave data= out), "
            f"or on data of {classes} classes"
        )
    return laid_out


def _classes(model: Any, x: np.ndarray) -> int:
    """How many classes the model scores: its output's width."""
    try:
        return int(model.outputs[0].shape[-1])
    except (AttributeError, IndexError, TypeError):  # a subclassed model declares no output
        return int(model(x[:1], training=False).shape[-1])


def test_data(given: dict[str, Any], found: logged_model.LoggedModel) -> Any:
    """The data option to test on: the one given (`data=NAME`), else the one the model's run
    trained on, with the keys given (`+data.KEY=VALUE`) changed."""
    if "_target_" in given:
        return given
    if found.run is None:
        raise UserError(
            f"{found.uri} has no training run to take its data from: name the data, "
            f"data=mnist (or data=npz +data.path=FILE)"
        )
    return OmegaConf.merge(logged_model.logged_config(found.run).data, given)
