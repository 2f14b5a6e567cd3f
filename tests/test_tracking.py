"""The recorder batches metric writes, without losing a value or its time; the store keeps a
run's artifacts beside it, and one that cannot be written is a one-line error."""

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import mlflow
import pytest
from mlflow import MlflowClient

from runner.tracking.recorder import Recorder
from runner.tracking.store import open_store, ui_link

from .conftest import QUICK, cli, compose_config


@pytest.fixture
def run_id(tmp_path) -> Iterator[str]:
    """An active run in a scratch store."""
    open_store(f"sqlite:///{tmp_path}/mlflow.db", "recorder")
    with mlflow.start_run() as run:
        yield run.info.run_id


def history(run_id: str, key: str) -> list[tuple[int, float, int]]:
    return [
        (m.step, m.value, m.timestamp)
        for m in mlflow.MlflowClient().get_metric_history(run_id, key)
    ]


def test_metrics_wait_for_the_flush_and_keep_the_time_they_were_logged(run_id):
    recorder = Recorder(run_id, flush_every_s=3600)
    before = int(time.time() * 1000)
    recorder.log_metrics({"train/loss": 2.0}, step=10)
    recorder.log_metrics({"train/loss": 1.0, "train/accuracy": 0.5}, step=20)
    assert history(run_id, "train/loss") == [], "nothing written before the flush"
    time.sleep(0.05)
    flushed = int(time.time() * 1000)
    recorder.flush()
    written = history(run_id, "train/loss")
    assert [(step, value) for step, value, _ in written] == [(10, 2.0), (20, 1.0)]
    assert all(before <= stamp < flushed for _, _, stamp in written)
    assert [v for _, v, _ in history(run_id, "train/accuracy")] == [0.5]
    recorder.log_metrics({"train/loss": 9.0}, step=20)
    recorder.flush()
    assert len(history(run_id, "train/loss")) == 2, "a step is logged once"
    assert recorder.final_metrics() == {"train/loss": 1.0, "train/accuracy": 0.5}


def test_metrics_are_written_once_the_interval_has_passed(run_id):
    recorder = Recorder(run_id, flush_every_s=60)
    recorder.log_metrics({"train/loss": 2.0}, step=10)
    assert history(run_id, "train/loss") == []
    recorder._flushed_at -= 60  # a minute passes
    recorder.log_metrics({"train/loss": 1.0}, step=20)
    assert [step for step, _, _ in history(run_id, "train/loss")] == [10, 20]
    at_once = Recorder(run_id, flush_every_s=0)
    at_once.log_metrics({"val/loss": 3.0}, step=20)
    assert [v for _, v, _ in history(run_id, "val/loss")] == [3.0]


def test_a_dataset_another_run_logged_a_moment_before_is_linked(run_id, monkeypatch, mnist_dir):
    """Two sweep jobs logging one new dataset at once: the team server (PostgreSQL) refused the
    second, which found no dataset, then could not insert it. Asked again, it links it."""
    from mlflow.exceptions import MlflowException

    from runner import data
    from runner.config.settings import check_config
    from runner.tracking import provenance

    cfg = compose_config([*QUICK, f"data.dir={mnist_dir}"])
    log_input, raced = mlflow.log_input, []

    def racing(dataset, context):
        if not raced:  # the other job inserts it first
            raced.append(context)
            with mlflow.start_run(nested=True):
                log_input(dataset, context=context)
            raise MlflowException(
                "(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "
                '"dataset_pk"'
            )
        log_input(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing)
    provenance.log_dataset(data.load(cfg.data, check_config(cfg).data), cfg.data)
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    contexts = {tag.value for i in inputs for tag in i.tags if tag.key == "mlflow.data.context"}
    assert contexts == {"training", "validation", "test"}


def test_only_a_record_inserted_meanwhile_is_asked_for_again():
    from mlflow.exceptions import MlflowException

    from runner.tracking.provenance import _duplicate

    assert _duplicate(MlflowException("UNIQUE constraint failed: datasets.experiment_id"))
    assert not _duplicate(MlflowException("RESOURCE_DOES_NOT_EXIST: run abc not found"))


def test_a_new_experiment_keeps_its_artifacts_beside_its_sqlite_store(tmp_path, monkeypatch):
    """MLflow put them in ./mlruns of whichever folder the run started in."""
    elsewhere, store = tmp_path / "elsewhere", tmp_path / "store"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    open_store(f"sqlite:///{store}/mlflow.db", "beside")
    with mlflow.start_run() as run:
        mlflow.log_text("logged", "note.txt")
    assert (store / "mlruns" / run.info.run_id / "artifacts" / "note.txt").read_text() == "logged"
    assert list(elsewhere.iterdir()) == []
    # A model-training experiment to the MLflow UI, which would otherwise ask which kind it is.
    tags = MlflowClient().get_experiment(run.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_default_store_is_the_working_folders_in_each_of_a_processs_runs(
    tmp_path, monkeypatch, new_store
):
    """MLflow keeps a store per URI for the process: the relative default, sqlite:///mlflow.db,
    went on naming the folder the process's first run started in."""
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        shutil.copyfile(new_store, tmp_path / name / "mlflow.db")
        monkeypatch.chdir(tmp_path / name)
        open_store("sqlite:///mlflow.db", name)
        with mlflow.start_run() as run:
            pass
        found = MlflowClient(f"sqlite:///{tmp_path / name}/mlflow.db").get_run(run.info.run_id)
        assert found.info.experiment_id == run.info.experiment_id


def test_a_run_s_link_opens_the_ui_s_training_view_and_holds_no_password(monkeypatch):
    """`mlflow ui` serves a local store on port 5000; a server's address keeps no credentials.
    The UI's GenAI view is its default, unless the link's workflowType says otherwise."""
    page = "#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "sqlite:///mlflow.db")
    assert ui_link("3", "abc") == f"http://127.0.0.1:5000/{page}"
    server = "https://alice:s3cret@mlflow.example.org:8443/team/?token=t0ken"
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: server)
    assert ui_link("3", "abc") == f"https://mlflow.example.org:8443/team/{page}"


def test_an_existing_experiment_keeps_its_artifact_location(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("kept", artifact_location=str(tmp_path / "own"))
    open_store(uri, "kept")
    with mlflow.start_run() as run:
        assert run.info.artifact_uri.startswith(str(tmp_path / "own"))


@pytest.fixture
def in_read_only(tmp_path, mnist_dir) -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """Runs `runner ARGS` in tmp_path/work, a folder nothing may write to.

    Permissions do not stop root, and these tests run as root here and in CI: for root the folder
    is bind-mounted read-only over itself, in a mount namespace of the command's own (`unshare
    -m`; a container without CAP_SYS_ADMIN refuses it, and the test skips). For anyone else the
    folder's write permission is taken away."""
    work = tmp_path / "work"
    work.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        mount = 'mount --bind -o ro "$0" "$0" && cd "$0" && exec "$@"'
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(work)]
        try:
            probe = subprocess.run([*prefix, "sh", "-c", "! touch probe"], capture_output=True)
        except FileNotFoundError as error:
            pytest.skip(f"no way to make a folder read-only for root here: {error}")
        if probe.returncode != 0:
            pytest.skip(f"no way to make a folder read-only for root here: {probe.stderr!r}")
    else:
        work.chmod(0o555)

    def run(*args: str) -> subprocess.CompletedProcess:
        return cli(
            "runner",
            *args,
            cwd=work,
            mnist_dir=mnist_dir,
            timeout=600,
            new_store=False,
            within=prefix,
        )

    yield run
    work.chmod(0o755)


def test_a_read_only_working_folder_is_one_line_naming_where_to_write(in_read_only):
    """Hydra failed to create outputs/ with a traceback (`PermissionError: 'outputs'`)."""
    result = in_read_only(*QUICK)
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("runner: error: cannot create the output folder outputs/"), line
    assert "hydra.run.dir=" in line and "tracking.uri=" in line


def test_a_read_only_output_folder_given_is_one_line(in_read_only):
    """An explicit hydra.run.dir in the read-only folder: Hydra failed to create it with a
    traceback."""
    result = in_read_only(*QUICK, "hydra.run.dir=mine")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("runner: error: cannot write the output folder mine:"), line
    assert "point hydra.run.dir at a folder you can write to" in line


def test_a_read_only_store_is_one_line_at_once(in_read_only, tmp_path):
    """With the output folder elsewhere, the default store in the read-only folder had MLflow
    retry for 108 s before a traceback."""
    started = time.monotonic()
    result = in_read_only(*QUICK, f"hydra.run.dir={tmp_path / 'run'}")
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("runner: error: cannot write the MLflow store sqlite:///mlflow.db"), line
    assert "tracking.uri=" in line


def test_a_read_only_working_folder_records_where_tracking_uri_says(in_read_only, tmp_path):
    """The artifacts went to ./mlruns of the read-only folder all the same: the run failed."""
    store = tmp_path / "store"
    result = in_read_only(
        *QUICK, f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{store}/mlflow.db"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri == str(store / "mlruns" / run.info.run_id / "artifacts")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "hydra"}
