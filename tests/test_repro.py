"""`runner-repro`: rerun a logged run and compare its metric histories step by step."""

import json
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from runner.cli import repro
from runner.cli.reruns import rerun
from runner.errors import UserError
from runner.tracking import recorded
from runner.tracking.differences import Difference, compare, environment_differences

from .conftest import QUICK, REPO, cli, compose_config, store_client

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_repro")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, mnist_dir) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("repro")
    result = cli("runner", *QUICK, cwd=work, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    client = store_client(work)
    [run] = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    return work, run.info.run_id


def test_repro_of_an_unchanged_run_agrees_exactly(logged_run, mnist_dir):
    work, run_id = logged_run
    result = cli("runner-repro", run_id, cwd=work, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "every metric history agrees (rtol=0.0, atol=0.0)" in result.stdout
    client = store_client(work)
    tagged = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id],
        filter_string=f"tags.repro_of = '{run_id}'",
    )
    assert len(tagged) == 1 and tagged[0].info.status == "FINISHED"
    [fresh] = (work / "outputs" / "repro").iterdir()
    assert fresh.name.startswith(f"{run_id}_")
    assert (fresh / "checkpoints" / "step-0000030").is_dir()


def test_repro_that_differs_exits_1_with_the_first_differing_steps(
    logged_run, mnist_dir, monkeypatch, capsys
):
    """In-process (the command's main), as the rerun trains in the calling process anyway."""
    work, run_id = logged_run
    monkeypatch.chdir(work)
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the rerun imports from its folder
    with pytest.raises(SystemExit, match="^1$"):
        repro.main([run_id, "--set", "optimizer.lr=0.4"])
    rows = {
        line.split()[0]: line.split()[1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("train/", "val/", "test/"))
    }
    assert rows["train/loss"] == "10"
    assert rows["test/accuracy"] == "30"


def test_repro_of_an_unknown_run_is_a_clear_error(logged_run):
    work, _ = logged_run
    with pytest.raises(UserError, match="cannot read run feedfacefeedface"):
        rerun("feedfacefeedface", f"sqlite:///{work}/mlflow.db", [])


def test_repro_refuses_an_unknown_or_malformed_set_before_training(
    logged_run, mnist_dir, monkeypatch, capsys
):
    """The first through the command, the others in-process (the same main): one line each,
    exit 1, and no run recorded."""
    work, run_id = logged_run
    client = store_client(work)
    experiment = client.get_experiment_by_name("mnist").experiment_id
    runs_before = len(client.search_runs([experiment]))
    settings = [
        (
            "data.dirr=/x",
            f"--set data.dirr=/x: run {run_id}'s config has no key 'data.dirr' "
            "(did you mean data.dir?)",
        ),
        ("data.dir", "--set 'data.dir' is not KEY=VALUE"),
        ("data.limit=abc", "--set data.limit=abc: data.limit is int in run"),
        ("trainer.progress_bar=3", "--set trainer.progress_bar=3: trainer.progress_bar is bool"),
        ("model=cnn_raw", "--set model=cnn_raw: model is a group of settings"),
    ]
    (setting, message), *others = settings
    result = cli("runner-repro", run_id, "--set", setting, cwd=work, mnist_dir=mnist_dir)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"runner-repro: error: {message}")
    monkeypatch.chdir(work)
    # Absolute: MLflow caches a store by its URI, so a relative one could read another folder's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for setting, message in others:
        with pytest.raises(SystemExit, match="^1$"):
            repro.main([run_id, "--set", setting])
        out, err = capsys.readouterr()
        assert out == ""
        [line] = err.splitlines()
        assert line.startswith(f"runner-repro: error: {message}")
    assert len(client.search_runs([experiment])) == runs_before


WORKFLOW = REPO / "examples" / "github-actions" / "reproducibility.yml"


@pytest.fixture(scope="module")
def golden(logged_run, mnist_dir) -> Path:
    """The README's `runner-repro <run id> --save golden/mnist.json`, in the run's folder."""
    work, run_id = logged_run
    result = cli(
        "runner-repro", run_id, "--save", "golden/mnist.json", cwd=work, mnist_dir=mnist_dir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "check it anywhere with: runner-repro --golden golden/mnist.json" in result.stdout
    return work / "golden" / "mnist.json"


def test_a_saved_golden_file_holds_the_runs_config_environment_and_histories(logged_run, golden):
    work, run_id = logged_run
    saved = json.loads(golden.read_text())
    client = store_client(work)
    run = client.get_run(run_id)
    assert saved["run_id"] == run_id
    assert saved["overrides"] == ["debug=quick"]  # the command line, from hydra/overrides.yaml
    assert saved["config"]["seed"] == int(run.data.params["seed"])
    assert saved["environment"]["python"] == run.data.tags["python_version"]
    history = client.get_metric_history(run_id, "train/loss")
    assert saved["metrics"]["train/loss"] == [[m.step, m.value] for m in history]
    assert not any(key.startswith(("perf/", "system/")) for key in saved["metrics"])


def test_the_example_ci_job_passes_on_its_golden_file_without_a_store(golden, tmp_path, mnist_dir):
    """The workflow's command, as written, in a checkout that holds only golden/mnist.json and
    the data (where the job would download it): exact, in this environment; no store left."""
    [command] = [
        step["run"]
        for step in yaml.safe_load(WORKFLOW.read_text())["jobs"]["golden"]["steps"]
        if "runner-repro" in step.get("run", "")
    ]
    uv, run, name, *args = shlex.split(command)
    assert (uv, run, name) == ("uv", "run", "runner-repro")
    (tmp_path / "golden").mkdir()
    shutil.copy(golden, tmp_path / "golden" / "mnist.json")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist").symlink_to(mnist_dir)
    result = cli(name, *args, cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "every metric history agrees (rtol=0.0, atol=0.0)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "golden"]


def test_a_golden_rerun_that_differs_fails_naming_the_steps(golden, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with pytest.raises(SystemExit, match="^1$"):
        repro.main(["--golden", str(golden), "--set", "optimizer.lr=0.4"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if "/" in line[:6]}
    assert rows["train/loss"] == "10" and rows["test/accuracy"] == "30"
    assert "The environments are the same" in out


def test_a_golden_file_from_another_environment_is_checked_within_rtol_naming_it(
    golden, tmp_path, monkeypatch, capsys
):
    """Recorded with another Keras: the rerun may round otherwise, so it is held to rtol 1e-3
    rather than bitwise, and the output names the difference."""
    elsewhere = json.loads(golden.read_text())
    recorded = elsewhere["environment"]["packages"]["keras"]
    elsewhere["environment"]["packages"]["keras"] = "3.0.0"
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps(elsewhere))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    repro.main(["--golden", str(path)])
    out = capsys.readouterr().out
    assert "every metric history agrees (rtol=0.001, atol=0.0)" in out
    [line] = [line for line in out.splitlines() if line.startswith("packages.keras")]
    assert line.split() == ["packages.keras", "3.0.0", recorded]


def test_config_drift_is_refused_naming_each_key_until_update_rewrites_the_file(
    golden, tmp_path, monkeypatch, capsys
):
    """The CI gate tests conf/ as it stands: a copy of conf/ whose SGD learning rate changed
    composes the file's overrides into another config, refused before anything trains, but for
    the keys that name the machine; --update reruns it and rewrites the file, which then
    passes."""
    import runner.cli.train

    conf = tmp_path / "conf"
    shutil.copytree(runner.cli.train.CONF_DIR, conf)
    sgd = conf / "optimizer" / "sgd.yaml"
    assert "lr: 0.5\n" in sgd.read_text()
    sgd.write_text(sgd.read_text().replace("lr: 0.5\n", "lr: 0.45\n"))
    monkeypatch.setattr(runner.cli.train, "CONF_DIR", conf)
    recorded = json.loads(golden.read_text())
    recorded["config"]["tracking"]["uri"] = "sqlite:////elsewhere/mlflow.db"
    recorded["config"]["trainer"]["checkpoint_dir"] = "/elsewhere/checkpoints"
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(recorded))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with pytest.raises(SystemExit, match="^1$"):
        repro.main(["--golden", str(path)])
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"runner-repro: error: {path}: today's config differs from the one it recorded, "
        f"optimizer.lr: 0.5 -> 0.45; not rerun. After an intended change, rewrite it with "
        f"runner-repro --golden {path} --update\n"
    )
    repro.main(["--golden", str(path), "--update"])
    assert capsys.readouterr().out.startswith(f"updated {path}: today's config")
    updated = json.loads(path.read_text())
    assert updated["config"]["optimizer"]["lr"] == 0.45
    assert updated["overrides"] == recorded["overrides"]
    assert updated["metrics"]["train/loss"] != recorded["metrics"]["train/loss"]
    repro.main(["--golden", str(path)])
    assert "every metric history agrees (rtol=0.0, atol=0.0)" in capsys.readouterr().out


def test_a_run_without_its_command_line_is_not_saved(tmp_path, new_store):
    """A run trained from Python logged no hydra/overrides.yaml: a golden file of it could not
    compose today's config, so --save refuses it in one line."""
    from mlflow import MlflowClient

    shutil.copyfile(new_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("python", artifact_location=str(tmp_path / "mlruns"))
    run_id = client.create_run(experiment).info.run_id
    client.log_text(run_id, "model:\n  _target_: a.build\n", "config.yaml")
    with pytest.raises(UserError) as error:
        recorded.save(run_id, uri, tmp_path / "golden.json")
    assert str(error.value).startswith(
        f"run {run_id} logged no hydra/overrides.yaml, so its command line is unknown"
    )
    assert not (tmp_path / "golden.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the golden file {path}: No such file or directory"),
        ("{", "{path} is not a golden file: Expecting property name"),
        ('{"config": {}}', "{path} is not a golden file: it lacks environment, metrics"),
        ('{"config": [], "environment": {}, "metrics": {}}', "{path} is not a golden file"),
        (
            '{"config": {}, "environment": {}, "metrics": {}}',
            "{path} records no overrides (an older runner-repro wrote it), so today's conf/ "
            "cannot be checked against it: write it anew with runner-repro RUN_ID --save {path}",
        ),
    ],
    ids=["missing", "not-json", "incomplete", "config-not-a-mapping", "older-format"],
)
def test_a_bad_golden_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "golden.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match="^1$"):
        repro.main(["--golden", str(path)])
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"runner-repro: error: {message.format(path=path)}")


def test_repro_fails_fast_on_an_unreachable_server(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again once the block ends
    server = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    started = time.monotonic()
    result = cli("runner-repro", "feedfacefeedface", cwd=tmp_path, env=server, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"runner-repro: error: the MLflow tracking server http://127.0.0.1:{port}"
    )
    assert "does not answer" in line


def test_compare_finds_changed_missing_and_tolerated_values():
    expected = {"loss": [(10, 1.0), (20, 0.5)], "acc": [(10, 0.1)]}
    assert compare(expected, expected) == []
    found = {"loss": [(10, 1.0), (20, 0.5001)], "acc": [(10, 0.1), (20, 0.2)]}
    assert compare(expected, found) == [
        Difference("acc", 20, None, 0.2),
        Difference("loss", 20, 0.5, 0.5001),
    ]
    assert compare({"loss": expected["loss"]}, {"loss": found["loss"]}, rtol=1e-3) == []


def test_environment_differences_name_the_dotted_key():
    a = {"packages": {"keras": "3.15.1", "numpy": "2.4"}, "cpu": "x"}
    b = {"packages": {"keras": "3.16.0", "numpy": "2.4"}, "cpu": "x"}
    assert environment_differences(a, b) == [("packages.keras", "3.15.1", "3.16.0")]


def test_repro_of_a_run_of_an_older_layout_says_so(tmp_path):
    """A run whose logged config predates models named by `_target_` cannot be rerun by this
    runner: one line says which commit can, before anything trains."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("old", artifact_location=str(tmp_path / "mlruns"))
    run_id = client.create_run(experiment, tags={"git_commit": "b0ad1bd"}).info.run_id
    client.log_text(run_id, "model:\n  name: softmax\ntracking_uri: x\n", "config.yaml")
    with pytest.raises(UserError) as error:
        rerun(run_id, uri, [])
    assert str(error.value) == (
        f"run {run_id} was recorded by an older runner, whose config names no "
        f"model._target_: rerun it with the runner of its commit, b0ad1bd"
    )
    # A config of a later layout that lacks a key today's runner needs: the same line names it.
    config = OmegaConf.to_container(compose_config(["debug=quick"]))
    del config["tracking"]["server_patience_s"]
    run_id = client.create_run(experiment, tags={"git_commit": "74d52cf"}).info.run_id
    client.log_text(run_id, OmegaConf.to_yaml(config), "config.yaml")
    with pytest.raises(UserError) as error:
        rerun(run_id, uri, [])
    assert str(error.value) == (
        f"run {run_id} was recorded by an older runner, whose config names no "
        f"tracking.server_patience_s: rerun it with the runner of its commit, 74d52cf"
    )
