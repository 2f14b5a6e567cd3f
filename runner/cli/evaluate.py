"""`runner-eval`: a logged model's loss and accuracy on its data's test set, like the TF Layers
guide's `evaluate()`. Usage: `uv run runner-eval run_id=<run id>` or `model_uri=models:/<id>`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from runner.cli.train import CONF_DIR
from runner.config.schema import register_configs
from runner.errors import UserError, reported, run_hydra_app
from runner.targets import importable_from_cwd

if TYPE_CHECKING:  # NumPy loads where it is needed: --help and argument errors answer at once
    import numpy as np

register_configs()


def evaluate(cfg: DictConfig) -> dict[str, float | int | None]:
    """Loss, accuracy and the optimizer step the model reached. The command line and the store
    are checked before the backend loads, which takes seconds."""
    from runner.tracking.model_choice import check_choice

    check_choice(cfg.run_id, cfg.model_uri)
    from runner.tracking import logged_model, store

    store.connect(cfg.tracking.uri)
    from runner import backends

    uri = logged_model.locate(cfg.run_id, cfg.model_uri)
    backend = backends.select(str(cfg.backend or logged_model.backend_of(uri)))  # before Keras
    from runner import data
    from runner.config.schema import DataKeys
    from runner.config.settings import runner_keys
    from runner.models import classifier
    from runner.tracking.recorded import logged_environment
    from runner.training.fitting import evaluate_outputs

    found = logged_model.load(uri)
    data_cfg = test_data(cfg.data, found)
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


def fitted(test: Any, model: Any) -> Any:
    """`test` with its images laid out as `model` takes them (a model logged before the runner
    kept images as (height, width, channels) takes them as flat rows), refused where its images
    or its labels are not of the shape and the classes the model takes."""
    import numpy as np

    from runner.data import Split
    from runner.tracking.logged_model import input_shape

    shape = input_shape(model)
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


def test_data(given: Any, found: Any) -> Any:
    """The data option to test on: the one given (`data=NAME`), else the one the model's run
    trained on, with the keys given (`+data.KEY=VALUE`) changed."""
    from omegaconf import OmegaConf

    from runner.tracking.logged_model import logged_config

    if "_target_" in given:
        return given
    if found.run is None:
        raise UserError(
            f"{found.uri} has no training run to take its data from: name the data, "
            f"data=mnist (or data=npz +data.path=FILE)"
        )
    return OmegaConf.merge(logged_config(found.run).data, given)


def main() -> None:
    """The `runner-eval` command."""
    # MLflow draws a download bar on stderr for each of the run's small files it reads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    importable_from_cwd()
    run_hydra_app("runner-eval", run_hydra)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def run_hydra(cfg: DictConfig) -> None:
    with reported("runner-eval"):
        print(evaluate(cfg))
