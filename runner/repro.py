"""`runner-repro RUN_ID`: rerun a logged run from its logged config and compare every metric
history step by step. Exits 0 when they agree (exactly, or within --rtol/--atol), 1 otherwise,
printing the first differing step of each metric and the environment differences that may
explain them."""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

History = dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class Difference:
    metric: str
    step: int
    expected: float | None
    found: float | None


def compare(expected: History, found: History, rtol: float = 0.0, atol: float = 0.0) -> list:
    """The first differing step of each metric; a step or metric on one side only differs too."""
    differences = []
    for metric in sorted(expected.keys() | found.keys()):
        want, got = dict(expected.get(metric, [])), dict(found.get(metric, []))
        for step in sorted(want.keys() | got.keys()):
            a, b = want.get(step), got.get(step)
            if a is None or b is None or not math.isclose(a, b, rel_tol=rtol, abs_tol=atol):
                differences.append(Difference(metric, step, a, b))
                break
    return differences


def environment_differences(expected: dict, found: dict) -> list[tuple[str, Any, Any]]:
    """(key, expected, found) for each dotted environment.json key whose values differ."""
    from runner.tracking import flatten

    want, got = dict(flatten(expected)), dict(flatten(found))
    return [
        (key, want.get(key), got.get(key))
        for key in sorted(want.keys() | got.keys())
        if want.get(key) != got.get(key)
    ]


# Metrics that measure the machine (speed, memory, load), not the model: no two runs agree.
MEASUREMENTS = ("perf/", "system/")


def histories(client: Any, run: Any) -> History:
    """The run's result metrics, each as (step, value) points."""
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in sorted(run.data.metrics)
        if not key.startswith(MEASUREMENTS)
    }


def logged_environment(run: Any) -> dict:
    """The run's environment.json; empty for runs logged before the runner recorded one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/environment.json"))
    except MlflowException:
        return {}


def report(differences: list[Difference], environment: list[tuple[str, Any, Any]]) -> str:
    lines = [f"{'metric':<16} {'first differing step':>20} {'original':>14} {'rerun':>14}"]
    lines += [
        f"{d.metric:<16} {d.step:>20} {_number(d.expected):>14} {_number(d.found):>14}"
        for d in differences
    ]
    if environment:
        lines += ["", f"{'environment':<40} {'original':<30} rerun"]
        lines += [f"{key:<40} {str(a):<30} {b}" for key, a, b in environment]
    else:
        lines += ["", "The environments are the same (versions, platform, devices, commit, data)."]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "missing" if value is None else f"{value:.8g}"


def rerun(run_id: str, tracking_uri: str, overrides: list[str]) -> tuple[Any, Any]:
    """Train again from `run_id`'s logged config changed by `overrides` (KEY=VALUE); returns
    (original run, new run). The overrides and the store are checked before anything trains."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    from runner import tracking
    from runner.access import refusal
    from runner.errors import UserError
    from runner.train import train

    for override in overrides:
        key, equals, _ = override.partition("=")
        if not equals or not key.strip():
            raise UserError(
                f"--set {override!r} is not KEY=VALUE: write it as, e.g., "
                f"--set data.dir=/data/mnist"
            )
    tracking.connect(tracking_uri)  # MLflow would retry an unreachable server for minutes
    client = mlflow.MlflowClient(tracking_uri)
    try:
        original = client.get_run(run_id)
        logged = mlflow.artifacts.load_text(f"{original.info.artifact_uri}/config.yaml")
    except MlflowException as error:
        raise refusal(error, tracking_uri) or UserError(
            f"cannot read run {run_id} in {tracking_uri}: {error.message}"
        ) from None
    logged_cfg = OmegaConf.create(logged)
    if OmegaConf.select(logged_cfg, "model._target_") is None:
        commit = original.data.tags.get("git_commit", "its git_commit tag")
        raise UserError(
            f"run {run_id} was recorded by an older runner, whose config names no "
            f"model._target_: rerun it with the runner of its commit, {commit}"
        )
    cfg = overridden(logged_cfg, overrides, run_id)
    cfg.tracking.uri = tracking_uri
    # A fresh folder, so the rerun neither resumes from nor overwrites the original's checkpoints.
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cfg.trainer.checkpoint_dir = str(
        Path("outputs") / "repro" / f"{run_id}_{stamp}" / "checkpoints"
    )
    cfg.trainer.resume = False
    train(cfg, tags={"repro_of": run_id})
    return original, client.get_run(mlflow.last_active_run().info.run_id)


def overridden(logged: Any, overrides: list[str], run_id: str) -> Any:
    """The logged config with `overrides` applied. A key it lacks is refused: merged, a misspelt
    key would be added beside the real one and the original rerun unchanged."""
    from difflib import get_close_matches

    from omegaconf import OmegaConf

    from runner.errors import UserError
    from runner.tracking import flatten

    absent = object()
    for override in overrides:
        key = override.partition("=")[0].strip()
        was = OmegaConf.select(logged, key, default=absent)
        if was is absent:
            keys = [name for name, _ in flatten(OmegaConf.to_container(logged))]
            close = get_close_matches(key, keys, n=1)
            hint = f"did you mean {close[0]}?" if close else "see the run's config.yaml artifact"
            raise UserError(f"--set {override}: run {run_id}'s config has no key {key!r} ({hint})")
        if OmegaConf.is_config(was):
            raise UserError(
                f"--set {override}: {key} is a group of settings in run {run_id}'s config; set "
                f"its keys one by one (--set {key}.KEY=VALUE)"
            )
        now = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        if not _same_kind(was, now):
            raise UserError(
                f"--set {override}: {key} is {type(was).__name__} in run {run_id}'s config "
                f"({was!r}), not {type(now).__name__}"
            )
    return OmegaConf.merge(logged, OmegaConf.from_dotlist(overrides))


def _same_kind(was: Any, now: Any) -> bool:
    """Whether `now` may replace `was`: a number by a number (an int by an int), a flag by a
    flag; a text or an unset value by anything."""
    if was is None or isinstance(was, str):
        return True
    if isinstance(was, bool) or isinstance(now, bool):
        return isinstance(was, bool) and isinstance(now, bool)
    if isinstance(was, int):
        return isinstance(now, int)
    return isinstance(now, int | float)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="runner-repro", description=__doc__)
    parser.add_argument("run_id", help="the MLflow run to reproduce")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0)")
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the logged config, e.g. --set data.dir=/data/mnist on another machine",
    )
    args = parser.parse_args(argv)
    from runner.tracking import default_uri

    uri = default_uri()
    # MLflow draws a download bar on stderr for each of the run's small files it reads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    from runner.errors import reported
    from runner.targets import importable_from_cwd

    importable_from_cwd()
    with reported("runner-repro"):
        original, repeat = rerun(args.run_id, uri, args.overrides)
    import mlflow

    client = mlflow.MlflowClient(uri)
    differences = compare(
        histories(client, original), histories(client, repeat), args.rtol, args.atol
    )
    environments = [logged_environment(run) for run in (original, repeat)]
    print(f"original run {original.info.run_id}, rerun {repeat.info.run_id}")
    if not differences:
        print(f"every metric history agrees (rtol={args.rtol}, atol={args.atol})")
        return
    print(report(differences, environment_differences(*environments)))
    sys.exit(1)
