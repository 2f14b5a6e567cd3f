"""SLURM jobs requeued mid-training (`scontrol requeue`) or warned of their time limit
(`timeout_min=1`, submitit's SIGUSR2): each writes a checkpoint, is requeued, and carries on in
the same MLflow run to the same weights and metrics as a job never interrupted."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from runner.training.checkpoints import latest

from .conftest import QUICK, only_run, parents_and_children, store_client
from .test_slurm import on_cpus

pytestmark = pytest.mark.xdist_group("slurm")

# A user's callback (it joins by _target_, from the folder the command runs in) that holds a
# job's first start at one step until SLURM signals it, so that the signal lands mid-training
# whenever SLURM sends it: mid-window and between checkpoints, so that the stop's own checkpoint
# and the window's partial sums are what the requeued job carries on from. It does nothing
# outside SLURM, or in a requeued start.
HOLD = """
import os
import signal
import time
from pathlib import Path

import keras


class UntilSignalled(keras.callbacks.Callback):
    def __init__(self, step: int, flags: str):
        super().__init__()
        self.step, self.flags, self.signalled = step, Path(flags), False
        job = os.environ.get("SLURM_ARRAY_TASK_ID")
        self.job = job if job and not int(os.environ.get("SLURM_RESTART_COUNT") or 0) else None

    def on_train_begin(self, logs=None):
        for number in (signal.SIGTERM, signal.SIGUSR2):
            previous = signal.getsignal(number)

            def noted(n, frame, previous=previous):
                self.signalled = True
                previous(n, frame)

            signal.signal(number, noted)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.job is None or step < self.step:
            return
        (self.flags / f"held-{self.job}").write_text(str(step))
        deadline = time.monotonic() + 240
        while not self.signalled and time.monotonic() < deadline:
            time.sleep(0.1)
        self.job = None
"""

STEPS = ["trainer.steps=300", "trainer.log_every=10", "trainer.eval_every=100"]
STEPS += ["trainer.checkpoint_every=100", "seed=5"]


def test_requeued_and_timed_out_jobs_carry_on_in_their_runs_to_the_same_result(
    slurm_cluster, tmp_path, mnist_dir
):
    """Two jobs that differ in nothing training depends on: job #0 is requeued with
    `scontrol requeue` while held; job #1 waits for its time-limit signal (timeout_min=1). Both
    end FINISHED in the run they started, each step logged once, with the weights and metrics
    of the same config trained without a stop."""
    (tmp_path / "hold.py").write_text(HOLD)
    hold = ["+callbacks.hold._target_=hold.UntilSignalled", "+callbacks.hold.step=135"]
    hold.append(f"+callbacks.hold.flags={tmp_path}")
    slurm = [
        *on_cpus(slurm_cluster),
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.signal_delay_s=5",
    ]
    # Not this process's MLFLOW_TRACKING_URI, which in-process tests' runs set: the sweep's own.
    env = {k: v for k, v in slurm_cluster.env.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MNIST_DIR"] = str(mnist_dir)
    sweep = subprocess.Popen(
        [str(Path(sys.executable).with_name("runner")), "-m", *slurm]
        + ["tracking.system_metrics_every_s=10,11", *QUICK, *STEPS, *hold],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not (tmp_path / "held-0").exists():
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[1][-3000:]
        time.sleep(0.2)
    [array] = {p.name.split("_")[0] for p in (tmp_path / "multirun").glob("*/*/.submitit/*_0")}
    slurm_cluster.run("scontrol", "requeue", f"{array}_0")
    # Meanwhile, while job #1 waits for its signal: the same config, never stopped, in a store
    # of its own.
    alone_dir = tmp_path / "alone"
    alone_dir.mkdir()
    (alone_dir / "hold.py").write_text(HOLD)
    reference = subprocess.Popen(
        [str(Path(sys.executable).with_name("runner")), *QUICK, *STEPS, *hold],
        cwd=alone_dir,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, err[-3000:]
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    alone = only_run(alone_dir)
    expected = _histories(store_client(alone_dir), alone.info.run_id)

    [parent], children = parents_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 2
    client = store_client(tmp_path)
    for child in children:
        assert child.info.status == "FINISHED"
        assert _histories(client, child.info.run_id) == expected
    # Each job was stopped once at least, and requeued: SLURM counts its restarts.
    for job in (0, 1):
        shown = slurm_cluster.run("scontrol", "show", "job", f"{array}_{job}").stdout
        assert int(shown.split("Restarts=")[1].split()[0]) >= 1, shown
        logs = (tmp_path / "multirun").glob(f"*/*/.submitit/{array}_{job}/*_log.*")
        said = "".join(path.read_text() for path in logs)
        signalled = "SIGTERM" if job == 0 else "SIGUSR2"
        assert f"{signalled} received: stopping after the 10 step(s) under way" in said
        assert "resuming from step 150 of run " in said, "the requeued job says so"
    # The same weights as the run never stopped.
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    checkpoints = next((alone_dir / "outputs").glob("*/*/checkpoints"))
    weights = latest(checkpoints).load_model().get_weights()
    for job in (0, 1):
        resumed = latest(sweep_dir / str(job) / "checkpoints").load_model().get_weights()
        assert all(np.array_equal(a, b) for a, b in zip(weights, resumed, strict=True))


def _histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's history but the timing ones, as (step, value) in step order."""
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
        if not key.startswith(("perf/", "system/"))
    }
