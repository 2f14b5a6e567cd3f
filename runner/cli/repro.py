"""`runner-repro RUN_ID`: rerun a logged run from its logged config and compare every metric
history step by step. Exits 0 when they agree (exactly, or within --rtol/--atol), 1 otherwise,
printing the first differing step of each metric and the environment differences that may
explain them.

`runner-repro RUN_ID --save FILE` writes what such a rerun needs (the command line's overrides,
config, environment, metric histories) to a small JSON file a repository can commit;
`runner-repro --golden FILE` composes today's conf/ with those overrides, refuses if the config
differs from the recorded one, and reruns it anywhere, into a scratch store, with no tracking
server; `--update` rewrites the file after an intended change."""

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
    """(key, expected, found) for each dotted key of two nested mappings (environment.json, or
    a config) whose values differ."""
    from runner.tracking.provenance import flatten

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
    return "\n".join([*lines, "", environment_report(environment)])


def environment_report(environment: list[tuple[str, Any, Any]]) -> str:
    """The environment keys that differ, as a table; or a line saying none does."""
    if not environment:
        return "The environments are the same (versions, platform, devices, commit, data)."
    lines = [f"{'environment':<40} {'original':<30} rerun"]
    return "\n".join(lines + [f"{_whose(key):<40} {str(a):<30} {b}" for key, a, b in environment])


def _whose(key: str) -> str:
    """An environment key, saying whose code its git commit or state is: the runner's `git`, or
    `user_code.git`, that of the user's own modules (whose files' SHA-256 rows name them)."""
    if key.startswith("git."):
        return f"{key} (the runner's)"
    if key.startswith("user_code.git."):
        return f"{key} (your code's)"
    return key


def _number(value: float | None) -> str:
    return "missing" if value is None else f"{value:.8g}"


def rerun(run_id: str, tracking_uri: str, overrides: list[str]) -> tuple[Any, Any]:
    """Train again from `run_id`'s logged config changed by `overrides` (KEY=VALUE); returns
    (original run, new run). The overrides and the store are checked before anything trains."""
    from runner.targets import check_importable

    check_overrides(overrides)
    original, logged_cfg = logged_run(run_id, tracking_uri)
    # A fresh folder, so the rerun neither resumes from nor overwrites the original's checkpoints.
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = Path("outputs") / "repro" / f"{run_id}_{stamp}"
    cfg = overridden(logged_cfg, overrides, f"run {run_id}")
    # Near the run's own checkpoints is the folder it ran from, where its model's module is.
    # Checked only: importing it could load Keras before the rerun chooses the run's backend.
    check_importable(cfg.model._target_, near=cfg.trainer.checkpoint_dir)
    return original, train_again(cfg, tracking_uri, folder, run_id)


def check_overrides(overrides: list[str]) -> None:
    from runner.errors import UserError

    for override in overrides:
        key, equals, _ = override.partition("=")
        if not equals or not key.strip():
            raise UserError(
                f"--set {override!r} is not KEY=VALUE: write it as, e.g., "
                f"--set data.dir=/data/mnist"
            )


def logged_run(run_id: str, tracking_uri: str) -> tuple[Any, Any]:
    """The run and its logged config, read from `tracking_uri`."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    from runner.errors import UserError
    from runner.tracking import store
    from runner.tracking.access import refusal

    store.connect(tracking_uri)  # MLflow would retry an unreachable server for minutes
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
    return original, logged_cfg


def train_again(cfg: Any, tracking_uri: str, folder: Path, of: str) -> Any:
    """Train `cfg` into `tracking_uri`, its checkpoints in `folder`, tagged `repro_of=<of>`;
    returns the new run."""
    import mlflow

    from runner.cli.train import train

    cfg.tracking.uri = tracking_uri
    cfg.trainer.checkpoint_dir = str(folder / "checkpoints")
    cfg.trainer.resume = False
    if cfg.trainer.get("register_as"):
        cfg.trainer.register_as = None  # a rerun checks the model; it is no new version of it
    train(cfg, tags={"repro_of": of})
    return mlflow.MlflowClient(tracking_uri).get_run(mlflow.last_active_run().info.run_id)


# The environment keys that decide whether a rerun must be bitwise equal: other versions, Python
# or processors round otherwise.
SAME_IF_EQUAL = ("packages", "python", "machine", "cpu")
# A golden file's tolerance where those differ.
OTHER_ENVIRONMENT_RTOL = 1e-3


def golden_rtol(recorded: dict, found: dict, rtol: float | None = None) -> float:
    """The relative tolerance a golden file's rerun is checked with: `rtol` if given; else 0
    where the rerun's environment `found` is the `recorded` one in each of SAME_IF_EQUAL, and
    OTHER_ENVIRONMENT_RTOL otherwise."""
    if rtol is not None:
        return rtol
    same = all(recorded.get(key) == found.get(key) for key in SAME_IF_EQUAL)
    return 0.0 if same else OTHER_ENVIRONMENT_RTOL


def save(run_id: str, tracking_uri: str, path: Path) -> dict:
    """Write `run_id`'s golden file: its command line's overrides, config, environment and
    metric histories."""
    from omegaconf import OmegaConf

    original, logged_cfg = logged_run(run_id, tracking_uri)
    config = OmegaConf.to_container(logged_cfg)
    return save_run(path, original, logged_overrides(original), config, tracking_uri)


def save_run(path: Path, run: Any, overrides: list[str], config: dict, tracking_uri: str) -> dict:
    """Write golden file `path` of `run` in `tracking_uri`, started by the command-line
    `overrides` with the resolved `config`: those, and the run's environment and metric
    histories."""
    import mlflow

    golden = {
        "run_id": run.info.run_id,
        "overrides": overrides,
        "config": config,
        "environment": logged_environment(run),
        "metrics": histories(mlflow.MlflowClient(tracking_uri), run),
    }
    _write(path, golden)
    return golden


def logged_overrides(run: Any) -> list[str]:
    """The overrides of the command that started `run` (a sweep's job: its own), from the
    `hydra/overrides.yaml` Hydra wrote and the run logged."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from runner.errors import UserError

    try:
        text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/hydra/overrides.yaml")
    except MlflowException:
        raise UserError(
            f"run {run.info.run_id} logged no hydra/overrides.yaml, so its command line is "
            f"unknown and a golden file could not tell a change in conf/: save a run that the "
            f"runner command started"
        ) from None
    return [str(override) for override in yaml.safe_load(text) or []]


def _write(path: Path, golden: dict) -> None:
    from runner.errors import UserError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(golden, indent=1) + "\n")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None


def load_golden(path: Path) -> dict:
    """A golden file `save` wrote, checked."""
    from runner.errors import UserError

    try:
        golden = json.loads(path.read_text())
    except OSError as error:
        raise UserError(
            f"cannot read the golden file {path}: {error.strerror}; write one with "
            f"runner-repro RUN_ID --save {path}"
        ) from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not a golden file: {error}") from None
    keys = golden if isinstance(golden, dict) else {}
    missing = [
        key for key in ("config", "environment", "metrics") if not isinstance(keys.get(key), dict)
    ]
    if missing:
        raise UserError(
            f"{path} is not a golden file: it lacks {', '.join(missing)} (a mapping each); "
            f"write one with runner-repro RUN_ID --save {path}"
        )
    if not isinstance(golden.get("overrides"), list):
        raise UserError(
            f"{path} records no overrides (an older runner-repro wrote it), so today's conf/ "
            f"cannot be checked against it: write it anew with runner-repro RUN_ID --save {path}"
        )
    golden["metrics"] = {
        key: [(int(step), float(value)) for step, value in points]
        for key, points in golden["metrics"].items()
    }
    return golden


def check_golden(path: Path, overrides: list[str], update: bool = False) -> tuple[dict, Any, dict]:
    """Compose today's conf/ with golden file `path`'s overrides and rerun it (changed by
    `overrides`, KEY=VALUE) in a scratch store, deleted afterwards; returns (golden, its rerun's
    histories, the rerun's environment). A config that differs from the one the file recorded
    is refused before anything trains, unless `update`: then the file is rewritten with today's
    config and the rerun's environment and histories."""
    import tempfile

    import mlflow
    from omegaconf import OmegaConf

    from runner.errors import UserError

    check_overrides(overrides)
    golden = load_golden(path)
    cfg = composed(golden["overrides"], path)
    drift = config_drift(golden["config"], cfg)
    if drift and not update:
        raise UserError(
            f"{path}: today's config differs from the one it recorded, "
            f"{'; '.join(f'{key}: {was!r} -> {now!r}' for key, was, now in drift)}; not rerun. "
            f"After an intended change, rewrite it with runner-repro --golden {path} --update"
        )
    cfg = overridden(with_machine_keys(cfg, golden["config"]), overrides, str(path))
    today = OmegaConf.to_container(cfg, resolve=True)
    with tempfile.TemporaryDirectory(prefix="runner-repro-") as scratch:
        uri = f"sqlite:///{scratch}/mlflow.db"
        repeat = train_again(cfg, uri, Path(scratch), str(golden.get("run_id", path)))
        found = histories(mlflow.MlflowClient(uri), repeat)
        environment = logged_environment(repeat)
    if update:
        _write(path, {**golden, "config": today, "environment": environment, "metrics": found})
    return golden, found, environment


# Config keys that name the machine a run ran on, not what it trained: never drift. `hydra`
# covers everything under it.
MACHINE_KEYS = ("tracking.uri", "trainer.checkpoint_dir", "data.dir", "data.path", "hydra")


def machine_key(key: str) -> bool:
    """Whether dotted config `key` is, or lies under, one of the MACHINE_KEYS."""
    return any(key == name or key.startswith(f"{name}.") for name in MACHINE_KEYS)


def with_machine_keys(cfg: Any, recorded: dict) -> Any:
    """`cfg` with the recorded values of its MACHINE_KEYS: the rerun reads the data where the
    file says (`--set data.dir=DIR` elsewhere), as a rerun of the recorded config did."""
    from omegaconf import OmegaConf

    from runner.tracking.provenance import flatten

    for key, value in flatten(recorded):
        if machine_key(key) and OmegaConf.select(cfg, key, default=None) is not None:
            OmegaConf.update(cfg, key, value)
    return cfg


def composed(overrides: list[str], path: Path) -> Any:
    """The config `runner OVERRIDES` composes from today's conf/."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from runner.cli.train import compose
    from runner.errors import UserError, misspelt_key, one_line

    try:
        return compose(overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(
            f"{path}: today's conf/ cannot compose its overrides {' '.join(overrides)} "
            f"({misspelt_key(error) or one_line(error)}); after an intended change, write it "
            f"anew from a run of today's config with runner-repro RUN_ID --save {path}"
        ) from None


def config_drift(recorded: dict, cfg: Any) -> list[tuple[str, Any, Any]]:
    """(key, recorded, now) for each dotted key of `cfg`, resolved, that differs from the
    recorded config, but for the MACHINE_KEYS."""
    from omegaconf import OmegaConf

    now = OmegaConf.to_container(cfg, resolve=True)
    return [row for row in environment_differences(recorded, now) if not machine_key(row[0])]


def overridden(logged: Any, overrides: list[str], whose: str) -> Any:
    """The logged config (`whose`: "run <id>", or a golden file) with `overrides` applied. A key
    it lacks is refused: merged, a misspelt key would be added beside the real one and the
    original rerun unchanged."""
    from omegaconf import OmegaConf

    from runner.errors import UserError, did_you_mean
    from runner.tracking.provenance import flatten

    absent = object()
    for override in overrides:
        key = override.partition("=")[0].strip()
        was = OmegaConf.select(logged, key, default=absent)
        if was is absent:
            keys = [name for name, _ in flatten(OmegaConf.to_container(logged))]
            hint = did_you_mean(key, keys) or "see the run's config.yaml artifact"
            raise UserError(f"--set {override}: {whose}'s config has no key {key!r} ({hint})")
        if OmegaConf.is_config(was):
            raise UserError(
                f"--set {override}: {key} is a group of settings in {whose}'s config; set "
                f"its keys one by one (--set {key}.KEY=VALUE)"
            )
        now = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        if not _same_kind(was, now):
            raise UserError(
                f"--set {override}: {key} is {type(was).__name__} in {whose}'s config "
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
    parser = argparse.ArgumentParser(
        prog="runner-repro",
        description=__doc__,
        usage="%(prog)s RUN_ID [--save FILE] | %(prog)s --golden FILE [--update] "
        "[--set KEY=VALUE ...] [--rtol R] [--atol A]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_id",
        nargs="?",
        help="the MLflow run to reproduce, or the registered model whose run it is "
        "(models:/NAME@ALIAS, models:/NAME/VERSION)",
    )
    parser.add_argument(
        "--save", type=Path, metavar="FILE", help="write RUN_ID's golden file, without a rerun"
    )
    parser.add_argument(
        "--golden",
        type=Path,
        metavar="FILE",
        help="rerun a golden file instead of a run, in a scratch store, with no tracking server",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="relative tolerance (default 0; for --golden, 1e-3 when the environment differs)",
    )
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="with --golden: after an intended change to conf/, rerun today's config and rewrite "
        "the file's config, environment and histories (keys that name the machine, "
        f"{', '.join(MACHINE_KEYS)}, never count as a change)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the logged config, e.g. --set data.dir=/data/mnist on another machine",
    )
    args = parser.parse_args(argv)
    if (args.run_id is None) == (args.golden is None):
        parser.error("give either a RUN_ID or --golden FILE")
    if args.save and (args.golden or args.overrides):
        parser.error("--save writes RUN_ID's golden file as it was logged: drop --golden and --set")
    if args.update and not args.golden:
        parser.error("--update rewrites a golden file: give --golden FILE")
    if args.update and any(not machine_key(o.partition("=")[0].strip()) for o in args.overrides):
        parser.error(
            "--update records today's config as conf/ composes it: --set may only say where "
            f"things are ({', '.join(MACHINE_KEYS[:-1])}); change conf/ instead"
        )
    # MLflow draws a download bar on stderr for each of the run's small files it reads.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    from runner.errors import reported

    with reported("runner-repro"):
        check_overrides(args.overrides)  # told before MLflow loads, which takes a second
    from runner.targets import importable_from_cwd
    from runner.tracking.store import default_uri

    importable_from_cwd()
    if args.save:
        with reported("runner-repro"):
            golden = save(_run_id(args.run_id, default_uri()), default_uri(), args.save)
        points = sum(len(points) for points in golden["metrics"].values())
        print(
            f"wrote {args.save}: run {args.run_id}'s config, environment and {points} metric "
            f"points; check it anywhere with: runner-repro --golden {args.save}"
        )
        return
    if args.golden:
        with reported("runner-repro"):
            golden, found, environment = check_golden(args.golden, args.overrides, args.update)
        if args.update:
            points = sum(len(points) for points in found.values())
            print(
                f"updated {args.golden}: today's config, this environment and {points} metric "
                f"points of its rerun; check it with: runner-repro --golden {args.golden}"
            )
            return
        expected, logged = golden["metrics"], golden["environment"]
        rtol = golden_rtol(logged, environment, args.rtol)
        print(f"golden file {args.golden}, rerun in a scratch store")
    else:
        with reported("runner-repro"):
            run_id = _run_id(args.run_id, default_uri())
            original, repeat = rerun(run_id, default_uri(), args.overrides)
        import mlflow

        client = mlflow.MlflowClient(default_uri())
        expected, found = histories(client, original), histories(client, repeat)
        logged, environment = (logged_environment(run) for run in (original, repeat))
        rtol = args.rtol or 0.0
        print(f"original run {original.info.run_id}, rerun {repeat.info.run_id}")
    differences = compare(expected, found, rtol, args.atol)
    changed = environment_differences(logged, environment)
    if not differences:
        print(f"every metric history agrees (rtol={rtol}, atol={args.atol})")
        if changed:
            print(environment_report(changed))
        return
    print(report(differences, changed))
    sys.exit(1)


def _run_id(given: str, tracking_uri: str) -> str:
    """`given`, or the run that logged the model a models:/ URI names."""
    if not given.startswith("models:/"):
        return given
    from runner.tracking import registry, store

    store.connect(tracking_uri)
    return registry.run_of(given)
