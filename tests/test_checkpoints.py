"""Checkpoints: written whole or not at all, pruned, and a killed run resumed to the same end."""

import json
import logging
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest

from runner.cli import repro
from runner.cli.train import train
from runner.errors import Interrupted, UserError
from runner.tracking.recorded import histories
from runner.training import checkpoints

from .conftest import (
    PROBE,
    QUICK,
    cli,
    compose_config,
    only_run,
    parents_and_children,
    store_client,
)

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_checkpoints")

STEPS = 120
# The R edition's softmax behind a user's Dropout (tests.probes), whose random state a resume
# must carry on, with Adam (the runner's fused kernel on TensorFlow), whose moments it must:
# 120 steps, a checkpoint every 40, 5 steps an execution, and a callback that signals its own
# process at a chosen step (idle unless asked).
RESUMABLE = [
    *QUICK,
    "experiment=deep_mnist_r",
    "model._target_=tests.probes.dropout_softmax",
    "optimizer=adam",
    "optimizer.lr=0.001",
    f"trainer.steps={STEPS}",
    "trainer.checkpoint_every=40",
    "device.steps_per_execution=5",
    "+callbacks.signal._target_=tests.probes.SignalAt",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir) -> Path:
    """The RESUMABLE run left alone, in-process: its folder, which holds its store and run/."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MNIST_DIR", str(mnist_dir))
        patch.delenv("RUNNER_TEST_SIGNAL", raising=False)
        config = [
            *RESUMABLE,
            f"tracking.uri=sqlite:///{folder}/mlflow.db",
            f"trainer.checkpoint_dir={folder}/run/checkpoints",
        ]
        train(compose_config(config))
    return folder


def test_checkpoints_are_written_atomically_and_pruned(in_tmp_store):
    overrides = [
        "trainer.steps=60",
        "trainer.log_every=10",
        "trainer.eval_every=60",
        "trainer.checkpoint_every=20",
        "trainer.keep_checkpoints=2",
        "data.limit=500",
        "trainer.progress_bar=false",
        "trainer.log_model=false",
        f"tracking.uri=sqlite:///{in_tmp_store}/mlflow.db",
    ]
    train(compose_config(overrides))
    folder = in_tmp_store / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000040", "step-0000060"]
    state = json.loads((folder / "step-0000060" / "state.json").read_text())
    run = store_client(in_tmp_store).get_run(state["run_id"])
    assert state["step"] == 60 and run.info.status == "FINISHED"
    # A checkpoint interrupted mid-write, or a folder without its state, is never taken.
    (folder / "step-0000080.partial").mkdir()
    (folder / "step-0000080.partial" / "state.json").write_text('{"step": 80, "run_id": "x"}')
    (folder / "step-0000100").mkdir()
    assert checkpoints.latest(folder).step == 60


def test_resume_without_a_checkpoint_is_a_clear_error(in_tmp_store):
    cfg = compose_config(
        [
            "trainer.resume=true",
            f"trainer.checkpoint_dir={in_tmp_store}/none",
            f"tracking.uri=sqlite:///{in_tmp_store}/mlflow.db",
        ]
    )
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        train(cfg)


def final_weights(run_dir: Path) -> list[np.ndarray]:
    final = checkpoints.latest(run_dir / "checkpoints")
    assert final.step == STEPS
    return final.load_model().get_weights()


def history(folder: Path, run_id: str) -> dict:
    """The run's metric histories, less the machine's measurements (as runner-repro compares)."""
    client = store_client(folder)
    return histories(client, client.get_run(run_id))


def runner(folder: Path, mnist_dir: Path, *args: str, signal_at: str = "", code: int = 0) -> str:
    """`runner ARGS` in `folder`, signalling itself as `signal_at` says (`INT@50`: Ctrl-C once
    step 50 has trained), ending with `code`; returns what it printed on stderr."""
    env = {**PROBE, "RUNNER_TEST_SIGNAL": signal_at}
    result = cli("runner", *args, cwd=folder, mnist_dir=mnist_dir, env=env)
    assert result.returncode == code, result.stderr[-3000:]
    return result.stderr


def test_a_sweep_job_stopped_then_killed_carries_on_alone_to_the_uninterrupted_end(
    tmp_path, mnist_dir, reference
):
    """Ctrl-C after step 50 stops the sweep's one job at the end of its execution, step 55,
    mid-window: a checkpoint, the run KILLED, and the command that carries the job on alone
    (repeating the sweep's would start a new sweep). That command, killed -9 after step 100
    (checkpoint at 80), then run again, ends the job's run as the run left alone ended: its
    weights, metrics and history, each step logged once. Four processes, one MLflow run."""
    job = tmp_path / "run" / "0"
    sweep = ["-m", *RESUMABLE, f"hydra.sweep.dir={tmp_path / 'run'}"]
    stderr = runner(tmp_path, mnist_dir, *sweep, signal_at="INT@50", code=130)
    assert "runner: error: stopped by SIGINT at step 55, checkpoint written" in stderr
    assert "Traceback" not in stderr
    assert checkpoints.latest(job / "checkpoints").step == 55
    [parent], [child] = parents_and_children(tmp_path)
    assert (parent.info.status, child.info.status) == ("FAILED", "KILLED")
    [hint] = [line for line in stderr.splitlines() if "carry on with this job alone: " in line]
    name, *alone = shlex.split(hint.split("carry on with this job alone: ", 1)[1])
    assert name == "runner" and "-m" not in alone
    assert alone[-2:] == ["trainer.resume=true", f"hydra.run.dir={job}"]

    runner(tmp_path, mnist_dir, *alone, signal_at="KILL@100", code=-signal.SIGKILL)
    assert checkpoints.latest(job / "checkpoints").step == 80
    runner(tmp_path, mnist_dir, *alone)

    for got, want in zip(final_weights(job), final_weights(reference / "run"), strict=True):
        np.testing.assert_array_equal(got, want)
    client, ref_run = store_client(tmp_path), only_run(reference)
    run = client.get_run(child.info.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    for key in ("test/accuracy", "test/loss", "val/accuracy", "val/loss"):
        assert run.data.metrics[key] == ref_run.data.metrics[key], key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(10, STEPS + 1, 10)), "each step logged once"
    assert history(tmp_path, run.info.run_id) == history(reference, ref_run.info.run_id)
    # Hydra's record of the sweep's job stays; each resume's is kept beside it.
    hydra = job / ".hydra"
    assert "trainer.resume" not in (hydra / "overrides.yaml").read_text()
    resumes = sorted(hydra.glob("resumed-*"))
    assert len(resumes) == 2
    assert all("trainer.resume=true" in (r / "overrides.yaml").read_text() for r in resumes)


def test_a_run_stopped_after_its_last_step_is_finished_by_its_resume(
    tmp_path, mnist_dir, monkeypatch, reference
):
    """Ctrl-C once training has ended, its last checkpoint written, leaves the run KILLED and
    untested, saying in one line that training is complete and how to finish the run. That
    resume (here in-process) trains nothing: it tests and ends the same MLflow run FINISHED,
    as the run left alone ended, each step logged once."""
    run_dir = tmp_path / "run"
    command = [*RESUMABLE, f"hydra.run.dir={run_dir}"]
    stderr = runner(tmp_path, mnist_dir, *command, signal_at="INT@end", code=130)
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"runner: error: stopped by SIGINT after the last training step, {STEPS}: training is "
        f"complete, checkpoint in {run_dir / 'checkpoints'}; to test it and end its MLflow run, "
        f"finish it with the same command plus trainer.resume=true hydra.run.dir={run_dir}"
    )
    stopped = only_run(tmp_path)
    assert stopped.info.status == "KILLED"
    assert not [key for key in stopped.data.metrics if key.startswith("test/")]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    monkeypatch.delenv("RUNNER_TEST_SIGNAL", raising=False)
    resume = ["trainer.resume=true", f"trainer.checkpoint_dir={run_dir / 'checkpoints'}"]
    train(compose_config([*RESUMABLE, *resume, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]))
    run, ref_run = only_run(tmp_path), only_run(reference)
    assert run.info.run_id == stopped.info.run_id
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.metrics["test/accuracy"] == ref_run.data.metrics["test/accuracy"]
    assert history(tmp_path, run.info.run_id) == history(reference, ref_run.info.run_id)


# A short softmax run whose stop lands inside a window (steps_per_execution 5, windows of 20),
# between checkpoints, and in a window that validates.
SOFTMAX = [
    "data.limit=1000",
    "trainer.steps=80",
    "trainer.log_every=20",
    "trainer.eval_every=20",
    "trainer.checkpoint_every=40",
    "device.steps_per_execution=5",
    "trainer.progress_bar=false",
    "trainer.log_model=false",
    "tracking.system_metrics=false",
]


def softmax_run(folder: Path, *extra: str) -> dict:
    """Train SOFTMAX (plus `extra`) with its store and checkpoints in `folder`; returns the
    final metrics."""
    return train(
        compose_config(
            [
                *SOFTMAX,
                f"tracking.uri=sqlite:///{folder}/mlflow.db",
                f"trainer.checkpoint_dir={folder}/checkpoints",
                *extra,
            ]
        )
    )


def stop_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make training stop as SIGINT does, after the execution that ends on `step`."""
    from runner.callbacks import optimizer_step
    from runner.training.callbacks import StopOnSignal

    original = StopOnSignal.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        if optimizer_step(self.model) == step:
            self.received = "SIGINT"
        original(self, batch, logs)

    monkeypatch.setattr(StopOnSignal, "on_train_batch_end", on_train_batch_end)


def test_run_stopped_mid_window_resumes_to_the_same_history_bitwise(
    tmp_path, mnist_dir, monkeypatch, caplog
):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alone").mkdir()
    softmax_run(tmp_path / "alone")
    reference = history(tmp_path / "alone", only_run(tmp_path / "alone").info.run_id)

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    with monkeypatch.context() as patch:
        stop_at(patch, 30)
        with pytest.raises(Interrupted, match="at step 30,"):
            softmax_run(stopped)
    assert checkpoints.latest(stopped / "checkpoints").step == 30
    run_id = only_run(stopped).info.run_id
    assert max(m.step for m in store_client(stopped).get_metric_history(run_id, "val/loss")) == 20
    caplog.set_level(logging.INFO, logger="runner.training.checkpoints")
    softmax_run(stopped, "trainer.resume=true")

    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert said == [f"resuming from step 30 of run {run_id}"], "said once, at INFO"
    assert only_run(stopped).info.status == "FINISHED"
    assert history(stopped, run_id) == reference
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{stopped}/mlflow.db")
    repro.main([run_id])  # exits 1 on any difference


def test_resume_with_other_settings_is_refused_naming_them(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        stop_at(patch, 40)
        with pytest.raises(Interrupted):
            softmax_run(tmp_path)
    changed = [
        "trainer.resume=true",
        "model=cnn_raw",
        "optimizer=adam",
        "optimizer.lr=0.001",
        "data.batch_size=50",
        "trainer.steps=120",
    ]
    with pytest.raises(UserError) as refused:
        softmax_run(tmp_path, *changed)
    message = str(refused.value)
    for key in ("model.name=softmax (now cnn_raw)", "optimizer.name=sgd (now adam)"):
        assert key in message
    assert "data.batch_size=100 (now 50)" in message
    assert "trainer.steps=80 (now 120)" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="to train the run further, use trainer.resume=extend"):
        softmax_run(tmp_path, "trainer.resume=true", "trainer.steps=120")
    # Nothing was recorded by the refused resumes: the stopped run is as it was.
    run = only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.params["trainer.steps"] == "80"
    assert checkpoints.latest(tmp_path / "checkpoints").step == 40


def test_extend_carries_a_run_on_in_a_new_run_with_its_new_steps(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "long").mkdir()
    softmax_run(tmp_path / "long", "trainer.steps=120", "trainer.eval_every=60")
    long_run = only_run(tmp_path / "long")

    softmax_run(tmp_path, "trainer.eval_every=60")  # validates at 60 and after its last step, 80
    short = only_run(tmp_path)
    with pytest.raises(UserError, match="at step 80, the run's last: nothing is left to train"):
        softmax_run(tmp_path, "trainer.resume=true", "trainer.eval_every=60")
    with pytest.raises(UserError, match="above the checkpoint's step 80"):
        softmax_run(tmp_path, "trainer.resume=extend", "trainer.steps=60", "trainer.eval_every=60")
    softmax_run(tmp_path, "trainer.resume=extend", "trainer.steps=120", "trainer.eval_every=60")

    client = store_client(tmp_path)
    [extended] = client.search_runs(
        [short.info.experiment_id], filter_string=f"tags.extends = '{short.info.run_id}'"
    )
    assert extended.info.status == "FINISHED"
    assert extended.data.params["trainer.steps"] == "120"
    assert client.get_run(short.info.run_id).data.tags["extended_by"] == extended.info.run_id
    assert checkpoints.latest(tmp_path / "checkpoints").run_id == extended.info.run_id
    # Training carried on exactly, and the run records what 120 steps at once would have.
    got = history(tmp_path, extended.info.run_id)
    assert got == history(tmp_path / "long", long_run.info.run_id)
