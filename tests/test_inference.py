"""`runner-eval` and `runner-predict` on a model that a test trained and logged."""

import gzip
import os
import re
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from runner.data import TEST_IMAGES, TEST_LABELS, read_idx
from runner.errors import UserError
from runner.evaluate import evaluate
from runner.predict import predict
from runner.train import CONF_DIR, train

from .conftest import cli, compose_config

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
                f"tracking_uri=sqlite:///{work}/mlflow.db",
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


def app_config(name: str, overrides: list[str]) -> DictConfig:
    """The config `runner-eval` (name="evaluate") or `runner-predict` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_eval_by_model_uri_matches_eval_by_run(trained, mnist_dir):
    work, run_id = trained
    store = f"tracking_uri=sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    experiment = mlflow.get_experiment_by_name("mnist").experiment_id
    [model] = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    data = f"data.dir={mnist_dir}"
    by_run = evaluate(app_config("evaluate", [f"run_id={run_id}", store, data]))
    by_uri = evaluate(app_config("evaluate", [f"model_uri={model.model_uri}", store, data]))
    assert by_uri == by_run


def test_eval_of_an_unknown_run_is_a_clear_error(trained):
    work, _ = trained
    cfg = app_config(
        "evaluate", ["run_id=0123456789abcdef", f"tracking_uri=sqlite:///{work}/mlflow.db"]
    )
    with pytest.raises(UserError, match="no run '0123456789abcdef' in the tracking store"):
        evaluate(cfg)
    with pytest.raises(UserError, match="give exactly one of run_id"):
        evaluate(app_config("evaluate", [f"tracking_uri=sqlite:///{work}/mlflow.db"]))


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
    store = f"tracking_uri=sqlite:///{work}/mlflow.db"
    cfg = app_config("predict", [f"run_id={run_id}", f"images={tmp_path}/notes.png", store])
    with pytest.raises(UserError, match="notes.png: not a readable image"):
        predict(cfg)
    cfg = app_config("predict", [f"run_id={run_id}", "images=nowhere/*.png", store])
    with pytest.raises(UserError, match=r"images='nowhere/\*.png' matches no file"):
        predict(cfg)
