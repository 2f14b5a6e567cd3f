"""Equal configs give equal runs, whatever ran before in the process; each run records its
environment."""

import hashlib
import json

import mlflow
from mlflow import MlflowClient

from runner.data import TEST_LABELS, read_idx
from runner.repro import histories
from runner.train import train

from .conftest import QUICK, compose_config


def histories_of(store_uri: str, experiment: str) -> list[dict]:
    """Every run's metric histories, oldest run first."""
    client = MlflowClient(store_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    return [histories(client, run) for run in runs]


def test_same_config_gives_identical_metric_histories(in_tmp_store):
    """In one process, as in a reused sweep worker. The raw-ops CNN, whose dropout draws random
    numbers, is checked so in test_launchers' joblib sweep (seeds 7, 8, 7 on two workers)."""
    model = "softmax"
    store = f"sqlite:///{in_tmp_store / 'mlflow.db'}"
    base = [f"model={model}", f"tracking.uri={store}", f"tracking.experiment_name={model}", *QUICK]
    train(compose_config(base))
    # A run with another seed in between must leave nothing behind for the third.
    train(compose_config([*base, "seed=7", "device.deterministic=false"]))
    train(compose_config(base))
    first, other, third = histories_of(store, model)
    assert first == third
    assert first != other
    assert len(first["train/loss"]) == 3


def test_run_records_its_environment(in_tmp_store, mnist_dir):
    store = f"sqlite:///{in_tmp_store / 'mlflow.db'}"
    train(compose_config([f"tracking.uri={store}", *QUICK]))
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    env = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/environment.json"))
    assert set(env["packages"]) == {"keras", "tensorflow", "mlflow", "hydra-core", "numpy"}
    assert env["devices"][0].startswith("CPU")
    labels = read_idx(mnist_dir / f"{TEST_LABELS}.gz")
    assert env["data_sha256"]["y_test"] == hashlib.sha256(labels.tobytes()).hexdigest()
    assert set(env["data_sha256"]) == {"x_train", "y_train", "x_test", "y_test"}
    # The data's record in MLflow's Datasets: a name, one digest, and each split's size.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    assert {d.name for d in inputs.values()} == {
        "mnist-training",
        "mnist-validation",
        "mnist-test",
    }
    assert len({d.digest for d in inputs.values()}) == 1
    sizes = {context: json.loads(d.profile)["targets_shape"] for context, d in inputs.items()}
    assert sizes == {"training": [1000], "validation": [1000], "test": [1000]}
    tags = run.data.tags
    assert tags["keras_version"] == env["packages"]["keras"]
    assert tags["tensorflow_version"] == env["packages"]["tensorflow"]
    assert tags["devices"].startswith("CPU:0")
    if env["git"]["commit"]:
        assert tags["git_commit"] == env["git"]["commit"]
        assert tags["git_dirty"] in {"True", "False"}
    # The runner's model and loader, Keras's optimizer and loss: no user's code to record.
    assert "user_code" not in env and "user_git_commit" not in tags
