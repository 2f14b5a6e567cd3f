"""A team's tracking server, started by the README's "For a team" commands (tests/team_server.py):
the owner's joblib sweep recorded through it with its artifacts and models, every command run
against it, and MLflow recording straight into its PostgreSQL database."""

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from runner.data import TEST_IMAGES, read_idx

from .conftest import QUICK, cli, compose_config, readme_commands
from .team_server import SECTION

# Every module using the server runs on the worker that started it.
pytestmark = pytest.mark.xdist_group("team_server")

RESULTS = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "test/loss", "test/accuracy"}
ARTIFACTS = {"config.yaml", "environment.json", "hydra", "plots"}


def split(command: str) -> list[str]:
    """A README line's command and arguments, `uv run` dropped."""
    uv, run, *words = shlex.split(command)
    assert (uv, run) == ("uv", "run"), command
    return words


def launch(name: str, *args: str, cwd: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    """A project command started in the background, its output in `cwd`/NAME.out and .err
    (a pipe that no one reads while another command runs could fill and stall it)."""
    with (cwd / f"{name}.out").open("w") as out, (cwd / f"{name}.err").open("w") as err:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name(name)), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=err,
        )
    return process, cwd / name


def finish(launched: tuple[subprocess.Popen, Path]) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of a command that `launch` started."""
    process, output = launched
    process.wait(timeout=300)
    out, err = output.with_suffix(".out"), output.with_suffix(".err")
    return process.returncode, out.read_text(), err.read_text()


def test_readme_points_the_runner_at_the_server_without_credentials_in_the_uri(team_server):
    commands = readme_commands(SECTION)
    [export] = [c for c in commands if c.startswith("export ") and "_USERNAME=" in c]
    settings = dict(word.split("=", 1) for word in shlex.split(export)[1:])
    assert settings.keys() == {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
    assert "@" not in settings["MLFLOW_TRACKING_URI"]
    assert settings["MLFLOW_TRACKING_USERNAME"] == team_server.owner.name
    sweep, compare, slurm = (split(c) for c in team_server.runner_commands)
    assert sweep[:2] == ["runner", "-m"] and "hydra/launcher=joblib" in sweep
    assert compare == ["runner-compare"]
    # The SLURM line composes to submitit's SLURM launcher (tests/test_slurm.py runs it).
    assert slurm[:2] == ["runner", "-m"]
    launcher = compose_config(
        [a.split(",")[0] if a.startswith("seed=") else a for a in slurm[2:]], hydra=True
    ).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")


def test_owners_sweep_of_four_jobs_and_every_command_work_against_the_server(
    team_server, mnist_dir, tmp_path
):
    """The README's joblib sweep (4 jobs, 2 at a time) as alice, in quick runs that log their
    model: every child FINISHED with its metrics, artifacts kept by the server and model; then
    runner-compare, runner-eval, runner-predict and runner-repro against the server."""
    env = team_server.env("owner")
    sweep, compare, _ = (split(c) for c in team_server.runner_commands)
    started = time.monotonic()
    result = cli(
        *sweep,
        *QUICK,
        "trainer.log_model=true",
        "tracking.plots=true",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
        env=env,
    )
    swept = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    with team_server.as_user("owner"):
        client = MlflowClient(team_server.url)
        runs = client.search_runs([team_server.experiment_id])
        [parent] = [r for r in runs if r.data.tags.get("sweep.dir", "").startswith(str(tmp_path))]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED"
        assert sorted(int(c.data.params["seed"]) for c in children) == list(range(1, 5))
        for child in children:
            assert child.info.status == "FINISHED", child.info
            assert child.data.metrics.keys() >= RESULTS
            assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 3
            listed = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert listed >= ARTIFACTS, listed
            assert "mlflow-artifacts:" in child.info.artifact_uri
        models = client.search_logged_models([team_server.experiment_id])
        assert {m.source_run_id for m in models} >= {c.info.run_id for c in children}
    # The server wrote the files in its own folder: the clients uploaded them through it.
    assert len(list((team_server.dir / "artifacts").rglob("config.yaml"))) >= 4

    child = children[0].info.run_id
    images = read_idx(mnist_dir / f"{TEST_IMAGES}.gz")[:1]
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    env = {**env, "MNIST_DIR": str(mnist_dir)}
    started = time.monotonic()
    commands = {
        "compare": launch(*compare, cwd=tmp_path, env=env),
        "eval": launch("runner-eval", f"run_id={child}", cwd=tmp_path, env=env),
        "predict": launch(
            "runner-predict",
            f"run_id={child}",
            f"images={tmp_path}/digit.png",
            cwd=tmp_path,
            env=env,
        ),
        "repro": launch("runner-repro", child, cwd=tmp_path, env=env),
    }
    done = {name: finish(launched) for name, launched in commands.items()}
    print(f"sweep {swept:.1f} s, then the four commands at once {time.monotonic() - started:.1f} s")
    code, out, err = done["compare"]
    assert code == 0, err[-3000:]
    for run in children:
        assert run.info.run_id in out
    code, out, err = done["eval"]
    assert code == 0, err[-3000:]
    assert re.search(r"\{'loss': [\d.]+, 'accuracy': [\d.]+, 'global_step': 30\}", out), out
    code, out, err = done["predict"]
    assert code == 0, err[-3000:]
    assert re.search(r"digit\.png: class \d", out), out
    code, out, err = done["repro"]
    assert code == 0, out + err[-3000:]
    assert "every metric history agrees (rtol=0.0, atol=0.0)" in out
    with team_server.as_user("owner"):
        [repeat] = MlflowClient(team_server.url).search_runs(
            [team_server.experiment_id], filter_string=f"tags.repro_of = '{child}'"
        )
        assert repeat.info.status == "FINISHED"


def test_mlflow_records_straight_into_the_servers_postgresql_database(
    team_server, mnist_dir, tmp_path
):
    """`tracking.uri=postgresql://...`: MLflow's own PostgreSQL store (psycopg), no server in
    between; the run lands in the database the server reads, so the admin sees it there."""
    result = cli(
        "runner",
        *QUICK,
        f"tracking.uri={team_server.db_uri}",
        "tracking.experiment_name=straight-to-postgresql",
        cwd=tmp_path,
        mnist_dir=mnist_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(team_server.db_uri)
    experiment = client.get_experiment_by_name("straight-to-postgresql")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics.keys() >= RESULTS
    assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == 1
    # The database's password is in the URI: recorded and printed masked.
    assert run.data.params["tracking.uri"] == team_server.db_uri.replace(
        team_server.pg_password, "***"
    )
    assert team_server.pg_password not in result.stdout + result.stderr
    with team_server.as_user("admin"):
        assert MlflowClient(team_server.url).get_run(run.info.run_id).info.status == "FINISHED"
