"""Checkpoints: written whole or not at all, pruned, and a killed run resumed to the same end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runner import checkpoints
from runner.errors import UserError
from runner.train import train

from .conftest import compose_config, only_run, store_client

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_checkpoints")

CNN = [
    "model=cnn_raw",
    "optimizer=adam",
    "data.batch_size=50",
    "data.limit=2000",
    "trainer.steps=200",
    "trainer.log_every=20",
    "trainer.eval_every=100",
    "trainer.checkpoint_every=40",
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
        f"tracking_uri=sqlite:///{in_tmp_store}/mlflow.db",
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
            f"tracking_uri=sqlite:///{in_tmp_store}/mlflow.db",
        ]
    )
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        train(cfg)


def final_weights(run_dir: Path) -> list[np.ndarray]:
    final = checkpoints.latest(run_dir / "checkpoints")
    assert final.step == 200
    return final.load_model().get_weights()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_dir) -> Path:
    """The CNN run left alone, in-process."""
    folder = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MNIST_DIR", str(mnist_dir))
        train(compose_config([*CNN, f"tracking_uri=sqlite:///{folder}/mlflow.db"]))
    return folder


def interrupt(
    tmp_path: Path, mnist_dir: Path, how: signal.Signals
) -> tuple[list[str], dict, int, str]:
    """Start the CNN run as a user would, and send it `how` once its first checkpoint exists."""
    env = {**os.environ, "MNIST_DIR": str(mnist_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "runner", *CNN, f"hydra.run.dir={tmp_path / 'run'}"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first = tmp_path / "run" / "checkpoints" / "step-0000040" / "state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    return command, env, process.returncode, stderr


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
    assert set(range(20, 201, 20)) <= set(steps), "no window missing"


def resume(command: list[str], env: dict, cwd: Path) -> None:
    resumed = subprocess.run(
        [*command, "trainer.resume=true"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_run_killed_and_resumed_ends_as_if_never_interrupted(tmp_path, mnist_dir, reference):
    command, env, code, _ = interrupt(tmp_path, mnist_dir, signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoints.latest(tmp_path / "run" / "checkpoints").step < 200
    resume(command, env, tmp_path)
    assert_same_end(tmp_path, reference)


def test_ctrl_c_checkpoints_marks_killed_and_resumes_to_the_same_end(
    tmp_path, mnist_dir, reference
):
    command, env, code, stderr = interrupt(tmp_path, mnist_dir, signal.SIGINT)
    assert code == 130, stderr[-3000:]
    assert "runner: error: stopped by SIGINT at step" in stderr
    assert "Traceback" not in stderr
    stopped = checkpoints.latest(tmp_path / "run" / "checkpoints")
    assert 40 < stopped.step < 200
    assert f"at step {stopped.step}," in stderr
    run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    resume(command, env, tmp_path)
    assert_same_end(tmp_path, reference)
