"""MLflow bookkeeping for one training run: config, metrics, test results, plots and the model.

Training metrics are buffered and written in one batch every `tracking.metrics_flush_every_s`
seconds, at each checkpoint and when the run ends: a write to the SQLite store costs the same
whatever its size, and a large share of a short window's time (docs/performance.md). A run that
raises ends FAILED with the error in a tag.
"""

import fcntl
import logging
import os
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import numpy as np
from hydra.core.hydra_config import HydraConfig
from mlflow.entities import Experiment, Metric
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from runner.backends.base import Backend
from runner.config.schema import CONF_DIR
from runner.data import Split, Splits, file_record
from runner.errors import Interrupted, ServerLost, UserError
from runner.masking import mask
from runner.sweeps.jobs import SweepJob
from runner.targets import label
from runner.tracking import access, environment, serving
from runner.training.stopping import Stops

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
# The tag of a run whose Optuna trial was pruned: its step. The run ends KILLED, yet is over.
PRUNED_TAG = "pruned_at_step"


class Recorder:
    """Logs into the active MLflow run and keeps the metric histories for the plots.

    Metrics wait in memory, stamped with the time they were logged, until `flush` writes them in
    one batch, which `log_metrics` does once `flush_every_s` seconds have passed since the last.
    A resumed run starts from the histories already in MLflow, and the metrics its checkpoint
    holds as `unrecorded`, and skips any step logged before the interruption, so each metric
    keeps one value a step.

    A tracking server that does not answer (restarted, or gone) does not stop training: its
    metrics stay in memory, and in each checkpoint, and are written once it answers again. After
    `patience_s` seconds without an answer the recorder is `lost`, and training stops."""

    def __init__(
        self,
        run_id: str,
        history: dict | None = None,
        flush_every_s: float = 0.0,
        patience_s: float = 0.0,
        unrecorded: list[list[Any]] | None = None,
    ):
        self.run_id = run_id
        self.history: dict[str, list[tuple[int, float]]] = history or {}
        self._logged = {(key, step) for key, points in self.history.items() for step, _ in points}
        self.flush_every_s = flush_every_s
        self.patience_s = patience_s
        self._pending: list[Metric] = []
        for key, value, timestamp, step in unrecorded or []:
            if (key, step) not in self._logged:
                self.history.setdefault(key, []).append((step, value))
                self._logged.add((key, step))
                self._pending.append(Metric(key, value, timestamp, step))
        self._flushed_at = time.monotonic()
        self._unanswered_since: float | None = None
        self.lost = False
        # How the run ends if nothing raises: KILLED for an Optuna trial called off (`prune`).
        self.end_status = "FINISHED"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            if (key, step) not in self._logged:
                self.history.setdefault(key, []).append((step, float(value)))
                self._logged.add((key, step))
                self._pending.append(Metric(key, float(value), now_ms, step))
        if time.monotonic() - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write the metrics logged since the last flush. Unless `final`, a server that does not
        answer is tried once, and the metrics kept for the next flush."""
        self._flushed_at = time.monotonic()
        client = mlflow.MlflowClient()
        while self._pending:
            batch = self._pending[:_BATCH]  # the most MLflow takes in one log_batch
            try:
                with nullcontext() if final else _one_attempt():
                    client.log_batch(self.run_id, metrics=batch)
            except MlflowException as error:
                if final or not _unanswered(error):
                    raise
                self._not_answered(error)
                return
            del self._pending[: len(batch)]
        self.lost = False
        if self._unanswered_since is not None:
            log.warning("the MLflow tracking server answers again: its metrics are written")
            self._unanswered_since = None

    def _not_answered(self, error: MlflowException) -> None:
        now = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = now
            log.warning(
                "the MLflow tracking server does not answer (%s): training goes on, and its "
                "metrics wait in memory and in the checkpoints for up to %g s",
                error.message.split(" failed with exception ")[-1][:200],
                self.patience_s,
            )
        self.lost = now - self._unanswered_since >= self.patience_s

    def unrecorded(self) -> list[list[Any]]:
        """The metrics not yet written, as [key, value, timestamp, step], for a checkpoint."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self._pending]

    def set_tag(self, key: str, value: str) -> None:
        mlflow.MlflowClient().set_tag(self.run_id, key, value)

    def prune(self, step: int) -> None:
        """End the run KILLED, tagged with the step its Optuna trial was pruned at."""
        self.set_tag(PRUNED_TAG, str(step))
        self.end_status = "KILLED"

    def log_test(self, test: Split, outputs: np.ndarray, loss: float, step: int) -> None:
        """Test metrics at `step`, the last."""
        from runner.models import classifier

        accuracy = classifier.accuracy(outputs, test.y)
        self.log_metrics({"test/loss": loss, "test/accuracy": accuracy}, step=step)
        log.info("test accuracy %.4f, test loss %.4f", accuracy, loss)

    def log_plots(self, test: Split, outputs: np.ndarray) -> None:
        """The test set's confusion matrix and the training curves, as PNG artifacts."""
        from runner.models.classifier import classes
        from runner.tracking import (
            plots,  # matplotlib: half a second, for runs that draw no plots too
        )

        confusion = plots.confusion_matrix(test.y, classes(outputs), outputs.shape[1])
        mlflow.log_figure(confusion, "plots/confusion_matrix.png")
        mlflow.log_figure(plots.training_curves(self.history), "plots/training_curves.png")

    def log_model(self, model: Any, output: str, target: str, requirements: list[str]) -> None:
        """The trained model, which emits `output` (logits or probabilities) and was built by
        `_target_` `target`, served as `runner.tracking.serving` says; pinned requirements (Keras's,
        MLflow's and its backend's `requirements`) skip MLflow's slow inference of them."""
        import keras

        # uv's environments have no pip, which MLflow reports as a warning while writing conda.yaml.
        logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
        serving.log_model(
            model,
            MODEL_ARTIFACT,
            output,
            pip_requirements=[
                f"keras=={keras.__version__}",
                *requirements,
                f"mlflow=={mlflow.__version__}",
            ],
            target=target,
        )

    def final_metrics(self) -> dict[str, float]:
        return {key: values[-1][1] for key, values in self.history.items()}


@contextmanager
def mlflow_run(
    cfg: DictConfig,
    splits: Splits,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    sweep_job: SweepJob | None = None,
    extends: bool = False,
    unrecorded: list[list[Any]] | None = None,
    *,
    stops: Stops,
    backend: Backend,
) -> Iterator[Recorder]:
    """One MLflow run around the training; ends FAILED (with an `error` tag) if anything raises.

    Besides the config it records the environment (`environment.json`, and tags for versions,
    devices and commit), so that a run can be rerun and a difference explained. With
    `resume_run_id` it reopens that run, whose config is already logged; with `extends` too, it
    starts a new run that carries that run's history on under the new config (tagged
    `extends`), since MLflow's params cannot change. A new run of a `sweep_job` is nested under
    the sweep's parent run; `unrecorded` are the metrics the resumed checkpoint holds that the
    server had not taken; `stops` holds the stop signals while MLflow opens the run; `backend`
    is the run's. Call `open_store` first.

    A run whose server stopped answering (`ServerLost`) stays RUNNING there, if the server
    cannot be told, and is reopened by its resume.
    """
    hydra_dir = _hydra_record_dir()
    reopen = resume_run_id if not extends else None
    # System metrics (psutil; nvidia-ml-py for GPUs) are sampled on a thread while the run is on.
    mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_every_s)
    try:
        with stops.held():
            started = mlflow.start_run(
                run_id=reopen,
                run_name=None if reopen else _run_name(cfg, sweep_job),
                nested=sweep_job is not None,
                parent_run_id=sweep_job.parent_run_id if sweep_job and not reopen else None,
                log_system_metrics=cfg.tracking.system_metrics,
            )
    except KeyboardInterrupt as error:  # a stop that came while the run opened
        if mlflow.active_run() is not None:
            _fail(error, None)
        raise
    with started as run:
        recorder = None
        try:
            run_id = run.info.run_id
            log.info(
                "MLflow run %s in experiment %r: %s",
                run_id,
                cfg.tracking.experiment_name,
                ui_link(run.info.experiment_id, run_id),
            )
            history = None
            if reopen:
                history = _reopen(reopen)
            elif resume_run_id:
                history = _carry_on(resume_run_id, run_id, cfg.trainer.eval_every)
            if not reopen:
                _log_config(cfg, hydra_dir)
                _log_dataset(splits, cfg.data)
            _log_environment(splits.digests, cfg, backend)
            mlflow.set_tags(tags or {})
            recorder = Recorder(
                run_id,
                history,
                cfg.tracking.metrics_flush_every_s,
                cfg.tracking.server_patience_s,
                unrecorded,
            )
            yield recorder
            recorder.flush(final=True)
            if recorder.end_status != "FINISHED":
                mlflow.end_run(recorder.end_status)  # the context manager would say FINISHED
        except ServerLost as error:
            _leave(error, "KILLED")
            raise
        except MlflowException as error:
            if not _unanswered(error):
                _fail(error, recorder)
                raise
            _leave(error, "FAILED")  # MLflow has retried for minutes already
            raise UserError(
                f"the MLflow tracking server {mask(cfg.tracking.uri)} stopped answering "
                f"({mask(error.message)[:300]}): start it again, then run the command again"
            ) from None
        except BaseException as error:
            _fail(error, recorder)
            raise


def _fail(error: BaseException, recorder: Recorder | None) -> None:
    """End the active run FAILED, or KILLED if interrupted, with its error as a tag."""
    _keep_metrics(recorder)
    mlflow.set_tag("error", _error_tag(error))
    if isinstance(error, Interrupted | KeyboardInterrupt):
        mlflow.end_run("KILLED")  # the context manager would record FAILED


def _leave(error: BaseException, status: str) -> None:
    """End the active run on a server that does not answer: tried once each, so that the run is
    told if the server is back, and otherwise left RUNNING there for its resume to reopen."""
    with _one_attempt(), suppress(MlflowException):
        mlflow.set_tag("error", _error_tag(error))
    with _one_attempt(), suppress(MlflowException):
        mlflow.end_run(status)  # leaves MLflow's stack of runs even when the server is away


def _error_tag(error: BaseException) -> str:
    """The `error` tag: the exception's type and message, as MLflow's may hold the URI."""
    return mask(f"{type(error).__name__}: {error}")[:5000]


def _unanswered(error: MlflowException) -> bool:
    """Whether a tracking server failed to answer, rather than refused a request."""
    return mlflow.get_tracking_uri().startswith(("http://", "https://")) and (
        error.get_http_status_code() >= 500
    )


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


def run_ended(run_id: str) -> bool:
    """Whether the run recorded its ending: it ended FINISHED, or KILLED by its Optuna pruner.
    One stopped (or failed, or cut off from its server) after its last training step has not,
    and its resume finishes it."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"the checkpoint's MLflow run {run_id} is not in the tracking store "
            f"{mask(mlflow.get_tracking_uri())}: resume with the tracking.uri it recorded into"
        ) from None
    return run.info.status == "FINISHED" or PRUNED_TAG in run.data.tags


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
    for start in range(0, len(points), _BATCH):  # the most MLflow takes in one log_batch
        client.log_batch(new_run_id, metrics=points[start : start + _BATCH])
    client.set_tag(new_run_id, "extends", old_run_id)
    client.set_tag(old_run_id, "extended_by", new_run_id)
    log.info("run %s carries on run %s with a larger trainer.steps", new_run_id, old_run_id)
    history: dict[str, list[tuple[int, float]]] = {}
    for m in points:
        history.setdefault(m.key, []).append((m.step, m.value))
    return history


_BATCH = 1000


@contextmanager
def _one_attempt() -> Iterator[None]:
    """MLflow's requests inside make one attempt of at most 10 s, instead of retrying for
    minutes: a flush during training must not hold training up while the server is away."""
    saved = {name: os.environ.get(name) for name in _RETRY_SETTINGS}
    os.environ.update(_RETRY_SETTINGS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_RETRY_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def open_store(uri: str, experiment_name: str) -> None:
    """Point MLflow at `uri` and the experiment (created if new), failing fast with a clear
    message. Runs that start at once may all find the store or the experiment missing: a new
    SQLite store is created under a lock, and an experiment that another run has just created on
    a server is used as it is."""
    connect(uri)
    database = sqlite_file(uri)
    try:
        if database is None:
            experiment = _set_experiment(experiment_name, None)
        else:
            with _store_lock(uri, database):
                experiment = _set_experiment(experiment_name, database.parent / "mlruns")
    except MlflowException as error:
        raise access.refusal(error, uri, experiment_name) or UserError(
            f"cannot use the MLflow tracking store {mask(uri)}: {mask(error.message)}"
        ) from None
    if uri.startswith(("http://", "https://")):
        access.check_can_record(uri, experiment.experiment_id, experiment_name)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store URI, relative ones against the working folder; None
    for other stores and an in-memory database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not uri.startswith("sqlite:"):
        return None
    try:
        name = make_url(uri).database
    except ArgumentError:
        return None  # MLflow reports it
    return Path(name).absolute() if name and name != ":memory:" else None


@contextmanager
def _store_lock(uri: str, database: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<database>.lock`, after checking that the store can be written:
    SQLite in a read-only folder makes MLflow retry for minutes before it fails. MLflow creates a
    new store's tables, and an experiment, with no guard against another process doing the same
    at the same moment."""
    fix = (
        "record elsewhere with tracking.uri=sqlite:////DIR/mlflow.db (or MLFLOW_TRACKING_URI), "
        "or run from a folder you can write to"
    )
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{database}.lock", os.O_WRONLY | os.O_CREAT, 0o666)
    except OSError as error:
        raise UserError(
            f"cannot write the MLflow store {uri} in {database.parent} ({error.strerror}): {fix}"
        ) from None
    try:
        for path in (database.parent, database):
            if path.exists() and not os.access(path, os.W_OK):
                raise UserError(f"cannot write the MLflow store {uri}: {path} is read-only: {fix}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # which releases the lock


# MLflow's UI opens an experiment in its GenAI view unless told otherwise: by the `workflowType`
# of its link (`ui_link`), else the browser's last choice. This tag makes the experiment one of
# model training, which the UI then does not ask about.
TRAINING_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Where `mlflow ui`, started in the folder of a local store, serves it.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_link(experiment_id: str, run_id: str) -> str:
    """The page of a run in the MLflow UI's model-training view: on the tracking server MLflow
    records into, without the user and password of its URI, or for another store as `mlflow ui`
    serves it."""
    uri = mlflow.get_tracking_uri()
    base = _server_address(uri) if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _server_address(uri: str) -> str:
    """A tracking server's URI without its user, password or query."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query="", fragment="").geturl().rstrip("/")


def _set_experiment(name: str, artifacts: Path | None) -> Experiment:
    """Make `name` the active experiment, and return it. A new one keeps its artifacts in
    `artifacts` (else where the store puts them): MLflow's default for a SQLite store is ./mlruns
    of whichever folder the run started in, not the store's. An existing experiment stays as it
    is. A new one is tagged as the UI's model-training kind (TRAINING_KIND)."""
    client = mlflow.MlflowClient()
    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(
                name, str(artifacts) if artifacts else None, tags=TRAINING_KIND
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another run created it first
                raise
    return mlflow.set_experiment(name)


def default_uri() -> str:
    """`tracking.uri` as conf/tracking/mlflow.yaml sets it (MLFLOW_TRACKING_URI, else
    ./mlflow.db), for the commands that compose no Hydra config: one place says it."""
    return str(OmegaConf.load(CONF_DIR / "tracking" / "mlflow.yaml").uri)


def connect(uri: str) -> None:
    """Point MLflow at `uri`, probing a server first: MLflow itself retries an unreachable
    server for minutes before it gives up. A SQLite file is named by its absolute path: MLflow
    keeps a store per URI for the process, so a relative one would go on naming the folder a
    first run in the process started in."""
    database = sqlite_file(uri)
    if database is not None:
        from sqlalchemy.engine import make_url

        uri = make_url(uri).set(database=str(database)).render_as_string(hide_password=False)
    if uri.startswith(("http://", "https://")):
        health = _server_address(uri)  # urllib takes no user in the address; /health asks none
        try:
            urllib.request.urlopen(f"{health}/health", timeout=10).close()
        except (OSError, ValueError) as error:
            raise UserError(
                mask(
                    f"the MLflow tracking server {uri} does not answer ({error}): start it, "
                    f"correct MLFLOW_TRACKING_URI (or tracking.uri), or unset it to record into "
                    f"./mlflow.db"
                )
            ) from None
        access.check_credentials(uri)
    # MLflow would print a server's run address too: in the UI's GenAI view, and with the URI's
    # password in it. The runner logs its own (`ui_link`).
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)


def _log_config(cfg: DictConfig, hydra_dir: Path | None) -> None:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    mlflow.log_params(
        {
            key: value if value is None or isinstance(value, int | float) else mask(str(value))
            for key, value in flatten(resolved)
        }
    )
    mlflow.set_tags({"model": label(cfg.model), "optimizer": label(cfg.optimizer)})
    mlflow.log_text(mask(OmegaConf.to_yaml(resolved)), "config.yaml")
    if hydra_dir is not None and hydra_dir.is_dir():
        mlflow.log_artifacts(str(hydra_dir), "hydra")


def _log_dataset(splits: Splits, data: DictConfig) -> None:
    """The data's record in MLflow's Datasets, one per split: its name, size and digest, so that
    the UI shows which data trained the run. MLflow keeps one record per name and digest, which
    each split's own digest (its content: `Split.digest`) keeps from another run's subset."""
    from mlflow.data import from_numpy

    source = mask(str(data.get("path") or data.get("dir") or data.get("_target_")))
    for context, split in (
        ("training", splits.train),
        ("validation", splits.validation),
        ("test", splits.test),
    ):
        with warnings.catch_warnings():  # that a path is a local file, said twice per split
            warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
            dataset = from_numpy(
                split.x,
                targets=split.y,
                source=source,
                name=f"{label(data)}-{context}",
                digest=split.digest,
            )
        try:
            mlflow.log_input(dataset, context=context)
        except MlflowException as error:
            if not _duplicate(error):
                raise
            mlflow.log_input(dataset, context=context)


def _duplicate(error: MlflowException) -> bool:
    """Whether the store refused a record that another run added at the same moment: it looks
    for a dataset, finds none and inserts it, so of two runs logging the same new dataset at
    once (a sweep's first jobs) the second is refused; asked again, it links the one now there."""
    text = str(error.message)
    return any(hint in text for hint in ("UniqueViolation", "UNIQUE constraint", "duplicate key"))


def _log_environment(data_digests: dict[str, str], cfg: DictConfig, backend: Backend) -> None:
    described = environment.describe(data_digests, backend)
    record = file_record(cfg.data)
    if record:  # the file data.path names, whose change runner-repro and runner-eval tell
        described["data_file"] = record
    # The user's own model, data, optimizer, loss or callbacks: their commit, and their sources.
    modules = environment.user_modules(cfg)
    if modules:
        described["user_code"] = environment.user_code(modules)
        for name, file in modules.items():
            mlflow.log_artifact(str(file), environment.source_folder(name, file))
    mlflow.set_tags(environment.tags(described))
    mlflow.log_dict(described, "environment.json")


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested config to dotted keys: {"optimizer": {"lr": 0.5}} -> ("optimizer.lr", 0.5)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _hydra_record_dir() -> Path | None:
    """Where Hydra wrote this command's config and overrides, if it did."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return None
    hydra = HydraConfig.get()
    return Path(hydra.runtime.output_dir) / hydra.output_subdir


def _run_name(cfg: DictConfig, sweep_job: SweepJob | None) -> str:
    """The command-line overrides name the run, so a sweep's runs tell themselves apart."""
    if sweep_job:
        return sweep_job.name
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return mask(overrides) or label(cfg.model)
