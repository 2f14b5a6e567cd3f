"""Hydra's Optuna sweeper, made resumable and kept to one set of settings: `n_trials` counts the
completed trials of the whole study, so rerunning an interrupted search runs only the trials it
still lacks, and a study refuses to go on under other settings than it was started with.

The stock sweeper (hydra-optuna-sweeper) reloads a stored study but then runs `n_trials` more,
and its seeded sampler would propose the first trials' parameters again; nor does it notice that
a study started with `trainer.steps=200` is continued with `trainer.steps=1000`, which would mix
trials that cannot be compared and report the best of either. Hydra only instantiates sweepers
from the `hydra_plugins` package, hence this module's home; it imports Optuna lazily because
Hydra imports every plugin module at each start.
"""

import logging
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig

from runner.errors import UserError, reported

log = logging.getLogger(__name__)

# The study's user attribute that records the settings it was started with.
SETTINGS_ATTR = "runner.settings"


class SettingsChanged(UserError):
    """A stored study continued with other settings than it was started with."""


class ResumableOptunaSweeper(OptunaSweeper):
    @classmethod
    def check_before_sweep(cls, config: DictConfig) -> bool:
        """Whether the sweep has trials to run; raises `SettingsChanged` if the stored study was
        started with other settings. `runner.nested_runs.NestedRuns` asks before it opens the
        sweep's MLflow parent run, which Hydra has its callbacks do before it builds the sweeper."""
        sweeper = config.hydra.sweeper
        storage = sweeper.storage
        if isinstance(storage, DictConfig):
            storage = instantiate(storage)
        _, done = _checked_study(sweeper.study_name, storage, settings(config))
        return done < sweeper.n_trials

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        search = self.sweeper
        now = settings(search.config)
        # Refused here only with NestedRuns, which checks first, switched off.
        with reported("runner"):
            study, done = _checked_study(search.study_name, search.storage, now)
        if study is None and search.study_name is not None and search.storage is not None:
            study = optuna.create_study(
                study_name=search.study_name,
                storage=search.storage,
                directions=search._get_directions(),
            )
        if study is not None and SETTINGS_ATTR not in study.user_attrs:
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
                _count(done, "completed trial"),
            )
            return None
        if study is not None and study.trials:
            interrupted = [t.number for t in study.trials if t.state == TrialState.RUNNING]
            for number in interrupted:  # their process died: they will never report
                study.tell(number, state=TrialState.FAIL)
            search.n_trials = wanted - done
            # Fresh randomness, so the resumed search does not repeat the first proposals.
            if hasattr(search.sampler, "reseed_rng"):
                search.sampler.reseed_rng()
            log.info(
                "Resuming study %r: %d of %d trials completed, %d interrupted (marked failed); "
                "running %d more",
                search.study_name,
                done,
                wanted,
                len(interrupted),
                search.n_trials,
            )
        return super().sweep(arguments)


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


def _checked_study(name: str | None, storage: Any, now: dict[str, Any]) -> tuple[Any, int]:
    """The stored study (None if there is none yet) and its count of completed trials; raises
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
