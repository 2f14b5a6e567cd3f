"""Checkpoints: written whole or not at all, pruned, and a killed run resumed to the same end."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runner import checkpoints, repro
from runner.errors import Interrupted, UserError
from runner.train import train

from .conftest import compose_config, only_run, parents_and_children, store_client

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_checkpoints")

STEPS = 120
CNN = [
    "model=cnn_raw",
    "optimizer=adam",
    "data.batch_size=50",
    "data.limit=2000",
    f"trainer.steps={STEPS}",
    "trainer.log_every=20",
    "trainer.eval_every=100",  # and at step 120, off the multiples
    "trainer.checkpoint_every=40",
    # Executions shorter than a window, so that a signal may stop the run mid-window.
    "device.steps_per_execution=10",
    "trainer.progress_bar=false",
    "trainer.log_model=false",
]


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir) -> Path:
    """The CNN run left alone, in-process."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MNIST_DIR", str(mnist_dir))
        train(compose_config([*CNN, f"tracking.uri=sqlite:///{folder}/mlflow.db"]))
    return folder


def interrupt(
    tmp_path: Path,
    mnist_dir: Path,
    how: signal.Signals,
    sweep: bool = False,
    extra: tuple[str, ...] = (),
    after: int = 40,
) -> tuple[list[str], dict, int, str]:
    """Start the CNN run as a user would (as a sweep's one job with `sweep`; with `extra`
    overrides), and send it `how` once its checkpoint of step `after` exists."""
    env = {**os.environ, "MNIST_DIR": str(mnist_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    where = f"hydra.sweep.dir={tmp_path / 'run'}" if sweep else f"hydra.run.dir={tmp_path / 'run'}"
    command = [sys.executable, "-m", "runner", *(["-m"] if sweep else []), *CNN, where]
    process = subprocess.Popen(
        [*command, *extra],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    job = tmp_path / "run" / ("0" if sweep else "")
    first = job / "checkpoints" / f"step-{after:07d}" / "state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    return command, env, process.returncode, stderr


def history(folder: Path, run_id: str) -> dict:
    """The run's metric histories, less the machine's measurements (as runner-repro compares)."""
    client = store_client(folder)
    return repro.histories(client, client.get_run(run_id))


def assert_same_end(tmp_path: Path, reference: Path) -> None:
    for got, want in zip(final_weights(tmp_path / "run"), final_weights(reference), strict=True):
        np.testing.assert_array_equal(got, want)
    client, run = store_client(tmp_path), only_run(tmp_path)
    ref_run = only_run(reference)
    assert run.info.status == "FINISHED"
    assert "error" not in run.data.tags
    for key in ("test/accuracy", "test/loss", "val/accuracy", "val/loss"):
        assert run.data.metrics[key] == ref_run.data.metrics[key], key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)), "no step logged twice"
    assert history(tmp_path, run.info.run_id) == history(reference, ref_run.info.run_id)


def resume(command: list[str], env: dict, cwd: Path) -> None:
    """Run `command`, which resumes a run, to its end."""
    resumed = subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_run_killed_then_interrupted_resumes_to_the_uninterrupted_end(
    tmp_path, mnist_dir, reference
):
    """kill -9 after the first checkpoint; the resumed run stopped by Ctrl-C after the second,
    which writes a checkpoint and ends the MLflow run KILLED; resumed again, the run ends as
    the one left alone did."""
    command, env, code, _ = interrupt(tmp_path, mnist_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoints.latest(tmp_path / "run" / "checkpoints").step < STEPS
    resume_once = ("trainer.resume=true",)
    _, _, code, stderr = interrupt(tmp_path, mnist_dir, signal.SIGINT, extra=resume_once, after=80)
    assert code == 130, stderr[-3000:]
    assert "runner: error: stopped by SIGINT at step" in stderr
    assert "Traceback" not in stderr
    stopped = checkpoints.latest(tmp_path / "run" / "checkpoints")
    assert 80 < stopped.step < STEPS
    assert f"at step {stopped.step}," in stderr
    assert f"trainer.resume=true hydra.run.dir={tmp_path / 'run'}\n" in stderr
    assert only_run(tmp_path).info.status == "KILLED"
    resume([*command, "trainer.resume=true"], env, tmp_path)
    assert_same_end(tmp_path, reference)
    # Hydra's record of the first command stays; each resume's is kept beside it.
    hydra = tmp_path / "run" / ".hydra"
    assert "trainer.resume" not in (hydra / "overrides.yaml").read_text()
    resumes = sorted(hydra.glob("resumed-*"))
    assert len(resumes) == 2
    assert all("trainer.resume=true" in (r / "overrides.yaml").read_text() for r in resumes)


def test_a_sweep_job_stopped_says_how_to_carry_it_on_alone(tmp_path, mnist_dir, reference):
    """Repeating the sweep's command would start a new sweep; the job is carried on alone."""
    _, env, code, stderr = interrupt(tmp_path, mnist_dir, signal.SIGINT, sweep=True)
    assert code == 130, stderr[-3000:]
    [hint] = [line for line in stderr.splitlines() if "carry on with this job alone: " in line]
    alone = shlex.split(hint.split("carry on with this job alone: ", 1)[1])
    assert alone[0] == "runner" and "-m" not in alone
    assert f"hydra.run.dir={tmp_path / 'run' / '0'}" in alone
    resume([sys.executable, "-m", "runner", *alone[1:]], env, tmp_path)
    _, [child] = parents_and_children(tmp_path)
    ref_run = only_run(reference)
    assert store_client(tmp_path).get_run(child.info.run_id).info.status == "FINISHED"
    assert history(tmp_path, child.info.run_id) == history(reference, ref_run.info.run_id)


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
    from runner.callbacks import StopOnSignal, optimizer_step

    original = StopOnSignal.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        if optimizer_step(self.model) == step:
            self.received = "SIGINT"
        original(self, batch, logs)

    monkeypatch.setattr(StopOnSignal, "on_train_batch_end", on_train_batch_end)


def test_run_stopped_mid_window_resumes_to_the_same_history_bitwise(
    tmp_path, mnist_dir, monkeypatch
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
    softmax_run(stopped, "trainer.resume=true")

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
