"""Equal configs give equal runs, whatever ran before in the process; each run records its
environment."""

import hashlib
import json

import mlflow
from mlflow import MlflowClient

from runner.cli.train import train
from runner.data import TEST_LABELS, read_idx
from runner.tracking.recorded import histories

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


def dataset_inputs(client: MlflowClient, run_id: str) -> dict:
    """The run's MLflow dataset records, by context (training, validation, test)."""
    inputs = client.get_run(run_id).inputs.dataset_inputs
    found = {i.tags[0].value: i.dataset for i in inputs}
    assert set(found) == {"training", "validation", "test"}
    return found


def dataset_sizes(inputs: dict) -> dict[str, int]:
    """Each dataset record's number of examples, and of images, which must agree."""
    sizes = {}
    for context, dataset in inputs.items():
        profile = json.loads(dataset.profile)
        assert profile["features_shape"][0] == profile["targets_shape"][0]
        sizes[context] = profile["targets_shape"][0]
    return sizes


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
    # The data's record in MLflow's Datasets: per split a name, its size and its own digest.
    inputs = dataset_inputs(client, run.info.run_id)
    assert {d.name for d in inputs.values()} == {
        "mnist-training",
        "mnist-validation",
        "mnist-test",
    }
    assert len({d.digest for d in inputs.values()}) == 3
    assert dataset_sizes(inputs) == {"training": 1000, "validation": 1000, "test": 1000}
    tags = run.data.tags
    assert tags["keras_version"] == env["packages"]["keras"]
    assert tags["tensorflow_version"] == env["packages"]["tensorflow"]
    assert tags["devices"].startswith("CPU:0")
    if env["git"]["commit"]:
        assert tags["git_commit"] == env["git"]["commit"]
        assert tags["git_dirty"] in {"True", "False"}
    # The runner's model and loader, Keras's optimizer and loss: no user's code to record.
    assert "user_code" not in env and "user_git_commit" not in tags
    # A second run on other subsets of the same data gets records of its own: MLflow would
    # link it to the first run's if a digest were the same.
    other = [
        "data.limit=2000",
        "data.validation_size=500",
        "trainer.steps=10",
        "trainer.eval_every=10",
    ]
    train(compose_config([f"tracking.uri={store}", *QUICK, *other]))
    [second] = [
        r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id
    ]
    again = dataset_inputs(client, second.info.run_id)
    assert dataset_sizes(again) == {"training": 2000, "validation": 500, "test": 2000}
    digests = {d.digest for d in [*inputs.values(), *again.values()]}
    assert len(digests) == 6
