"""End to end: the `runner` command trains, reaches the tutorials' accuracy and records it all."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from runner import backends, data
from runner.backends import devices
from runner.cli.train import run_hydra, train
from runner.config.settings import check_config
from runner.errors import Interrupted, Stopped
from runner.training import checkpoints, fitting, modeling, optim, stopping
from runner.training.stopping import StopReason, Stops

from .conftest import QUICK, cli, compose_config, only_run, store_client

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_train")

METRICS = ["train/loss", "train/accuracy", "val/loss", "val/accuracy", "test/loss", "test/accuracy"]


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory, mnist_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """`runner model=softmax trainer.steps=300`, run as a user would, in an empty directory."""
    work = tmp_path_factory.mktemp("softmax")
    result = cli(
        "runner", "model=softmax", "trainer.steps=300", cwd=work, mnist_dir=mnist_dir, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_softmax_reaches_the_tutorial_accuracy(softmax_run):
    work, _ = softmax_run
    run = only_run(work)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] >= 0.85


def test_run_prints_no_tensorflow_error_or_info_lines_on_a_healthy_machine(softmax_run):
    """On a machine without a GPU, TensorFlow used to print its cuInit failure as an ERROR."""
    _, result = softmax_run
    tensorflow_lines = re.findall(r"^[IE]\d{4} [\d:.]+ .*$", result.stderr, re.M)
    assert tensorflow_lines == [], result.stderr[-3000:]


def test_run_records_metrics_at_optimizer_steps(softmax_run):
    work, _ = softmax_run
    run = only_run(work)
    client = store_client(work)
    assert set(METRICS) <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [100, 200, 300]
    assert history[-1].value < history[0].value
    # Validated every eval_every=500 steps and after the last: here only at step 300.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [300]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")] == [300]


def test_run_records_config_tags_and_artifacts(softmax_run):
    work, _ = softmax_run
    run = only_run(work)
    params = run.data.params
    assert params["model.name"] == "softmax"
    assert params["optimizer.lr"] == "0.5"
    assert params["trainer.steps"] == "300"
    assert params["seed"] == "42"
    assert run.data.tags["model"] == "softmax"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert run.data.tags["git_commit"] == head.stdout.strip()
    assert run.info.run_name == "model=softmax,trainer.steps=300"
    client = store_client(work)
    artifacts = artifact_paths(client, run.info.run_id)
    expected = {
        "config.yaml",
        "hydra/overrides.yaml",
        "plots/training_curves.png",
        "plots/confusion_matrix.png",
    }
    assert expected <= artifacts
    config = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    assert "steps: 300" in config and "${" not in config, "the config is logged resolved"
    overrides = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/hydra/overrides.yaml")
    assert "trainer.steps=300" in overrides
    assert (work / "mlruns").is_dir(), "artifacts land in ./mlruns beside ./mlflow.db"


def test_logged_model_loads_back_and_predicts(softmax_run, mnist_dir):
    work, _ = softmax_run
    run = only_run(work)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    [logged] = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert logged.source_run_id == run.info.run_id
    model = mlflow.keras.load_model(logged.model_uri)
    from runner.data import TEST_IMAGES, TEST_LABELS, read_idx

    images = read_idx(mnist_dir / f"{TEST_IMAGES}.gz")[:500].reshape(500, 28, 28, 1) / 255.0
    labels = read_idx(mnist_dir / f"{TEST_LABELS}.gz")[:500]
    accuracy = np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels)
    assert accuracy >= 0.85
    served = mlflow.pyfunc.load_model(logged.model_uri).predict(images.reshape(500, 784))
    assert list(served.columns) == ["class", "probabilities", "logits"]
    assert (served["class"] == model.predict(images, verbose=0).argmax(axis=1)).all()
    signature = mlflow.models.get_model_info(logged.model_uri).signature
    assert signature.inputs is None, "flat and H x W x C images are both taken"
    assert signature.outputs.input_names() == ["class", "probabilities", "logits"]


def short_run(overrides: list[str], store: Path) -> dict[str, float]:
    cfg = compose_config(
        [
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
            "data.limit=2000",
            "trainer.log_every=20",
            "trainer.eval_every=40",
            "trainer.steps=80",
            "trainer.progress_bar=false",
            "trainer.log_model=false",
            *overrides,
        ]
    )
    return train(cfg)


def test_short_cnn_run_lowers_training_loss(in_tmp_store):
    """The layers CNN at a rate that learns in 80 steps. (The raw-ops CNN's loss falls in its
    golden history, tests/golden/cnn_raw.json.)"""
    final = short_run(["model=cnn_layers", "optimizer.lr=0.05"], in_tmp_store)
    run = only_run(in_tmp_store)
    client = store_client(in_tmp_store)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 4
    assert losses[-1] < losses[0] * 0.9
    assert final["test/accuracy"] > 0.3, "well above chance after 80 steps"
    assert run.info.status == "FINISHED"


def test_failed_training_ends_the_run_failed(in_tmp_store, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fitting, "evaluate_outputs", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        short_run(["trainer.steps=20", "trainer.eval_every=20"], in_tmp_store)
    run = only_run(in_tmp_store)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: disk on fire"
    assert "train/loss" in run.data.metrics, "what was measured before the crash is kept"


def test_diverging_loss_stops_the_run_failed_at_its_step(in_tmp_store):
    from runner.training.callbacks import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"the training loss became (nan|inf) at step \d+"):
        short_run(["experiment=deep_mnist_r", "optimizer.lr=1e6"], in_tmp_store)
    run = only_run(in_tmp_store)
    assert run.info.status == "FAILED"
    assert "TrainingDiverged: the training loss became" in run.data.tags["error"]


@pytest.mark.parametrize(
    "args",
    [["trainer.steps=100"], ["-m", "seed=1,2", "trainer.steps=100"]],
    ids=["run", "sweep"],
)
def test_unreachable_tracking_server_is_a_clear_error(tmp_path, mnist_dir, args):
    """A sweep is stopped before its first job: Hydra would turn the error into a warning."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    result = cli("runner", *args, cwd=tmp_path, mnist_dir=mnist_dir, env=server)
    assert result.returncode == 1
    assert f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Warning" not in result.stderr and "Launching" not in result.stdout + result.stderr
    if "-m" in args:
        assert not list(tmp_path.glob("multirun/*/*")), "no empty sweep folder left behind"


@pytest.mark.parametrize("stopped", ["opening", "training", "testing"])
def test_sigterm_ends_the_run_killed_even_sent_again_while_it_closes(
    stopped, in_tmp_store, monkeypatch, caplog
):
    """SIGTERM while MLflow opens the run (between creating it and making it the active run),
    while it trains, or while it tests. SLURM signals a cancelled job's step and its batch
    script, which passes the signal on: the second SIGTERM, arriving while the run closes,
    must not stop the close half way. Stopped while it tests, after its last step, the run is
    finished by its resume."""
    import signal

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from runner.tracking import runs

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    def signalled_again(error):
        terminated()  # as the run is being ended with the first one's error
        return error_tag(error)

    error_tag = runs._error_tag
    monkeypatch.setattr(runs, "_error_tag", signalled_again)
    before = {number: signal.getsignal(number) for number in stopping.STOP_SIGNALS}
    if stopped == "opening":
        start = SystemMetricsMonitor.start

        def started(self):
            terminated()
            start(self)

        monkeypatch.setattr(SystemMetricsMonitor, "start", started)
        with pytest.raises(KeyboardInterrupt, match="SIGTERM") as stop:
            short_run(["tracking.system_metrics=true"], in_tmp_store)
    elif stopped == "training":
        monkeypatch.setenv("RUNNER_TEST_SIGNAL", "TERM@20")
        callback = "+callbacks.signal._target_=tests.probes.SignalAt"
        folder = f"trainer.checkpoint_dir={in_tmp_store / 'checkpoints'}"
        # Caught as well: the second signal's KeyboardInterrupt, were it raised, would stop pytest.
        with pytest.raises((Interrupted, KeyboardInterrupt)) as stop:
            short_run([callback, folder], in_tmp_store)
    else:
        evaluate_outputs = fitting.evaluate_outputs
        monkeypatch.setattr(fitting, "evaluate_outputs", terminated)
        # Training is complete: the stop says so, and how to finish the run.
        complete = "after the last training step, 20: training is complete, checkpoint in"
        with pytest.raises((Interrupted, KeyboardInterrupt)) as stop:  # not pytest's own stop
            short_run(["trainer.steps=20", "trainer.eval_every=20"], in_tmp_store)
        assert isinstance(stop.value, Interrupted)
        assert f"stopped by SIGTERM {complete}" in str(stop.value)
        assert stop.value.exit_code == 128 + signal.SIGTERM
    run = only_run(in_tmp_store)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == f"{type(stop.value).__name__}: {stop.value}"
    if stopped == "training":
        step = checkpoints.latest(in_tmp_store / "checkpoints").step
        assert isinstance(stop.value, Interrupted)
        assert 20 <= step < 80 and f"stopped by SIGTERM at step {step}," in str(stop.value)
        # The stop comes at the end of the execution under way: 20 steps (auto) here.
        assert "SIGTERM received: stopping after the 20 step(s) under way" in caplog.text
    after = {number: signal.getsignal(number) for number in stopping.STOP_SIGNALS}
    assert after == before, "the handlers are put back"
    if stopped == "testing":  # its resume tests it and ends the same run FINISHED
        monkeypatch.setattr(fitting, "evaluate_outputs", evaluate_outputs)
        monkeypatch.setattr(runs, "_error_tag", error_tag)
        resume = ["trainer.steps=20", "trainer.eval_every=20", "trainer.resume=true"]
        short_run(resume, in_tmp_store)
        finished = only_run(in_tmp_store)
        assert (finished.info.run_id, finished.info.status) == (run.info.run_id, "FINISHED")
        history = store_client(in_tmp_store).get_metric_history(run.info.run_id, "test/loss")
        assert [m.step for m in history] == [20] and "error" not in finished.data.tags


def test_fit_that_raises_puts_the_signal_handlers_back(in_tmp_store):
    """Keras skips its callbacks' `on_train_end` when `fit` raises: the stop signals' handlers
    are put back all the same, so that a stop while the failed run closes is not taken for a
    stop of training steps that have ended."""

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("disk on fire")

    settings = check_config(compose_config([*QUICK, "model=softmax", "data.limit=200"]))
    backend = backends.select("tensorflow", settings.device)
    found = backend.detect(settings.device.cpu_devices)
    plan = devices.plan(
        settings.device, found, fitting.intervals(settings.trainer, {}), "tensorflow"
    )
    splits = data.load(settings.options.data, settings.data)
    with backend.build_scope(plan):
        model = modeling.build(settings.options.model, splits.input_shape, splits.num_classes)
        optimizer = optim.build(
            settings.options.optimizer, settings.optimizer, settings.trainer.steps
        )
        modeling.compiled(model, optimizer, settings.options.loss, plan)
    before = {number: signal.getsignal(number) for number in stopping.STOP_SIGNALS}
    with pytest.raises(RuntimeError, match="disk on fire"):
        fitting.fit(
            model,
            splits,
            trainer=settings.trainer,
            data=settings.data,
            seed=settings.seed,
            logits=True,
            recorder=None,
            plan=plan,
            run_settings={},
            extra={"crash": Crash()},
            backend=backend,
            carry_on=stopping.CarryOn(),
        )
    after = {number: signal.getsignal(number) for number in stopping.STOP_SIGNALS}
    assert after == before


def test_each_stop_controller_keeps_its_own_stops(caplog):
    """No stop is kept in a module: one command's controller, closing its run on SIGTERM, only
    logs another SIGTERM (a second Ctrl-C still interrupts), while another controller in the
    same process is stopped by it."""
    before = {number: signal.getsignal(number) for number in stopping.STOP_SIGNALS}
    closing, fresh = Stops(), Stops()
    with pytest.raises(Stopped) as stopped, closing.installed():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.signal == signal.SIGTERM and closing.reason is StopReason.SIGNAL
    with closing.installed(), pytest.raises(Stopped, match="SIGINT"):
        os.kill(os.getpid(), signal.SIGTERM)
        assert "SIGTERM received: already stopping" in caplog.text
        os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(Stopped, match="SIGTERM"), fresh.installed():
        os.kill(os.getpid(), signal.SIGTERM)
    assert {number: signal.getsignal(number) for number in stopping.STOP_SIGNALS} == before


def test_sigterm_while_starting_stops_at_once_in_one_line(tmp_path, mnist_dir):
    """SIGTERM before training (here while TensorFlow loads) ends the command at once, as a
    SLURM job cancelled or requeued while it starts must, since submitit ignores SIGTERM."""
    import signal
    import time

    command = [str(Path(sys.executable).with_name("runner")), *QUICK]
    env = {**os.environ, "MNIST_DIR": str(mnist_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    while not list(tmp_path.glob("outputs/*/*/.hydra/config.yaml")):  # Hydra calls the job
        assert started.poll() is None, started.communicate()[1]
        time.sleep(0.05)
    time.sleep(0.5)
    started.send_signal(signal.SIGTERM)
    _, stderr = started.communicate(timeout=60)
    assert started.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "runner: stopped by SIGTERM"
    assert "Traceback" not in stderr and "devices:" not in stderr


def test_runner_returns_the_optimized_metric_for_sweepers(in_tmp_store):
    value = run_hydra(compose_config([*QUICK, "model=softmax", "optimized_metric=val/loss"]))
    run = mlflow.last_active_run()
    assert value == run.data.metrics["val/loss"]
    # debug=quick draws no plots (tracking.plots=false), which take a second of a quick run.
    artifacts = artifact_paths(store_client(in_tmp_store), run.info.run_id)
    assert "config.yaml" in artifacts and not any(a.startswith("plots/") for a in artifacts)
