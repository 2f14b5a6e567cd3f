"""Hydra's Optuna sweeper, made resumable, kept to one set of settings and able to prune:
`n_trials` counts the finished (completed or pruned) trials of the whole study, so rerunning an
interrupted search runs only the trials it still lacks; a study refuses to go on under other
settings than it was started with; and `pruner` (none, median, hyperband) calls off trials that
report hopeless validations (`runner.pruning`).

The stock sweeper (hydra-optuna-sweeper) reloads a stored study but then runs `n_trials` more,
and its seeded sampler would propose the first trials' parameters again; nor does it notice that
a study started with `trainer.steps=200` is continued with `trainer.steps=1000`, which would mix
trials that cannot be compared and report the best of either. The stock sweeper also never hears
from a trial before it ends, so it cannot prune. Hydra only instantiates sweepers from the
`hydra_plugins` package, hence this module's home; it imports Optuna lazily because Hydra
imports every plugin module at each start.

`hydra/sweeper=runner_optuna` selects it, with the stock sweeper's settings and `pruner`.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, ListConfig, OmegaConf

from runner import pruning
from runner.errors import UserError, reported

log = logging.getLogger(__name__)

# The study's user attribute that records the settings it was started with.
SETTINGS_ATTR = "runner.settings"


class SettingsChanged(UserError):
    """A stored study continued with other settings than it was started with."""


@dataclass
class RunnerOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.runner_optuna.resumable_sweeper.ResumableOptunaSweeper"
    # none, median or hyperband (Optuna's defaults), or a pruner's {_target_: ..., ...}.
    pruner: Any = "none"


ConfigStore.instance().store(
    group="hydra/sweeper", name="runner_optuna", node=RunnerOptunaSweeperConf, provider="runner"
)


class ResumableOptunaSweeper(OptunaSweeper):
    def __init__(self, *args: Any, pruner: Any = "none", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pruner = pruner

    @classmethod
    def check_before_sweep(cls, config: DictConfig) -> bool:
        """Whether the sweep has trials to run; raises `SettingsChanged` if the stored study was
        started with other settings. `runner.nested_runs.NestedRuns` asks before it opens the
        sweep's MLflow parent run, which Hydra has its callbacks do before it builds the sweeper."""
        sweeper = config.hydra.sweeper
        storage = sweeper.storage
        if isinstance(storage, DictConfig):
            storage = instantiate(storage)
        directions = sweeper.direction
        directions = list(directions) if isinstance(directions, ListConfig) else [directions]
        _checked_pruner(
            sweeper.get("pruner"), config.optimized_metric, storage, sweeper.study_name, directions
        )
        _, done = _checked_study(sweeper.study_name, storage, settings(config))
        return done < sweeper.n_trials

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        search = self.sweeper
        now = settings(search.config)
        # Refused here only with NestedRuns, which checks first, switched off.
        with reported("runner"):
            pruner = _checked_pruner(
                self.pruner,
                search.config.optimized_metric,
                search.storage,
                search.study_name,
                search._get_directions(),
            )
            study, done = _checked_study(search.study_name, search.storage, now)
        if study is None:
            study = optuna.create_study(
                study_name=search.study_name,
                storage=search.storage,
                directions=search._get_directions(),
            )
        if SETTINGS_ATTR not in study.user_attrs:
            if study.trials:
                log.warning(
                    "study %r has no record of the settings its trials ran with (it predates "
                    "the record): recording this command's",
                    search.study_name,
                )
            study.set_user_attr(SETTINGS_ATTR, now)
        wanted = search.n_trials
        if done >= wanted:
            log.info(
                "study %r already has its %s; raise hydra.sweeper.n_trials to run more",
                search.study_name,
                _count(done, "finished trial"),
            )
            return None
        if study.trials:
            interrupted = [t.number for t in study.trials if t.state == TrialState.RUNNING]
            for number in interrupted:  # their process died: they will never report
                study.tell(number, state=TrialState.FAIL)
            search.n_trials = wanted - done
            # Fresh randomness, so the resumed search does not repeat the first proposals.
            if hasattr(search.sampler, "reseed_rng"):
                search.sampler.reseed_rng()
            log.info(
                "Resuming study %r: %d of %d trials finished, %d interrupted (marked failed); "
                "running %d more",
                search.study_name,
                done,
                wanted,
                len(interrupted),
                search.n_trials,
            )
        return self._sweep(arguments, study, pruner)

    def _sweep(self, arguments: list[str], study: Any, pruner: Any) -> None:
        """The stock sweeper's loop (`OptunaSweeperImpl.sweep`), on `study`: ask a batch of
        `n_jobs` trials, launch them, tell the study how each ended: completed with its values,
        pruned (`runner.pruning.Pruned`) or failed. Each trial is marked with its job, which
        finds it there to report to."""
        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
        from optuna.trial import TrialState

        search = self.sweeper
        search._process_searchspace_config()
        space, fixed = create_params_from_overrides(
            search._parse_sweeper_params_config() + list(arguments)
        )
        space = {**(search.search_space_distributions or {}), **space}
        space = {name: d for name, d in space.items() if name not in fixed}
        sampler = search.sampler
        is_grid = getattr(sampler, "func", None) is optuna.samplers.GridSampler  # a partial
        if is_grid:
            grid = {name: search._to_grid_sampler_choices(d) for name, d in space.items()}
            sampler = sampler(grid)
            search.n_trials = min(search.n_trials, math.prod(len(v) for v in grid.values()))
        study.sampler, study.pruner = sampler, pruner
        objectives = len(search._get_directions())
        left = search.n_trials
        while left > 0:
            trials = [study.ask() for _ in range(min(left, search.n_jobs))]
            for offset, trial in enumerate(trials):
                key = pruning.job_key(search.config.hydra, search.job_idx + offset)
                trial.set_user_attr(pruning.JOB_ATTR, key)
            overrides = search._configure_trials(trials, space, fixed)
            returns = search.launcher.launch(overrides, initial_job_idx=search.job_idx)
            search.job_idx += len(returns)
            failures = []
            for trial, ret in zip(trials, returns, strict=True):
                try:
                    value = ret.return_value
                    if isinstance(value, pruning.Pruned):
                        log.info("trial %d pruned at step %d", trial.number, value.step)
                        _tell(study, trial, is_grid, state=TrialState.PRUNED)
                        continue
                    values = [float(v) for v in value] if objectives > 1 else [float(value)]
                    _tell(study, trial, is_grid, values=values, state=TrialState.COMPLETE)
                except Exception as error:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                    log.warning("Failed experiment: %s", error)
                    failures.append(error)
            if len(failures) / len(returns) > search.max_failure_rate:
                log.error(
                    "Failed %s times out of %d with max_failure_rate=%s",
                    failures,
                    len(returns),
                    search.max_failure_rate,
                )
                for ret in returns:
                    ret.return_value  # noqa: B018 - raises the job's error, with its traceback
            left -= len(trials)
        _save_results(study, objectives, Path(search.config.hydra.sweep.dir))


def _tell(study: Any, trial: Any, is_grid: bool, **how: Any) -> None:
    """`study.tell(trial, **how)`. A grid sampler whose grid is done stops the study, which
    outside `study.optimize` raises once the trial is told: the sweep ends there anyway."""
    try:
        study.tell(trial, **how)
    except RuntimeError as error:
        if not (is_grid and "Study.stop" in str(error)):
            raise


def _save_results(study: Any, objectives: int, sweep_dir: Path) -> None:
    """The best trial (the Pareto front of several objectives), logged and written to
    optimization_results.yaml as the stock sweeper writes it."""
    if not study.best_trials:
        log.warning("no trial of study %r completed: none is best", study.study_name)
        return
    if objectives == 1:
        best = study.best_trial
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s", best.value)
    else:
        front = [{"params": t.params, "values": t.values} for t in study.best_trials]
        results = {"name": "optuna", "solutions": front}
        log.info("Number of Pareto solutions: %d", len(front))
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def settings(config: DictConfig) -> dict[str, Any]:
    """What makes a study's trials comparable, as the command line set it: its overrides that are
    not searched (sorted; `hydra.*` ones, such as `hydra.sweeper.n_trials`, are not among them),
    and the searched space, `hydra.sweeper.params` with any sweeps of the command line."""
    overrides = list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(overrides)
    searched = {str(key): str(value) for key, value in (config.hydra.sweeper.params or {}).items()}
    fixed = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            searched[override.get_key_element()] = text.split("=", 1)[1]
        else:
            fixed.append(text)
    return {"fixed": sorted(fixed), "searched": dict(sorted(searched.items()))}


def _checked_pruner(
    spec: Any, metric: str, storage: Any, study_name: str | None, directions: list
) -> Any:
    """The pruner `spec` builds (None for none), refused where its trials could not report."""
    pruner = pruning.build_pruner(spec)
    if pruner is None:
        return None
    if not str(metric).startswith("val/"):
        raise UserError(
            f"hydra.sweeper.pruner prunes on validations, but optimized_metric={metric} is not "
            f"a validation metric: optimize a val/ one, or set hydra.sweeper.pruner=none"
        )
    if storage is None or study_name is None:
        raise UserError(
            "hydra.sweeper.pruner needs a stored study, which the trials report to: set "
            "hydra.sweeper.storage=sqlite:///optuna.db and hydra.sweeper.study_name=NAME"
        )
    if len(directions) > 1:
        raise UserError(
            f"hydra.sweeper.pruner prunes studies of one objective, not {len(directions)}: give "
            f"hydra.sweeper.direction one value, or set hydra.sweeper.pruner=none"
        )
    return pruner


def _checked_study(name: str | None, storage: Any, now: dict[str, Any]) -> tuple[Any, int]:
    """The stored study (None if there is none yet) and its count of finished trials; raises
    `SettingsChanged` if it was started with other settings than `now`."""
    from optuna.trial import TrialState

    study = _stored_study(name, storage)
    if study is None:
        return None, 0
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is not None and stored != now:
        differences = _differences(
            _by_key(stored["fixed"]), _by_key(now["fixed"]), "{key} not set"
        ) + _differences(
            {k: f"{k}={v}" for k, v in stored["searched"].items()},
            {k: f"{k}={v}" for k, v in now["searched"].items()},
            "{key} not searched",
        )
        raise SettingsChanged(
            f"study {name!r} in {storage} was started with other settings: "
            f"{'; '.join(differences)}; run it with its own settings to continue it, or start "
            f"a new study with hydra.sweeper.study_name=<new name>"
        )
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    return study, done


def _by_key(overrides: list[str]) -> dict[str, str]:
    """Overrides by the key they set (`+a.b` for `+a.b=1`, `~c` for `~c`)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.get_key_element(): text for text, o in zip(overrides, parsed, strict=True)}


def _differences(then: dict[str, str], now: dict[str, str], absent: str) -> list[str]:
    """`X then, Y now` for each key whose setting differs, in key order."""
    return [
        f"{then.get(key, absent.format(key=key))} then, {now.get(key, absent.format(key=key))} now"
        for key in sorted(then.keys() | now.keys())
        if then.get(key) != now.get(key)
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _stored_study(name: str | None, storage: Any) -> Any:
    """The study as stored, or None if there is none yet."""
    import optuna

    if name is None or storage is None:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return None
