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
from mlflow import MlflowClient

from runner import checkpoints
from runner.errors import UserError
from runner.train import train

from .conftest import compose_config

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
    run = MlflowClient(f"sqlite:///{in_tmp_store}/mlflow.db").get_run(state["run_id"])
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


def test_run_killed_and_resumed_ends_as_if_never_interrupted(tmp_path, mnist_dir, monkeypatch):
    env = {**os.environ, "MNIST_DIR": str(mnist_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    killed_dir = tmp_path / "killed" / "run"
    command = [sys.executable, "-m", "runner", *CNN, f"hydra.run.dir={killed_dir}"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = killed_dir / "checkpoints" / "step-0000040" / "state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoints.latest(killed_dir / "checkpoints").step < 200

    resumed = subprocess.run(
        [*command, "trainer.resume=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    train(
        compose_config(
            [
                *CNN,
                f"tracking_uri=sqlite:///{reference_dir}/mlflow.db",
                f"trainer.checkpoint_dir={reference_dir}/checkpoints",
            ]
        )
    )

    for got, want in zip(final_weights(killed_dir), final_weights(reference_dir), strict=True):
        np.testing.assert_array_equal(got, want)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(20, 201, 20)), "every step logged once, none missing"
    reference = MlflowClient(f"sqlite:///{reference_dir}/mlflow.db")
    [ref_run] = reference.search_runs([reference.get_experiment_by_name("mnist").experiment_id])
    for key in ("test/accuracy", "test/loss", "val/accuracy", "train/loss"):
        assert run.data.metrics[key] == ref_run.data.metrics[key], key
