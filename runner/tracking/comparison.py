"""The runs of a sweep, of several sweeps, or of a whole experiment, side by side: what
`runner-compare` prints and a sweep's parent run logs when the sweep ends
(`runner.sweeps.nested_runs`).

One row a run: its sweep (when several are compared), its name and status, the parameters that
differ between the runs, and the final value of the chosen metrics, sorted by one of them. Over
a parameter (`--over seed`), one row a group of runs that differ only in it: the mean, standard
deviation and count of each metric over the group, and one curve a group, its mean in a band of
±1 deviation.
"""

from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from runner.errors import UserError, did_you_mean
from runner.tracking import store
from runner.tracking.access import refusal
from runner.tracking.comparison_defaults import CURVE, DEFAULT_METRICS, DEFAULT_SORT
from runner.tracking.identity import SWEEP_DIR_TAG

# The column naming each run's sweep, when the runs of several are compared.
SWEEP = "sweep"
# Parameters that say where a run writes or records, not what it trains: each job of a sweep has
# its own checkpoint folder. Runs are grouped (--over) by their other parameters.
NOT_SETTINGS = ("trainer.checkpoint_dir", "tracking.")
# The columns of a group's row (--over) besides its parameters and metrics: how many runs it has.
RUNS = "runs"
# Each metric's columns in a group's row: over its finished runs.
STATISTICS = ("mean", "std", "n")


def table(runs: pd.DataFrame, metrics: Sequence[str], sort_by: str | None = None) -> pd.DataFrame:
    """`runs` as `mlflow.search_runs` gives them, reduced to what tells them apart.

    Parameters equal in every run are left out, and one that only some runs have differs; a
    parameter or metric a run lacks is blank. Sorting puts the best first: lowest for a loss,
    highest for anything else."""
    params = [column for column in runs.columns if column.startswith("params.")]
    # Missing counts as a value of its own: `astype(str)` keeps it NaN, which nunique skips.
    differing = sorted(column for column in params if runs[column].nunique(dropna=False) > 1)
    out = pd.DataFrame(
        {
            **({SWEEP: runs[SWEEP]} if SWEEP in runs.columns else {}),
            "run": runs.get(f"tags.{MLFLOW_RUN_NAME}", runs["run_id"]),
            "run_id": runs["run_id"],
            "status": runs["status"],
        }
    )
    for column in differing:
        out[column.removeprefix("params.")] = runs[column]
    for metric in metrics:
        out[metric] = runs.get(f"metrics.{metric}", pd.Series(float("nan"), index=runs.index))
    if sort_by:
        if sort_by not in out.columns:
            out[sort_by] = runs.get(f"metrics.{sort_by}", float("nan"))
        out = out.sort_values(sort_by, ascending="loss" in sort_by, na_position="last")
    return out.reset_index(drop=True)


def groups(runs: pd.DataFrame, over: str) -> tuple[list[pd.DataFrame], list[str]]:
    """`runs` in groups that differ only in the parameter `over` (and in NOT_SETTINGS), in the
    order of their first runs, and the parameters (columns `params.*`) that tell groups apart."""
    settings = [
        column
        for column in runs.columns
        if column.startswith("params.")
        and column != f"params.{over}"
        and not column.removeprefix("params.").startswith(NOT_SETTINGS)
    ]
    if not settings:
        return [runs], []
    # A parameter a run lacks is a value of its own, as in `table`.
    members = [rows for _, rows in runs.groupby(settings, dropna=False, sort=False)]
    differing = sorted(column for column in settings if runs[column].nunique(dropna=False) > 1)
    return members, differing


def summary(
    runs: pd.DataFrame, over: str, metrics: Sequence[str], sort_by: str | None = None
) -> pd.DataFrame:
    """One row a group of `runs` that differ only in `over` (`groups`): the parameters that tell
    the groups apart, the group's values of `over`, its number of runs, and the mean, standard
    deviation and count of each metric's final value over its finished runs (a failed or pruned
    run's last values are not its result). Best first by `sort_by`'s mean."""
    members, differing = groups(runs, over)
    rows = []
    for group in members:
        row = {SWEEP: "; ".join(dict.fromkeys(group[SWEEP]))} if SWEEP in group.columns else {}
        row.update({column.removeprefix("params."): group[column].iloc[0] for column in differing})
        row[over] = " ".join(_cell(value) for value in group[f"params.{over}"])
        row[RUNS] = len(group)
        finished = group[group["status"] == "FINISHED"]
        for metric in dict.fromkeys([*metrics, *([sort_by] if sort_by else [])]):
            values = finished.get(f"metrics.{metric}", pd.Series(dtype=float)).dropna()
            mean, std, n = (f"{metric} {statistic}" for statistic in STATISTICS)
            row.update({mean: values.mean(), std: values.std(), n: len(values)})
        rows.append(row)
    out = pd.DataFrame(rows)
    if sort_by:
        out = out.sort_values(f"{sort_by} mean", ascending="loss" in sort_by, na_position="last")
    return out.reset_index(drop=True)


def check_over(runs: pd.DataFrame, over: str) -> None:
    """Refuse an `--over` that is not a parameter of the runs, naming those that differ."""
    params = [
        column.removeprefix("params.") for column in runs.columns if column.startswith("params.")
    ]
    if over in params:
        return
    hint = did_you_mean(over, params)
    differing = [
        key
        for key in sorted(params)
        if not key.startswith(NOT_SETTINGS) and runs[f"params.{key}"].nunique(dropna=False) > 1
    ]
    raise UserError(
        f"--over {over!r} is not a parameter of the runs compared: "
        + (f"{hint} " if hint else "")
        + f"those that differ between them are {', '.join(differing) or 'none'}"
    )


def group_curves(
    runs: pd.DataFrame, over: str, metric: str
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """The mean history of `metric` over each group's finished runs (`groups`, as `summary`
    counts them), and its standard deviation at each step, by the group's name: the parameters
    that set it apart, and its number of finished runs."""
    members, differing = groups(runs, over)
    means, deviations = {}, {}
    for group in members:
        finished = group[group["status"] == "FINISHED"]
        settings = " ".join(
            f"{column.removeprefix('params.')}={_cell(group[column].iloc[0])}"
            for column in differing
        )
        name = f"{settings or 'all runs'} ({len(finished)} runs)"
        points = pd.DataFrame(
            [point for history in curves(finished, metric).values() for point in history],
            columns=["step", "value"],
        )
        steps = points.groupby("step")["value"]
        means[name] = list(steps.mean().items())
        deviations[name] = list(steps.std().fillna(0.0).items())
    return means, deviations


def recorded_metrics(runs: pd.DataFrame) -> list[str]:
    """The metrics that at least one of `runs` has a value of."""
    return sorted(
        column.removeprefix("metrics.")
        for column in runs.columns
        if column.startswith("metrics.") and runs[column].notna().any()
    )


def chosen_metrics(
    runs: pd.DataFrame, metrics: Sequence[str] | None, sort_by: str | None
) -> tuple[list[str], str | None]:
    """The metrics to show and to sort by. Ones asked for must be metrics of the runs, since a
    misspelt name would only add a blank column or leave the rows unsorted; by default the
    DEFAULT_METRICS, sorted by DEFAULT_SORT where a run has it, else in the runs' order."""
    have = recorded_metrics(runs)
    asked = [*(metrics or []), *([sort_by] if sort_by else [])]
    unknown = [metric for metric in dict.fromkeys(asked) if metric not in have]
    if unknown:
        raise UserError(
            f"no run compared has the metric {', '.join(map(repr, unknown))}: pick from "
            f"{', '.join(have) or 'none (the runs logged no metric yet)'}"
        )
    if sort_by is None and DEFAULT_SORT in have:
        sort_by = DEFAULT_SORT
    return list(metrics or DEFAULT_METRICS), sort_by


def render(rows: pd.DataFrame, fmt: str) -> str:
    """The table as aligned text, GitHub markdown or CSV; numbers to 4 decimals."""
    if fmt == "csv":
        return rows.to_csv(index=False)
    cells = rows.map(_cell)
    if fmt == "markdown":
        lines = ["| " + " | ".join(rows.columns) + " |", "|" + "---|" * len(rows.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
        return "\n".join(lines) + "\n"
    return cells.to_string(index=False) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def latest_sweep(experiment_id: str) -> str | None:
    """The run id of the experiment's most recent sweep parent, if it has any."""
    found = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_DIR_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return None if found.empty else str(found["run_id"].iloc[0])


def children(experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """The runs nested under `parent_run_id`, in the order they started."""
    return mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def select_runs(experiment_name: str, parents: Sequence[str], everything: bool) -> pd.DataFrame:
    """The runs to compare: the children of the sweeps `parents` (of the latest sweep if none),
    each row naming its sweep when there are several; or with `everything` every run of the
    experiment but the sweep parents."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise UserError(
            f"no experiment named {experiment_name!r} in this store (it has: {names}); "
            f"pick one with --experiment"
        )
    if everything:
        runs = mlflow.search_runs([experiment.experiment_id])
        if f"tags.{SWEEP_DIR_TAG}" in runs.columns:
            runs = runs[runs[f"tags.{SWEEP_DIR_TAG}"].isna()]
        if runs.empty:
            raise UserError(
                f"experiment {experiment_name!r} has no runs yet: train one with "
                f"`uv run runner`, or pick another experiment with --experiment"
            )
        return runs
    if not parents:
        latest = latest_sweep(experiment.experiment_id)
        if latest is None:
            raise UserError(
                f"experiment {experiment_name!r} has no sweep yet: run one with "
                f"`uv run runner -m ...`, or pass --all to compare every run"
            )
        parents = [latest]
    sweeps = []
    for parent in dict.fromkeys(parents):
        runs = children(experiment.experiment_id, parent)
        if runs.empty:
            raise UserError(f"run {parent} has no child runs in experiment {experiment_name!r}")
        if len(parents) > 1:
            runs.insert(0, SWEEP, f"{mlflow.get_run(parent).info.run_name} ({parent[:8]})")
        sweeps.append(runs)
    return pd.concat(sweeps, ignore_index=True)


def curves(runs: pd.DataFrame, metric: str) -> dict[str, list[tuple[int, float]]]:
    """Each run's history of `metric`, by its name (prefixed with its sweep's, if it has one)."""
    client = mlflow.MlflowClient()
    names = runs.get(f"tags.{MLFLOW_RUN_NAME}", runs["run_id"])
    if names.duplicated().any():  # reruns, repeated trials: a curve each all the same
        names = names + " (" + runs["run_id"].str[:8] + ")"
    if SWEEP in runs.columns:
        names = runs[SWEEP] + ": " + names
    return {
        name: [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
        for name, run_id in zip(names, runs["run_id"], strict=True)
    }


def compared(
    *,
    tracking_uri: str | None,
    experiment: str,
    parents: Sequence[str],
    everything: bool,
    metrics: Sequence[str] | None,
    sort_by: str | None,
    over: str | None,
    plot: Path | None,
) -> pd.DataFrame:
    """The rows `runner-compare` prints (`select_runs`, `chosen_metrics`; `summary` over `over`,
    else `table`), their curves drawn in the PNG `plot` if given. `tracking_uri` defaults to
    the runner's store."""
    uri = tracking_uri or store.default_uri()
    store.connect(existing_store(uri))
    try:
        runs = select_runs(experiment, parents, everything)
        metrics, sort_by = chosen_metrics(runs, metrics, sort_by)
        if over:
            check_over(runs, over)
            rows = summary(runs, over, metrics, sort_by)
        else:
            rows = table(runs, metrics, sort_by)
        if plot:
            if over:
                draw(*group_curves(runs, over, CURVE), path=plot)
            else:
                draw(curves(runs, CURVE), path=plot)
    except MlflowException as error:
        raise refusal(error, uri) or error from None
    return rows


def draw(
    runs_curves: dict[str, list[tuple[int, float]]],
    spread: dict[str, list[tuple[int, float]]] | None = None,
    *,
    path: Path,
) -> None:
    """Draw each run's curve (or group's mean, in its `spread`) into the PNG `path`."""
    from runner.tracking import plots  # matplotlib, half a second: only where a plot is asked

    try:
        plots.sweep_curves(runs_curves, CURVE, spread).savefig(path, format="png")
    except OSError as error:
        raise UserError(f"cannot write --plot {path}: {error.strerror}") from None


def existing_store(uri: str) -> str:
    """`uri`, unless it names a SQLite file that is missing: opening it would create an empty
    store. `tracking.connect` names the file by its absolute path."""
    path = store.sqlite_file(uri)
    if path is not None and not path.is_file():
        raise UserError(
            f"no MLflow store at {path}: run this where `uv run runner` recorded its runs, "
            f"or point --tracking-uri (or MLFLOW_TRACKING_URI) at the store"
        )
    return uri
