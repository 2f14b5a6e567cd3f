"""Find and load a model that a training run logged to MLflow, by run id or by model URI, and
read what its run says of it: its config, the step it reached, what it emits."""

from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from runner.errors import UserError
from runner.models import classifier, register_custom_objects
from runner.targets import import_code
from runner.tracking.access import refusal
from runner.tracking.model_choice import check_choice

# Keys of a logged model's MLmodel metadata: the module that its `_target_` names, which loading
# imports first, and the folder it was imported from when the model was logged.
MODULE_KEY, FOLDER_KEY = "module", "module_folder"


@dataclass(frozen=True)
class LoggedModel:
    model: Any
    uri: str
    run: Any  # the training run (mlflow.entities.Run), for its config


def locate(run_id: str | None, model_uri: str | None) -> str:
    """The URI of the model `run_id` logged, else `model_uri` (models:/, runs:/, a path), in
    the store that `runner.tracking.store.connect` pointed MLflow at: a wrong run is told before
    TensorFlow loads, which takes seconds."""
    check_choice(run_id, model_uri)
    return model_uri or _model_of_run(run_id)


def backend_of(uri: str) -> str:
    """The Keras backend the model at `uri` was saved on, as MLflow's Keras flavour records it
    (TensorFlow for a model saved before it did)."""
    try:
        if Path(uri).is_dir():
            flavors = mlflow.models.Model.load(uri).flavors
        else:
            flavors = mlflow.models.get_model_info(uri).flavors
    except MlflowException as error:
        raise UserError(f"cannot load the model: {error.message}") from None
    return flavors.get("keras", {}).get("keras_backend", "tensorflow")


def load(uri: str) -> LoggedModel:
    """The Keras model at `uri` (from `locate`), and its training run where this store has it."""
    register_custom_objects()
    try:
        if Path(uri).is_dir():  # a model saved or downloaded here: its store may be elsewhere
            info = mlflow.models.Model.load(uri)
        else:
            info = mlflow.models.get_model_info(uri)
        run = _run_if_known(info.run_id)
        metadata = info.metadata or {}
        name = _module_to_import(run, metadata)
        if name:
            import_code(name, metadata.get(FOLDER_KEY))
        model = mlflow.keras.load_model(uri)
    except MlflowException as error:
        raise UserError(f"cannot load the model: {error.message}") from None
    return LoggedModel(model, uri, run)


def _module_to_import(run: Any, metadata: dict[str, Any]) -> str | None:
    """What to import before the model loads: the run's `model._target_`, which models logged
    before their module was recorded have too, else the module the model's metadata records."""
    if run is not None:
        with suppress(UserError):  # a run logged by hand, without the runner's config.yaml
            name = OmegaConf.select(logged_config(run), "model._target_")
            if name:
                return str(name)
    return metadata.get(MODULE_KEY)


def _run_if_known(run_id: str | None) -> Any:
    """The run `run_id` in this store; None for a model without one, or whose run is in a store
    this command does not read."""
    if not run_id:
        return None
    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        return None


def _model_of_run(run_id: str) -> str:
    """The newest model the run logged: a resumed run logs one each time it ends."""
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as error:
        raise refusal(error, mlflow.get_tracking_uri()) or UserError(
            f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}: run this "
            f"where the run was recorded, or set MLFLOW_TRACKING_URI"
        ) from None
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    if not models:
        raise UserError(
            f"run {run_id} logged no model: it was trained with trainer.log_model=false (as "
            f"debug=quick sets); train it again with trainer.log_model=true"
        )
    return models[0].model_uri


def logged_config(run: Any) -> Any:
    """The resolved config the run trained with (its config.yaml artifact)."""
    try:
        return OmegaConf.create(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml"))
    except MlflowException as error:
        raise UserError(
            f"cannot read run {run.info.run_id}'s config.yaml: {error.message}"
        ) from None


def input_shape(model: Any) -> tuple[int | None, ...]:
    """The shape of one of the model's inputs: a functional or Sequential model declares it, a
    subclassed one keeps that of the call that built it."""
    try:
        return tuple(model.inputs[0].shape[1:])
    except (AttributeError, IndexError, TypeError):  # a subclassed model declares no input
        built = (model.get_build_config() or {}).get("input_shape")
    if not isinstance(built, list | tuple) or not built:
        raise UserError(
            f"the model, a {type(model).__name__}, records no input shape: it was saved before "
            f"it was called on any input"
        )
    return tuple(built[1:])


def reached_step(found: LoggedModel) -> int | None:
    """The optimizer step the model reached, which a run stopped early or resumed further than
    it was started for does not share with its `trainer.steps` parameter; that parameter for a
    model saved without its optimizer."""
    optimizer = getattr(found.model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        return int(optimizer.iterations.numpy())
    steps = found.run.data.params.get("trainer.steps") if found.run else None
    return int(steps) if steps else None


def emitted(found: LoggedModel) -> str:
    """What the model emits, logits or probabilities (`runner.models.classifier`): as its run's
    `model.output` says, else (a model without a run) probabilities if it ends in a softmax."""
    if found.run is not None:
        try:
            config = logged_config(found.run)
        except UserError:  # a run logged by hand, without the runner's config.yaml
            pass
        else:
            return classifier.output(config.get("model") or {})
    return (
        classifier.PROBABILITIES if classifier.ends_in_softmax(found.model) else classifier.LOGITS
    )
