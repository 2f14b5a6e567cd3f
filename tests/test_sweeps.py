"""A grid sweep as a user runs it: one MLflow parent run, a child a job, the comparison logged to
the parent, `runner-compare` on the store, and the sweep seen in the MLflow UI in Chromium."""

import io
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from runner.cli import compare
from runner.sweeps import jobs, nested_runs
from runner.tracking import comparison, plots

from .conftest import QUICK, cli, mlflow_server, parents_and_children, store_client

# One worker runs this file: its tests share a module-scoped run.
pytestmark = pytest.mark.xdist_group("test_sweeps")

GRID = ["model=softmax,cnn_layers", "optimizer.lr=0.1,0.01"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def grid(tmp_path_factory, mnist_dir) -> Path:
    """The README's sweep, made short: 2 models x 2 rates, with the basic launcher."""
    work = tmp_path_factory.mktemp("grid")
    result = cli("runner", "-m", *GRID, *QUICK, cwd=work, mnist_dir=mnist_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (work / CONSOLE).write_text(result.stdout)
    return work


# The grid's console output, kept beside its store.
CONSOLE = "console.txt"


def ui_link(run) -> str:
    """The page of `run` in the MLflow UI's model-training view, as `mlflow ui` serves it."""
    return (
        f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        "?workflowType=machine_learning"
    )


def sweep_runs(work: Path) -> tuple:
    """(parent, children) of the one sweep in `work`'s store."""
    [parent], children = parents_and_children(work)
    return parent, children


def test_sweep_is_one_parent_run_with_a_child_run_a_job(grid):
    parent, children = sweep_runs(grid)
    assert len(children) == 4
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.overrides"] == " ".join([*GRID, *QUICK])
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    assert sweep_dir.parent.parent == grid / "multirun"
    assert json.loads((sweep_dir / jobs.SWEEP_FILE).read_text())["parent_run_id"] == (
        parent.info.run_id
    )
    assert parent.data.tags["sweep.launcher"] == "BasicLauncher"
    grid_points = {(r.data.params["model.name"], r.data.params["optimizer.lr"]) for r in children}
    assert grid_points == {(m, lr) for m in ("softmax", "cnn_layers") for lr in ("0.1", "0.01")}
    # Each run's link in the MLflow UI: the parent's in the sweep's output, a job's in its log.
    console = (grid / CONSOLE).read_text()
    assert f"MLflow parent run {parent.info.run_id} for the sweep in {sweep_dir}: " in console
    assert f": {ui_link(parent)}\n" in console
    logs = "".join(log.read_text() for log in sweep_dir.glob("*/runner.log"))
    experiment = store_client(grid).get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"test/accuracy", "val/accuracy", "train/loss"} <= child.data.metrics.keys()
        assert f"MLflow run {child.info.run_id} in experiment 'mnist': {ui_link(child)}\n" in logs
        # Named by what sets the job apart, not by the overrides every job shares.
        name = child.data.tags["mlflow.runName"]
        assert name.startswith("#") and "model=" in name and "data.limit" not in name


def test_parent_run_holds_the_comparison_table_and_plot(grid):
    parent, children = sweep_runs(grid)
    client = store_client(grid)
    logged = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, nested_runs.COMPARISON_TABLE, str(grid))
        ).read_text()
    )
    table = pd.DataFrame(logged["data"], columns=logged["columns"])
    assert len(table) == 4
    assert {"model.name", "optimizer.lr", "val/accuracy", "test/accuracy"} <= set(table.columns)
    assert "data.limit" not in table.columns  # equal in every run
    best = max(c.data.metrics["val/accuracy"] for c in children)
    assert table["val/accuracy"].iloc[0] == pytest.approx(best)
    assert parent.data.metrics["best/val/accuracy"] == pytest.approx(best)
    local = client.download_artifacts(parent.info.run_id, nested_runs.CURVES_PLOT, str(grid))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_the_latest_sweep_best_first(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    compare.main(["--format", "csv"])
    lines = capsys.readouterr().out.strip().splitlines()
    header = lines[0].split(",")
    assert header[:3] == ["run", "run_id", "status"]
    assert {"model.name", "optimizer.lr", *comparison.DEFAULT_METRICS} <= set(header)
    accuracies = [float(line.split(",")[header.index("val/accuracy")]) for line in lines[1:]]
    assert len(accuracies) == 4 and accuracies == sorted(accuracies, reverse=True)

    parent, _ = sweep_runs(grid)
    args = ["--parent", parent.info.run_id, "--format", "markdown", "--sort", "test/loss"]
    compare.main([*args, "--metrics", "test/loss"])
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("| run | run_id | status |") and rows[1].startswith("|---|")
    losses = [float(row.strip("| ").split(" | ")[-1]) for row in rows[2:]]
    assert len(losses) == 4 and losses == sorted(losses)


def test_compare_lists_every_run_of_an_experiment_but_the_parents(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    compare.main(["--all"])
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 + 4
    assert "sweep model=" not in out


def test_compare_names_what_is_wrong(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match="^1$"):
        compare.main(["--experiment", "nope"])
    assert "no experiment named 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^1$"):
        compare.main(["--parent", "0" * 32])
    assert f"run {'0' * 32} has no child runs" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^1$"):
        compare.main(["--tracking-uri", f"sqlite:///{grid / 'absent.db'}"])
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (grid / "absent.db").exists()


@pytest.fixture
def mlflow_ui(grid):
    """`mlflow server` over the grid's store."""
    with mlflow_server(grid / "mlflow.db") as url:
        yield url


def test_mlflow_ui_shows_the_sweep_in_chromium(grid, mlflow_ui, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI: .ci/run installs Debian's chromium")
        pytest.skip("needs Debian's chromium (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    parent, children = sweep_runs(grid)
    # The sweep's own link to its parent run, on this test's server rather than `mlflow ui`'s.
    [link] = re.findall(r"for the sweep in \S+: (\S+)", (grid / CONSOLE).read_text())
    link = link.replace("http://127.0.0.1:5000/", f"{mlflow_ui}/")
    screenshot = tmp_path / "mlflow_ui_sweep.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        # A new browser, whose storage does not choose the UI's view: the link does.
        page = browser.new_page(viewport={"width": 1920, "height": 800})
        try:
            page.goto(link)
            page.get_by_text(parent.info.run_id, exact=True).wait_for(timeout=60_000)
            # The model-training view's side bar, whose Runs is the training runs table.
            page.locator('a[href$="/runs?workflowType=machine_learning"]', has_text="Runs").click()
            names = page.locator('[role="gridcell"][col-id="attributes.`Run Name`"]')
            names.filter(has_text=parent.data.tags["mlflow.runName"]).wait_for(timeout=60_000)
            genai = [
                page.get_by_text(text, exact=True) for text in ("Observability", "Training runs")
            ]
            in_genai_view = [locator.count() for locator in genai]
            page.get_by_role("button", name="Close").click()  # the assistant's side panel
            names.first.locator("button").click()  # expands the parent into its children
            for child in children:
                names.filter(has_text=child.data.tags["mlflow.runName"]).wait_for(timeout=10_000)
            page.get_by_role("button", name="Columns", exact=True).click()
            page.get_by_role("dialog").get_by_text("val/accuracy", exact=True).click()
            page.keyboard.press("Escape")
            page.locator('[role="columnheader"]', has_text="val/accuracy").first.wait_for()
            cells = page.locator('[role="gridcell"][col-id*="val/accuracy"]')
            shown = {round(float(text), 4) for text in cells.all_inner_texts() if text != "-"}
        finally:
            page.screenshot(path=screenshot, full_page=True)
            browser.close()
    assert in_genai_view == [0, 0]  # the GenAI view's side bar and title of its runs table
    assert shown == {round(c.data.metrics["val/accuracy"], 4) for c in children}
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_shows_a_parameter_of_one_model_only(grid, monkeypatch, capsys):
    """cnn_layers has a dropout rate, softmax none: the column is blank for softmax."""
    monkeypatch.chdir(grid)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args in ([], ["--all"]):
        compare.main([*args, "--format", "csv"])
        header, *lines = capsys.readouterr().out.strip().splitlines()
        columns = header.split(",")
        assert {"model.name", "model.dropout_rate", *comparison.DEFAULT_METRICS} <= set(columns)
        assert "best/val/accuracy" not in columns  # the sweep parent's, not the runs'
        cells = [dict(zip(columns, line.split(","), strict=True)) for line in lines]
        rates = {row["model.name"]: row["model.dropout_rate"] for row in cells}
        assert rates == {"softmax": "", "cnn_layers": "0.4"}


def test_compare_refuses_a_metric_no_run_has(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match="^1$"):
        compare.main(["--all", "--sort", "val/acc"])
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("runner-compare: error: no run compared has the metric 'val/acc'")
    assert "val/accuracy" in line and "train/loss" in line
    with pytest.raises(SystemExit, match="^1$"):
        compare.main(["--metrics", "test/accuracy", "test/acc", "val/los"])
    assert "the metric 'test/acc', 'val/los':" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory, mnist_dir) -> Path:
    """Two short sweeps in one store: over the data's name, and over seeds x learning rates."""
    work = tmp_path_factory.mktemp("two_sweeps")
    short = [*QUICK, "trainer.steps=10", "trainer.log_every=5", "trainer.eval_every=5"]
    for swept in (["data.name=mnist,digits"], ["seed=1,2", "optimizer.lr=0.1,0.9"]):
        result = cli("runner", "-m", *swept, *short, cwd=work, mnist_dir=mnist_dir)
        assert result.returncode == 0, result.stderr[-3000:]
    return work


def in_order(folder: Path) -> tuple:
    """The two sweeps' parent runs, first first, and their children."""
    parents, children = parents_and_children(folder)
    return sorted(parents, key=lambda run: run.info.start_time), children


def test_a_sweep_over_data_keeps_its_runs_in_one_experiment_and_compares_with_another(
    two_sweeps, monkeypatch, capsys
):
    """Runs are recorded in the experiment named after their data unless in a sweep, whose jobs
    join their parent's experiment, whatever data each trains on: else the parent's summary
    would miss them. Then a second sweep in the same store, and `runner-compare --parent A
    --parent B --plot FILE`: the six runs in one table, each row naming its own sweep, and
    their validation curves in one PNG."""
    client = store_client(two_sweeps)
    assert client.get_experiment_by_name("digits") is None
    (first, second), children = in_order(two_sweeps)
    parents = [first, second]
    of_first = [c for c in children if c.data.tags["mlflow.parentRunId"] == first.info.run_id]
    assert sorted(c.data.params["data.name"] for c in of_first) == ["digits", "mnist"]
    assert "best/val/accuracy" in first.data.metrics

    monkeypatch.chdir(two_sweeps)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{two_sweeps}/mlflow.db")
    plot = two_sweeps / "curves.png"
    args = ["--parent", first.info.run_id, "--parent", second.info.run_id, "--plot", str(plot)]
    compare.main([*args, "--format", "csv"])
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(rows.columns[:2]) == ["sweep", "run"] and len(rows) == 6
    assert {"data.name", "optimizer.lr"} <= set(rows.columns)  # each differs across the sweeps
    label = {p.info.run_id: f"{p.info.run_name} ({p.info.run_id[:8]})" for p in parents}
    sweep_of = {c.info.run_id: label[c.data.tags["mlflow.parentRunId"]] for c in children}
    assert dict(zip(rows["run_id"], rows["sweep"], strict=True)) == sweep_of
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = comparison.curves(rows.assign(**{"tags.mlflow.runName": rows["run"]}), comparison.CURVE)
    assert len(drawn) == 6 and all(len(points) == 2 for points in drawn.values())


def test_compare_over_seed_gives_each_group_of_seeds_one_row_and_curve(
    two_sweeps, monkeypatch, capsys
):
    """`--over seed`: the runs that differ only in seed (each has its own checkpoint folder)
    make one row, with each metric's mean, standard deviation and count, and one curve, its mean
    in a band of one standard deviation; a key the runs lack is refused in one line."""
    (first, second), children = in_order(two_sweeps)
    monkeypatch.chdir(two_sweeps)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{two_sweeps}/mlflow.db")
    of_second = [c for c in children if c.data.tags["mlflow.parentRunId"] == second.info.run_id]
    final = pd.DataFrame(
        [{"lr": float(c.data.params["optimizer.lr"]), **c.data.metrics} for c in of_second]
    ).groupby("lr")
    plot = two_sweeps / "seeds.png"
    args = ["--parent", second.info.run_id, "--over", "seed"]
    compare.main([*args, "--format", "csv", "--plot", str(plot)])
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype={"seed": str})
    assert list(rows.columns[:3]) == ["optimizer.lr", "seed", "runs"]
    assert "trainer.checkpoint_dir" not in rows.columns
    assert list(rows["seed"]) == ["1 2", "1 2"] and list(rows["runs"]) == [2, 2]
    for metric in comparison.DEFAULT_METRICS:
        mean = rows.set_index("optimizer.lr")[f"{metric} mean"]
        assert mean.to_dict() == pytest.approx(final[metric].mean().to_dict())
        std = rows.set_index("optimizer.lr")[f"{metric} std"]
        assert std.to_dict() == pytest.approx(final[metric].std().to_dict())
        assert list(rows[f"{metric} n"]) == [2, 2]
    means = list(rows["val/accuracy mean"])
    assert means == sorted(means, reverse=True)

    compare.main(args)  # the table
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["optimizer.lr", "seed", "runs", "test/accuracy"]
    assert len(lines) == 2

    # Both sweeps: the first's two runs differ in data.name, each a group of one (no std).
    both = ["--parent", first.info.run_id, *args, "--format", "csv"]
    compare.main(both)
    rows = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert sorted(rows["runs"]) == [1, 1, 2, 2] and rows.columns[0] == "sweep"
    assert rows["val/accuracy std"].isna().tolist() == [n == 1 for n in rows["runs"]]

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = comparison.children(second.info.experiment_id, second.info.run_id)
    means, spread = comparison.group_curves(runs, "seed", comparison.CURVE)
    assert set(means) == {"optimizer.lr=0.1 (2 runs)", "optimizer.lr=0.9 (2 runs)"}
    for name, points in means.items():
        lr = float(name.split("=")[1].split()[0])
        assert [step for step, _ in points] == [5, 10]
        assert points[-1][1] == pytest.approx(final["val/accuracy"].mean()[lr])
        assert spread[name][-1][1] == pytest.approx(final["val/accuracy"].std()[lr])
    figure = plots.sweep_curves(means, comparison.CURVE, spread)
    assert len(figure.axes[0].lines) == len(figure.axes[0].collections) == 2  # a band a group

    with pytest.raises(SystemExit, match="^1$"):
        compare.main([*args[:2], "--over", "sed"])
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "runner-compare: error: --over 'sed' is not a parameter of the runs compared: did you "
        "mean seed? those that differ between them are optimizer.lr, seed\n"
    )


def test_a_job_is_named_by_the_overrides_that_set_it_apart():
    """The keys a sweep's command line fixes, as the parent writes them for its jobs, and a
    job's name from them, as its MLflow run and a lost SLURM job's line give it."""
    command = ["model=softmax,cnn_layers", "+trainer.note=a", "data.limit=100", "seed=range(2)"]
    fixed = jobs.sweep_keys(command, swept=False)
    assert fixed == ["+trainer.note", "data.limit"]
    assert jobs.sweep_keys(command, swept=True) == ["model", "seed"]
    job = ["model=cnn_layers", "+trainer.note=a", "data.limit=100", "seed=1"]
    assert jobs.job_name(3, job, fixed) == "#3 model=cnn_layers seed=1"
