"""A run's lifecycle in MLflow: opened (new, reopened by a resume, or extending an earlier run),
and ended FINISHED, KILLED or FAILED, with the error in a tag, whatever happens inside.

A run whose server stopped answering (`ServerLost`) stays RUNNING there, if the server cannot
be told, and is reopened by its resume.
"""

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import mlflow
from mlflow import ActiveRun
from mlflow.exceptions import MlflowException

from runner.config.schema import TrackingConf
from runner.errors import Interrupted, ServerLost, UserError
from runner.masking import mask
from runner.tracking.identity import RunIdentity
from runner.tracking.provenance import Provenance
from runner.tracking.recorder import PRUNED_TAG, Recorder
from runner.tracking.store import BATCH, one_attempt, ui_link, unanswered

log = logging.getLogger(__name__)


class SignalHolder(Protocol):
    """What holds the stop signals back while MLflow opens a run, as
    `runner.training.stopping.Stops` does: MLflow creates a run, then starts its system
    metrics, then makes it the active run, and a run stopped in between could not be ended."""

    def held(self) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class Resumed:
    """The run a resumed checkpoint recorded into, which this run carries on."""

    run_id: str
    # The metrics the checkpoint holds that the server had not taken.
    unrecorded: list[list[Any]] | None = None
    # Resumed with more trainer.steps: a new run carries the old one's history on, as MLflow's
    # params cannot change; its validations fall every `eval_every` steps.
    extends: bool = False
    eval_every: int = 1


@contextmanager
def mlflow_run(
    tracking: TrackingConf,
    identity: RunIdentity,
    provenance: Provenance,
    *,
    stops: SignalHolder,
    tags: dict[str, str] | None = None,
    resumed: Resumed | None = None,
) -> Iterator[Recorder]:
    """One MLflow run around the training, as `tracking` settings say, named and placed as
    `identity` says, with `tags`; it ends FAILED (with an `error` tag) if anything raises.

    A new run records its config and data, and every run its environment (`provenance`), so
    that a run can be rerun and a difference explained. A `resumed` run is reopened, its config
    already logged; or, if it `extends` the old run, a new run carries that run's history on
    (tagged `extends`). `stops` holds the stop signals while MLflow opens the run. Call
    `runner.tracking.store.open_store` first.
    """
    reopen = resumed.run_id if resumed and not resumed.extends else None
    with _started(tracking, identity, reopen, stops) as run:
        recorder = None
        try:
            run_id = run.info.run_id
            log.info(
                "MLflow run %s in experiment %r: %s",
                run_id,
                identity.experiment_name,
                ui_link(run.info.experiment_id, run_id),
            )
            history = _history(run_id, resumed)
            provenance.log(new=reopen is None)
            mlflow.set_tags(tags or {})
            recorder = Recorder(
                run_id,
                history=history,
                flush_every_s=tracking.metrics_flush_every_s,
                patience_s=tracking.server_patience_s,
                unrecorded=resumed.unrecorded if resumed else None,
            )
            yield recorder
            recorder.flush(final=True)
            if recorder.end_status != "FINISHED":
                mlflow.end_run(recorder.end_status)  # the context manager would say FINISHED
        except ServerLost as error:
            _leave(error, "KILLED")
            raise
        except MlflowException as error:
            if not unanswered(error):
                _fail(error, recorder)
                raise
            raise _lost(error, tracking.uri) from None
        except BaseException as error:
            _fail(error, recorder)
            raise


def _started(
    tracking: TrackingConf, identity: RunIdentity, reopen: str | None, stops: SignalHolder
) -> ActiveRun:
    """The run MLflow opens: `reopen` if given, else a new one, nested under the sweep's parent
    run if it has one; with system metrics (psutil; nvidia-ml-py for GPUs) sampled on a thread
    while it is on. A stop that comes while it opens ends it KILLED."""
    mlflow.set_system_metrics_sampling_interval(tracking.system_metrics_every_s)
    try:
        with stops.held():
            return mlflow.start_run(
                run_id=reopen,
                run_name=None if reopen else identity.name,
                nested=identity.parent_run_id is not None,
                parent_run_id=None if reopen else identity.parent_run_id,
                log_system_metrics=tracking.system_metrics,
            )
    except KeyboardInterrupt as error:
        if mlflow.active_run() is not None:
            _fail(error, None)
        raise


def _history(run_id: str, resumed: Resumed | None) -> dict[str, list[tuple[int, float]]] | None:
    """The metric histories the run starts from: a reopened run's own, or those an extending
    run carries on; None for a new run."""
    if resumed is None:
        return None
    if not resumed.extends:
        return _reopen(resumed.run_id)
    return _carry_on(resumed.run_id, run_id, resumed.eval_every)


def _lost(error: MlflowException, uri: str) -> UserError:
    """The run left as `_leave` leaves it, and the one-line error of a server that stopped
    answering: MLflow has retried for minutes already."""
    _leave(error, "FAILED")
    return UserError(
        f"the MLflow tracking server {mask(uri)} stopped answering "
        f"({mask(error.message)[:300]}): start it again, then run the command again"
    )


def _fail(error: BaseException, recorder: Recorder | None) -> None:
    """End the active run FAILED, or KILLED if interrupted, with its error as a tag."""
    _keep_metrics(recorder)
    mlflow.set_tag("error", _error_tag(error))
    if isinstance(error, Interrupted | KeyboardInterrupt):
        mlflow.end_run("KILLED")  # the context manager would record FAILED


def _leave(error: BaseException, status: str) -> None:
    """End the active run on a server that does not answer: tried once each, so that the run is
    told if the server is back, and otherwise left RUNNING there for its resume to reopen."""
    with one_attempt(), suppress(MlflowException):
        mlflow.set_tag("error", _error_tag(error))
    with one_attempt(), suppress(MlflowException):
        mlflow.end_run(status)  # leaves MLflow's stack of runs even when the server is away


def _error_tag(error: BaseException) -> str:
    """The `error` tag: the exception's type and message, as MLflow's may hold the URI."""
    return mask(f"{type(error).__name__}: {error}")[:5000]


def _keep_metrics(recorder: Recorder | None) -> None:
    """Write what a failing run logged before it failed, unless the store is what failed."""
    try:
        if recorder is not None:
            recorder.flush()
    except Exception as error:  # the run's own error matters more; report this one beside it
        log.warning("could not write the run's last metrics to MLflow: %s", error)


def _reopen(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The metric histories a resumed run has logged so far; the interruption's `error` tag
    goes, since the run now carries on."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if "error" in run.data.tags:
        client.delete_tag(run_id, "error")
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }


def _carry_on(
    old_run_id: str, new_run_id: str, eval_every: int
) -> dict[str, list[tuple[int, float]]]:
    """Copy into `new_run_id`, which extends `old_run_id`, the metrics a run of its new length
    would have logged by then: not the old run's closing test, nor its closing validation off
    the `eval_every` steps. Link the two runs; return the histories copied."""
    client = mlflow.MlflowClient()
    points = [
        metric
        for key in client.get_run(old_run_id).data.metrics
        if not key.startswith("test/")
        for metric in client.get_metric_history(old_run_id, key)
        if not (key.startswith("val/") and metric.step % eval_every)
    ]
    for start in range(0, len(points), BATCH):
        client.log_batch(new_run_id, metrics=points[start : start + BATCH])
    client.set_tag(new_run_id, "extends", old_run_id)
    client.set_tag(old_run_id, "extended_by", new_run_id)
    log.info("run %s carries on run %s with a larger trainer.steps", new_run_id, old_run_id)
    history: dict[str, list[tuple[int, float]]] = {}
    for m in points:
        history.setdefault(m.key, []).append((m.step, m.value))
    return history


def run_ended(run_id: str) -> bool:
    """Whether the run recorded its ending: it ended FINISHED, or KILLED by its Optuna pruner.
    One stopped (or failed, or cut off from its server) after its last training step has not,
    and its resume finishes it."""
    return _ended(_resumed_run(run_id))


@dataclass(frozen=True)
class Ending:
    """How a run that recorded its ending ended: its final metrics, and the step its Optuna
    pruner stopped it at, if it did."""

    metrics: dict[str, float]
    pruned_at: int | None


def recorded_ending(run_id: str) -> Ending | None:
    """The ending of a run to be carried on, if it recorded one already: an Optuna trial whose
    job ended after its search process died, which the study was never told of."""
    run = _resumed_run(run_id)
    if not _ended(run):
        return None
    pruned = run.data.tags.get(PRUNED_TAG)
    return Ending(dict(run.data.metrics), int(pruned) if pruned else None)


def _ended(run: Any) -> bool:
    return run.info.status == "FINISHED" or PRUNED_TAG in run.data.tags


def _resumed_run(run_id: str) -> Any:
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"the checkpoint's MLflow run {run_id} is not in the tracking store "
            f"{mask(mlflow.get_tracking_uri())}: resume with the tracking.uri it recorded into"
        ) from None
