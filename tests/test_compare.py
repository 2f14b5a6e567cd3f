"""`runner-compare`: which parameters differ and which metrics may be asked for, on tables
shaped like `mlflow.search_runs` output, and an experiment without runs (tests/test_sweeps.py
compares a real sweep's runs)."""

import pandas as pd
import pytest
from mlflow import MlflowClient

from runner.cli import compare
from runner.errors import UserError
from runner.tracking import comparison


def searched_runs() -> pd.DataFrame:
    """Two runs as `mlflow.search_runs` gives them: a parameter only one has is None in the
    other, a metric it lacks NaN."""
    return pd.DataFrame(
        {
            "run_id": ["a" * 32, "b" * 32],
            "status": ["FINISHED", "FINISHED"],
            "metrics.val/accuracy": [0.8, 0.9],
            "metrics.test/loss": [0.5, float("nan")],
            "params.model.name": ["softmax", "cnn_layers"],
            "params.model.dropout_rate": [None, "0.4"],
            "params.data.limit": ["1000", "1000"],
            "params.trainer.note": [None, None],
            "tags.mlflow.runName": ["softmax", "cnn"],
        }
    )


def test_a_parameter_only_some_runs_have_differs_and_is_blank_where_missing():
    rows = comparison.table(searched_runs(), ["val/accuracy"], sort_by="val/accuracy")
    # Parameters by name: mlflow.search_runs orders its columns differently from call to call.
    assert list(rows.columns) == [
        "run",
        "run_id",
        "status",
        "model.dropout_rate",
        "model.name",
        "val/accuracy",
    ]
    assert list(rows["run"]) == ["cnn", "softmax"]
    csv = comparison.render(rows, "csv").splitlines()
    assert csv[1].startswith("cnn,") and ",0.4,cnn_layers," in csv[1]
    assert ",,softmax," in csv[2]
    shuffled = searched_runs().iloc[:, ::-1]
    assert list(comparison.table(shuffled, ["val/accuracy"]).columns) == list(rows.columns)
    text = comparison.render(rows, "table")
    assert "nan" not in text.lower() and "None" not in text


def test_only_metrics_the_runs_have_may_be_asked_for():
    runs = searched_runs()
    assert comparison.recorded_metrics(runs) == ["test/loss", "val/accuracy"]
    defaults = list(comparison.DEFAULT_METRICS)
    assert comparison.chosen_metrics(runs, None, None) == (defaults, "val/accuracy")
    assert comparison.chosen_metrics(runs, ["test/loss"], "test/loss") == (
        ["test/loss"],
        "test/loss",
    )
    with pytest.raises(UserError) as raised:
        comparison.chosen_metrics(runs, ["test/loss", "val/acuracy"], None)
    message = str(raised.value)
    assert "'val/acuracy'" in message and "pick from test/loss, val/accuracy" in message
    with pytest.raises(UserError, match="'test/accuracy'"):
        comparison.chosen_metrics(runs, None, "test/accuracy")


def test_the_default_sort_is_dropped_where_no_run_has_it():
    runs = searched_runs().drop(columns="metrics.val/accuracy")
    assert comparison.chosen_metrics(runs, None, None) == (list(comparison.DEFAULT_METRICS), None)
    with pytest.raises(UserError, match="'val/accuracy'"):
        comparison.chosen_metrics(runs, None, "val/accuracy")


def test_compare_of_an_experiment_without_runs_says_so(in_tmp_store, capsys):
    MlflowClient(f"sqlite:///{in_tmp_store}/mlflow.db").create_experiment("empty")
    with pytest.raises(SystemExit, match="^1$"):
        compare.main(["--all", "--experiment", "empty"])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "runner-compare: error: experiment 'empty' has no runs yet: train one with "
        "`uv run runner`, or pick another experiment with --experiment\n"
    )


def test_a_group_over_seed_counts_only_its_finished_runs_results():
    """Runs that differ only in seed and in their checkpoint folder are one group; a failed
    run's last values, cut short, count among its runs but not in its statistics."""
    runs = pd.DataFrame(
        {
            "run_id": ["a" * 32, "b" * 32, "c" * 32, "d" * 32],
            "status": ["FINISHED", "FINISHED", "FAILED", "FINISHED"],
            "metrics.val/accuracy": [0.8, 0.9, 0.1, 0.7],
            "params.seed": ["1", "2", "3", "1"],
            "params.model.dropout_rate": [None, None, None, "0.4"],
            "params.trainer.checkpoint_dir": [f"/out/{n}/checkpoints" for n in range(4)],
        }
    )
    rows = comparison.summary(runs, "seed", ["val/accuracy"], sort_by="val/accuracy")
    assert list(rows.columns) == [
        "model.dropout_rate",
        "seed",
        "runs",
        "val/accuracy mean",
        "val/accuracy std",
        "val/accuracy n",
    ]
    assert rows["seed"].tolist() == ["1 2 3", "1"] and rows["runs"].tolist() == [3, 1]
    assert rows["val/accuracy mean"].tolist() == pytest.approx([0.85, 0.7])
    assert rows["val/accuracy std"][0] == pytest.approx(0.0707107) and pd.isna(rows.iloc[1, 4])
    assert rows["val/accuracy n"].tolist() == [2, 1]


def test_a_misspelt_over_suggests_the_parameter_and_names_those_that_differ():
    with pytest.raises(UserError) as error:
        comparison.check_over(searched_runs(), "model.nmae")
    assert str(error.value) == (
        "--over 'model.nmae' is not a parameter of the runs compared: did you mean model.name? "
        "those that differ between them are model.dropout_rate, model.name"
    )
    with pytest.raises(UserError, match="compared: those that differ"):
        comparison.check_over(searched_runs(), "zzz")
