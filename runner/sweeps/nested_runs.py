"""Hydra multirun as nested MLflow runs: one parent run a sweep, each job a child under it.

Hydra calls `NestedRuns` in the process that starts the sweep; the jobs find the parent run
through `runner.sweeps.jobs`. When the sweep ends, the parent gets the comparison of its children.
A sweeper whose search several processes share (the runner's Optuna sweeper on a stored study)
has them share one parent run, closed by the last of them to end.
"""

import atexit
import contextlib
import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig

from runner.errors import UserError, reported
from runner.masking import mask
from runner.sweeps import slurm
from runner.sweeps.jobs import SWEEP_FILE, sweep_keys
from runner.tracking import comparison, registry, store
from runner.tracking.identity import SWEEP_DIR_TAG
from runner.tracking.registry import Registration

log = logging.getLogger(__name__)

COMPARISON_TABLE = "sweep/comparison.json"
CURVES_PLOT = "sweep/val_accuracy.png"


class NestedRuns(Callback):
    """Opens the sweep's parent run before the first job and closes it after the last, with a
    comparison of its children. A sweep that stops early still ends its parent, as FAILED.
    Hydra hands it the whole config; it takes what it needs at once."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.optimized_metric = "val/accuracy"
        # trainer.register_as and its companions: the best job's model is registered at the end.
        self.registration: Registration | None = None
        # The sweeper's way of sharing the parent with its search's other processes, if any.
        self.shared: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra, tracking = config.hydra, config.tracking
        sweep_dir = Path(hydra.sweep.dir).absolute()
        overrides = list(hydra.overrides.task)
        # Hydra would make any exception raised here a warning and run the jobs all the same.
        with reported("runner"):
            try:
                _check_registration_not_swept(overrides, list(hydra.sweeper.get("params") or {}))
                check = before_sweep(hydra.sweeper._target_)
                if check is not None and not check(config):  # the sweeper says why, later
                    _drop_if_empty(sweep_dir)
                    return
                store.open_store(tracking.uri, tracking.experiment_name)
            except UserError:
                _drop_if_empty(sweep_dir)
                raise
        slurm.prepare_sweep(hydra.launcher)
        tags = {
            SWEEP_DIR_TAG: str(sweep_dir),
            "sweep.overrides": mask(" ".join(overrides)),
            "sweep.sweeper": hydra.sweeper._target_.rsplit(".", 1)[-1],
            "sweep.launcher": hydra.launcher._target_.rsplit(".", 1)[-1],
        }
        share = getattr(get_class(hydra.sweeper._target_), "shared_parent", None)
        self.shared = share(config) if share else None
        self._open_parent(tracking.experiment_name, tags, sweep_keys(overrides, swept=False))
        self.optimized_metric = config.optimized_metric
        self.registration = registry.registration(config.trainer, config.optimized_metric)

    def _open_parent(self, experiment_name: str, tags: dict[str, str], fixed: list[str]) -> None:
        """Create the sweep's parent run, with `tags`, or join the one its search's other
        processes share, and write its id into the sweep folder for the jobs, with the keys the
        command line gives one value (`fixed`)."""
        sweep_dir = Path(tags[SWEEP_DIR_TAG])
        experiment_id = mlflow.get_experiment_by_name(experiment_name).experiment_id
        open_parent = functools.partial(
            mlflow.MlflowClient().create_run,
            experiment_id,
            run_name=f"sweep {tags['sweep.overrides']}"[:250],
            tags=tags,
        )
        if self.shared is None:
            self.parent_run_id = open_parent().info.run_id
        else:
            self.parent_run_id = self.shared.join(lambda: open_parent().info.run_id)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(
            json.dumps(
                {
                    "parent_run_id": self.parent_run_id,
                    # The jobs record here too, whatever their own data (and so default
                    # experiment name) is: a sweep's runs stay in one experiment.
                    "experiment_name": experiment_name,
                    "fixed": fixed,
                }
            )
        )
        log.info(
            "MLflow parent run %s for the sweep in %s: %s",
            self.parent_run_id,
            sweep_dir,
            store.ui_link(experiment_id, self.parent_run_id),
        )
        # Hydra skips on_multirun_end when a job fails or the sweep is interrupted.
        atexit.register(self._finish, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish("FINISHED")
        atexit.unregister(self._finish)

    def _finish(self, status: str) -> None:
        if self.parent_run_id is None:
            return
        client = mlflow.MlflowClient()
        if self.shared is not None:
            status = self._shared_status(client, status)
            if status is None:
                return
        try:
            summarize(client, self.parent_run_id, self.optimized_metric)
        except Exception as error:  # the parent must still end, whatever the summary hit
            log.warning("could not summarise the sweep in its parent run: %s", error)
        refused = None
        if status == "FINISHED" and self.registration:
            try:
                self._register_best(client)
            except Exception as error:  # Hydra would make it a warning, and the sweep exit 0
                refused = (
                    error
                    if isinstance(error, UserError)
                    else UserError(f"cannot register the sweep's best model: {error}")
                )
                status = "FAILED"
                client.set_tag(self.parent_run_id, "error", mask(str(refused)))
        if status == "FAILED" and refused is None:
            client.set_tag(
                self.parent_run_id,
                "error",
                "the sweep did not complete: a job failed or it was interrupted (see its log)",
            )
        client.set_terminated(self.parent_run_id, status)
        self.parent_run_id = None
        if refused:
            with reported("runner"):
                raise refused

    def _shared_status(self, client: Any, status: str) -> str | None:
        """None while another process still runs a trial of the shared search: the parent is
        left to it, marked with this process's error if it failed. Else the status to end the
        parent with: FAILED if a process that left before failed."""
        if self.shared.others_at_work():
            if status == "FAILED":
                client.set_tag(self.parent_run_id, "error", "a process of the search failed")
            log.info(
                "MLflow parent run %s is left to the search's other processes", self.parent_run_id
            )
            self.parent_run_id = None
            return None
        failed = "error" in client.get_run(self.parent_run_id).data.tags
        return "FAILED" if failed else status

    def _register_best(self, client: Any) -> None:
        """Register the model of the child best by optimized_metric (summarize tagged it)."""
        best = client.get_run(self.parent_run_id).data.tags.get("sweep.best_run_id")
        if best is None:
            raise UserError("no job of the sweep has a result to register its model by")
        name = self.registration.name
        version = registry.register(best, self.registration)
        client.set_tag(self.parent_run_id, "registered", f"models:/{name}/{version}")


def _drop_if_empty(folder: Path) -> None:
    """Remove the sweep's folder of a sweep that launches nothing, if nothing was written there."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def before_sweep(sweeper: str) -> Callable[[DictConfig], bool] | None:
    """How the sweeper class `sweeper` says whether the sweep will launch any job, asked before
    its parent run exists: Hydra calls `on_multirun_start` before it builds the sweeper, so a
    sweeper that refused to start or had nothing to run would otherwise leave an empty parent
    run. A sweeper class takes part with a classmethod `check_before_sweep(config) -> bool`,
    which returns False when there is nothing to run and raises a `UserError` to refuse."""
    return getattr(get_class(sweeper), "check_before_sweep", None)


def summarize(client: Any, parent_run_id: str, optimized_metric: str) -> None:
    """Log the children's comparison table and validation curves to the parent run, and the
    best finished child's `optimized_metric` as the parent's `best/...` metric."""
    from runner.tracking import plots  # matplotlib: half a second that a single run need not spend

    parent = client.get_run(parent_run_id)
    runs = comparison.children(parent.info.experiment_id, parent_run_id)
    if runs.empty:
        return
    rows = comparison.table(runs, comparison.DEFAULT_METRICS, sort_by=optimized_metric)
    client.log_table(parent_run_id, data=rows, artifact_file=COMPARISON_TABLE)
    curves = comparison.curves(runs, comparison.CURVE)
    client.log_figure(parent_run_id, plots.sweep_curves(curves, comparison.CURVE), CURVES_PLOT)
    best = rows[optimized_metric][rows["status"] == "FINISHED"].dropna()  # not pruned trials
    if not best.empty:
        client.log_metric(parent_run_id, f"best/{optimized_metric}", float(best.iloc[0]))
        client.set_tag(parent_run_id, "sweep.best_run_id", rows["run_id"][best.index[0]])


def _check_registration_not_swept(overrides: list[str], searched: list[str]) -> None:
    """A sweep registers its best job's model once, at its end, under one name: refuse a sweep
    over trainer.register_as, its alias or force (in the command line's `overrides`, or the
    sweeper's `searched` keys), which would register nothing."""
    for key in sweep_keys(overrides, swept=True) + searched:
        if key.lstrip("+~").startswith("trainer.register_"):
            raise UserError(
                f"{key} cannot be swept: a sweep registers its best job's model once, under one "
                f"name; give it one value, or run a sweep for each"
            )
