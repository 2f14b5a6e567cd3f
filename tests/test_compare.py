"""`runner-compare`: which parameters differ, which metrics may be asked for, and empty
experiments, on tables shaped like `mlflow.search_runs` output and on a real store."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from runner import compare
from runner.errors import UserError

from .conftest import QUICK, cli

# One worker runs this file: its tests share a module-scoped store.
pytestmark = pytest.mark.xdist_group("test_compare")


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
    rows = compare.table(searched_runs(), ["val/accuracy"], sort_by="val/accuracy")
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
    csv = compare.render(rows, "csv").splitlines()
    assert csv[1].startswith("cnn,") and ",0.4,cnn_layers," in csv[1]
    assert ",,softmax," in csv[2]
    shuffled = searched_runs().iloc[:, ::-1]
    assert list(compare.table(shuffled, ["val/accuracy"]).columns) == list(rows.columns)
    text = compare.render(rows, "table")
    assert "nan" not in text.lower() and "None" not in text


def test_only_metrics_the_runs_have_may_be_asked_for():
    runs = searched_runs()
    assert compare.recorded_metrics(runs) == ["test/loss", "val/accuracy"]
    defaults = list(compare.DEFAULT_METRICS)
    assert compare.chosen_metrics(runs, None, None) == (defaults, "val/accuracy")
    assert compare.chosen_metrics(runs, ["test/loss"], "test/loss") == (["test/loss"], "test/loss")
    with pytest.raises(UserError) as raised:
        compare.chosen_metrics(runs, ["test/loss", "val/acuracy"], None)
    message = str(raised.value)
    assert "'val/acuracy'" in message and "pick from test/loss, val/accuracy" in message
    with pytest.raises(UserError, match="'test/accuracy'"):
        compare.chosen_metrics(runs, None, "test/accuracy")


def test_the_default_sort_is_dropped_where_no_run_has_it():
    runs = searched_runs().drop(columns="metrics.val/accuracy")
    assert compare.chosen_metrics(runs, None, None) == (list(compare.DEFAULT_METRICS), None)
    with pytest.raises(UserError, match="'val/accuracy'"):
        compare.chosen_metrics(runs, None, "val/accuracy")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, mnist_dir) -> Path:
    """A softmax and a cnn_layers run, as one sweep, in a scratch folder's default store."""
    work = tmp_path_factory.mktemp("compare")
    result = cli("runner", "-m", "model=softmax,cnn_layers", *QUICK, cwd=work, mnist_dir=mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def test_compare_shows_a_parameter_of_one_model_only(two_models, monkeypatch, capsys):
    monkeypatch.chdir(two_models)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args in ([], ["--all"]):
        compare.main([*args, "--format", "csv"])
        header, *lines = capsys.readouterr().out.strip().splitlines()
        columns = header.split(",")
        assert {"model.name", "model.dropout_rate", *compare.DEFAULT_METRICS} <= set(columns)
        assert "best/val/accuracy" not in columns  # the sweep parent's, not the runs'
        cells = [dict(zip(columns, line.split(","), strict=True)) for line in lines]
        rates = {row["model.name"]: row["model.dropout_rate"] for row in cells}
        assert rates == {"softmax": "", "cnn_layers": "0.4"}


def test_compare_refuses_a_metric_no_run_has(two_models, mnist_dir):
    result = cli(
        "runner-compare", "--all", "--sort", "val/acc", cwd=two_models, mnist_dir=mnist_dir
    )
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("runner-compare: error: no run compared has the metric 'val/acc'")
    assert "val/accuracy" in line and "train/loss" in line
    result = cli(
        "runner-compare",
        *("--metrics", "test/accuracy", "test/acc", "val/los"),
        cwd=two_models,
        mnist_dir=mnist_dir,
    )
    assert result.returncode == 1
    assert "the metric 'test/acc', 'val/los':" in result.stderr


def test_compare_of_an_experiment_without_runs_says_so(two_models, monkeypatch, capsys):
    monkeypatch.chdir(two_models)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    MlflowClient(f"sqlite:///{two_models / 'mlflow.db'}").create_experiment("empty")
    with pytest.raises(SystemExit, match="^1$"):
        compare.main(["--all", "--experiment", "empty"])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "runner-compare: error: experiment 'empty' has no runs yet: train one with "
        "`uv run runner`, or pick another experiment with --experiment\n"
    )
