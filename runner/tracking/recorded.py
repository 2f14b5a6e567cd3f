"""What a run recorded, read back from the store: its config, the command line's overrides, its
environment and metric histories; saved as a golden file, and its config set against today's
or changed by `--set KEY=VALUE` for a rerun."""

import json
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from runner.config.schema import SECTIONS, keys
from runner.errors import UserError, did_you_mean
from runner.tracking import store
from runner.tracking.access import refusal
from runner.tracking.differences import History, environment_differences
from runner.tracking.golden import machine_key, write_golden
from runner.tracking.provenance import flatten

# Metrics that measure the machine (speed, memory, load), not the model: no two runs agree.
MEASUREMENTS = ("perf/", "system/")


def histories(client: Any, run: Any) -> History:
    """The run's result metrics, each as (step, value) points."""
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in sorted(run.data.metrics)
        if not key.startswith(MEASUREMENTS)
    }


def logged_environment(run: Any) -> dict:
    """The run's environment.json; empty for runs logged before the runner recorded one."""
    try:
        return json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/environment.json"))
    except MlflowException:
        return {}


def logged_run(run_id: str, tracking_uri: str) -> tuple[Any, Any]:
    """The run and its logged config, read from `tracking_uri`."""
    store.connect(tracking_uri)  # MLflow would retry an unreachable server for minutes
    client = mlflow.MlflowClient(tracking_uri)
    try:
        original = client.get_run(run_id)
        logged = mlflow.artifacts.load_text(f"{original.info.artifact_uri}/config.yaml")
    except MlflowException as error:
        raise refusal(error, tracking_uri) or UserError(
            f"cannot read run {run_id} in {tracking_uri}: {error.message}"
        ) from None
    logged_cfg = OmegaConf.create(logged)
    if OmegaConf.select(logged_cfg, "model._target_") is None:
        _refuse_older(original, "model._target_")
    return original, logged_cfg


def check_trainable(run: Any, logged: Any) -> None:
    """Refuse, in one line naming the key and the commit that recorded it, a logged config that
    lacks a key today's runner trains with: recorded by an earlier commit, before it existed."""
    needed = [
        f"{path}.{key}" if path else key
        for path, schema in SECTIONS
        for key in keys(schema)
        if (path, key) != ("", "callbacks")  # none unless a callback option is picked
    ]
    absent = object()
    lacking = [key for key in needed if OmegaConf.select(logged, key, default=absent) is absent]
    if lacking:
        _refuse_older(run, lacking[0])


def _refuse_older(run: Any, key: str) -> None:
    commit = run.data.tags.get("git_commit", "its git_commit tag")
    raise UserError(
        f"run {run.info.run_id} was recorded by an older runner, whose config names no {key}: "
        f"rerun it with the runner of its commit, {commit}"
    )


def logged_overrides(run: Any) -> list[str]:
    """The overrides of the command that started `run` (a sweep's job: its own), from the
    `hydra/overrides.yaml` Hydra wrote and the run logged."""
    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/hydra/overrides.yaml")
    except MlflowException:
        raise UserError(
            f"run {run.info.run_id} logged no hydra/overrides.yaml, so its command line is "
            f"unknown and a golden file could not tell a change in conf/: save a run that the "
            f"runner command started"
        ) from None
    return [str(override) for override in yaml.safe_load(text) or []]


def save(run_id: str, tracking_uri: str, path: Path) -> dict:
    """Write `run_id`'s golden file: its command line's overrides, config, environment and
    metric histories."""
    original, logged_cfg = logged_run(run_id, tracking_uri)
    return save_run(
        path,
        run=original,
        overrides=logged_overrides(original),
        config=OmegaConf.to_container(logged_cfg),
        tracking_uri=tracking_uri,
    )


def save_run(
    path: Path, *, run: Any, overrides: list[str], config: dict, tracking_uri: str
) -> dict:
    """Write golden file `path` of `run` in `tracking_uri`, started by the command-line
    `overrides` with the resolved `config`: those, and the run's environment and metric
    histories."""
    golden = {
        "run_id": run.info.run_id,
        "overrides": overrides,
        "config": config,
        "environment": logged_environment(run),
        "metrics": histories(mlflow.MlflowClient(tracking_uri), run),
    }
    write_golden(path, golden)
    return golden


def config_drift(recorded: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, recorded, now) for each dotted key of the resolved config `now` that differs from
    the `recorded` one, but for the MACHINE_KEYS."""
    return [row for row in environment_differences(recorded, now) if not machine_key(row[0])]


def machine_keys(recorded: dict, now: dict) -> list[tuple[str, Any]]:
    """(dotted key, recorded value) for each of the MACHINE_KEYS that the resolved config `now`
    sets too: the rerun reads the data where the file says (`--set data.dir=DIR` elsewhere), as a
    rerun of the `recorded` config did."""
    given = dict(flatten(now))
    return [
        (key, value)
        for key, value in flatten(recorded)
        if machine_key(key) and given.get(key) is not None
    ]


def overridden(logged: Any, overrides: list[str], whose: str) -> Any:
    """The logged config (`whose`: "run <id>", or a golden file) with `overrides` applied. A key
    it lacks is refused: merged, a misspelt key would be added beside the real one and the
    original rerun unchanged."""
    absent = object()
    for override in overrides:
        key = override.partition("=")[0].strip()
        was = OmegaConf.select(logged, key, default=absent)
        if was is absent:
            keys = [name for name, _ in flatten(OmegaConf.to_container(logged))]
            hint = did_you_mean(key, keys) or "see the run's config.yaml artifact"
            raise UserError(f"--set {override}: {whose}'s config has no key {key!r} ({hint})")
        if OmegaConf.is_config(was):
            raise UserError(
                f"--set {override}: {key} is a group of settings in {whose}'s config; set "
                f"its keys one by one (--set {key}.KEY=VALUE)"
            )
        now = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        if not _same_kind(was, now):
            raise UserError(
                f"--set {override}: {key} is {type(was).__name__} in {whose}'s config "
                f"({was!r}), not {type(now).__name__}"
            )
    return OmegaConf.merge(logged, OmegaConf.from_dotlist(overrides))


def _same_kind(was: Any, now: Any) -> bool:
    """Whether `now` may replace `was`: a number by a number (an int by an int), a flag by a
    flag; a text or an unset value by anything."""
    if was is None or isinstance(was, str):
        return True
    if isinstance(was, bool) or isinstance(now, bool):
        return isinstance(was, bool) and isinstance(now, bool)
    if isinstance(was, int):
        return isinstance(now, int)
    return isinstance(now, int | float)
