"""hparams_search=cnn_optuna: Optuna's trials as MLflow children, and a study that resumes."""

import optuna

from .conftest import QUICK, cli, parents_and_children


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
