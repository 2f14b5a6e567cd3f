"""The `runner` command: compose the Hydra config, build data, model and optimizer, train, record.

Only Hydra and OmegaConf are imported at module level, so `runner --cfg job` answers without
loading TensorFlow or MLflow.
"""

import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from runner.config.outputs import check_given_dirs, register_resolvers
from runner.config.schema import CONF_DIR, register_configs
from runner.config.settings import check_config
from runner.errors import Interrupted, UserError, reported, run_hydra_app
from runner.masking import install_masking
from runner.sweeps import jobs, preemption, pruning
from runner.targets import importable_from_cwd, label
from runner.training.stopping import CarryOn, StopReason, Stops

register_configs()
register_resolvers()
install_masking()  # here, as each sweep job's process imports this module too
log = logging.getLogger(__name__)


def train(
    cfg: DictConfig,
    tags: dict[str, str] | None = None,
    trial: pruning.Trial | None = None,
    stops: Stops | None = None,
) -> dict[str, float]:
    """Train one model as `cfg` says and record it in MLflow, with `tags` added to the run;
    returns the final metrics. Everything is built from the config's `_target_`s before the
    MLflow run starts, so a config that cannot train leaves no run behind. An Optuna `trial`
    hears each validation, and a trial its pruner calls off ends its run KILLED, untested. A
    run resumed once its training is complete (it was stopped while it tested) trains nothing:
    it is tested, its model logged, and its run ended. `stops` is the command's stop
    controller; called from Python, `train` has one of its own. This is the composition root:
    the config is checked once, and each layer gets the settings it needs."""
    settings = check_config(cfg)  # also makes the data's paths absolute, as they are recorded
    stops = Stops() if stops is None else stops
    from runner.tracking import provenance, registry, runs, store

    # A sweep's job records into its parent's experiment.
    identity = jobs.run_identity(settings.tracking.experiment_name, label(settings.options.model))
    # Before minutes of training: a store that cannot record is told at once.
    store.open_store(settings.tracking.uri, identity.experiment_name)
    from runner import backends

    backend = backends.select(str(settings.backend), settings.device)  # before Keras loads
    from runner.cli import composition
    from runner.training.fitting import finishable

    carry_on = CarryOn(_how_to_resume, preemption.will_requeue())
    earlier = trial.earlier if trial is not None else None
    if earlier is not None:
        ending = runs.recorded_ending(earlier.run_id)
        if ending is not None:
            return trial.ended(ending)
        settings = composition.carried_on(settings, earlier)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    prepared = composition.prepare(settings, resolved, backend=backend, trial=trial, stops=stops)
    steps = settings.trainer.steps
    origin = provenance.Provenance(resolved, prepared.splits, backend, jobs.hydra_record_dir())
    with (
        stops.installed(),
        runs.mlflow_run(
            settings.tracking,
            identity,
            origin,
            stops=stops,
            tags={**prepared.tags(), **(tags or {})},
            resumed=prepared.reopens(settings.trainer, earlier),
        ) as recorder,
        finishable(Path(settings.trainer.checkpoint_dir), steps, recorder.run_id, carry_on),
    ):
        if trial is not None:
            trial.record(pruning.Attempt(recorder.run_id, settings.trainer.checkpoint_dir))
        final = composition.train(prepared, settings, recorder, stops=stops, carry_on=carry_on)
    if stops.reason is StopReason.PRUNED:
        return final
    registration = registry.registration(settings.trainer, settings.optimized_metric)
    if registration and identity.parent_run_id is None:  # a sweep registers its best, at its end
        registry.register(recorder.run_id, registration)
    return final


def compose(overrides: Sequence[str] = (), with_hydra: bool = False) -> DictConfig:
    """The config `runner OVERRIDES` would train with, for calling `train` from Python; with
    `with_hydra`, Hydra's own settings (launcher, sweeper, callbacks) under `hydra` too."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(
            config_name="config", overrides=list(overrides), return_hydra_config=with_hydra
        )
    if _HYDRA_OUTPUT_DIR in str(OmegaConf.to_container(cfg.trainer)["checkpoint_dir"]):
        # No Hydra run, so no run folder: checkpoints/ in the working directory.
        cfg.trainer.checkpoint_dir = str(Path("checkpoints").absolute())
    return cfg


_HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"


def _how_to_resume(checkpoints: Path, verb: str = "carry on") -> str:
    """The command that carries this run on (or, as `verb` says, finishes it): the same one,
    pointed at this run's folder when its checkpoints are there (the default
    trainer.checkpoint_dir). A sweep's job is carried on alone, with its own overrides; an
    Optuna trial is not: the search's command carries it on, from this checkpoint."""
    if not HydraConfig.initialized():
        return f"{verb} with trainer.resume=true"
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    in_run = checkpoints.resolve().is_relative_to(output_dir.resolve())
    folder = f" hydra.run.dir={shlex.quote(str(output_dir))}" if in_run else ""
    if not jobs.in_multirun():
        return f"{verb} with the same command plus trainer.resume=true{folder}"
    if "Optuna" in str(hydra_cfg.sweeper.get("_target_", "")):
        return "run the search's command again: it carries this trial on from here first"
    overrides = " ".join(shlex.quote(o) for o in hydra_cfg.overrides.task)
    return f"{verb} with this job alone: runner {overrides} trainer.resume=true{folder}"


class JobFailed(CompactHydraException):
    """A sweep's job hit a `UserError`: Hydra records the job as failed, goes on with the others
    (or the sweeper counts a failed trial), and prints this one line at the end."""


def main() -> None:
    """The `runner` command."""
    with reported("runner"):
        check_given_dirs(sys.argv[1:])
    importable_from_cwd()
    run_hydra_app("runner", run_hydra, explain=_lost_job)


def _lost_job(error: BaseException) -> str | None:
    """A sweep's SLURM job that ended without its result, in one line: its id, state and log."""
    if "submitit" not in sys.modules:
        return None
    from runner.sweeps.slurm import job_failure

    return job_failure(error)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def run_hydra(cfg: DictConfig) -> float | pruning.Pruned:
    """Train, then give `optimized_metric`'s final value: what a Hydra sweeper optimises. A
    trial of a pruned Optuna search gives `Pruned` if its pruner called it off."""
    jobs.mask_hydra_record()
    with reported("runner"), Stops().installed() as stops:
        try:
            trial = pruning.this_jobs_trial()
            if trial is None:
                return train(cfg, stops=stops)[cfg.optimized_metric]
            try:
                tags = {"optuna.trial": str(trial.number)}
                return trial.result(train(cfg, tags, trial, stops)[cfg.optimized_metric])
            finally:
                trial.close()
        except UserError as error:
            if jobs.in_multirun() and not isinstance(error, Interrupted):
                log.error("runner: error: %s", error)
                raise JobFailed(str(error)) from None
            raise


if __name__ == "__main__":
    main()
