"""Register a run's logged model in MLflow's Model Registry and move an alias onto it, only when
it beats the model the alias holds (`models:/NAME@champion` stays the best found so far).

A new version of registered model NAME is made either way, tagged with its run, the run's
overrides and the metric that chose it; the alias moves to it if its metric is better than the
aliased version's run's (lower for a loss, higher otherwise), or when forced."""

import logging
from dataclasses import dataclass
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from runner.errors import UserError
from runner.tracking.logged_model import locate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """Where a run's model is registered (`trainer.register_as` and its companions): as a new
    version of `name`, `alias` moving onto it if its `metric` beats the aliased one's, or
    `force`d."""

    name: str
    alias: str
    metric: str
    force: bool = False


def registration(trainer: Any, metric: str) -> Registration | None:
    """What the `trainer` settings register, chosen by `metric` (`optimized_metric`); None
    when they register nothing."""
    if not trainer.register_as:
        return None
    return Registration(trainer.register_as, trainer.register_alias, metric, trainer.register_force)


def register(run_id: str, registration: Registration) -> str:
    """A new version of the registered model from `run_id`'s newest logged model, returned;
    the alias moves onto it if its run's final metric beats the aliased version's run's, or if
    forced."""
    name, alias, metric = registration.name, registration.alias, registration.metric
    client = mlflow.MlflowClient()
    try:
        value = _final(client, run_id, metric)
        if value is None:
            raise UserError(
                f"run {run_id} has no {metric} to register its model by: set optimized_metric "
                f"to one of its metrics"
            )
        current = _aliased(client, name, alias)
        held = _final(client, current.run_id, metric) if current and current.run_id else None
        tags = {"run_id": run_id, "overrides": _overrides(run_id), "chosen_by": f"{metric}={value}"}
        version = mlflow.register_model(locate(run_id, None), name, tags=tags).version
        moved = registration.force or held is None or _better(value, held, metric)
        if moved:
            client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        raise UserError(
            f"cannot register run {run_id}'s model as {name!r}: {error.message}"
        ) from None
    if moved:
        log.info("registered models:/%s/%s, now models:/%s@%s", name, version, name, alias)
    else:
        log.info(
            "registered models:/%s/%s; %s stays on version %s, whose %s %s this one's %s does "
            "not beat (trainer.register_force=true moves it anyway)",
            *(name, version, alias, current.version, metric, held, value),
        )
    return str(version)


def run_of(uri: str) -> str:
    """The run that logged the model a registry URI names: models:/NAME/VERSION or
    models:/NAME@ALIAS."""
    name, _, which = uri.removeprefix("models:/").partition("@")
    if not which and "/" not in name:  # a logged model's id, models:/m-...
        try:
            return mlflow.get_logged_model(name).source_run_id
        except MlflowException as error:
            raise UserError(f"no model {uri} in this store: {error.message}") from None
    try:
        if which:
            version = mlflow.MlflowClient().get_model_version_by_alias(name, which)
        else:
            name, _, number = name.rpartition("/")
            version = mlflow.MlflowClient().get_model_version(name, number)
    except MlflowException as error:
        raise UserError(
            f"no registered model version {uri} in this store: {error.message}"
        ) from None
    if not version.run_id:
        raise UserError(f"{uri} was registered from no run, so nothing says how to train it")
    return version.run_id


def _overrides(run_id: str) -> str:
    """The command-line overrides the run was started with, as Hydra logged them."""
    try:
        logged = mlflow.artifacts.load_text(f"runs:/{run_id}/hydra/overrides.yaml")
    except MlflowException:
        return ""  # trained without a `runner` command
    return " ".join(yaml.safe_load(logged) or [])


def _aliased(client: Any, name: str, alias: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None  # no such alias yet


def _final(client: Any, run_id: str, metric: str) -> float | None:
    return client.get_run(run_id).data.metrics.get(metric)


def _better(value: float, than: float, metric: str) -> bool:
    return value < than if "loss" in metric else value > than
