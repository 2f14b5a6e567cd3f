"""The heavy half of the `runner` command's composition root, imported once the backend is
chosen (`runner.cli.train.train`): it builds the data, the model and the callbacks from the
checked `Settings`, each layer given the part it needs, then trains and records the run."""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runner import data
from runner.backends import devices
from runner.backends.base import Backend
from runner.config.settings import Settings
from runner.data import Splits
from runner.models import classifier
from runner.sweeps import preemption
from runner.sweeps.jobs import SweepJob
from runner.tracking import runs
from runner.training import checkpoints, fitting, modeling, optim
from runner.training.callbacks import ReportToTrial
from runner.training.checkpoints import Checkpoint
from runner.training.fitting import (
    check_even_batches,
    check_resumable,
    configured_callbacks,
    finishable,
    fit,
    intervals,
)
from runner.training.stopping import CarryOn, StopReason, Stops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """All a run needs before its MLflow run starts: a config that cannot train fails before."""

    backend: Backend
    found: devices.Devices
    plan: devices.Plan
    splits: Splits
    callbacks: dict[str, Any]
    run_settings: dict[str, Any]
    resumed: Checkpoint | None
    model: Any


def prepare(
    settings: Settings, cfg: DictConfig, *, backend: Backend, trial: Any, stops: Stops
) -> Prepared:
    """Devices, data, callbacks, the checkpoint to resume from and the compiled model."""
    device, trainer = settings.device, settings.trainer
    found = backend.detect(device.cpu_devices)  # before anything runs on them
    callbacks = configured_callbacks(settings.options.callbacks)
    plan = devices.plan(device, found, intervals(trainer, callbacks), str(settings.backend))
    if trial is not None:
        callbacks["optuna_trial"] = ReportToTrial(trial, settings.optimized_metric, stops)
    log.info("devices: %s; %s", found.describe(), plan.describe())
    backend.start_clean(settings.seed, device.deterministic, plan)
    splits = data.load(settings.options.data, settings.data)
    folder = Path(trainer.checkpoint_dir)
    run_settings = checkpoints.settings(OmegaConf.to_container(cfg, resolve=True), splits.digests)
    mode = preemption.resume_as(trainer.resume, checkpoints.latest(folder) is not None)
    resumed = (
        checkpoints.resume_point(
            folder,
            steps=trainer.steps,
            mode=mode,
            run_settings=run_settings,
            finish=preemption.requeued(),
        )
        if mode != "false"
        else None
    )
    check_resumable(resumed.step if resumed else 0, plan)
    check_even_batches(splits, settings.data.eval_batch_size, plan)
    options = settings.options
    with backend.build_scope(plan):
        if resumed:
            model = resumed.load_model(options.model["_target_"])
            optimizer = model.optimizer
        else:
            model = modeling.build(options.model, splits.input_shape, splits.num_classes)
            optimizer = optim.build(options.optimizer, settings.optimizer, trainer.steps)
        modeling.compiled(model, optimizer, options.loss, plan)
        modeling.check_loss(model, options.loss["_target_"], splits.train.x, splits.train.y)
    return Prepared(backend, found, plan, splits, callbacks, run_settings, resumed, model)


def run(
    prepared: Prepared,
    settings: Settings,
    cfg: DictConfig,
    *,
    tags: dict[str, str] | None,
    job: SweepJob | None,
    stops: Stops,
    carry_on: CarryOn,
) -> tuple[dict[str, float], str | None]:
    """Train, test and record the run; its final metrics and, unless its pruner ended it, its
    MLflow run's id."""
    p, trainer = prepared, settings.trainer
    resumed, splits, model = p.resumed, p.splits, p.model
    # trainer.resume=extend with more steps: a new run, as MLflow's params cannot change.
    extends = resumed is not None and resumed.settings.get("trainer.steps") != trainer.steps
    run_tags = {**p.found.tags(), **p.plan.tags(), **(tags or {})}
    folder = Path(trainer.checkpoint_dir)
    with (
        stops.installed(),
        runs.mlflow_run(
            cfg,
            splits,
            run_tags,
            resumed and resumed.run_id,
            job,
            extends,
            resumed.unrecorded if resumed else None,
            stops=stops,
            backend=p.backend,
        ) as recorder,
        finishable(folder, trainer.steps, recorder.run_id, carry_on),
    ):
        reached = fit(
            model,
            splits,
            trainer=trainer,
            data=settings.data,
            seed=settings.seed,
            logits=settings.model.output == classifier.LOGITS,
            recorder=recorder,
            plan=p.plan,
            run_settings=p.run_settings,
            resumed=resumed,
            extra=p.callbacks,
            backend=p.backend,
            stops=stops,
            carry_on=carry_on,
        )
        if stops.reason is StopReason.PRUNED:
            recorder.prune(reached)
            return recorder.final_metrics(), None
        _finish(recorder, prepared, settings, reached)
        return recorder.final_metrics(), recorder.run_id


def _finish(recorder: Any, prepared: Prepared, settings: Settings, reached: int) -> None:
    """Test the trained model, then record its plots and the model as the settings say."""
    model, test = prepared.model, prepared.splits.test
    if reached < settings.trainer.steps:
        recorder.set_tag("stopped_early_at", str(reached))
    outputs, loss = fitting.evaluate_outputs(
        model, test, settings.data.eval_batch_size, prepared.backend
    )
    recorder.log_test(test, outputs, loss, reached)
    if settings.tracking.plots:
        recorder.log_plots(test, outputs)
    if settings.trainer.log_model:
        target = settings.options.model["_target_"]
        output = classifier.output(settings.options.model)
        recorder.log_model(model, output, target, prepared.backend.requirements())
