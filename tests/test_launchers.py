"""Sweeps through the other launchers and the Optuna sweeper: each job still a child of the one
parent run, parallel jobs all recorded in the one SQLite store, and failures leave nothing
RUNNING."""

from pathlib import Path

import optuna

from .conftest import QUICK, cli, compose_config, store_client

# Every job's full set of results, which a lost write would leave incomplete.
RESULTS = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "test/loss", "test/accuracy"}


def runs_of(work: Path) -> list:
    client = store_client(work)
    return client.search_runs([client.get_experiment_by_name("mnist").experiment_id])


def parents_and_children(work: Path) -> tuple[list, list]:
    runs = runs_of(work)
    parents = [r for r in runs if "sweep.dir" in r.data.tags]
    ids = {p.info.run_id for p in parents}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in ids]
    assert len(parents) + len(children) == len(runs)
    return parents, children


def test_four_parallel_joblib_jobs_are_all_recorded_in_the_sqlite_store(tmp_path, mnist_dir):
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"]
    result = cli(
        "runner", "-m", *launcher, "seed=1,2,3,4", *QUICK, cwd=tmp_path, mnist_dir=mnist_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [parent], children = parents_and_children(tmp_path)
    assert parent.data.tags["sweep.launcher"] == "JoblibLauncher"
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["1", "2", "3", "4"]
    client = store_client(tmp_path)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.metrics.keys() >= RESULTS
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 3


def test_reused_joblib_workers_start_each_job_clean(tmp_path, mnist_dir):
    """Two workers for three equal jobs: the third runs in a worker that already trained one,
    and must match the first two exactly."""
    launcher = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    overrides = ["seed=7,7,7", "model=cnn_raw", *QUICK]
    result = cli("runner", "-m", *launcher, *overrides, cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, children = parents_and_children(tmp_path)
    client = store_client(tmp_path)
    curves = {
        tuple(m.value for m in client.get_metric_history(c.info.run_id, "train/loss"))
        for c in children
    }
    assert len(children) == 3 and len(curves) == 1


def test_submitit_local_jobs_are_children_of_the_sweep(tmp_path, mnist_dir):
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    result = cli("runner", "-m", *launcher, "seed=1,2", *QUICK, cwd=tmp_path, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    [parent], children = parents_and_children(tmp_path)
    assert parent.data.tags["sweep.launcher"] == "LocalLauncher"
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    # Each job ran as its own process, which submitit logs under the sweep directory.
    assert len(list(Path(parent.data.tags["sweep.dir"]).glob(".submitit/*/*_log.out"))) == 2


def test_slurm_launcher_is_configured_and_keeps_the_nested_runs():
    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 60)
    assert cfg.hydra.callbacks.nested_runs._target_ == "runner.sweep.NestedRuns"


def test_failing_job_fails_the_sweep_and_ends_every_run(tmp_path, mnist_dir):
    """One job's bad value: the others still run, the command exits 1 with one line naming the
    value, and the parent run ends FAILED rather than RUNNING."""
    overrides = [o for o in QUICK if not o.startswith("trainer.steps")]
    result = cli(
        "runner", "-m", "trainer.steps=35,30", *overrides, cwd=tmp_path, mnist_dir=mnist_dir
    )
    assert result.returncode == 1
    assert "runner: error: trainer.steps=35 must be a multiple of trainer.log_every=10" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    [parent], [child] = parents_and_children(tmp_path)
    assert parent.info.status == "FAILED" and "did not complete" in parent.data.tags["error"]
    assert child.info.status == "FINISHED" and child.data.params["trainer.steps"] == "30"


def test_optuna_search_runs_trials_as_children_and_resumes_its_study(tmp_path, mnist_dir):
    search = ["hparams_search=cnn_optuna", *QUICK]
    first = cli("runner", *search, "hydra.sweeper.n_trials=2", cwd=tmp_path, mnist_dir=mnist_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="cnn_optuna", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    params = {(t.params["optimizer.lr"], t.params["data.batch_size"]) for t in study.trials}
    assert len(params) == 2 and all(batch in (50, 100, 200) for _, batch in params)

    study.ask()  # a trial whose process died: left RUNNING in the study
    again = cli("runner", *search, "hydra.sweeper.n_trials=3", cwd=tmp_path, mnist_dir=mnist_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 3 trials completed, 1 interrupted" in again.stdout
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]

    parents, children = parents_and_children(tmp_path)
    assert len(parents) == 2 and len(children) == 3
    assert all(p.info.status == "FINISHED" for p in parents)
    values = sorted(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert values == sorted(c.data.metrics["val/accuracy"] for c in children)
    assert {c.data.params["model.name"] for c in children} == {"cnn_raw"}
    assert set(study.best_params) == {"optimizer.lr", "data.batch_size", "model.keep_prob"}
