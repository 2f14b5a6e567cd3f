"""Sweeps through the other launchers: each job still a child of the one parent run, parallel
jobs all recorded in the one SQLite store, and failures leave nothing RUNNING."""

from pathlib import Path

from .conftest import QUICK, cli, compose_config, parents_and_children, store_client

# Every job's full set of results, which a lost write would leave incomplete.
RESULTS = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "test/loss", "test/accuracy"}


def test_joblib_jobs_run_at_once_into_one_sqlite_store_and_start_clean(tmp_path, mnist_dir):
    """Two workers for three jobs: the first two run at once, both writing to the one SQLite
    store; the last runs in a worker that already trained one, and must match job 0 (same
    seed) exactly."""
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    overrides = ["seed=7,8,7", "model=cnn_raw", *QUICK]
    result = cli("runner", "-m", *launcher, *overrides, cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    [parent], children = parents_and_children(tmp_path)
    assert parent.data.tags["sweep.launcher"] == "JoblibLauncher"
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["7", "7", "8"]
    client = store_client(tmp_path)
    curves = {}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.metrics.keys() >= RESULTS
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(history) == 3
        curves.setdefault(child.data.params["seed"], set()).add(tuple(m.value for m in history))
    assert len(curves["7"]) == 1


def test_submitit_local_jobs_are_children_of_the_sweep(tmp_path, mnist_dir):
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    result = cli("runner", "-m", *launcher, "seed=1", *QUICK, cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    [parent], [child] = parents_and_children(tmp_path)
    assert parent.data.tags["sweep.launcher"] == "LocalLauncher"
    assert parent.info.status == child.info.status == "FINISHED"
    # The job ran as its own process, which submitit logs under the sweep directory.
    assert len(list(Path(parent.data.tags["sweep.dir"]).glob(".submitit/*/*_log.out"))) == 1


def test_slurm_launcher_is_configured_and_keeps_the_nested_runs():
    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 60)
    assert cfg.hydra.callbacks.nested_runs._target_ == "runner.sweeps.nested_runs.NestedRuns"


def test_failing_job_fails_the_sweep_and_ends_every_run(tmp_path, mnist_dir):
    """One job's bad value: the others still run, the command exits 1 with one line naming the
    value, and the parent run ends FAILED rather than RUNNING."""
    result = cli("runner", "-m", "trainer.steps=35,30", *QUICK, cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 1
    assert "runner: error: trainer.steps=35 must be a multiple of trainer.log_every=10" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    [parent], [child] = parents_and_children(tmp_path)
    assert parent.info.status == "FAILED" and "did not complete" in parent.data.tags["error"]
    assert child.info.status == "FINISHED" and child.data.params["trainer.steps"] == "30"
