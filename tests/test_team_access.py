"""On the team server: who may record, credentials that never reach the record, and a server
that goes away mid-run, for 15 s or for good."""

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from .conftest import QUICK, cli

pytestmark = pytest.mark.xdist_group("team_server")

# Runs long enough to take the server away in their middle (10,000 steps train in 5 to 10 s
# here), checkpointed and validated every 5,000 steps.
LONG = [*QUICK, "trainer.log_every=100", "trainer.eval_every=5000"]
LONG += ["trainer.checkpoint_every=5000", "tracking.metrics_flush_every_s=0.5"]
# The run the server leaves for good must still be training when it gives the server up.
GONE = ["trainer.steps=20000", "tracking.server_patience_s=1"]


def runs_of(server, experiment: str | None = None) -> list:
    """alice's runs in `experiment`, none while it does not exist (which the auth app, asked
    by name, answers with 403)."""
    with server.as_user("owner"):
        client = MlflowClient(server.url)
        name = experiment or server.experiment
        found = client.search_experiments(filter_string=f"name = '{name}'")
        return client.search_runs([found[0].experiment_id]) if found else []


@pytest.mark.parametrize(
    ("user", "password", "told"),
    [
        (None, None, "asks who you are: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        ("owner", "not-her-password", "refused user 'alice': the user does not exist there or "),
        ("reader", None, "user 'bob' may only read experiment 'mnist' on the MLflow tracking "),
    ],
    ids=["no-credentials", "wrong-password", "read-only"],
)
def test_a_user_who_may_not_record_is_told_in_one_line_before_training(
    team_server, tmp_path, mnist_dir, user, password, told
):
    before = len(runs_of(team_server))
    env = team_server.env(user, password) if user else team_server.env()
    result = cli("runner", *QUICK, cwd=tmp_path, mnist_dir=mnist_dir, env=env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("runner: error: ") and told in line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    fix = "ask its owner or the server's admin for EDIT" if user == "reader" else "check MLFLOW"
    assert user is None or fix in line
    # Before any training: no run, and TensorFlow never loaded.
    assert "MLflow run" not in result.stderr and "devices:" not in result.stderr
    assert len(runs_of(team_server)) == before


def test_the_admin_may_record_anywhere_although_mlflow_reports_read(team_server):
    """MLflow's permission query answers READ for an admin on another user's experiment, where
    at run time an admin may do anything: the admin is let through, a reader is not."""
    from runner.errors import UserError
    from runner.tracking.access import check_can_record

    with team_server.as_user("admin"):
        granted = team_server.api(
            "3.0/mlflow/users/permissions/get",
            username="admin",
            resource_type="experiment",
            resource_id=team_server.experiment_id,
        )
        assert granted["permission"] not in ("EDIT", "MANAGE")
        check_can_record(team_server.url, team_server.experiment_id, team_server.experiment)
    with team_server.as_user("reader"), pytest.raises(UserError, match="may only read"):
        check_can_record(team_server.url, team_server.experiment_id, team_server.experiment)


def test_a_user_who_may_not_read_a_run_is_told_in_one_line(team_server, tmp_path, mnist_dir):
    """bob may read alice's `mnist`, not an experiment she keeps to herself: runner-compare,
    runner-eval and runner-repro each say so in one line, not that the run does not exist."""
    with team_server.as_user("owner"):
        client = MlflowClient(team_server.url)
        found = client.search_experiments(filter_string="name = 'private'")
        experiment = found[0].experiment_id if found else client.create_experiment("private")
        run_id = client.create_run(experiment).info.run_id
    told = "user 'bob' may not read this on the MLflow tracking server"
    for command in (
        ["runner-compare", "--experiment", "private"],
        ["runner-eval", f"run_id={run_id}"],
        ["runner-repro", run_id],
    ):
        result = cli(*command, cwd=tmp_path, mnist_dir=mnist_dir, env=team_server.env("reader"))
        assert result.returncode == 1, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"{command[0]}: error: {told}"), result.stderr[-2000:]
        assert "ask the owner of its experiment" in line and "Traceback" not in result.stderr


def test_credentials_in_the_tracking_uri_are_masked_everywhere(team_server, tmp_path, mnist_dir):
    """alice's password in the URI itself, for a one-job sweep: it must appear in no parameter,
    tag, text artifact, run name, Hydra file or console line."""
    owner = team_server.owner
    uri = team_server.url.replace("http://", f"http://{owner.name}:{owner.password}@")
    experiment = "masked"
    result = cli(
        "runner",
        "-m",
        *QUICK,
        "seed=3",
        f"tracking.uri={uri}",
        f"tracking.experiment_name={experiment}",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    secret = owner.password
    console = result.stdout + result.stderr
    assert secret not in console
    assert f"{owner.name}\\:***@" in console  # Hydra's line for the job, masked
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in {".yaml", ".log"}]
    assert any(p.name == "multirun.yaml" for p in written)
    assert [p for p in written if secret in p.read_text()] == []
    runs = runs_of(team_server, experiment)
    assert len(runs) == 2  # the sweep and its job
    with team_server.as_user("owner"):
        mlflow.set_tracking_uri(team_server.url)
        client = MlflowClient(team_server.url)
        for run in runs:
            assert secret not in run.info.run_name
            fields = {**run.data.params, **run.data.tags}
            assert [k for k, v in fields.items() if secret in v] == []
            for path in _artifact_files(client, run.info.run_id):
                if not path.endswith(".png"):
                    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{path}")
                    assert secret not in text, path
            for logged in run.inputs.dataset_inputs:
                assert secret not in logged.dataset.source
        [job] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert job.data.params["tracking.uri"] == uri.replace(secret, "***")
        assert job.info.status == "FINISHED"


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        files += _artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def test_a_server_restarted_mid_run_loses_no_metric(team_server, tmp_path, mnist_dir):
    """Stopped for 15 s while training, then started again: the run carries on, its metrics
    waiting in memory, and finishes with every step logged once."""
    run = _start(team_server, tmp_path, mnist_dir, "restarted", "trainer.steps=10000")
    _wait_for_step(team_server, "restarted", 2000)
    team_server.stop()
    try:
        time.sleep(15)
    finally:
        team_server.start()
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert "the MLflow tracking server answers again" in out + err
    [finished] = runs_of(team_server, "restarted")
    assert finished.info.status == "FINISHED"
    _assert_each_step_once(team_server, finished.info.run_id, 10000)


def test_a_server_gone_for_good_stops_the_run_to_resume_once_it_is_back(
    team_server, tmp_path, mnist_dir
):
    """The server stays away past tracking.server_patience_s: training stops with a checkpoint
    holding the metrics the server has not taken, the command exits 1 saying how to resume;
    resumed once the server is back, the run finishes with each step logged once."""
    run = _start(team_server, tmp_path, mnist_dir, "gone", *GONE)
    _wait_for_step(team_server, "gone", 2000)
    team_server.stop()
    try:
        out, err = run.communicate(timeout=600)
    finally:
        team_server.start()
    assert run.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("runner: error: the MLflow tracking server has not answered for 1 s")
    assert "checkpoint written to" in line and "Traceback" not in err
    assert "once the server is back, carry on with the same command plus trainer.resume=true" in (
        line
    )
    folder = line.rsplit("hydra.run.dir=", 1)[1]
    [stopped] = runs_of(team_server, "gone")
    assert stopped.info.status == "RUNNING"  # the server could not be told; the resume reopens
    resumed = cli(
        "runner",
        *_overrides("gone"),
        *GONE,
        "trainer.resume=true",
        f"hydra.run.dir={folder}",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
        env=team_server.env("owner"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [finished] = runs_of(team_server, "gone")
    assert finished.info.run_id == stopped.info.run_id and finished.info.status == "FINISHED"
    _assert_each_step_once(team_server, finished.info.run_id, 20000)


def _overrides(experiment: str) -> list[str]:
    return [*LONG, f"tracking.experiment_name={experiment}"]


def _start(server, folder: Path, mnist_dir: Path, experiment: str, *extra: str):
    env = {**server.env("owner"), "MNIST_DIR": str(mnist_dir)}
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("runner")), *_overrides(experiment), *extra],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(server, experiment: str, step: int) -> None:
    """Until the experiment's one run has logged train/loss at `step` or later."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = runs_of(server, experiment)
        if runs and runs[0].data.metrics.get("train/loss") is not None:
            with server.as_user("owner"):
                history = MlflowClient(server.url).get_metric_history(
                    runs[0].info.run_id, "train/loss"
                )
            if max(m.step for m in history) >= step:
                return
        time.sleep(0.5)
    raise AssertionError(f"the run in {experiment} never reached step {step}")


def _assert_each_step_once(server, run_id: str, steps: int) -> None:
    with server.as_user("owner"):
        client = MlflowClient(server.url)
        expected = {
            "train/loss": list(range(100, steps + 1, 100)),
            "val/accuracy": list(range(5000, steps + 1, 5000)),
            "test/accuracy": [steps],
        }
        for key, steps in expected.items():
            logged = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert logged == steps, key
