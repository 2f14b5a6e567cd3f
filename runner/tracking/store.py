"""The MLflow tracking store: pointing MLflow at a URI (a SQLite file or a tracking server),
opening an experiment there, and the addresses and retries of a server.

A server that does not answer is told at once, in one line, rather than after MLflow's minutes
of retries; a SQLite store that several runs open at once is created under a lock.
"""

import fcntl
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import mlflow
from mlflow.entities import Experiment
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from runner.config.schema import CONF_DIR
from runner.errors import UserError
from runner.masking import mask
from runner.tracking import access

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

# The most metrics MLflow takes in one log_batch.
BATCH = 1000
# MLflow's UI opens an experiment in its GenAI view unless told otherwise: by the `workflowType`
# of its link (`ui_link`), else the browser's last choice. This tag makes the experiment one of
# model training, which the UI then does not ask about.
TRAINING_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Where `mlflow ui`, started in the folder of a local store, serves it.
LOCAL_UI = "http://127.0.0.1:5000"
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
    if is_server(uri):
        access.check_can_record(uri, experiment.experiment_id, experiment_name)


def connect(uri: str) -> None:
    """Point MLflow at `uri`, probing a server first: MLflow itself retries an unreachable
    server for minutes before it gives up. A SQLite file is named by its absolute path: MLflow
    keeps a store per URI for the process, so a relative one would go on naming the folder a
    first run in the process started in."""
    database = sqlite_file(uri)
    if database is not None:
        uri = _sqlite_url(uri).set(database=str(database)).render_as_string(hide_password=False)
    if is_server(uri):
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


def is_server(uri: str) -> bool:
    """Whether `uri` names a tracking server, rather than a database or a folder."""
    return uri.startswith(("http://", "https://"))


def default_uri() -> str:
    """`tracking.uri` as conf/tracking/mlflow.yaml sets it (MLFLOW_TRACKING_URI, else
    ./mlflow.db), for the commands that compose no Hydra config: one place says it."""
    return str(OmegaConf.load(CONF_DIR / "tracking" / "mlflow.yaml").uri)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store URI, relative ones against the working folder; None
    for other stores and an in-memory database."""
    url = _sqlite_url(uri)
    name = url.database if url is not None else None
    return Path(name).absolute() if name and name != ":memory:" else None


def _sqlite_url(uri: str) -> "URL | None":
    """`uri` parsed, if it names a SQLite store that SQLAlchemy can read (MLflow reports one it
    cannot)."""
    if not uri.startswith("sqlite:"):
        return None
    import sqlalchemy  # half a second, which a tracking server's commands need not spend

    try:
        return sqlalchemy.engine.make_url(uri)
    except sqlalchemy.exc.ArgumentError:
        return None


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


def ui_link(experiment_id: str, run_id: str) -> str:
    """The page of a run in the MLflow UI's model-training view: on the tracking server MLflow
    records into, without the user and password of its URI, or for another store as `mlflow ui`
    serves it."""
    uri = mlflow.get_tracking_uri()
    base = _server_address(uri) if is_server(uri) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _server_address(uri: str) -> str:
    """A tracking server's URI without its user, password or query."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query="", fragment="").geturl().rstrip("/")


def unanswered(error: MlflowException) -> bool:
    """Whether a tracking server failed to answer, rather than refused a request."""
    return is_server(mlflow.get_tracking_uri()) and error.get_http_status_code() >= 500


@contextmanager
def one_attempt() -> Iterator[None]:
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
