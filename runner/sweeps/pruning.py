"""An Optuna search's trial, the job's side: it reports `optimized_metric` at each validation
and stops when the study's pruner says it is hopeless; it records where it trains, so that a
worker that takes it over (its workers having died) carries it on there.

A Hydra sweeper hands each job only its overrides, not the Optuna trial they came from. The
runner's sweeper (`hydra_plugins.runner_optuna`) marks each trial it asks with the job it
launches it as; the job finds that trial in the study's storage, which every launcher's jobs
reach, and reports to it there. A pruned job returns `Pruned`, and the sweeper tells the study.
"""

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from runner.errors import UserError, one_line
from runner.sweeps import jobs, leases

log = logging.getLogger(__name__)

# The trial's user attribute naming the job that runs it: `job_key`.
JOB_ATTR = "runner.job"
# The trial's user attribute recording where its job trains: `Attempt`.
ATTEMPT_ATTR = "runner.attempt"
# hydra.sweeper.storage's form for Optuna's journal file, which several processes (on a shared
# file system, several machines) can share: journal:PATH.
JOURNAL = "journal:"
# hydra.sweeper.pruner's names, and what they build (Optuna's defaults).
PRUNERS = {"median": "optuna.pruners.MedianPruner", "hyperband": "optuna.pruners.HyperbandPruner"}


@dataclass(frozen=True)
class Pruned:
    """What a pruned trial's job returns to the sweeper: the step it stopped at (its value
    there is the last it reported)."""

    step: int


@dataclass(frozen=True)
class Attempt:
    """Where a trial's job trained: its MLflow run, its checkpoints' folder and its process
    (`host:pid`). A job that takes the trial over carries the training on from there, into
    that run."""

    run_id: str
    checkpoint_dir: str
    worker: str = field(default_factory=leases.this_worker)


def build_pruner(spec: Any) -> Any:
    """The Optuna pruner `hydra.sweeper.pruner` names (none, median, hyperband) or builds (a
    `_target_` node, which Hydra may have built already); None for none."""
    if spec is None or isinstance(spec, str):
        if spec in (None, "none"):
            return None
        if spec not in PRUNERS:
            raise UserError(
                f"hydra.sweeper.pruner={spec} is not none, median or hyperband; an Optuna pruner "
                f"of your own goes in as hydra.sweeper.pruner={{_target_:optuna.pruners.NAME,...}}"
            )
        return get_class(PRUNERS[spec])()
    if isinstance(spec, DictConfig | dict):
        try:
            return instantiate(spec)
        except Exception as error:
            raise UserError(f"hydra.sweeper.pruner: cannot build it: {one_line(error)}") from None
    return spec


def open_storage(spec: Any) -> Any:
    """The Optuna storage `hydra.sweeper.storage` names: `journal:PATH`, a journal file; a
    `_target_` node, built; an RDB URL (sqlite:///..., postgresql://...) or None, as it is."""
    if isinstance(spec, DictConfig):
        return instantiate(spec)
    if isinstance(spec, str) and spec.startswith(JOURNAL):
        import optuna

        backend = optuna.storages.journal.JournalFileBackend(spec.removeprefix(JOURNAL))
        return optuna.storages.JournalStorage(backend)
    return spec


def job_key(hydra: Any, job_num: int) -> str:
    """The job a trial runs as: its sweep's folder (from where the search was started, as a job
    may run elsewhere) and its number there; `hydra` is the `hydra` config node."""
    return f"{Path(hydra.runtime.cwd) / hydra.sweep.dir}#{job_num}"


class Trial:
    """This job's Optuna trial, which hears the validations and may call training off. The job
    holds a lease on it (`leases.Lease` of `lease_s`) until `close`; `earlier` is where a job
    before it trained, if one did, which `reported` the validations at these steps."""

    def __init__(self, trial: Any, lease_s: float, reported: frozenset[int] = frozenset()):
        self.trial = trial
        self.number: int = trial.number
        self.pruned_at: int | None = None
        self.reported = reported
        attempt = trial.user_attrs.get(ATTEMPT_ATTR)
        self.earlier = Attempt(**attempt) if attempt else None
        trial.set_user_attr(leases.JOB_WORKER_ATTR, leases.this_worker())
        self.lease = leases.Lease(lease_s)
        self.lease.hold(trial)

    def record(self, attempt: Attempt) -> None:
        """Record where this job trains, for a job that may have to carry it on."""
        if attempt != self.earlier:
            self.trial.set_user_attr(ATTEMPT_ATTR, asdict(attempt))

    def ended(self, ending: Any) -> dict[str, float]:
        """The final metrics of this trial's earlier job, whose run (`ending`, a
        `runner.tracking.runs.Ending`) ended before the study was told: its result stands."""
        run_id = self.earlier.run_id if self.earlier else None
        log.info("trial %d: its run %s had ended; its result stands", self.number, run_id)
        self.pruned_at = ending.pruned_at
        return ending.metrics

    def close(self) -> None:
        """Stop renewing the lease and unmark this process, which may outlive the job (a joblib
        worker) but is no longer at work on the trial."""
        import optuna

        self.lease.close()
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.trial.set_user_attr(leases.JOB_WORKER_ATTR, None)

    def report(self, value: float, step: int) -> bool:
        """Record `value` at `step`; whether the pruner calls the trial off there (not at a step
        an earlier job of the trial reported, and so carried on from)."""
        if step in self.reported:
            return False
        self.trial.report(value, step)
        if not self.trial.should_prune():
            return False
        log.info("trial %d pruned at step %d (%.4f there)", self.number, step, value)
        self.pruned_at = step
        return True

    def result(self, value: float) -> "float | Pruned":
        """What the job returns to the sweeper, `value` being its optimized_metric."""
        return value if self.pruned_at is None else Pruned(self.pruned_at)


def this_jobs_trial() -> Trial | None:
    """The trial this job runs, if it is a job of the runner's Optuna sweeper on a stored study
    (without a pruner, it reports all the same: Optuna's plots show the curves)."""
    hydra = jobs.multirun_settings()
    if hydra is None:
        return None
    sweeper = hydra.sweeper
    runner_optuna = str(sweeper.get("_target_", "")).endswith(".ResumableOptunaSweeper")
    if not runner_optuna or sweeper.get("storage") is None:
        return None
    import optuna  # which only a search's jobs need

    study = optuna.load_study(
        study_name=sweeper.study_name,
        storage=open_storage(sweeper.storage),
        pruner=build_pruner(sweeper.get("pruner")) or optuna.pruners.NopPruner(),
    )
    key = job_key(hydra, hydra.job.num)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(JOB_ATTR) == key:
            reported = frozenset(trial.intermediate_values)
            return Trial(optuna.Trial(study, trial._trial_id), sweeper.lease_s, reported)
    raise UserError(
        f"no running trial of study {sweeper.study_name!r} is this job's ({key}): run the "
        f"search itself (runner -m ...), not one of its jobs alone"
    )
