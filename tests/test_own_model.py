"""A user's own model and data, through the command line alone: a builder in a package of their
own outside the repository, a config folder naming it and an .npz of their images, trained (its
code's commit and source recorded), then evaluated, used and rerun; the tutorial models on that
data; the one-line errors a user's code or file can cause; and the README's commands for it, as
written."""

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from PIL import Image

from runner.cli import reruns
from runner.cli.evaluate import evaluate
from runner.cli.predict import predict
from runner.cli.train import train
from runner.data import TEST_IMAGES, TEST_LABELS, read_idx
from runner.errors import UserError

from .conftest import QUICK, REPO, cli, compose_config, only_run, readme_commands, store_client
from .test_inference import app_config

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("own_model")

CLASSES = 5

# What a user writes: a package of builders, outside the runner's repository.
BUILDERS = '''"""My networks."""

import keras


def build_mlp(input_shape, num_classes, hidden: int = 32):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(hidden, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def broken(input_shape, num_classes):
    raise ValueError("this builder is broken")
'''

MODEL_CONFIG = """# My MLP: `runner --config-dir my_conf model=mlp`
_target_: mynets.build_mlp
hidden: 32
"""

# The user's run: trained long enough to learn the easy classes below, with the model logged.
TRAIN = [*QUICK, "optimizer=adam", "optimizer.lr=0.01", "trainer.log_model=true"]


def squares(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """12x12 RGB noise, each image with a bright square of a random colour where its class
    puts it: classes a small MLP tells apart in a few dozen steps."""
    labels = np.arange(n) % CLASSES
    rng.shuffle(labels)
    images = rng.integers(0, 80, (n, 12, 12, 3), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        row, col = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)][label]
        image[row : row + 4, col : col + 4] = rng.integers(160, 256, 3, dtype=np.uint8)
    return images, labels.astype(np.uint8)


def git(folder: Path, *args: str) -> str:
    identity = ["-c", "user.name=User", "-c", "user.email=user@example.com"]
    command = ["git", *identity, *args]
    return subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """The user's folder, a git checkout of its own: mynets/ (their builders) and
    my_conf/model/mlp.yaml, committed, and shapes.npz."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "mynets").mkdir()
    (folder / "mynets" / "__init__.py").write_text(BUILDERS)
    (folder / "my_conf" / "model").mkdir(parents=True)
    (folder / "my_conf" / "model" / "mlp.yaml").write_text(MODEL_CONFIG)
    git(folder, "init", "--quiet")
    git(folder, "add", "mynets", "my_conf")
    git(folder, "commit", "--quiet", "-m", "My networks")
    rng = np.random.default_rng(0)
    x_train, y_train = squares(600, rng)
    x_test, y_test = squares(200, rng)
    np.savez(folder / "shapes.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return folder


@pytest.fixture(scope="module")
def trained(user, mnist_dir, tmp_path_factory) -> tuple[Path, str]:
    """`runner --config-dir my_conf model=mlp data=npz ...` run in the user's folder, recording
    into the store there; the folder and the run's id."""
    result = cli(
        "runner",
        "--config-dir",
        "my_conf",
        "model=mlp",
        "data=npz",
        f"data.path={user / 'shapes.npz'}",
        *TRAIN,
        cwd=user,
        mnist_dir=mnist_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return user, only_run(user, "npz").info.run_id


def test_own_model_and_data_train_through_the_cli(trained):
    work, run_id = trained
    run = store_client(work).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] >= 0.9  # chance is 0.2
    [logged] = store_client(work).search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.source_run_id == run_id


def test_eval_of_the_run_uses_its_own_data(trained, mnist_dir):
    work, run_id = trained
    result = cli("runner-eval", f"run_id={run_id}", cwd=work, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"'accuracy': ([\d.]+)", result.stdout)
    assert found, result.stdout
    logged = store_client(work).get_run(run_id).data.metrics["test/accuracy"]
    assert float(found.group(1)) == pytest.approx(logged, abs=1e-6)


def test_predict_classifies_the_users_images(trained, mnist_dir, tmp_path):
    """One test image of each class, written as a 12x12 RGB PNG: the model, at least 90%
    accurate on such images, classifies these (the run is deterministic, so this holds or fails
    the same way on every run in one environment)."""
    work, run_id = trained
    with np.load(work / "shapes.npz") as data:
        x_test, y_test = data["x_test"], data["y_test"]
    for label in range(CLASSES):
        first = int(np.flatnonzero(y_test == label)[0])
        Image.fromarray(x_test[first]).save(tmp_path / f"class{label}.png")
    result = cli(
        "runner-predict", f"run_id={run_id}", f"images={tmp_path}", cwd=work, mnist_dir=mnist_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = re.findall(
        r"/class(\d)\.png: class (\d+), probabilities = \[([^\]]*)\]", result.stdout
    )
    assert len(predicted) == CLASSES, result.stdout
    for truth, found, probabilities in predicted:
        assert found == truth
        assert len(probabilities.split()) == CLASSES


def test_the_users_code_is_recorded_with_its_own_commit(trained):
    """The runner's commit says nothing of a builder in the user's folder: the run records that
    folder's commit and state too, and the module's source."""
    work, run_id = trained
    run = store_client(work).get_run(run_id)
    commit = git(work, "rev-parse", "HEAD").strip()
    assert run.data.tags["user_git_commit"] == commit != run.data.tags.get("git_commit")
    assert run.data.tags["user_git_dirty"] == "False"
    artifacts = f"{run.info.artifact_uri}"
    env = json.loads(mlflow.artifacts.load_text(f"{artifacts}/environment.json"))
    source = (work / "mynets" / "__init__.py").read_bytes()
    assert env["user_code"] == {
        "modules": {
            "mynets": {"path": "mynets/__init__.py", "sha256": hashlib.sha256(source).hexdigest()}
        },
        "git": {"commit": commit, "dirty": False},
    }
    assert mlflow.artifacts.load_text(f"{artifacts}/code/mynets/__init__.py") == BUILDERS


def test_repro_of_the_users_run_agrees_and_names_their_changed_code(trained, mnist_dir):
    """Its builder edited since (a comment, which trains the same): the rerun agrees, and the
    environment table names the change as the user's code's, not the runner's."""
    work, run_id = trained
    builders = work / "mynets" / "__init__.py"
    builders.write_text(BUILDERS + "# tuned later\n")
    try:
        result = cli("runner-repro", run_id, cwd=work, mnist_dir=mnist_dir)
    finally:
        builders.write_text(BUILDERS)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["user_code.git.dirty", "(your", "code's)", "False", "True"] in rows
    assert [row[0] for row in rows if row[0].startswith("user_code.modules.")] == [
        "user_code.modules.mynets.sha256"
    ]
    assert not any(row[0].startswith("git.") for row in rows if row)


def without_y_test(user: Path, folder: Path) -> Path:
    """A copy of the user's .npz that lacks y_test."""
    with np.load(user / "shapes.npz") as data:
        arrays = {key: data[key] for key in data.files if key != "y_test"}
    path = folder / "no_y_test.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model._target_=mynets.nowhere.build"],
            "mynets.nowhere.build: mynets holds no 'nowhere'",
        ),
        (
            ["model._target_=mynets.build_mlp", "+model.widht=3"],
            "model.widht is not a parameter of mynets.build_mlp",
        ),
        (["data.path={npz_without_y_test}"], "the .npz holds no y_test"),
        (
            ["model._target_=mynets.broken"],
            "mynets.broken raised ValueError: this builder is broken",
        ),
    ],
    ids=["target-not-importable", "unknown-builder-key", "npz-lacks-y_test", "builder-raises"],
)
def test_a_users_mistake_is_found_before_the_run_starts(
    user, tmp_path, monkeypatch, overrides, message
):
    """In-process, as the command would run them (from the user's folder): each mistake is a
    UserError, which the command prints as its one line `runner: error: ...` (test_config),
    and no run is recorded at all."""
    monkeypatch.chdir(user)
    monkeypatch.syspath_prepend(str(user))
    npz = without_y_test(user, tmp_path)
    overrides = [o.format(npz_without_y_test=npz) for o in overrides]
    store = f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    config = ["data=npz", f"data.path={user / 'shapes.npz'}", *overrides, *QUICK, store]
    with pytest.raises(UserError, match=re.escape(message)):
        train(compose_config(config))
    client = store_client(tmp_path)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_readme_own_model_and_data_commands_work_as_written(mnist_dir, tmp_path):
    """Each command of "Your own model and data", in a copy of examples/: `cd examples` moves
    there, `uv run X` runs the environment's X."""
    commands = readme_commands("Your own model and data")
    assert commands[0] == "cd examples"
    work = tmp_path / "examples"
    shutil.copytree(
        REPO / "examples",
        work,
        ignore=shutil.ignore_patterns("mlflow.db*", "mlruns", "outputs", "*.npz", "__pycache__"),
    )
    trained = 0
    for command in commands[1:]:
        uv, run, name, *args = shlex.split(command)
        assert (uv, run) == ("uv", "run"), command
        result = cli(name, *args, cwd=work, mnist_dir=mnist_dir)
        assert result.returncode == 0, command + "\n" + result.stderr[-3000:]
        trained += name == "runner"
    client = store_client(work)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == trained
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"train/loss", "val/accuracy", "test/accuracy"} <= run.data.metrics.keys()
    # A tutorial model trains on the user's data as on MNIST.
    assert ("cnn_layers", "shapes") in {
        (r.data.params["model.name"], r.data.params["data.name"]) for r in runs
    }


# A subclassed model, which Keras knows by its registered name only once its module has run.
SUBCLASSED = '''"""My subclassed network."""

import keras


@keras.saving.register_keras_serializable(package="subnet")
class SubNet(keras.Model):
    def __init__(self, num_classes=10, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(num_classes)

    def call(self, x):
        return self.dense(self.flatten(x))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def build(input_shape, num_classes):
    return SubNet(num_classes)
'''
SUBNET = ["model._target_=subnet.build", "model.name=subnet", *QUICK]


@pytest.fixture(scope="module")
def subclassed(tmp_path_factory, mnist_dir) -> tuple[Path, str]:
    """A subclassed model trained with its model logged, by `runner` in the folder of its
    module (a process, so that this one has not imported the module); the folder and the run."""
    folder = tmp_path_factory.mktemp("subclassed")
    (folder / "subnet.py").write_text(SUBCLASSED)
    result = cli("runner", *SUBNET, "trainer.log_model=true", cwd=folder, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, only_run(folder).info.run_id


@pytest.fixture
def run_from(monkeypatch, mnist_dir):
    """Work in a folder as a command started there would: the folder importable, MNIST where
    it is (MNIST_DIR may be relative), and the subclassed model's module not imported, nor its
    class known to Keras."""

    def forget() -> None:
        sys.modules.pop("subnet", None)
        keras.saving.get_custom_objects().pop("subnet>SubNet", None)

    def move(folder: Path) -> None:
        monkeypatch.chdir(folder)
        monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
        monkeypatch.setattr(sys, "path", [str(folder), *sys.path])
        forget()

    yield move
    forget()


def first_test_digits(mnist_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(mnist_dir / f"{TEST_IMAGES}.gz")[:n]
    return images, read_idx(mnist_dir / f"{TEST_LABELS}.gz")[:n]


def test_a_subclassed_model_loads_back_from_its_folder(subclassed, run_from, mnist_dir, tmp_path):
    """runner-eval, runner-predict and MLflow's pyfunc import the model's module before they
    load it, and its MLmodel records that module and its folder."""
    folder, run_id = subclassed
    run_from(folder)
    store = f"tracking.uri=sqlite:///{folder}/mlflow.db"
    found = evaluate(app_config("evaluate", [f"run_id={run_id}", store]))
    assert found["global_step"] == 30
    run = store_client(folder).get_run(run_id)
    assert found["accuracy"] == pytest.approx(run.data.metrics["test/accuracy"], abs=1e-6)
    digits, _ = first_test_digits(mnist_dir, 1000)  # the run's test split (data.limit)
    Image.fromarray(digits[0]).save(tmp_path / "digit.png")
    [(_, digit, probabilities)] = predict(
        app_config("predict", [f"run_id={run_id}", f"images={tmp_path}/digit.png", store])
    )
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    [model] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert model.source_run_id == run_id
    assert mlflow.models.get_model_info(model.model_uri).metadata == {
        "output": "logits",
        "module": "subnet",
        "module_folder": str(folder),
    }
    answers = mlflow.pyfunc.load_model(model.model_uri).predict(digits)
    assert answers["class"][0] == digit
    assert np.allclose(answers["probabilities"][0], probabilities, atol=1e-6)
    _, labels = first_test_digits(mnist_dir, 1000)
    assert (answers["class"] == labels).mean() == pytest.approx(found["accuracy"], abs=1e-6)


def test_a_subclassed_run_extends_from_its_folder(subclassed, run_from, tmp_path):
    folder, run_id = subclassed
    run_from(folder)
    [checkpoints] = folder.glob("outputs/*/*/checkpoints")
    shutil.copytree(checkpoints, tmp_path / "checkpoints")  # the shared run's stay as they are
    extend = [
        "trainer.resume=extend",
        "trainer.steps=40",
        f"trainer.checkpoint_dir={tmp_path / 'checkpoints'}",
        f"tracking.uri=sqlite:///{folder}/mlflow.db",
    ]
    train(compose_config([*SUBNET, *extend]))
    client = store_client(folder)
    [extended] = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id], f"tags.extends = '{run_id}'"
    )
    assert extended.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(extended.info.run_id, "test/accuracy")] == [
        40
    ]


def test_a_subclassed_model_elsewhere_names_its_module_and_folder(subclassed, run_from, tmp_path):
    """From a folder without its module, each way of loading the model says in one line which
    module it needs and where to run from, and leaves no run RUNNING."""
    folder, run_id = subclassed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_from(elsewhere)
    message = (
        f"the model needs its module subnet, which cannot be imported from {elsewhere}: run "
        f"from {folder}, where the model was trained"
    )
    store = f"sqlite:///{folder}/mlflow.db"
    mlflow.set_tracking_uri(store)
    experiment = store_client(folder).get_run(run_id).info.experiment_id
    [model] = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(elsewhere / "digit.png")
    [checkpoints] = folder.glob("outputs/*/*/checkpoints")
    extend = [
        "trainer.resume=extend",
        "trainer.steps=40",
        f"trainer.checkpoint_dir={checkpoints}",
        f"tracking.uri={store}",
    ]
    loads = {
        "runner-eval": lambda: evaluate(
            app_config("evaluate", [f"run_id={run_id}", f"tracking.uri={store}"])
        ),
        "runner-predict": lambda: predict(
            app_config("predict", [f"run_id={run_id}", "images=digit.png", f"tracking.uri={store}"])
        ),
        "pyfunc": lambda: mlflow.pyfunc.load_model(model.model_uri),
        "runner trainer.resume=extend": lambda: train(compose_config([*SUBNET, *extend])),
        "runner-repro": lambda: reruns.rerun(run_id, store, []),
    }
    for name, load in loads.items():
        with pytest.raises(UserError) as error:
            load()
        assert str(error.value) == message, name
    client = store_client(folder)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "RUNNING" not in {r.info.status for r in runs}
