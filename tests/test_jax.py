"""Keras on JAX (`backend=jax`): the tutorial models and a user's model train; a run stopped by
kill -9, then by Ctrl-C, resumes to the uninterrupted run's end bitwise; a CPU split in two
trains data-parallel; a NaN fails the run; models move between backends; predict and repro
use the run's backend. Every JAX command is checked never to have imported TensorFlow."""

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from runner import backends
from runner.cli.train import train
from runner.data import TEST_IMAGES, TEST_LABELS, read_idx
from runner.errors import UserError
from runner.tracking import logged_model, recorded
from runner.training import checkpoints

from .conftest import (
    PROBE,
    QUICK,
    cli,
    compose_config,
    imported,
    only_run,
    readme_commands,
    store_client,
)

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_jax")


def readme(line: int) -> list[str]:
    """The arguments of the `uv run` command on `line` of the README's "Keras on JAX"."""
    uv, run, *command = shlex.split(readme_commands("Keras on JAX")[line])
    assert (uv, run) == ("uv", "run")
    return command


def run_jax(folder: Path, mnist_dir: Path, *overrides: str, env=None, code: int = 0, sweep=False):
    """`runner [-m] debug=quick backend=jax OVERRIDES` in `folder`, ending with `code`, and
    (unless killed, which skips Python's exit) without importing TensorFlow."""
    result = cli(
        "runner",
        *(["-m"] if sweep else []),
        *QUICK,
        "backend=jax",
        *overrides,
        cwd=folder,
        mnist_dir=mnist_dir,
        env={**PROBE, **(env or {})},
        report_tensorflow=True,
    )
    assert result.returncode == code, result.stderr[-3000:]
    if code != -signal.SIGKILL:
        assert imported(result) == {"jax"}
    return result


# The README's first JAX command, the R edition's softmax (probabilities, and their
# cross-entropy as the loss), with dropout before it (a user's model, whose random state a resume
# must carry on), made 120 steps with a checkpoint every 40, 5 steps an execution, and the
# signalling callback (idle unless asked).
RESUMABLE = [
    "experiment=deep_mnist_r",
    "model._target_=tests.probes.dropout_softmax",
    "trainer.steps=120",
    "trainer.checkpoint_every=40",
    "trainer.log_model=true",
    "device.steps_per_execution=5",
    "+callbacks.signal._target_=tests.probes.SignalAt",
]


@pytest.fixture(scope="module")
def jax_softmax(tmp_path_factory, mnist_dir) -> Path:
    """The RESUMABLE run trained on JAX, left alone: the folder of its store, its own folder
    in run/."""
    folder = tmp_path_factory.mktemp("jax_softmax")
    name, *args = readme(0)
    assert name == "runner" and set(args) == {*QUICK, "backend=jax", RESUMABLE[0]}
    run_jax(folder, mnist_dir, *RESUMABLE, f"hydra.run.dir={folder / 'run'}")
    return folder


def test_a_jax_run_records_its_backend_and_learns(jax_softmax):
    run = only_run(jax_softmax)
    assert run.info.status == "FINISHED"
    assert run.data.params["backend"] == "jax"
    tags = run.data.tags
    assert (tags["backend"], tags["backend_version"]) == ("jax", version("jax"))
    assert "tensorflow_version" not in tags
    assert tags["plan.jit_compile"] == "True"
    environment = recorded.logged_environment(run)
    assert environment["backend"] == "jax"
    assert environment["packages"]["jaxlib"] == version("jaxlib")
    assert "tensorflow" not in environment["packages"]
    assert run.data.metrics["test/accuracy"] > 0.7
    [model] = store_client(jax_softmax).search_logged_models([run.info.experiment_id])
    requirements = Path(
        mlflow.artifacts.download_artifacts(f"{model.artifact_location}/requirements.txt")
    ).read_text()
    assert f"jax=={version('jax')}" in requirements
    assert "tensorflow" not in requirements


def test_tutorial_cnns_train_on_jax_with_their_optimizers(tmp_path, mnist_dir):
    """Both CNNs in one sweep: cnn_raw with (fused, on TensorFlow) Adam, cnn_layers with SGD
    and the TF Layers guide's probability hook."""
    result = run_jax(
        tmp_path,
        mnist_dir,
        "model=cnn_raw,cnn_layers",
        "callbacks=probabilities",
        "callbacks.probabilities.every=10",
        "optimizer.lr=0.01",
        sweep=True,
    )
    assert result.stdout.count("step 30: probabilities = [[") == 2, result.stdout[-3000:]
    client = store_client(tmp_path)
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id],
        filter_string="tags.backend = 'jax'",
    )
    assert {r.data.params["model.name"]: r.data.params["optimizer.name"] for r in runs} == {
        "cnn_raw": "adam",
        "cnn_layers": "sgd",
    }
    for run in runs:
        assert run.info.status == "FINISHED"
        loss = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in loss] == [10, 20, 30]
        assert loss[-1].value < loss[0].value, run.data.params["model.name"]
        assert run.data.metrics["test/accuracy"] > 0.2, run.data.params["model.name"]  # chance 0.1


def test_killed_then_interrupted_run_resumes_bitwise(jax_softmax, tmp_path, mnist_dir):
    """kill -9 after step 50 (checkpoint at 40), Ctrl-C after step 80, which stops training at
    the end of the next execution, step 85, mid-window: the run carried on twice ends with the
    weights, metrics and history of the run left alone, each step logged once, all in one
    MLflow run. Four processes: the runs are equal across them."""
    here = [*RESUMABLE, f"hydra.run.dir={tmp_path / 'run'}"]
    killed = -signal.SIGKILL
    run_jax(tmp_path, mnist_dir, *here, env={"RUNNER_TEST_SIGNAL": "KILL@50"}, code=killed)
    assert checkpoints.latest(tmp_path / "run" / "checkpoints").step == 40
    resume = [*here, "trainer.resume=true"]
    result = run_jax(tmp_path, mnist_dir, *resume, env={"RUNNER_TEST_SIGNAL": "INT@80"}, code=130)
    assert "runner: error: stopped by SIGINT at step 85, checkpoint written" in result.stderr
    hint = f"carry on with the same command plus trainer.resume=true hydra.run.dir={tmp_path}/run\n"
    assert hint in result.stderr
    assert "Traceback" not in result.stderr
    assert checkpoints.latest(tmp_path / "run" / "checkpoints").step == 85
    assert only_run(tmp_path).info.status == "KILLED"
    run_jax(tmp_path, mnist_dir, *resume)

    run, want = only_run(tmp_path), only_run(jax_softmax)
    assert run.info.status == "FINISHED"
    for key in ("test/accuracy", "test/loss", "val/accuracy", "train/loss"):
        assert run.data.metrics[key] == want.data.metrics[key], key
    client = store_client(tmp_path)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(10, 121, 10))
    assert recorded.histories(client, run) == recorded.histories(store_client(jax_softmax), want)
    weights = [checkpoints.latest(f / "run" / "checkpoints") for f in (tmp_path, jax_softmax)]
    got, expected = (w.load_model().get_weights() for w in weights)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_cpu_split_in_two_trains_data_parallel(tmp_path, mnist_dir):
    """The README's command, with a user's model (tests.probes) that records how XLA laid
    each batch out: the 2 x 100 examples of a step split 100 a device."""
    layout = tmp_path / "layout.jsonl"
    name, *args = readme(1)
    assert name == "runner" and set(args) == {*QUICK, "backend=jax", "device.cpu_devices=2"}
    run_jax(
        tmp_path,
        mnist_dir,
        *args,
        "model._target_=tests.probes.sharded_softmax",
        env={"RUNNER_TEST_SHARDING": str(layout)},
    )
    run = only_run(tmp_path)
    assert (run.data.tags["plan.strategy"], run.data.tags["plan.replicas"]) == (
        "data_parallel",
        "2",
    )
    seen = [json.loads(line) for line in layout.read_text().splitlines()]
    training = {"batch": [200, 28, 28, 1], "shard": [100, 28, 28, 1], "devices": 2}
    assert training in seen, seen
    loss = store_client(tmp_path).get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [10, 20, 30]
    assert loss[-1].value < loss[0].value
    metrics = run.data.metrics
    assert metrics["perf/examples_per_sec"] / metrics["perf/steps_per_sec"] == pytest.approx(200)


def test_a_nan_loss_fails_the_jax_run_at_its_step(tmp_path, mnist_dir):
    result = run_jax(tmp_path, mnist_dir, "experiment=deep_mnist_r", "optimizer.lr=1e6", code=1)
    assert re.search(
        r"runner: error: the training loss became (nan|inf) at step \d+", result.stderr
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert only_run(tmp_path).info.status == "FAILED"


def evaluated(folder: Path, mnist_dir: Path, *args: str) -> float:
    """runner-eval's test accuracy, checking that it loaded only the backend it was told to:
    TensorFlow imports JAX where installed, and Keras scikit-learn, unless the runner stops
    them."""
    result = cli("runner-eval", *args, cwd=folder, mnist_dir=mnist_dir, report_tensorflow=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert imported(result) == {"tensorflow" if "backend=tensorflow" in args else "jax"}
    [line] = [x for x in result.stdout.splitlines() if x.startswith("{'loss'")]
    return ast.literal_eval(line)["accuracy"]


def test_models_move_between_backends(jax_softmax, tmp_path, mnist_dir, monkeypatch):
    """A model trained on JAX loads on JAX unless told otherwise (MLflow records its backend)
    and evaluates on TensorFlow, and one trained on TensorFlow evaluates on JAX: each to the
    test accuracy its own run measured."""
    on_jax = only_run(jax_softmax)
    [model] = store_client(jax_softmax).search_logged_models([on_jax.info.experiment_id])
    assert logged_model.backend_of(model.artifact_location.removeprefix("file://")) == "jax"
    there = evaluated(jax_softmax, mnist_dir, f"run_id={on_jax.info.run_id}", "backend=tensorflow")
    assert there == pytest.approx(on_jax.data.metrics["test/accuracy"], abs=1e-4)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train(compose_config([*QUICK, *RESUMABLE[:1], "trainer.log_model=true", f"tracking.uri={uri}"]))
    on_tf = only_run(tmp_path)
    back = evaluated(tmp_path, mnist_dir, f"run_id={on_tf.info.run_id}", "backend=jax")
    assert back == pytest.approx(on_tf.data.metrics["test/accuracy"], abs=1e-4)


def test_predict_and_repro_take_the_runs_backend(jax_softmax, tmp_path, mnist_dir):
    """Unless told otherwise, runner-predict loads the run's model on JAX, and runner-repro
    trains again on JAX (the logged config's backend), in another process, to the same
    history. In a copy of the store, as the rerun is recorded beside the run."""
    run_id = only_run(jax_softmax).info.run_id
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(jax_softmax / "mlflow.db", store / "mlflow.db")
    images = read_idx(mnist_dir / f"{TEST_IMAGES}.gz")[:3]
    labels = read_idx(mnist_dir / f"{TEST_LABELS}.gz")[:3]
    for number, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"digit{number}.png")
    predicted = cli(
        *("runner-predict", f"run_id={run_id}", f"images={tmp_path}"),
        cwd=store,
        mnist_dir=mnist_dir,
        env=PROBE,
        report_tensorflow=True,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert imported(predicted) == {"jax"}
    classes = dict(re.findall(r"/digit(\d)\.png: class (\d)", predicted.stdout))
    assert classes == {str(n): str(label) for n, label in enumerate(labels)}, predicted.stdout

    again = cli(
        "runner-repro",
        run_id,
        cwd=store,
        mnist_dir=mnist_dir,
        env=PROBE,
        report_tensorflow=True,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert imported(again) == {"jax"}


@pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
    reason="the test process's Keras must run on TensorFlow",
)
def test_a_process_cannot_switch_backends():
    """Keras reads its backend once; this test process runs TensorFlow."""
    with pytest.raises(UserError, match="Keras already runs on tensorflow in this process"):
        backends.select("jax")


def test_a_missing_backend_names_the_command_that_installs_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"^backend=jax: jax is not installed here; install it: uv"):
        backends.select("jax")


def test_xla_flags_split_the_cpu_and_fix_gpu_kernels_unless_given():
    from runner.backends.jax import xla_flags

    device = compose_config(["device.cpu_devices=2"]).device
    assert xla_flags("", device) == (
        "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"
    )
    given = "--xla_force_host_platform_device_count=4 --xla_gpu_deterministic_ops=false"
    assert xla_flags(given, device) == given
    assert xla_flags("", compose_config(["device.deterministic=false"]).device) == ""


def test_a_checkpoint_resumes_only_on_its_own_backend(tmp_path):
    """A checkpoint from before `backend` was recorded was written on TensorFlow."""
    cfg = compose_config(["backend=jax", f"trainer.checkpoint_dir={tmp_path}"])
    now = checkpoints.settings(OmegaConf.to_container(cfg, resolve=True), {"train": "d"})
    then = {k: v for k, v in now.items() if k != "backend"}
    written = checkpoints.Checkpoint(tmp_path, 10, "r1", then)
    with pytest.raises(UserError, match=r"trained with backend=tensorflow \(now jax\)"):
        checkpoints._check_settings(written, now, "true")


def test_xla_flags_cannot_change_once_jax_started(monkeypatch):
    """The second job of an in-process sweep (device.cpu_devices=2,1): its JAX keeps the first
    job's two CPU devices, so the job is refused rather than trained data-parallel."""
    from runner.backends import jax as on_jax

    two, one = (compose_config([f"device.cpu_devices={n}"]).device for n in (2, 1))
    monkeypatch.setattr(on_jax, "_GIVEN_FLAGS", "")
    monkeypatch.setattr(on_jax, "_started_with", None)
    started = on_jax.flags_for(two)
    monkeypatch.setattr(on_jax, "_started_with", started)
    assert on_jax.flags_for(two) == started
    with pytest.raises(UserError, match=r"^device.cpu_devices=1 device.deterministic=true need"):
        on_jax.flags_for(one)
    # Determinism is a GPU flag: a CPU-only JAX started without it carries on.
    monkeypatch.setattr(on_jax, "_started_with", "")
    assert on_jax.flags_for(one) == ""


@pytest.mark.parametrize(
    ("eval_batch", "limit", "refused"), [(500, 1000, None), (500, 999, "test")]
)
def test_data_parallel_evaluation_needs_even_batches(eval_batch, limit, refused):
    """Two devices split each evaluation batch, the last one too: 999 test examples leave a
    last batch of 499."""
    from runner.backends.devices import Plan
    from runner.data import Split, Splits
    from runner.training.fitting import check_even_batches

    def split(n):
        return Split(np.zeros((n, 2)), np.zeros(n))

    splits = Splits(split(10), split(1000), split(limit), 10, {})
    plan = Plan("float32", True, 1, "data_parallel", 2)
    if refused is None:
        check_even_batches(splits, eval_batch, plan)
        return
    with pytest.raises(UserError, match=r"leaves a last test batch of 499 examples: pick"):
        check_even_batches(splits, eval_batch, plan)
    check_even_batches(splits, eval_batch, Plan("float32", True, 1, "single", 1))
