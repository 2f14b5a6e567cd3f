"""The runner's Optuna sweeper, `hydra/sweeper=runner_optuna`: resumable, kept to one set of
settings and able to prune, on Optuna's public ask-and-tell API and Hydra's sweeper API.

`n_trials` counts the finished (completed or pruned) trials of the whole study, so rerunning an
interrupted search runs only the trials it still lacks, with fresh randomness, lest a seeded
sampler propose the first trials' parameters again. A study refuses to go on under other
settings than it was started with: a study started with `trainer.steps=200` and continued with
`trainer.steps=1000` would mix trials that cannot be compared and report the best of either.
And `pruner` (none, median, hyperband) calls off trials that report hopeless validations
(`runner.sweeps.pruning`): each trial is marked with the job it runs as, which finds it in the
study's storage to report to. The same command started several times at once, on one machine or
several, works on one stored study together (`sharing`): exactly n_trials trials between them,
and one MLflow parent run.

Its settings (`config.py`) are those of Hydra's Optuna sweeper (hydra-optuna-sweeper), which it
replaced: that plugin's 1.3 release declares optuna<3 and speaks Optuna 2's deprecated API.
Hydra only instantiates sweepers from the `hydra_plugins` package, hence this module's home; it
imports Optuna lazily because Hydra imports every plugin module at each start.
"""

import functools
import logging
import math
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from runner.errors import Interrupted, UserError, reported
from runner.sweeps import leases, pruning

from . import sharing

log = logging.getLogger(__name__)

# The study's user attribute that records the settings it was started with.
SETTINGS_ATTR = "runner.settings"
DIRECTIONS = ("minimize", "maximize")
# Seconds an interrupted sweep waits for its running jobs to stop.
INTERRUPT_GRACE_S = 10


class SettingsChanged(UserError):
    """A stored study continued with other settings than it was started with."""


class ResumableOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
        custom_search_space: str | None,
        pruner: Any = "none",
        lease_s: float = 120.0,
    ) -> None:
        self.sampler = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.params = params
        self.custom_search_space = custom_search_space
        self.pruner = pruner
        self.lease_s = lease_s
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.job_idx = 0

    @classmethod
    def check_before_sweep(cls, config: DictConfig) -> bool:
        """Whether the sweep has trials to run; raises `SettingsChanged` if the stored study was
        started with other settings. `runner.sweeps.nested_runs.NestedRuns` asks before it opens the
        sweep's MLflow parent run, which Hydra has its callbacks do before it builds the sweeper."""
        sweeper = config.hydra.sweeper
        storage = sweeper.storage
        directions = _directions(sweeper.direction)
        _checked_pruner(
            sweeper.get("pruner"), config.optimized_metric, storage, sweeper.study_name, directions
        )
        _, done = _checked_study(sweeper.study_name, storage, settings(config), directions)
        return done < sweeper.n_trials

    @classmethod
    def shared_parent(cls, config: DictConfig) -> "sharing.SharedParent | None":
        """How `NestedRuns` shares the sweep's parent run with the other processes searching the
        same stored study (`check_before_sweep` has made it); None for a study in memory."""
        sweeper = config.hydra.sweeper
        if sweeper.storage is None or sweeper.study_name is None:
            return None
        import optuna

        storage = _opened(sweeper.storage)
        study = optuna.load_study(study_name=sweeper.study_name, storage=storage)
        return sharing.SharedParent(study, storage)

    def sweep(self, arguments: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        now = settings(self.config)
        # Refused here only with NestedRuns, which checks first, switched off.
        with reported("runner"):
            directions = _directions(self.direction)
            pruner = _checked_pruner(
                self.pruner,
                self.config.optimized_metric,
                self.storage,
                self.study_name,
                directions,
            )
            stored, done = _checked_study(self.study_name, self.storage, now, directions)
            space, fixed = search_space(self.params, arguments)
            sampler, points = _with_grid(self.sampler, space)
        pruner = pruner or optuna.pruners.NopPruner()
        if stored is None:  # a study kept in memory
            study = optuna.create_study(
                study_name=self.study_name,
                storage=_opened(self.storage),
                sampler=sampler,
                pruner=pruner,
                directions=directions,
            )
            study.set_user_attr(SETTINGS_ATTR, now)
        else:
            study = optuna.load_study(
                study_name=self.study_name,
                storage=_opened(self.storage),
                sampler=sampler,
                pruner=pruner,
            )
        wanted = self.n_trials if points is None else min(self.n_trials, points)
        if done >= wanted:
            log.info(
                "study %r already has its %s; raise hydra.sweeper.n_trials to run more",
                self.study_name,
                _count(done, "finished trial"),
            )
            return
        if study.trials:
            left = [
                t for t in study.trials if t.state == TrialState.RUNNING and leases.abandoned(t)
            ]
            sampler.reseed_rng()  # so that the resumed search does not repeat the first proposals
            log.info(
                "Resuming study %r: %d of %d trials finished, %d left running by workers that are "
                "gone (carried on first); running %d more",
                self.study_name,
                done,
                wanted,
                len(left),
                wanted - done,
            )
        extend = get_method(self.custom_search_space) if self.custom_search_space else None
        trials = Trials(
            study,
            space,
            fixed,
            self.config,
            extend,
            points,
            wanted=wanted,
            storage=_opened(self.storage),
        )
        trials.unsafe = _unsafe_to_share(self.storage, self.study_name)
        self._launch(trials, wanted - done)
        _save_results(study, len(directions), Path(self.config.hydra.sweep.dir))

    def _launch(self, trials: "Trials", count: int) -> None:
        """Run `count` trials in `n_jobs` slots that do not wait for each other: each asks the
        study for its next trial as soon as its own has ended, so that a pruned or short trial
        frees its slot at once and the sampler and pruner hear of each trial as it ends. The
        basic launcher runs jobs in this process (its folder, Hydra's global state), so it gets
        one slot. Stops, with the first failed job's error, once the share of failed trials
        (over at least `n_jobs` of them, as a batch would be counted) is above
        `max_failure_rate`."""
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        window = min(self.n_jobs, count)
        slots = 1 if isinstance(self.launcher, BasicLauncher) else window
        lease = leases.Lease(self.lease_s)
        sweep = _Slots(trials, count, self.job_idx, window, self.max_failure_rate, lease)
        try:
            self._run_slots(sweep, slots)
        finally:
            lease.close()
        self.job_idx = sweep.job_idx
        sweep.raise_if_failed()

    def _run_slots(self, sweep: "_Slots", slots: int) -> None:
        if slots == 1:
            sweep.run(self.launcher)
        else:
            # Daemons, waited for in steps, so that Ctrl-C ends the command, as it did in the
            # launcher's own wait (a join without a timeout would not hear the signal): local
            # jobs, which had the signal too, get a moment to stop and be told; SLURM jobs, which
            # go on, are not waited for.
            threads = [
                threading.Thread(target=sweep.run, args=(self.launcher,), daemon=True)
                for _ in range(slots)
            ]
            for thread in threads:
                thread.start()
            try:
                for thread in threads:
                    while thread.is_alive():
                        thread.join(0.2)
            except BaseException:
                sweep.stop(interrupted=True)
                deadline = time.monotonic() + INTERRUPT_GRACE_S
                for thread in threads:
                    thread.join(max(0.0, deadline - time.monotonic()))
                raise


class _Slots:
    """The budget of trials that a sweep's slots share: each slot asks, launches and tells one
    trial at a time, asking and telling under a lock, so that at most `count` trials are
    launched (exactly, but for those the study's other processes run), with job numbers that are
    unique and increase in the order they are asked."""

    def __init__(
        self,
        trials: "Trials",
        count: int,
        job_idx: int,
        window: int,
        max_failure_rate: float,
        lease: leases.Lease,
    ) -> None:
        self.trials = trials
        self.lease = lease  # on the trials at work
        self.left = count
        self.job_idx = job_idx
        self.window = window
        self.max_failure_rate = max_failure_rate
        self.ended = 0
        self.failed: list[JobReturn] = []
        self.error: Exception | None = None  # the search's own (custom_search_space's, ...)
        self.stopped = False
        self.interrupted = False
        self.lock = threading.Lock()

    def run(self, launcher: Any) -> None:
        """One slot: trials one after the other until the budget is spent or the sweep stops.
        A job the launcher lost (its error raised rather than returned) is a failed trial, which
        the study is told of rather than left running. A job stopped by a signal (Ctrl-C,
        SIGTERM), or cut short as the sweep is interrupted, leaves its trial running, its lease
        given up, for the search's next worker or start to carry on from its checkpoint."""
        while True:
            with self.lock:
                if self.stopped or self.left == 0:
                    return
                job_num = self.job_idx
                try:
                    asked = self.trials.ask(job_num)
                except Exception as error:
                    self.error, self.stopped = error, True
                    return
                if asked is None:  # other processes' trials fill the study
                    return
                trial, overrides = asked
                self.left, self.job_idx = self.left - 1, job_num + 1
            self.lease.hold(trial)
            try:
                [ret] = launcher.launch([overrides], initial_job_idx=job_num)
            except Exception as error:
                ret = JobReturn(status=JobStatus.FAILED, _return_value=error)
            except BaseException:  # the job, run in this process, was stopped by a signal
                self._leave(trial)
                raise
            with self.lock:
                self.ended += 1
                stop = _interruption(ret)
                if ret.status != JobStatus.COMPLETED and (stop or self.interrupted):
                    self._leave(trial)
                    self.error, self.stopped = self.error or stop, True
                    continue
                self.lease.release(trial)
                if self.trials.tell(trial, ret):
                    self.failed.append(ret)
                    if len(self.failed) / max(self.ended, self.window) > self.max_failure_rate:
                        self.stopped = True

    def _leave(self, trial: Any) -> None:
        self.lease.give_up(trial)
        log.info("trial %d stopped: the search's command, run again, carries it on", trial.number)

    def stop(self, interrupted: bool = False) -> None:
        """Let the slots' running trials end, and start no more; `interrupted`, the sweep is
        stopped by a signal, which cuts them short."""
        with self.lock:
            self.stopped = True
            self.interrupted = interrupted

    def raise_if_failed(self) -> None:
        """Raise the search's error, or the first failed job's if failures stopped the sweep."""
        if self.error is not None:
            raise self.error
        if not self.stopped:
            return
        log.error(
            "%d of %d trials failed, more than max_failure_rate=%s allows",
            len(self.failed),
            self.ended,
            self.max_failure_rate,
        )
        self.failed[0].return_value  # noqa: B018 - raises the job's error, with its traceback


def _interruption(ret: JobReturn) -> Interrupted | None:
    """The signal's stop of a job stopped by one (Ctrl-C, SIGTERM, SIGUSR2), which wrote a
    checkpoint to carry its trial on from; None for a job that ended otherwise."""
    error = ret._return_value if ret.status == JobStatus.FAILED else None
    return error if isinstance(error, Interrupted) else None


class Trials:
    """A sweep's side of its study: `ask` gives a trial with the overrides its job runs with,
    `tell` records how the job ended. They hold no state between the calls, so the sweeper may
    ask for a batch and tell it whole, or ask for each trial as a job slot frees."""

    def __init__(
        self,
        study: Any,
        space: dict[str, Any],
        fixed: dict[str, Override],
        config: DictConfig,
        extend: Any,
        points: int | None,
        *,
        wanted: int | None = None,
        storage: Any = None,
    ) -> None:
        self.study = study
        self.storage = storage  # the study's, opened: where take-overs lock
        self.space = space  # the searched keys' distributions
        self.fixed = fixed  # the other overrides, by key
        self.config = config
        self.extend = extend  # hydra.sweeper.custom_search_space
        self.is_grid = points is not None
        self.objectives = len(study.directions)
        # The finished trials the study should hold, whichever process runs them.
        self.wanted = wanted
        # A warning for when another process turns out to share the study, once.
        self.unsafe: str | None = None

    def ask(self, job_num: int) -> tuple[Any, list[str]] | None:
        """A trial, marked as this process's and job `job_num`'s, and its job's overrides: its
        parameters, then the other overrides as given. First a trial whose workers died, taken
        over (`sharing.take_over`) to be carried on from its checkpoint with its own number;
        else a new one, unless the study's finished trials and those at work (of any process)
        already make `wanted`. Two processes that both see one trial missing both ask: the one
        whose trial the storage numbered second marks it failed (`sharing.SURPLUS_ATTR`) and
        runs nothing."""
        from optuna.trial import TrialState

        def claimed(trial: Any) -> None:
            self._claim(trial)
            self._mark(trial, job_num)

        taken = sharing.take_over(self.study, self.storage, claimed)
        if taken is not None:
            log.info("trial %d: its workers are gone; carrying it on", taken.number)
            return taken, self._overrides(taken)
        if self.wanted is not None and sharing.counted(self.study) >= self.wanted:
            return None
        trial = self.study.ask(fixed_distributions=self.space)
        self._claim(trial)
        if self.wanted is not None and sharing.counted(self.study, trial.number) >= self.wanted:
            trial.set_user_attr(sharing.SURPLUS_ATTR, True)
            _tell(self.study, trial, self.is_grid, state=TrialState.FAIL)
            log.info("trial %d not run: other processes' trials fill the study", trial.number)
            return None
        if self.unsafe and sharing.others_at_work(self.study):
            log.warning(self.unsafe)
            self.unsafe = None
        self._mark(trial, job_num)
        for key, override in self.fixed.items():
            trial.set_user_attr(key, override.get_value_element_as_str())
        if self.extend is not None:
            self.extend(self.config, trial)
            clash = sorted(trial.params.keys() & self.fixed.keys())
            if clash:
                self.study.tell(trial, state=TrialState.FAIL)
                raise UserError(
                    f"hydra.sweeper.custom_search_space suggests {', '.join(clash)}, which the "
                    f"command line sets: leave it to one of them"
                )
        return trial, self._overrides(trial)

    def _claim(self, trial: Any) -> None:
        """Mark `trial` as this process's, which the other workers count as at work."""
        trial.set_user_attr(leases.WORKER_ATTR, leases.this_worker())
        trial.set_user_attr(leases.SLURM_ATTR, leases.this_slurm_start())

    def _mark(self, trial: Any, job_num: int) -> None:
        """Mark `trial` as run as job `job_num`, which finds it by that."""
        trial.set_user_attr(pruning.JOB_ATTR, pruning.job_key(self.config.hydra, job_num))

    def _overrides(self, trial: Any) -> list[str]:
        searched = [f"{name}={value}" for name, value in trial.params.items()]
        return searched + [override.input_line for override in self.fixed.values()]

    def tell(self, trial: Any, ret: JobReturn) -> bool:
        """Tell the study how `trial`'s job ended, completed with its values, pruned
        (`runner.sweeps.pruning.Pruned`) or failed; whether it failed."""
        from optuna.trial import TrialState

        try:
            value = ret.return_value
            if isinstance(value, pruning.Pruned):
                log.info("trial %d pruned at step %d", trial.number, value.step)
                _tell(self.study, trial, self.is_grid, state=TrialState.PRUNED)
                return False
            values = [float(v) for v in value] if self.objectives > 1 else [float(value)]
            _tell(self.study, trial, self.is_grid, values=values, state=TrialState.COMPLETE)
        except Exception as error:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            log.warning("Failed experiment: %s", error)
            return True
        return False


def search_space(
    params: DictConfig | None, arguments: list[str]
) -> tuple[dict[str, Any], dict[str, Override]]:
    """The searched keys' Optuna distributions, and the other overrides by key, from
    `hydra.sweeper.params` and then the command line's overrides: a later sweep of a key
    replaces an earlier one, and a key also set to one value is not searched."""
    texts = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(texts):
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = _distribution(override)
        else:
            fixed[key] = override
    return {key: d for key, d in space.items() if key not in fixed}, fixed


def _distribution(override: Override) -> Any:
    """A sweep's Optuna distribution: a choice of `choice(...)` or `shuffle(range(...))`,
    `range(...)`'s steps (its stop included; of integers where all three are), `interval(...)`
    uniform and `tag(log, interval(...))` log-uniform (Hydra's intervals are of floats)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        choices = override.sweep_iterator(transformer=Transformer.encode)
        return CategoricalDistribution(list(choices))
    if override.is_range_sweep():
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    return FloatDistribution(value.start, value.end, log="log" in value.tags)


def _with_grid(sampler: Any, space: dict[str, Any]) -> tuple[Any, int | None]:
    """The sampler to search `space` with, and the number of points of a grid:
    hydra/sweeper/sampler=grid comes as a GridSampler waiting for its grid, each key's
    choices or range steps (its stop left out, as Hydra's range does)."""
    import optuna

    if getattr(sampler, "func", None) is not optuna.samplers.GridSampler:  # not a partial
        return sampler, None
    grid = {}
    for name, distribution in space.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            grid[name] = list(distribution.choices)
            continue
        if distribution.step is None or distribution.log:
            raise UserError(
                f"hydra/sweeper/sampler=grid searches points, not intervals: give {name} as "
                f"choice(...) or range(...)"
            )
        steps = int((distribution.high - distribution.low) // distribution.step)
        grid[name] = [distribution.low + i * distribution.step for i in range(steps)]
    return sampler(grid), math.prod(len(points) for points in grid.values())


def _directions(direction: Any) -> list[str]:
    """hydra.sweeper.direction as Optuna's list, one per objective."""
    directions = [direction] if isinstance(direction, str) else [str(d) for d in direction]
    wrong = [d for d in directions if d not in DIRECTIONS]
    if wrong or not directions:
        raise UserError(
            f"hydra.sweeper.direction={','.join(wrong)} is not minimize or maximize: give one, "
            f"or a list of them, one per value the jobs return"
        )
    return directions


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
    optimization_results.yaml as Hydra's Optuna sweeper wrote it."""
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


def _checked_study(
    name: str | None, storage: Any, now: dict[str, Any], directions: list[str] | None = None
) -> tuple[Any, int]:
    """The stored study (None if there is none yet) and its count of finished trials; raises
    `SettingsChanged` if it was started with other settings than `now`, and refuses a study whose
    trials hold Optuna 2's distribution classes (LogUniformDistribution, ...), as
    hydra-optuna-sweeper stored them: Optuna's storages refuse to mix them with today's. Given
    `directions`, a study not stored yet is made, with `now` as its settings, so that of two
    processes starting at once with other settings, the second is refused."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState

    if directions is None or name is None or storage is None:
        study = _stored_study(name, _opened(storage))
        stored = None if study is None else study.user_attrs.get(SETTINGS_ATTR)
    else:
        opened = _opened(storage)
        study, stored = sharing.joined_study(name, opened, directions, SETTINGS_ATTR, now)
    if study is None:
        return None, 0
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
    with warnings.catch_warnings():  # Optuna's note on each old class, which the error says
        warnings.simplefilter("ignore", FutureWarning)
        trials = study.trials
    current = (CategoricalDistribution, FloatDistribution, IntDistribution)
    old = {key for t in trials for key, d in t.distributions.items() if type(d) not in current}
    if old:
        raise UserError(
            f"study {name!r} in {storage} was started by a sweeper on hydra-optuna-sweeper, which "
            f"stored {', '.join(sorted(old))} in a form Optuna no longer adds trials to: start a "
            f"new study with hydra.sweeper.study_name=<new name>"
        )
    if stored is None and directions is not None:
        if trials:
            log.warning(
                "study %r has no record of the settings its trials ran with (it predates the "
                "record): recording this command's",
                name,
            )
        study.set_user_attr(SETTINGS_ATTR, now)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
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


def _opened(spec: Any) -> Any:
    """The storage `hydra.sweeper.storage` names (`runner.sweeps.pruning.open_storage`), one
    object a spec in this process, so that its slots and checks share one journal reader."""
    return _opened_text(spec) if isinstance(spec, str) else pruning.open_storage(spec)


@functools.cache
def _opened_text(spec: str) -> Any:
    return pruning.open_storage(spec)


def _unsafe_to_share(spec: Any, name: str | None) -> str | None:
    """A warning for a storage that processes cannot share safely, if it is one, to give when
    another process turns out to share it: a SQLite file. On a network file system, where
    SQLite's locks fail, it is given at once."""
    path = sharing.sqlite_file(spec)
    if path is None:
        return None
    network = sharing.network_file_system(path)
    if network:
        log.warning(
            "study %r is in the SQLite file %s on a network file system (%s), whose locks SQLite "
            "cannot trust: %s",
            name,
            path,
            network,
            sharing.SHARE_INSTEAD,
        )
        return None
    return (
        f"study {name!r} is in the SQLite file {path}, which another search process uses too: "
        f"SQLite makes them wait for each other and may fail with 'database is locked'; "
        f"{sharing.SHARE_INSTEAD}"
    )


def _stored_study(name: str | None, storage: Any) -> Any:
    """The study as stored, or None if there is none yet."""
    import optuna

    if name is None or storage is None:
        return None
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # not created yet
        return None
