"""The work of `runner-repro` once its arguments are checked: train a logged run or a golden file
again, from its recorded config, and say whether every metric history agrees. Here, above the
training it starts, so that `runner.cli.repro` answers `--help` without loading MLflow."""

import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.cli.train import compose, train
from runner.errors import UserError, misspelt_key, one_line, reported
from runner.targets import check_importable
from runner.tracking import registry, store
from runner.tracking.differences import (
    History,
    compare,
    environment_differences,
    environment_report,
    report,
)
from runner.tracking.golden import golden_rtol, load_golden, refuse_drift, write_golden
from runner.tracking.recorded import (
    check_trainable,
    config_drift,
    histories,
    logged_environment,
    logged_run,
    machine_keys,
    overridden,
    save,
)


def save_golden(given: str, path: Path) -> None:
    """`runner-repro RUN_ID --save FILE`: write the run's golden file, saying how to check it."""
    with reported("runner-repro"):
        golden = save(_run_id(given, store.default_uri()), store.default_uri(), path)
    points = sum(len(points) for points in golden["metrics"].values())
    print(
        f"wrote {path}: run {given}'s config, environment and {points} metric "
        f"points; check it anywhere with: runner-repro --golden {path}"
    )


def rerun_golden(
    path: Path, overrides: list[str], *, update: bool, rtol: float | None, atol: float
) -> None:
    """`runner-repro --golden FILE`: rerun the file and say whether it agrees (exit 1 where it
    does not); with `update`, rewrite it instead."""
    with reported("runner-repro"):
        golden, found, environment = check_golden(path, overrides, update)
    if update:
        points = sum(len(points) for points in found.values())
        print(
            f"updated {path}: today's config, this environment and {points} metric "
            f"points of its rerun; check it with: runner-repro --golden {path}"
        )
        return
    logged = golden["environment"]
    rtol = golden_rtol(logged, environment, rtol)
    print(f"golden file {path}, rerun in a scratch store")
    verdict(golden["metrics"], found, logged=logged, environment=environment, rtol=rtol, atol=atol)


def rerun_run(given: str, overrides: list[str], *, rtol: float, atol: float) -> None:
    """`runner-repro RUN_ID`: rerun the run in its store and say whether it agrees (exit 1 where
    it does not)."""
    with reported("runner-repro"):
        run_id = _run_id(given, store.default_uri())
        original, repeat = rerun(run_id, store.default_uri(), overrides)
    client = mlflow.MlflowClient(store.default_uri())
    expected, found = histories(client, original), histories(client, repeat)
    logged, environment = (logged_environment(run) for run in (original, repeat))
    print(f"original run {original.info.run_id}, rerun {repeat.info.run_id}")
    verdict(expected, found, logged=logged, environment=environment, rtol=rtol, atol=atol)


def verdict(
    expected: History, found: History, *, logged: dict, environment: dict, rtol: float, atol: float
) -> None:
    """Print that every history agrees, or the first differing step of each metric and exit 1;
    with the environment keys that differ between the `logged` run and its rerun."""
    differences = compare(expected, found, rtol, atol)
    changed = environment_differences(logged, environment)
    if not differences:
        print(f"every metric history agrees (rtol={rtol}, atol={atol})")
        if changed:
            print(environment_report(changed))
        return
    print(report(differences, changed))
    sys.exit(1)


def rerun(run_id: str, tracking_uri: str, overrides: list[str]) -> tuple[Any, Any]:
    """Train again from `run_id`'s logged config changed by `overrides` (KEY=VALUE, as
    `runner-repro` checked them); returns (original run, new run). The overrides and the store
    are checked before anything trains."""
    original, logged_cfg = logged_run(run_id, tracking_uri)
    check_trainable(original, logged_cfg)
    # A fresh folder, so the rerun neither resumes from nor overwrites the original's checkpoints.
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = Path("outputs") / "repro" / f"{run_id}_{stamp}"
    cfg = overridden(logged_cfg, overrides, f"run {run_id}")
    # Near the run's own checkpoints is the folder it ran from, where its model's module is.
    # Checked only: importing it could load Keras before the rerun chooses the run's backend.
    check_importable(cfg.model._target_, near=cfg.trainer.checkpoint_dir)
    return original, train_again(cfg, tracking_uri, folder, run_id)


def train_again(cfg: Any, tracking_uri: str, folder: Path, of: str) -> Any:
    """Train `cfg` into `tracking_uri`, its checkpoints in `folder`, tagged `repro_of=<of>`;
    returns the new run."""
    cfg.tracking.uri = tracking_uri
    cfg.trainer.checkpoint_dir = str(folder / "checkpoints")
    cfg.trainer.resume = False
    if cfg.trainer.get("register_as"):
        cfg.trainer.register_as = None  # a rerun checks the model; it is no new version of it
    train(cfg, tags={"repro_of": of})
    return mlflow.MlflowClient(tracking_uri).get_run(mlflow.last_active_run().info.run_id)


def check_golden(path: Path, overrides: list[str], update: bool = False) -> tuple[dict, Any, dict]:
    """Compose today's conf/ with golden file `path`'s overrides and rerun it (changed by
    `overrides`, KEY=VALUE, as `runner-repro` checked them) in a scratch store, deleted
    afterwards; returns (golden, its rerun's histories, the rerun's environment). A config that
    differs from the one the file recorded is refused before anything trains, unless `update`:
    then the file is rewritten with today's config and the rerun's environment and histories."""
    golden = load_golden(path)
    cfg = composed(golden["overrides"], path)
    now = OmegaConf.to_container(cfg, resolve=True)
    drift = config_drift(golden["config"], now)
    if not update:
        refuse_drift(path, drift)
    for key, value in machine_keys(golden["config"], now):
        OmegaConf.update(cfg, key, value)
    cfg = overridden(cfg, overrides, str(path))
    today = OmegaConf.to_container(cfg, resolve=True)
    with tempfile.TemporaryDirectory(prefix="runner-repro-") as scratch:
        uri = f"sqlite:///{scratch}/mlflow.db"
        repeat = train_again(cfg, uri, Path(scratch), str(golden.get("run_id", path)))
        found = histories(mlflow.MlflowClient(uri), repeat)
        environment = logged_environment(repeat)
    if update:
        write_golden(
            path, {**golden, "config": today, "environment": environment, "metrics": found}
        )
    return golden, found, environment


def composed(overrides: list[str], path: Path) -> Any:
    """The config `runner OVERRIDES` composes from today's conf/."""
    try:
        return compose(overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(
            f"{path}: today's conf/ cannot compose its overrides {' '.join(overrides)} "
            f"({misspelt_key(error) or one_line(error)}); after an intended change, write it "
            f"anew from a run of today's config with runner-repro RUN_ID --save {path}"
        ) from None


def _run_id(given: str, tracking_uri: str) -> str:
    """`given`, or the run that logged the model a models:/ URI names."""
    if not given.startswith("models:/"):
        return given
    store.connect(tracking_uri)
    return registry.run_of(given)
