"""The `runner` command: compose the Hydra config, build data, model and optimizer, train, record.

Only Hydra and OmegaConf are imported at module level, so `runner --cfg job` answers without
loading TensorFlow or MLflow.
"""

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from runner.config.outputs import check_given_dirs, register_resolvers
from runner.config.schema import CONF_DIR, check_config, register_configs, resume_mode
from runner.errors import Interrupted, UserError, reported, run_hydra_app
from runner.masking import install_masking
from runner.sweeps import jobs, preemption, pruning
from runner.targets import importable_from_cwd, label
from runner.training.stopping import StopReason, Stops

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
    controller; called from Python, `train` has one of its own."""
    check_config(cfg)
    stops = Stops() if stops is None else stops
    from runner.data import absolute_paths
    from runner.tracking import provenance, registry, runs, store

    absolute_paths(cfg.data)  # recorded so, for runner-eval and runner-repro from elsewhere

    # A sweep's job records into its parent's experiment.
    identity = jobs.run_identity(cfg.tracking.experiment_name, label(cfg.model))
    # Before minutes of training: a store that cannot record is told at once.
    store.open_store(cfg.tracking.uri, identity.experiment_name)
    from runner import backends

    name = str(cfg.get("backend", "tensorflow"))  # a run logged before backends: TensorFlow
    backend = backends.select(name, cfg.device)  # before anything imports Keras
    from runner import data
    from runner.backends import devices
    from runner.models import classifier
    from runner.training import checkpoints, modeling
    from runner.training.callbacks import ReportToTrial
    from runner.training.fitting import (
        check_even_batches,
        check_resumable,
        configured_callbacks,
        evaluate_outputs,
        finishable,
        fit,
        intervals,
    )

    found = backend.detect(cfg.device.cpu_devices)  # before anything runs on them
    callbacks = configured_callbacks(cfg)
    plan = devices.plan(cfg.device, found, intervals(cfg.trainer, callbacks), name)
    if trial is not None:
        callbacks["optuna_trial"] = ReportToTrial(trial, cfg.optimized_metric, stops)
    log.info("devices: %s; %s", found.describe(), plan.describe())
    backend.start_clean(cfg.seed, cfg.device.deterministic, plan)
    splits = data.load(cfg.data)
    mode = preemption.resume_as(
        resume_mode(cfg.trainer), checkpoints.latest(Path(cfg.trainer.checkpoint_dir)) is not None
    )
    resumed = (
        checkpoints.resume_point(cfg, mode, splits.digests, finish=preemption.requeued())
        if mode != "false"
        else None
    )
    check_resumable(resumed.step if resumed else 0, plan)
    check_even_batches(splits, cfg.data.eval_batch_size, plan)
    # trainer.resume=extend with more steps: a new run, as MLflow's params cannot change.
    extends = resumed is not None and resumed.settings.get("trainer.steps") != cfg.trainer.steps
    with backend.build_scope(plan):
        model = (
            resumed.load_model(cfg.model._target_)
            if resumed
            else modeling.build(cfg.model, splits.input_shape, splits.num_classes)
        )
        modeling.compiled(model, cfg, plan, resumed=resumed is not None)
        modeling.check_loss(model, cfg, splits.train.x, splits.train.y)
    run_tags = {**found.tags(), **plan.tags(), **(tags or {})}
    config = OmegaConf.to_container(cfg, resolve=True)
    origin = provenance.Provenance(config, splits, backend, jobs.hydra_record_dir())
    carried = (
        runs.Resumed(resumed.run_id, resumed.unrecorded, extends, cfg.trainer.eval_every)
        if resumed
        else None
    )
    with (
        stops.installed(),
        runs.mlflow_run(
            cfg.tracking, identity, origin, stops=stops, tags=run_tags, resumed=carried
        ) as recorder,
        finishable(cfg.trainer, recorder.run_id),
    ):
        reached = fit(
            model, splits, cfg, recorder, plan, resumed, callbacks, backend=backend, stops=stops
        )
        if stops.reason is StopReason.PRUNED:
            recorder.prune(reached)
            return recorder.final_metrics()
        if reached < cfg.trainer.steps:
            recorder.set_tag("stopped_early_at", str(reached))
        outputs, loss = evaluate_outputs(model, splits.test, cfg.data.eval_batch_size, backend)
        recorder.log_test(splits.test, outputs, loss, reached)
        if cfg.tracking.plots:
            recorder.log_plots(splits.test, outputs)
        if cfg.trainer.log_model:
            output = classifier.output(cfg.model)
            recorder.log_model(model, output, cfg.model._target_, backend.requirements())
        final = recorder.final_metrics()
    registration = registry.registration(cfg.trainer, cfg.optimized_metric)
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


def objective(cfg: DictConfig, stops: Stops | None = None) -> float | pruning.Pruned:
    """Train, then give `optimized_metric`'s final value: what a Hydra sweeper optimises. A
    trial of a pruned Optuna search gives `Pruned` if its pruner called it off."""
    trial = pruning.this_jobs_trial()
    tags = {"optuna.trial": str(trial.number)} if trial else None
    value = train(cfg, tags, trial, stops)[cfg.optimized_metric]
    return trial.result(value) if trial else value


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
def run_hydra(cfg: DictConfig) -> float:
    jobs.mask_hydra_record()
    with reported("runner"), Stops().installed() as stops:
        try:
            return objective(cfg, stops)
        except UserError as error:
            if jobs.in_multirun() and not isinstance(error, Interrupted):
                log.error("runner: error: %s", error)
                raise JobFailed(str(error)) from None
            raise


if __name__ == "__main__":
    main()
