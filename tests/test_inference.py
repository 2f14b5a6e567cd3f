"""`runner-eval` and `runner-predict` on a model that a test trained and logged."""

import gzip
import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from runner.cli.evaluate import evaluate
from runner.cli.predict import predict
from runner.cli.train import CONF_DIR, train
from runner.config.schema import EvaluateConf, PredictConf
from runner.data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, read_idx
from runner.errors import UserError

from .conftest import QUICK, cli, compose_config, only_run

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_inference")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir) -> tuple[Path, str]:
    """A 300-step softmax run with its model logged, in a scratch folder's default store."""
    work = tmp_path_factory.mktemp("inference")
    old = Path.cwd()
    os.chdir(work)
    try:
        cfg = compose_config(
            [
                f"data.dir={mnist_dir}",
                f"tracking.uri=sqlite:///{work}/mlflow.db",
                "trainer.steps=300",
                "trainer.progress_bar=false",
            ]
        )
        train(cfg)
    finally:
        os.chdir(old)
    runs = mlflow.search_runs(experiment_names=["mnist"])
    return work, runs.run_id[0]


def test_eval_prints_the_guides_dict(trained, mnist_dir):
    work, run_id = trained
    result = cli("runner-eval", f"run_id={run_id}", cwd=work, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(
        r"\{'loss': ([\d.]+), 'accuracy': ([\d.]+), 'global_step': 300\}", result.stdout
    )
    assert found, result.stdout
    assert float(found.group(2)) >= 0.85
    assert not (work / "outputs" / "runner-eval").exists()


def app_config(name: str, overrides: list[str]) -> EvaluateConf | PredictConf:
    """The settings `runner-eval` (name="evaluate") or `runner-predict` would run with, made from
    their config as the commands make them."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    cfg.tracking.experiment_name = ""
    return OmegaConf.to_object(cfg)


def test_eval_by_model_uri_matches_eval_by_run(trained, mnist_dir):
    work, run_id = trained
    store = f"tracking.uri=sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    experiment = mlflow.get_experiment_by_name("mnist").experiment_id
    [model] = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    data = f"+data.dir={mnist_dir}"  # a key of the run's own data config, changed
    by_run = evaluate(app_config("evaluate", [f"run_id={run_id}", store, data]))
    by_uri = evaluate(app_config("evaluate", [f"model_uri={model.model_uri}", store, data]))
    assert by_uri == by_run


def test_eval_of_an_unknown_run_is_a_clear_error(trained):
    work, _ = trained
    cfg = app_config(
        "evaluate", ["run_id=0123456789abcdef", f"tracking.uri=sqlite:///{work}/mlflow.db"]
    )
    with pytest.raises(UserError, match="no run '0123456789abcdef' in the tracking store"):
        evaluate(cfg)
    with pytest.raises(UserError, match="give exactly one of run_id"):
        evaluate(app_config("evaluate", [f"tracking.uri=sqlite:///{work}/mlflow.db"]))


def test_predict_classifies_test_digits_written_as_png(trained, mnist_dir, tmp_path):
    work, run_id = trained
    images = read_idx(mnist_dir / f"{TEST_IMAGES}.gz")[:2]
    labels = read_idx(mnist_dir / f"{TEST_LABELS}.gz")[:2]
    Image.fromarray(images[0]).save(tmp_path / "first.png")
    Image.fromarray(images[1]).resize((112, 112)).save(tmp_path / "second_large.png")
    result = cli(
        "runner-predict", f"run_id={run_id}", f"images={tmp_path}", cwd=work, mnist_dir=mnist_dir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    classes = dict(re.findall(r"/(\w+)\.png: class (\d)", result.stdout))
    assert classes == {"first": str(labels[0]), "second_large": str(labels[1])}
    assert "probabilities = [" in result.stdout


def test_predict_rejects_what_is_not_an_image(trained, tmp_path):
    work, run_id = trained
    (tmp_path / "notes.png").write_bytes(gzip.compress(b"not a picture"))
    store = f"tracking.uri=sqlite:///{work}/mlflow.db"
    cfg = app_config("predict", [f"run_id={run_id}", f"images={tmp_path}/notes.png", store])
    with pytest.raises(UserError, match="notes.png: not a readable image"):
        predict(cfg)
    cfg = app_config("predict", [f"run_id={run_id}", "images=nowhere/*.png", store])
    with pytest.raises(UserError, match=r"images='nowhere/\*.png' matches no file"):
        predict(cfg)


def closed_port() -> int:
    """A local port that nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_cli(name: str, *args: str, cwd: Path, mnist_dir: Path) -> tuple[float, str]:
    """Run a command that must fail; its time in seconds and its one-line stderr."""
    started = time.monotonic()
    result = cli(name, *args, cwd=cwd, mnist_dir=mnist_dir, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{name}: error: ")
    return elapsed, line


def test_eval_and_predict_fail_fast_on_an_unreachable_server(tmp_path, mnist_dir):
    server = f"tracking.uri=http://127.0.0.1:{closed_port()}"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "digit.png")
    for name, args in [
        ("runner-eval", ["run_id=0123456789abcdef"]),
        ("runner-predict", ["run_id=0123456789abcdef", f"images={tmp_path}/digit.png"]),
    ]:
        elapsed, line = timed_cli(name, *args, server, cwd=tmp_path, mnist_dir=mnist_dir)
        assert elapsed < 30
        assert "does not answer" in line and "no run" not in line


def test_bad_arguments_are_told_before_tensorflow_loads(tmp_path, mnist_dir):
    for name, args, message in [
        ("runner-eval", [], "give exactly one of run_id="),
        ("runner-eval", ["run_id=a", "model_uri=models:/b"], "give exactly one of run_id="),
        ("runner-predict", ["run_id=a"], "images=<png, glob or folder>"),
        ("runner-predict", ["images=x.png"], "give exactly one of run_id="),
        ("runner-predict", ["run_id=a", "images=[]"], "images=[] names no image"),
    ]:
        elapsed, line = timed_cli(name, *args, cwd=tmp_path, mnist_dir=mnist_dir)
        assert message in line
        assert elapsed < 8  # loading TensorFlow alone takes longer than that on 2 cores
    # What makes it quick: the command ends before anything imports TensorFlow.
    for module, name, args, message in [
        ("evaluate", "runner-eval", [], "give exactly one of run_id="),
        ("predict", "runner-predict", ["run_id=a"], "give the images"),
    ]:
        script = (
            "import sys\n"
            f"from runner.cli.{module} import main\n"
            f"sys.argv = {[name, *args]!r}\n"
            "try:\n"
            "    main()\n"
            "except SystemExit as exit:\n"
            "    print(exit.code)\n"
            "print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert f"{name}: error: {message}" in result.stderr, result.stderr[-2000:]
        assert result.stdout == "1\ntensorflow imported: False\n"


def test_eval_reports_the_step_the_model_reached_not_the_planned_one(tmp_path, mnist_dir):
    """A run that stopped early, or that an earlier runner resumed past the steps it was started
    for, has a trainer.steps parameter other than the step its model reached: here a model
    trained 60 steps, logged by a run whose parameter says 30."""
    from runner.backends.tensorflow_logs import load_tensorflow

    load_tensorflow()
    import keras

    from runner.tracking.store import open_store

    store = f"sqlite:///{tmp_path}/mlflow.db"
    open_store(store, "mnist")  # its artifacts beside the store, not in the working folder
    images = read_idx(mnist_dir / f"{TRAIN_IMAGES}.gz")[:600].reshape(600, 784) / 255
    labels = read_idx(mnist_dir / f"{TRAIN_LABELS}.gz")[:600]
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(True))
    with mlflow.start_run() as run:
        mlflow.log_param("trainer.steps", 30)
        model.fit(images, labels, batch_size=10, epochs=1, verbose=0)  # 60 steps
        mlflow.keras.log_model(model, name="model")
    cfg = app_config(
        "evaluate",
        [
            f"run_id={run.info.run_id}",
            f"tracking.uri={store}",
            "data=mnist",
            f"data.dir={mnist_dir}",
        ],
    )
    assert evaluate(cfg)["global_step"] == 60


def test_predict_reads_ink_held_in_the_alpha_channel_and_warns_of_blank_images(
    trained, mnist_dir, tmp_path
):
    work, run_id = trained
    digits = read_idx(mnist_dir / f"{TEST_IMAGES}.gz")[:5]
    for i, digit in enumerate(digits):
        Image.fromarray(digit).save(tmp_path / f"plain{i}.png")
        # Black ink on transparent: every colour channel 0, the digit in the alpha channel.
        rgba = np.zeros((28, 28, 4), np.uint8)
        rgba[..., 3] = digit
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"alpha{i}.png")
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "blank.png")
    result = cli(
        "runner-predict", f"run_id={run_id}", f"images={tmp_path}", cwd=work, mnist_dir=mnist_dir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    classes = dict(re.findall(r"/(\w+)\.png: class (\d)", result.stdout))
    assert len(set(classes[f"plain{i}"] for i in range(5))) > 1
    assert all(classes[f"alpha{i}"] == classes[f"plain{i}"] for i in range(5)), classes
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path}/blank.png is blank (every pixel alike): its class means nothing"
    ]


def test_a_model_saved_in_a_folder_evaluates_from_anywhere(trained, mnist_dir, tmp_path):
    """A logged model downloaded to a folder loads without the store it was logged in; with no
    run to read its data from, the data is named."""
    work, run_id = trained
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    experiment = mlflow.get_experiment_by_name("mnist").experiment_id
    [model] = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    folder = mlflow.artifacts.download_artifacts(model.model_uri, dst_path=str(tmp_path / "m"))
    elsewhere = [f"model_uri={folder}", f"tracking.uri=sqlite:///{tmp_path}/other.db"]
    by_folder = evaluate(
        app_config("evaluate", [*elsewhere, "data=mnist", f"data.dir={mnist_dir}"])
    )
    by_run = evaluate(
        app_config("evaluate", [f"run_id={run_id}", f"tracking.uri=sqlite:///{work}/mlflow.db"])
    )
    assert by_folder["accuracy"] == by_run["accuracy"]
    with pytest.raises(UserError, match="has no training run to take its data from"):
        evaluate(app_config("evaluate", elsewhere))


def test_eval_on_data_of_another_shape_is_one_line(trained, tmp_path):
    work, run_id = trained
    path = tmp_path / "small.npz"
    small = np.zeros((4, 12, 12, 3), np.uint8)
    np.savez(path, x_train=small, y_train=np.zeros(4, int), x_test=small, y_test=np.zeros(4, int))
    cfg = app_config(
        "evaluate",
        [
            f"run_id={run_id}",
            f"tracking.uri=sqlite:///{work}/mlflow.db",
            "data=npz",
            f"data.path={path}",
            "data.validation_size=1",
        ],
    )
    with pytest.raises(UserError, match=r"takes inputs of shape \(28, 28, 1\) but the test images"):
        evaluate(cfg)


def write_digits(path: Path, test_rows: int) -> Path:
    """A small .npz of 8x8 images of 4 classes; its test set's rows past 1,000, which a run
    with `data.limit=1000` leaves out, as `test_rows` long."""
    rng = np.random.default_rng(5)
    arrays = {
        "x_train": rng.integers(0, 256, (400, 8, 8), dtype=np.uint8),
        "y_train": np.arange(400) % 4,
        "x_test": rng.integers(0, 256, (1000 + test_rows, 8, 8), dtype=np.uint8),
        "y_test": np.arange(1000 + test_rows) % 4,
    }
    np.savez(path, **arrays)
    return path


def test_a_relative_data_path_is_recorded_absolute_with_its_digest(
    in_tmp_store, monkeypatch, caplog, capsys
):
    """A run on `data.path=sets/digits.npz` is evaluated and rerun from another folder; once the
    file changes, both say so (here in rows the run left out, so the results still agree)."""
    from runner.cli.repro import main as repro
    from runner.tracking.recorded import logged_environment

    (in_tmp_store / "sets").mkdir()
    path = write_digits(in_tmp_store / "sets" / "digits.npz", test_rows=100)
    store = f"sqlite:///{in_tmp_store}/mlflow.db"
    relative = ["data=npz", "data.path=sets/digits.npz", "trainer.log_model=true"]
    train(compose_config([*relative, *QUICK, f"tracking.uri={store}"]))
    run = only_run(in_tmp_store, "npz")
    assert run.data.params["data.path"] == str(path)
    logged = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert OmegaConf.create(logged).data.path == str(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert logged_environment(run)["data_file"] == {"path": str(path), "sha256": digest}

    elsewhere = in_tmp_store / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = app_config("evaluate", [f"run_id={run.info.run_id}", f"tracking.uri={store}"])
    assert evaluate(cfg)["accuracy"] == run.data.metrics["test/accuracy"]

    write_digits(path, test_rows=200)
    changed = hashlib.sha256(path.read_bytes()).hexdigest()
    with caplog.at_level("WARNING", logger="runner.data"):
        assert evaluate(cfg)["accuracy"] == run.data.metrics["test/accuracy"]
    assert [r.getMessage() for r in caplog.records if r.name == "runner.data"] == [
        f"data.path={path} has changed since the run trained on it (SHA-256 {digest} then, "
        f"{changed} now): results on it may differ from the run's"
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the rerun imports from its folder
    capsys.readouterr()
    repro([run.info.run_id])  # returns: every metric agrees
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["data_file.sha256"] == [digest, changed]


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_eval_of_a_model_of_fewer_classes_than_the_labels_is_one_line(kind):
    """A 3-class model given MNIST's test labels, up to 9: refused before evaluating, whether
    the model declares its output or only tells it by running."""
    import keras

    from runner.cli.evaluation import fitted
    from runner.data import Split

    from .test_models import Subclassed

    if kind == "functional":
        inputs = keras.Input((28, 28, 1))
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    else:
        model = Subclassed(3)
        model(np.zeros((1, 28, 28, 1), np.float32))  # built, as a trained model is
    test = Split(np.zeros((4, 28, 28, 1), np.float32), np.array([0, 1, 2, 9]))
    with pytest.raises(UserError) as error:
        fitted(test, model)
    assert str(error.value) == (
        "the model scores 3 classes but the test labels reach 9: evaluate it on the data it "
        "trained on (leave data= out), or on data of 3 classes"
    )
    three = Split(test.x, np.array([0, 1, 2, 2]))
    assert fitted(three, model) is three


def test_sixteen_bit_grey_pngs_keep_their_levels(tmp_path):
    from runner.data.images import open_image, pixels

    levels = np.zeros((28, 28), np.uint16)
    levels[7:21, 12:16] = 60000  # a bright bar on black, in 16 bits
    Image.fromarray(levels).save(tmp_path / "deep.png")
    image = open_image(tmp_path / "deep.png")
    values = pixels(image, tmp_path / "deep.png", (28, 28, 1), invert=False)
    assert values.max() == pytest.approx(60000 / 65535, abs=1 / 255)
    assert values.min() == 0.0


def test_an_unknown_run_is_told_before_tensorflow_loads(trained):
    work, _ = trained
    probe = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "from runner.errors import UserError\n"
        "from runner.cli.evaluate import evaluate\n"
        "from runner.cli.train import CONF_DIR\n"
        "with initialize_config_dir(config_dir=str(CONF_DIR), version_base='1.3'):\n"
        f"    cfg = compose('evaluate', ['run_id=0123456789abcdef', 'tracking.uri=sqlite:///{work}/mlflow.db'])\n"
        "cfg.tracking.experiment_name = ''  # as runner-eval sets it, with no data named\n"
        "try:\n"
        "    evaluate(OmegaConf.to_object(cfg))\n"
        "except UserError as error:\n"
        "    print(error, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip().endswith("False"), result.stdout + result.stderr[-2000:]
    assert "no run '0123456789abcdef'" in result.stdout
