"""hparams_search=cnn_optuna: Optuna's trials as MLflow children, and a study that resumes."""

from pathlib import Path

import optuna
import pytest

from .conftest import QUICK, cli, parents_and_children, store_client


def test_optuna_search_runs_trials_as_children_and_resumes_its_study(tmp_path, mnist_dir):
    search = ["hparams_search=cnn_optuna", *QUICK]
    first = cli("runner", *search, "hydra.sweeper.n_trials=1", cwd=tmp_path, mnist_dir=mnist_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "FutureWarning" not in first.stderr  # Optuna's notes on the plugin's old API
    study = optuna.load_study(study_name="cnn_optuna", storage=f"sqlite:///{tmp_path}/optuna.db")
    [trial] = study.trials
    assert trial.state.name == "COMPLETE" and trial.params["data.batch_size"] in (50, 100, 200)

    study.ask()  # a trial whose process died: left RUNNING in the study
    again = cli("runner", *search, "hydra.sweeper.n_trials=2", cwd=tmp_path, mnist_dir=mnist_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 2 trials completed, 1 interrupted" in again.stdout
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[2].params != study.trials[0].params

    parents, children = parents_and_children(tmp_path)
    assert len(parents) == 2 and len(children) == 2
    assert all(p.info.status == "FINISHED" for p in parents)
    values = sorted(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert values == sorted(c.data.metrics["val/accuracy"] for c in children)
    assert {c.data.params["model.name"] for c in children} == {"cnn_raw"}
    assert set(study.best_params) == {"optimizer.lr", "data.batch_size", "model.keep_prob"}


# A tiny search: one trial of a few steps.
TINY = [
    "hparams_search=cnn_optuna",
    "trainer.steps=20",
    "trainer.log_every=10",
    "trainer.eval_every=20",
    "trainer.progress_bar=false",
    "data.limit=500",
    "hydra.sweeper.n_trials=1",
]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A folder holding a completed tiny search: its study in optuna.db, its runs in mlflow.db."""
    folder = tmp_path_factory.mktemp("searched")
    done = cli("runner", *TINY, cwd=folder, mnist_dir=mnist_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def run_ids(folder: Path) -> set[str]:
    client = store_client(folder)
    experiment = client.get_experiment_by_name("mnist").experiment_id
    return {r.info.run_id for r in client.search_runs([experiment])}


def sweep_folders(folder: Path) -> list[Path]:
    return sorted((folder / "multirun").glob("*/*"))


def test_a_study_refuses_other_settings_than_it_was_started_with(searched, mnist_dir):
    before, folders = run_ids(searched), sweep_folders(searched)
    other = [o for o in TINY if not o.startswith(("trainer.steps=", "data.limit="))]
    result = cli(
        "runner", *other, "trainer.steps=30", "data.limit=600", cwd=searched, mnist_dir=mnist_dir
    )
    assert result.returncode != 0
    [line] = result.stderr.splitlines()
    assert line.startswith("runner: error: study 'cnn_optuna'"), line
    for then, now in [
        ("data.limit=500", "data.limit=600"),
        ("trainer.steps=20", "trainer.steps=30"),
    ]:
        assert then in line and now in line and line.index(then) < line.index(now), line
    assert "hydra.sweeper.study_name=" in line
    assert run_ids(searched) == before
    assert sweep_folders(searched) == folders, "no empty sweep folder left behind"
    study = optuna.load_study(study_name="cnn_optuna", storage=f"sqlite:///{searched}/optuna.db")
    assert len(study.trials) == 1


def test_a_completed_study_run_again_says_so_and_leaves_no_empty_parent(searched, mnist_dir):
    before, folders = run_ids(searched), sweep_folders(searched)
    again = cli("runner", *TINY, cwd=searched, mnist_dir=mnist_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study 'cnn_optuna' already has its 1 completed trial" in again.stdout
    assert "raise hydra.sweeper.n_trials to run more" in again.stdout
    assert run_ids(searched) == before
    assert sweep_folders(searched) == folders
    compared = cli("runner-compare", cwd=searched, mnist_dir=mnist_dir)
    assert compared.returncode == 0, compared.stderr
